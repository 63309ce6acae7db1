"""Whole pipelines on 2 and 4 gloo processes, per plan (CFG parallel, Ulysses, ring, their products), against the
same requests in one process: the same images, in fp32 on the CPU up to rounding."""

from __future__ import annotations

import numpy as np
import pytest

from ditserve.config import ConfigError, EngineConfig, SamplingParams
from ditserve.engine import Engine
from ditserve.parallel import ParallelConfig
from ditserve.parallel.state import launch
from ditserve.testing import build_tiny_flux_pipeline, build_tiny_z_image_pipeline
from ditserve.testing_flux2 import build_tiny_flux2_pipeline
from ditserve.testing_qwen_image import build_tiny_qwen_image_pipeline
from ditserve.testing_wan import build_tiny_wan_pipeline

from .workers import generate_cases

TIMEOUT_S = 120.0
# Z-Image: with CFG, two prompts of different lengths in one batch (the masked path), and one without CFG.
Z_IMAGE_REQUESTS = [
    SamplingParams(prompt="a photo of a cat", negative_prompt="blurry", guidance=3.0, height=64, width=64, steps=2,
                   seed=3),
    SamplingParams(prompt="a red house under a wide blue sky at noon", guidance=3.0, height=64, width=64, steps=2,
                   seed=4),
    SamplingParams(prompt="a dog", guidance=0.0, height=64, width=64, steps=2, seed=5),
]
# FLUX.1: 5 x 5 image tokens and 13 text tokens, which neither 2 nor 4 divides (padded shards, masked keys).
FLUX_REQUESTS = [SamplingParams(prompt="a photo of a cat", height=80, width=80, steps=2, seed=3,
                                max_sequence_length=13)]
# Wan: 3 latent frames of 5 x 5 tokens (75: padded shards), with CFG.
WAN_REQUESTS = [SamplingParams(prompt="a photo of a cat", negative_prompt="blurry", guidance=4.0, height=80, width=80,
                               num_frames=9, steps=2, seed=3)]
# Qwen-Image: 5 x 5 image tokens, CFG with a prompt and a negative prompt of different lengths (masked text keys).
QWEN_REQUESTS = [SamplingParams(prompt="a photo of a cat on a red sofa", negative_prompt="blurry", guidance=4.0,
                                height=80, width=80, steps=2, seed=3)]
# FLUX.2: 5 x 5 image tokens and 13 text tokens (padded shards).
FLUX2_REQUESTS = [SamplingParams(prompt="a photo of a cat", height=80, width=80, steps=2, seed=3,
                                 max_sequence_length=13)]
# Every family on Ulysses and on ring (and CFG where it has it), each plan once: the ops are tested on their own in
# test_attention; here each family's sharding hooks (tables, masks, gather) and the pipeline's CFG hook.
PLANS = {
    2: [("z_image", "cfg=2"), ("z_image", "ring=2"), ("flux", "ring=2"), ("wan", "ulysses=2"),
        ("qwen_image", "cfg=2"), ("flux2", "ring=2")],
    4: [("z_image", "ulysses=2,cfg=2"), ("flux", "ulysses=4"), ("wan", "ring=2,cfg=2"),
        ("qwen_image", "ulysses=2,ring=2"), ("flux2", "ulysses=2,ring=2")],
}


def _one_process(folder, requests):
    engine = Engine.load(str(folder), EngineConfig(device="cpu"))
    return [out.frames for out in engine.generate(list(requests))]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (folder, requests, the one-process images)."""
    z = build_tiny_z_image_pipeline(tmp_path_factory.mktemp("tiny-z-image"), seed=0)
    f = build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux"), seed=0)
    w = build_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny-wan"), seed=0)
    q = build_tiny_qwen_image_pipeline(tmp_path_factory.mktemp("tiny-qwen-image"), seed=0)
    f2 = build_tiny_flux2_pipeline(tmp_path_factory.mktemp("tiny-flux2"), seed=0)
    return {"z_image": (z, Z_IMAGE_REQUESTS, _one_process(z, Z_IMAGE_REQUESTS)),
            "flux": (f, FLUX_REQUESTS, _one_process(f, FLUX_REQUESTS)),
            "wan": (w, WAN_REQUESTS, _one_process(w, WAN_REQUESTS)),
            "qwen_image": (q, QWEN_REQUESTS, _one_process(q, QWEN_REQUESTS)),
            "flux2": (f2, FLUX2_REQUESTS, _one_process(f2, FLUX2_REQUESTS))}


def _assert_same_images(got, want, name):
    for i, (a, b) in enumerate(zip(got, want)):
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"{name}, request {i}: max diff {diff.max()}"


@pytest.mark.parametrize("world", [2, 4])
def test_plans_make_the_one_process_images(models, world):
    """Every plan of the world size in one launch (a spawn costs seconds on a busy CPU)."""
    cases = [(models[family][0], plan, models[family][1]) for family, plan in PLANS[world]]
    results = launch(generate_cases, ParallelConfig(ulysses=world), "cpu", (cases,), TIMEOUT_S)
    for (family, plan), got in zip(PLANS[world], results):
        _assert_same_images(got, models[family][2], f"{family} {plan}")


def test_parallel_needs_its_workers(models):
    with pytest.raises(ConfigError, match="RANK is not set"):
        Engine.load(str(models["z_image"][0]), EngineConfig(device="cpu", parallel="cfg=2"))
