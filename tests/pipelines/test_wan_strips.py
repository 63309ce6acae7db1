"""Wan's decode in strips of rows (ditserve.pipelines.wan.decode_strips, `--vae-streaming`): the frames of the
whole `AutoencoderKLWan` decode (Wan 2.1 and Wan 2.2 VAEs, strips that do not divide the rows, batches), a
fraction of its activation memory at the real 480x832 and 720x1280 (live op outputs traced on meta tensors), and
the pipeline's use of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan

import ditserve.pipelines.wan as wan
from ditserve.pipelines.wan import decode_chunks, decode_strips
from ditserve.testing import LiveBytes

MiB = 2**20


def _wan21(**kw) -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                            latents_std=[1.0] * 4, **kw).eval()


def _wan22() -> AutoencoderKLWan:
    """Wan2.2's VAE (TI2V-5B): residual up blocks with a duplicating shortcut, 2x2 pixel patches as channels."""
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=16, decoder_base_dim=24, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                            temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                            out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 8,
                            latents_std=[1.0] * 8).eval()


def _assemble(vae, z, **kw) -> tuple[torch.Tensor, int]:
    """decode_strips' pieces put together, and how many pieces there were."""
    pieces = list(decode_strips(vae, z, **kw))
    frames = sum(p.shape[2] for _, row, p in pieces if row == 0)
    rows = sum(p.shape[3] for start, _, p in pieces if start == 0)
    b, c, _, _, w = pieces[0][2].shape
    out = torch.full((b, c, frames, rows, w), float("nan"))
    for start, row, p in pieces:
        out[:, :, start:start + p.shape[2], row:row + p.shape[3]] = p
    return out, len(pieces)


@pytest.mark.parametrize("make, z_shape", [(_wan21, (1, 4, 3, 16, 6)), (_wan21, (2, 4, 2, 13, 5)),
                                           (_wan22, (2, 8, 3, 12, 5))])
@pytest.mark.parametrize("strip_bytes", [1, 3000, 10**12])
def test_strips_are_the_whole_decode(make, z_shape, strip_bytes):
    """Every strip count, down to strips a halo tall (and rows they do not divide), gives the whole decode's
    video: fp32, differences of summation order only."""
    vae = make()
    z = torch.randn(z_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = vae.decode(z, return_dict=False)[0]  # clamped
        ours, n = _assemble(vae, z, strip_bytes=strip_bytes)
    assert ours.shape == whole.shape
    assert n % z.shape[2] == 0 and (n > z.shape[2]) == (strip_bytes < 10**12)
    assert (ours.clamp(-1, 1) - whole).abs().max() <= 1e-5 * whole.abs().max()


def test_without_halo_the_strip_edges_differ(monkeypatch):
    """The halo rows are what makes it exact: with none, the rows next to a strip's edge come out wrong."""
    vae, z = _wan21(), torch.randn(1, 4, 2, 16, 6, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(wan, "_halo_rows", lambda module, up: 0)
    with torch.no_grad():
        whole = vae.decode(z, return_dict=False)[0]
        ours, n = _assemble(vae, z, strip_bytes=3000)
    assert n > z.shape[2]
    assert (ours.clamp(-1, 1) - whole).abs().max() > 1e-2 * whole.abs().max()


def _peak_gib(fn) -> float:
    with torch.no_grad(), LiveBytes() as tracker:
        for piece in fn():
            del piece
    return tracker.peak / 2**30


@pytest.mark.parametrize("height, width, most", [(480, 832, 0.45), (720, 1280, 0.35)])
def test_memory_of_the_real_vae_in_bf16_meta(height, width, most):
    """The true size without computing: Wan 2.1's VAE in bf16 on meta tensors, 3 latent frames (9 frames; the
    memory of a frame chunk does not grow with the video's length). The whole decode's live op outputs peak at
    3.8 GiB at 480x832 (8.7 at 720x1280: the causal caches of every conv and the fp32 temporaries of the
    full-resolution layers); in strips a fraction of it. (On meta the mid block's attention falls back to the math
    kernel, whose score matrix a GPU's kernels never hold: part of what is left at 720p.)"""
    with torch.device("meta"):
        vae = AutoencoderKLWan().to(torch.bfloat16).eval()
    z = torch.empty(1, 16, 3, height // 8, width // 8, device="meta", dtype=torch.bfloat16)
    whole = _peak_gib(lambda: decode_chunks(vae, z))
    strips = _peak_gib(lambda: decode_strips(vae, z))
    assert whole > 3.5
    assert strips < most * whole


def test_pipeline_streams_when_asked(tmp_path, monkeypatch):
    """`vae_streaming="on"` (the default "auto" is on for CUDA only) decodes in strips, to the same uint8 frames
    as the frame-chunk decode (at most one level apart: fp32 summation order, then rounding at x255); "off" never
    strips."""
    from ditserve.config import EngineConfig, SamplingParams
    from ditserve.engine.engine import Engine
    from ditserve.testing_wan import build_tiny_wan_pipeline

    path = build_tiny_wan_pipeline(tmp_path / "wan")
    calls = []
    real = wan.decode_strips

    def spy(vae, z, strip_bytes=wan.STRIP_BYTES):
        calls.append(z.shape)
        return real(vae, z, strip_bytes=600)  # several strips at the tiny size

    monkeypatch.setattr(wan, "decode_strips", spy)
    videos = {}
    for mode in ("on", "off"):
        pipe = Engine.load(str(path), EngineConfig(device="cpu", vae_streaming=mode)).pipeline
        params = pipe.resolve(SamplingParams(prompt="x", height=64, width=80, num_frames=9, steps=2))
        latents = torch.randn(pipe.latent_shape(2, params), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            videos[mode] = pipe.decode(latents, params)
    assert len(calls) == 1
    assert videos["on"].shape == (2, 9, 64, 80, 3)
    assert np.abs(videos["on"].astype(int) - videos["off"].astype(int)).max() <= 1
