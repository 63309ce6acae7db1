"""PSNR and SSIM, against closed forms."""

import math

import numpy as np
import pytest

from ditserve.cache.quality import psnr, ssim


def test_psnr_closed_form():
    a = np.zeros((16, 16, 3), dtype=np.uint8)
    b = a.copy()
    b[0, 0, 0] = 255  # MSE = 255^2 / 768
    assert math.isclose(psnr(a, b), 10 * math.log10(768), rel_tol=1e-12)
    assert psnr(a, a) == math.inf
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(a, b[:8])


def test_ssim_of_constant_images_is_the_luminance_term():
    # Zero variance everywhere: SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1) (the structure term is C2 / C2).
    m1, m2 = 100.0, 140.0
    c1 = (0.01 * 255) ** 2
    a = np.full((20, 20), m1)
    b = np.full((20, 20), m2)
    assert math.isclose(ssim(a, b), (2 * m1 * m2 + c1) / (m1**2 + m2**2 + c1), rel_tol=1e-9)


def test_ssim_properties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert math.isclose(ssim(a, a), 1.0, rel_tol=1e-12)
    noisy = [np.clip(a + rng.normal(0, s, a.shape), 0, 255) for s in (5, 20, 60)]
    scores = [ssim(a, n) for n in noisy]
    assert scores[0] > scores[1] > scores[2] and scores[0] < 1
    assert math.isclose(ssim(a, noisy[1]), ssim(noisy[1], a), rel_tol=1e-12)
    assert ssim(a, 255 - a.astype(np.float64)) < 0  # inverted structure
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(a[:8, :8], a[:8, :8])
