"""Image similarity for judging a lossy cache against the uncached images: PSNR and SSIM.

Both take uint8-range images (PIL images or arrays of shape (H, W, C) / (H, W)) and compare them in float64.
SSIM is Wang et al. (2004) with the usual constants: an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03,
data range 255, population (co)variances, averaged over the valid window positions and the channels, as
scikit-image's `structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
data_range=255)` computes it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _array(img) -> np.ndarray:
    a = np.asarray(img, dtype=np.float64)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {a.shape}")
    return a


def psnr(a, b, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical images)."""
    x, y = _array(a), _array(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(data_range**2 / mse)


def ssim(a, b, data_range: float = 255.0, window: int = 11, sigma: float = 1.5) -> float:
    """Mean structural similarity in [-1, 1] (1 for identical images). Images need sides >= `window`."""
    x, y = _array(a), _array(b)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    if min(x.shape[:2]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {x.shape[:2]}")
    g = torch.exp(-(torch.arange(window, dtype=torch.float64) - (window - 1) / 2) ** 2 / (2 * sigma**2))
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :])[None, None]  # (1, 1, k, k)
    # (C, 1, H, W): channels as a batch, each filtered alone.
    tx = torch.from_numpy(x).permute(2, 0, 1)[:, None]
    ty = torch.from_numpy(y).permute(2, 0, 1)[:, None]

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel)  # valid positions only

    mx, my = blur(tx), blur(ty)
    vx = blur(tx * tx) - mx * mx
    vy = blur(ty * ty) - my * my
    cxy = blur(tx * ty) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())
