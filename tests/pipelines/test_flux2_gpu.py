"""FLUX.2 on a CUDA GPU in bf16, as users run it (skipped without one; `pytest -m gpu`): diffusers' initial
noise and a close image (our fused layout rounds differently in bf16), compiled and replayed from CUDA graphs,
with a reference image; the text encoder offloaded; the fp8 tier."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ditserve.config import EngineConfig, SamplingParams
from ditserve.engine import Engine
from ditserve.testing_flux2 import build_tiny_flux2_pipeline, psnr

pytestmark = pytest.mark.gpu
PROMPT = "a photo of a cat sitting on a red sofa"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_flux2_pipeline(tmp_path_factory.mktemp("flux2-gpu") / "dev", seed=5)


def reference_image() -> Image.Image:
    return Image.fromarray((np.random.default_rng(3).random((64, 80, 3)) * 255).astype(np.uint8))


def test_cuda_bf16_compiled_graphed_matches_diffusers(folder):
    import diffusers

    engine = Engine.load(str(folder), EngineConfig(device="cuda", dtype="bf16", compile=True, cuda_graphs="on"))
    ref = diffusers.Flux2Pipeline.from_pretrained(folder, torch_dtype=torch.bfloat16).to("cuda")
    ref.set_progress_bar_config(disable=True)
    params = SamplingParams(prompt=PROMPT, height=128, width=96, steps=4, guidance=3.5, seed=99)
    got = engine.pipeline.prepare_latents(2, engine.resolve(params))
    want, _ = ref.prepare_latents(2, 8, 128, 96, torch.bfloat16, torch.device("cuda"),
                                  torch.Generator("cuda").manual_seed(99))
    assert torch.equal(got, want)
    for images in ([], [reference_image()]):
        out = engine.generate(SamplingParams(prompt=PROMPT, height=128, width=96, steps=4, guidance=3.5, seed=99,
                                             images=images))
        (image,) = ref(prompt=PROMPT, image=images or None, height=128, width=96, num_inference_steps=4,
                       guidance_scale=3.5, generator=torch.Generator("cuda").manual_seed(99)).images
        assert psnr(out.frames[0], np.asarray(image)) >= 30
        assert out.peak_memory_bytes > 0
    assert engine.pipeline.graph_memory_bytes > 0  # the forward really replayed from graphs


def test_cuda_offloaded_text_encoder(folder):
    req = SamplingParams(prompt=PROMPT, height=64, width=64, steps=2, seed=1)
    engine = Engine.load(str(folder), EngineConfig(device="cuda", dtype="bf16", offload_text_encoder=True))
    te = engine.pipeline.text_encoder
    assert all(t.device.type == "cpu" and host.is_pinned() for t, host in te.tensors)
    out = engine.generate(req).frames
    assert all(t.device.type == "cpu" for t, _ in te.tensors)
    plain = Engine.load(str(folder), EngineConfig(device="cuda", dtype="bf16", cuda_graphs="off")).generate(req)
    assert psnr(out, plain.frames) >= 40


def test_cuda_fp8_tier(folder):
    req = SamplingParams(prompt=PROMPT, height=128, width=128, steps=3, seed=2)
    fp8 = Engine.load(str(folder), EngineConfig(device="cuda", dtype="bf16", quantization="fp8")).generate(req)
    bf16 = Engine.load(str(folder), EngineConfig(device="cuda", dtype="bf16")).generate(req)
    assert np.isfinite(fp8.frames).all() and psnr(fp8.frames, bf16.frames) >= 20
