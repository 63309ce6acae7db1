"""Whole pipelines on 2 and 4 gloo processes, per plan (CFG parallel, Ulysses, ring, their products), against the
same requests in one process: the same images, in fp32 on the CPU up to rounding."""

from __future__ import annotations

import numpy as np
import pytest

from ditserve.config import ConfigError, EngineConfig, SamplingParams
from ditserve.engine import Engine
from ditserve.parallel import ParallelConfig
from ditserve.parallel.state import launch
from ditserve.testing import build_tiny_z_image_pipeline

from .workers import generate_cases

TIMEOUT_S = 120.0
# With CFG, two prompts of different lengths in one batch (the masked path), and one without CFG.
REQUESTS = [
    SamplingParams(prompt="a photo of a cat", negative_prompt="blurry", guidance=3.0, height=64, width=64, steps=2,
                   seed=3),
    SamplingParams(prompt="a red house under a wide blue sky at noon", guidance=3.0, height=64, width=64, steps=2,
                   seed=4),
    SamplingParams(prompt="a dog", guidance=0.0, height=64, width=64, steps=2, seed=5),
]


@pytest.fixture(scope="module")
def z_image(tmp_path_factory):
    folder = build_tiny_z_image_pipeline(tmp_path_factory.mktemp("tiny-z-image"), seed=0)
    engine = Engine.load(str(folder), EngineConfig(device="cpu"))
    return folder, [out.frames for out in engine.generate(list(REQUESTS))]


def _assert_same_images(got, want, plan):
    for i, (a, b) in enumerate(zip(got, want)):
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, f"{plan}, request {i}: max diff {diff.max()}"


@pytest.mark.parametrize("world, plans", [
    (2, ["cfg=2", "ulysses=2", "ring=2"]),
    (4, ["ulysses=2,cfg=2", "ulysses=2,ring=2"]),
])
def test_z_image_plans_make_the_one_process_images(z_image, world, plans):
    folder, want = z_image
    results = launch(generate_cases, ParallelConfig(ulysses=world), "cpu", (folder, plans, REQUESTS), TIMEOUT_S)
    for plan, got in zip(plans, results):
        _assert_same_images(got, want, plan)


def test_parallel_needs_its_workers(z_image):
    folder, _ = z_image
    with pytest.raises(ConfigError, match="RANK is not set"):
        Engine.load(str(folder), EngineConfig(device="cpu", parallel="cfg=2"))
