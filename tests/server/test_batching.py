"""Batching: `FluxPipeline.generate_batch` keeps each request's own noise and image; the worker groups only
compatible requests, up to max_batch_size images, oldest first, and never runs a request it gave up on."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from ditserve.config import ConfigError, SamplingParams
from ditserve.server import ServerConfig
from ditserve.server.metrics import ServerMetrics
from ditserve.server.worker import EngineWorker, NotAccepting

from .conftest import FakePipeline, fake_engine


def pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


REQUESTS = [
    SamplingParams(prompt="a red circle on a blue background", seed=1, steps=2, height=64, width=64),
    SamplingParams(prompt="a small dog under a big tree at night", seed=7, num_images=3, steps=2, height=64,
                   width=64),
    SamplingParams(prompt="a", seed=1, num_images=2, steps=2, height=64, width=64),  # same seed as the first
]


def test_generate_batch_keeps_each_requests_noise_and_image(default_pipeline):
    pipe = default_pipeline.pipeline
    seen = []
    denoise = pipe.denoise

    def spy(latents, *args, **kwargs):  # the initial latents of each denoise call
        seen.append(latents.clone())
        return denoise(latents, *args, **kwargs)

    pipe.denoise = spy
    try:
        batched = pipe.generate_batch(REQUESTS)
        alone = [pipe.generate(r, progress=False) for r in REQUESTS]
    finally:
        del pipe.denoise
    batch_noise, *alone_noise = seen
    assert batch_noise.shape[0] == 6
    assert torch.equal(batch_noise, torch.cat(alone_noise))  # exactly the noise each seed gives alone
    assert not torch.equal(alone_noise[2][0], alone_noise[2][1])  # a request's images get distinct noise

    assert [len(r.images) for r in batched] == [1, 3, 2]
    assert [r.params.seed for r in batched] == [1, 7, 1]
    for b, a in zip(batched, alone):
        for img_b, img_a in zip(b.images, a.images):
            diff = np.abs(pixels(img_b) - pixels(img_a))
            # Batched GEMMs round differently from batch-1 ones: a rare pixel may land on the other side of
            # a uint8 rounding boundary; anything more would be a different image.
            assert diff.max() <= 1 and (diff > 0).mean() < 0.002
    # Different prompts give different images within the batch (the rows were not mixed up).
    assert np.abs(pixels(batched[0].images[0]) - pixels(batched[2].images[0])).max() > 10


def test_generate_batch_refuses_incompatible_requests(default_pipeline):
    pipe = default_pipeline.pipeline
    a = SamplingParams(prompt="a", seed=1, steps=2, height=64, width=64)
    for other in (SamplingParams(prompt="b", seed=1, steps=3, height=64, width=64),
                  SamplingParams(prompt="b", seed=1, steps=2, height=64, width=128),
                  SamplingParams(prompt="b", seed=1, steps=2, height=64, width=64, max_sequence_length=8)):
        assert pipe.batch_key(pipe.resolve(a)) != pipe.batch_key(pipe.resolve(other))
        with pytest.raises(ConfigError, match="must share"):
            pipe.generate_batch([a, other])
    with pytest.raises(ConfigError):
        pipe.generate_batch([])


# ------------------------------------------------------------------------------------------ worker


def started_worker(pipe: FakePipeline, **config) -> EngineWorker:
    worker = EngineWorker(lambda: fake_engine(pipe), ServerConfig(warmup=False, **config), ServerMetrics())
    worker.start()
    assert worker.wait_ready(10)
    return worker


def submit(worker, pipe, **kw):
    return worker.submit(pipe.resolve(SamplingParams(**{"prompt": "p", "seed": 0, **kw})))


def test_worker_batches_compatible_requests_up_to_the_limit():
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    worker = started_worker(pipe, max_batch_size=4)
    try:
        blocker = submit(worker, pipe, prompt="blocker")
        assert pipe.started.wait(10)
        jobs = [
            submit(worker, pipe, prompt="a", num_images=2),
            submit(worker, pipe, prompt="b", width=128),  # another size: another batch
            submit(worker, pipe, prompt="c"),
            submit(worker, pipe, prompt="d", num_images=2),  # would make 5 images with a and c: next batch
            submit(worker, pipe, prompt="e"),  # fits after a and c
            submit(worker, pipe, prompt="f", steps=3),  # other steps: another batch
            submit(worker, pipe, prompt="g", width=128),
        ]
        gate.set()
        for job in [blocker, *jobs]:
            job.future.result(10)
    finally:
        worker.close(10)
    batches = [[p.prompt for p in b] for b in pipe.batches]
    assert batches == [["blocker"], ["a", "c", "e"], ["b", "g"], ["d"], ["f"]]
    for job in jobs:  # each request got its own images back
        result = job.future.result()
        assert result.params is job.params and len(result.images) == job.params.num_images


def test_worker_skips_cancelled_requests_and_drains_on_close():
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    worker = started_worker(pipe, max_batch_size=1)
    blocker = submit(worker, pipe, prompt="blocker")
    assert pipe.started.wait(10)
    dropped = submit(worker, pipe, prompt="dropped")
    kept = [submit(worker, pipe, prompt=f"kept{i}") for i in range(3)]
    assert worker.cancel(dropped) and worker.queue_depth() == 3
    assert not worker.cancel(blocker)  # running: it finishes
    closer = threading.Thread(target=worker.close, args=(10,))
    closer.start()  # close while requests are queued: they still run (drain)
    time.sleep(0.05)
    with pytest.raises(NotAccepting):
        submit(worker, pipe, prompt="late")
    gate.set()
    closer.join(10)
    assert worker.state == "stopped"
    assert [b[0].prompt for b in pipe.batches] == ["blocker", "kept0", "kept1", "kept2"]
    assert all(job.future.result(0).images for job in [blocker, *kept])
    assert dropped.future.cancelled()


def test_worker_does_not_batch_requests_together_under_a_dit_cache():
    """A DiT cache takes one skip decision per batch: batching two requests could change each one's image."""
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    pipe.cache = object()  # what FluxPipeline holds when --cache is on
    worker = started_worker(pipe, max_batch_size=4)
    try:
        jobs = [submit(worker, pipe, prompt=p) for p in ("blocker", "a", "b")]
        gate.set()
        for job in jobs:
            job.future.result(10)
    finally:
        worker.close(10)
    assert [[p.prompt for p in b] for b in pipe.batches] == [["blocker"], ["a"], ["b"]]
