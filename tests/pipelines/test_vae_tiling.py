"""Tiled VAE decode (EngineConfig.vae_tiling): when it applies, that it is diffusers' tiled decode with our
tile geometry, that "off" and small images under "auto" decode whole (exactly diffusers' decode), and the flag."""

from __future__ import annotations

import pytest
import torch

from ditserve.cli import build_parser
from ditserve.config import ConfigError, EngineConfig, SamplingParams
from ditserve.engine_args import engine_from_args
from ditserve.loader import load_model
from ditserve.pipelines.base import VAE_AUTO_TILE_PIXELS
from ditserve.pipelines import flux
from ditserve.pipelines.flux import FluxPipeline
from ditserve.testing import build_tiny_flux_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # natural size 128 -> tiles of min(VAE_TILE, 128) = 128 pixels = 16 latent pixels (8x VAE)
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiling"), guidance_embeds=False, seed=3,
                                    sample_size=128)


def _pipe(folder, tiling: str) -> FluxPipeline:
    engine = EngineConfig(device="cpu", dtype="fp32", vae_tiling=tiling)
    loaded = load_model(str(folder), engine)
    return FluxPipeline(loaded.components, engine, FluxPipeline.spec_for(loaded.name, loaded.components))


def _latents(H: int, W: int) -> torch.Tensor:
    return torch.randn(1, (H // 16) * (W // 16), 64, generator=torch.Generator().manual_seed(0))


def test_unknown_value_is_a_config_error():
    with pytest.raises(ConfigError, match="vae_tiling"):
        EngineConfig(vae_tiling="sometimes")


def test_when_tiles_are_used(folder):
    auto, on, off = (_pipe(folder, t) for t in ("auto", "on", "off"))
    assert not auto.tiled_decode(1024, 1024)  # FLUX.1's native size decodes whole
    assert auto.tiled_decode(1024, 1040) and auto.tiled_decode(2048, 2048)
    assert VAE_AUTO_TILE_PIXELS == 1024 * 1024
    assert on.tiled_decode(64, 64) and on.tiled_decode(2048, 2048)
    assert not off.tiled_decode(64, 64) and not off.tiled_decode(4096, 4096)
    assert on.vae.tile_sample_min_size == 128 and on.vae.tile_latent_min_size == 16


def test_tiled_decode_is_diffusers_tiled_decode(folder, monkeypatch):
    on, off = _pipe(folder, "on"), _pipe(folder, "off")
    H, W = 256, 192  # several 128-pixel tiles
    calls = []
    real = type(on.vae).tiled_decode

    def spy(self, z, return_dict=True):
        calls.append(tuple(z.shape))
        return real(self, z, return_dict=return_dict)

    monkeypatch.setattr(type(on.vae), "tiled_decode", spy)
    with torch.inference_mode():
        tiled = on.decode_latents(_latents(H, W), _size(H, W))
        whole = off.decode_latents(_latents(H, W), _size(H, W))
    assert calls == [(1, 16, H // 8, W // 8)]
    assert tiled.shape == whole.shape == (1, 3, H, W)
    with torch.inference_mode():
        z = flux.unpack_latents(_latents(H, W), H // 8, W // 8)
        z = z / on.vae.config.scaling_factor + on.vae.config.shift_factor
        want = real(on.vae, z, return_dict=False)[0]
    torch.testing.assert_close(tiled, want)
    assert not torch.equal(tiled, whole)  # blending tiles is not the whole-image decode: lossy


def test_off_and_small_auto_decode_whole(folder, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("tiled_decode called")

    for tiling in ("off", "auto"):
        pipe = _pipe(folder, tiling)
        monkeypatch.setattr(type(pipe.vae), "tiled_decode", boom)
        with torch.inference_mode():
            assert pipe.decode_latents(_latents(256, 256), _size(256, 256)).shape == (1, 3, 256, 256)


def test_flag_reaches_the_engine():
    args = build_parser().parse_args(["generate", "--prompt", "x", "--vae-tiling", "on"])
    assert engine_from_args(args).vae_tiling == "on"
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert engine_from_args(args).vae_tiling == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--prompt", "x", "--vae-tiling", "maybe"])


def _size(height: int, width: int) -> SamplingParams:
    return SamplingParams(prompt="", height=height, width=width)
