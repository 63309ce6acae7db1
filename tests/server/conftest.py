"""Fixtures of the server tests: a fake pipeline (instant, scriptable failures), live servers on loopback."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from typing import Callable

import pytest
import torch
from PIL import Image

import numpy as np

from ditserve.config import EngineConfig, ModelSpec, SamplingParams
from ditserve.engine import Capabilities, Engine, Output
from ditserve.server import ServerConfig, create_app
from ditserve.server.app import listen_socket, uvicorn_config

FAKE_SPEC = ModelSpec(name="fake", pipeline="FakePipeline", components={}, default_steps=2, default_guidance=0.0,
                      default_height=64, default_width=64, max_sequence_length=16)


class FakePipeline:
    """The pipeline contract with no model: image i of a request is a solid colour derived from (seed, i),
    so tests can tell which request an image belongs to. `gate` (an Event) holds each batch until set;
    `fail` (a callable returning an exception or None, given the batch) makes a batch raise."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None,
                 fail: Callable[[list[SamplingParams]], BaseException | None] | None = None):
        self.spec = FAKE_SPEC
        self.capabilities = Capabilities(family="fake", guidance="distilled")
        self.device = torch.device("cpu")
        self.cache = None
        self.delay, self.gate, self.fail = delay, gate, fail
        self.batches: list[list[SamplingParams]] = []
        self.started = threading.Event()  # set when a (non-warmup) batch begins

    def resolve(self, params: SamplingParams) -> SamplingParams:
        self.capabilities.check(params)
        p = params.resolved(self.spec)
        if p.seed is None:
            p.seed = 12345
        return p

    def batch_key(self, p: SamplingParams) -> tuple:
        return (p.height, p.width, p.steps, p.guidance)

    def generate_batch(self, requests: list[SamplingParams], progress: bool = False) -> list[Output]:
        self.batches.append(list(requests))
        if requests[0].prompt != "warmup":
            self.started.set()
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        if self.fail is not None and (exc := self.fail(requests)) is not None:
            raise exc
        steps = requests[0].steps or 0  # (a warmup's request may leave it unset)
        for i in range(steps):  # the denoise loop's progress hook (`Pipeline.on_step`)
            if getattr(self, "on_step", None) is not None:
                self.on_step(i + 1, steps)
            if getattr(self, "step_gate", None) is not None:
                self.step_gate.wait(30)
        timings = {"text_encode_s": 0.001, "denoise_s": 0.002, "decode_s": 0.001, "total_s": 0.004}
        if self.capabilities.output == "video":  # frame j of video i: the image's colour, its red channel + j
            return [Output(kind="video", frames=np.stack([fake_video(p, i) for i in range(p.num_images)]),
                           timings=timings, peak_memory_bytes=None, params=p, fps=p.fps) for p in requests]
        return [Output(kind="image", frames=np.stack([np.asarray(fake_image(p, i)) for i in range(p.num_images)]),
                       timings=timings, peak_memory_bytes=None, params=p) for p in requests]


def fake_colour(seed: int, i: int) -> tuple[int, int, int]:
    return ((seed * 7 + i * 31) % 256, (seed * 13 + i) % 256, (seed + 5 * i) % 256)


def fake_image(p: SamplingParams, i: int):
    return Image.new("RGB", (p.width, p.height), fake_colour(p.seed, i))


def fake_video(p: SamplingParams, i: int) -> np.ndarray:
    """(F, H, W, 3) uint8: frame j is `fake_colour(seed, i)` with j added to its red channel."""
    frames = np.empty((p.num_frames, p.height, p.width, 3), dtype=np.uint8)
    frames[:] = fake_colour(p.seed, i)
    frames[..., 0] += np.arange(p.num_frames, dtype=np.uint8)[:, None, None]
    return frames


class FakeVideoPipeline(FakePipeline):
    """The fake as a video family: classifier-free guidance, frames 4n + 1 (5 by default, at 8 fps), one optional
    input image; `step_gate` (an Event) holds each denoise step until set."""

    def __init__(self, *args, step_gate: threading.Event | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec = dataclasses.replace(FAKE_SPEC, default_num_frames=5, default_fps=8.0)
        self.capabilities = Capabilities(family="fake-video", guidance="cfg", output="video", max_input_images=1,
                                         frame_rule=(4, 1))
        self.step_gate = step_gate
        self.on_step = None


def fake_engine(pipeline: FakePipeline) -> Engine:
    return Engine("fake", pipeline, EngineConfig(device="cpu"))


def fake_app(pipeline: FakePipeline | None = None, **config):
    pipeline = pipeline or FakePipeline()
    config.setdefault("warmup", False)
    return create_app(lambda: fake_engine(pipeline), ServerConfig(**config))


class Live:
    def __init__(self, url: str, server, thread: threading.Thread):
        self.url, self.server, self.thread = url, server, thread


@contextlib.contextmanager
def live_server(app, timeout: float = 60.0):
    """Serve `app` with uvicorn on a free loopback port in a thread; yields a `Live` (url, uvicorn server,
    thread) once the engine is ready (or, when it never gets ready, once uvicorn has started). Setting
    `live.server.should_exit` is what SIGTERM does to a real server."""
    import uvicorn

    sock = listen_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = uvicorn_config(app, app.state.config)  # what `ditserve serve` runs: its protocol, timeouts and cap
    config.timeout_graceful_shutdown = 30
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    app.state.worker.wait_ready(max(0.0, deadline - time.monotonic()))
    try:
        yield Live(f"http://127.0.0.1:{port}", server, thread)
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="session")
def default_pipeline():
    """The packaged default model on CPU (fp32), loaded once for the session."""
    return Engine.load(None, EngineConfig(device="cpu"))
