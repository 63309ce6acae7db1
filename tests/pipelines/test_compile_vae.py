"""EngineConfig.compile_vae / --compile-vae: the VAE decoder goes channels-last and compiled, and decodes what
the plain decoder does (lossless); off by default."""

from __future__ import annotations

import pytest
import torch

from ditserve.cli import build_parser
from ditserve.config import EngineConfig, SamplingParams
from ditserve.engine_args import engine_from_args
from ditserve.loader import load_model
from ditserve.pipelines import base as pipeline_base
from ditserve.pipelines.flux import FluxPipeline
from ditserve.testing import build_tiny_flux_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("compile-vae"), guidance_embeds=False, seed=4,
                                    sample_size=128)


def _pipe(folder, **kw) -> FluxPipeline:
    engine = EngineConfig(device="cpu", dtype="fp32", **kw)
    loaded = load_model(str(folder), engine)
    return FluxPipeline(loaded.components, engine, FluxPipeline.spec_for(loaded.name, loaded.components))


def test_compiled_channels_last_decoder_decodes_the_same(folder, monkeypatch):
    monkeypatch.setattr(pipeline_base, "VAE_COMPILE_BACKEND", "eager")  # (inductor on a CPU VAE: minutes)
    plain, compiled = _pipe(folder), _pipe(folder, compile_vae=True)
    assert plain.vae.decoder._compiled_call_impl is None
    assert compiled.vae.decoder._compiled_call_impl is not None
    conv = compiled.vae.decoder.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    latents = torch.randn(1, 8 * 8, 64, generator=torch.Generator().manual_seed(0))  # 128 x 128 pixels
    with torch.inference_mode():
        expected = plain.decode_latents(latents, _size(128, 128))
        out = compiled.decode_latents(latents, _size(128, 128))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_flag():
    for command in ("generate", "serve", "bench"):
        base = [command] + (["--prompt", "x"] if command != "serve" else [])
        assert engine_from_args(build_parser().parse_args(base)).compile_vae is False
        assert engine_from_args(build_parser().parse_args(base + ["--compile-vae"])).compile_vae is True


def test_warmup_compiles_the_decoder(folder, monkeypatch):
    """A dummy-run warmup still decodes once when the decoder is compiled, so requests do not compile it."""
    from ditserve.compile import warmup

    monkeypatch.setattr(pipeline_base, "VAE_COMPILE_BACKEND", "eager")
    pipe = _pipe(folder, compile_vae=True)
    calls = []
    pipe.vae.decoder.register_forward_pre_hook(lambda m, a: calls.append(1))
    params = SamplingParams(prompt="x", height=64, width=64, steps=2, seed=0)
    warmup(pipe, params)
    assert len(calls) == 1
    with torch.compiler.set_stance("fail_on_recompile"):
        assert len(pipe.generate(params, progress=False).images) == 1


def _size(height: int, width: int) -> SamplingParams:
    return SamplingParams(prompt="", height=height, width=width)
