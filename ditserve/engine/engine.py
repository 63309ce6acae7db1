"""The Engine: one loaded model, ready to generate. One per process.

    engine = Engine.load("/models/some-checkpoint", EngineConfig(compile=True))
    engine.warmup()                                   # compiles what requests will run (dummy-run mode)
    [out] = engine.generate([GenerationRequest(prompt="a red apple", seed=1)])

`load` resolves the checkpoint, builds every component (safetensors streamed into meta-built DiTs, or dummy
weights), and hands them to the family's pipeline, whose construction mounts the DiT cache, compiles, sets up
the VAE paths and binds CUDA graphs, in that order (`ditserve.pipelines.base`). `generate` groups compatible
requests (equal `batch_key`) into batches. The CLI's generate / bench, the server's worker and compile-report
all go through here.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from ditserve.config import EngineConfig, ModelSpec, SamplingParams
from ditserve.engine.request import Capabilities, Output
from ditserve.logging import init_logger

logger = init_logger(__name__)

# Steps of warmup's short real request: the first forward of a shape runs plainly, the second captures its CUDA
# graph (where the engine graphs it), the third replays it.
REAL_WARMUP_STEPS = 3


class Engine:
    """A loaded model: `name`, `config` (EngineConfig), `pipeline`, and what the server and CLI read of it:
    `spec` (defaults), `capabilities`, `device`, `cache`."""

    def __init__(self, name: str, pipeline: Any, config: EngineConfig):
        self.name = name
        self.pipeline = pipeline
        self.config = config

    @classmethod
    def load(cls, model: str | None, config: EngineConfig) -> "Engine":
        """Load `model` (None: the packaged default; a folder; a hub id; with load_format "dummy" also a preset
        name) for `config`. Raises ConfigError on any user-facing problem."""
        from ditserve.pipelines import load_pipeline

        state = cls._join_parallel(config)
        if state is not None:  # this rank's own GPU; no CUDA graphs (a graph of collectives is not built yet)
            config = dataclasses.replace(config, device=str(state.device), cuda_graphs="off")
        name, pipeline = load_pipeline(model, config)
        if state is not None and state.sp > 1:  # the DiT(s) on this rank's shard of the sequence
            from ditserve.parallel.sharding import enable_sequence_parallel

            for dit in (pipeline.transformer, getattr(pipeline, "transformer_2", None)):  # (a second expert)
                if dit is not None:
                    enable_sequence_parallel(dit, state)
        if pipeline.device.type == "cpu":  # threads for the work and the cores free, once per process
            from ditserve.threads import configure_for_pipeline

            logger.info(configure_for_pipeline(pipeline).describe())
        return cls(name, pipeline, config)

    @staticmethod
    def _join_parallel(config: EngineConfig):
        """EngineConfig.parallel: this process's `ParallelState` (joining the run's process group when no one
        has yet: under torchrun, from its environment), or None for a one-process engine."""
        from ditserve.parallel import ParallelConfig

        plan = ParallelConfig.parse(config.parallel)
        if not plan.enabled:
            return None
        from ditserve.parallel.state import current, init_parallel

        return current() or init_parallel(plan, config.device)

    # ------------------------------------------------------------------------------------- what it is

    @property
    def spec(self) -> ModelSpec:
        return self.pipeline.spec

    @property
    def capabilities(self) -> Capabilities:
        return self.pipeline.capabilities

    @property
    def device(self) -> torch.device:
        return self.pipeline.device

    @property
    def cache(self):
        return getattr(self.pipeline, "cache", None)

    @property
    def lora(self):
        """The DiT's LoRA adapters (`ditserve.lora.adapters.LoRAManager`: load / unload / info, per-request
        selection through `SamplingParams.extra["lora"]`), or None when the engine has no LoRA settings."""
        return getattr(self.pipeline, "lora", None)

    # ---------------------------------------------------------------------------------------- requests

    def resolve(self, request: SamplingParams) -> SamplingParams:
        """The request with defaults filled in, validated, a seed drawn. Raises ConfigError."""
        return self.pipeline.resolve(request)

    def batch_key(self, request: SamplingParams) -> tuple:
        return self.pipeline.batch_key(request)

    def generate_batch(self, requests: list[SamplingParams], progress: bool = False) -> list[Output]:
        """Run compatible requests (equal `batch_key`) as one batch; one Output per request."""
        return self.pipeline.generate_batch(requests, progress=progress)

    def generate(self, requests: SamplingParams | list[SamplingParams], progress: bool = False
                 ) -> Output | list[Output]:
        """Run one request (-> its Output) or several (-> their Outputs, in order; compatible ones batched)."""
        if isinstance(requests, SamplingParams):
            return self.pipeline.generate(requests, progress=progress)
        resolved = [self.resolve(r) for r in requests]
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(resolved):
            groups.setdefault(self.batch_key(r), []).append(i)
        outputs: list[Output | None] = [None] * len(resolved)
        for idx in groups.values():
            for i, out in zip(idx, self.generate_batch([resolved[i] for i in idx], progress=progress)):
                outputs[i] = out
        return outputs  # type: ignore[return-value]

    def warmup(self, height: int | None = None, width: int | None = None, steps: int | None = None,
               batch_sizes: tuple[int, ...] = (1,), num_frames: int | None = None) -> float:
        """Run the real path once per batch size with the settings requests will use (cache on, the same size
        and step count), in dummy-run mode (`ditserve.dummy_run`: the DiT's output projection and the VAE
        decode are skipped, no outputs made), so that the first real request compiles nothing. The compiled
        regions are the blocks, so the graphs compiled here are those real requests use (`ditserve.compile.warmup`,
        once per batch size). Then a short real request per batch size (REAL_WARMUP_STEPS steps, outputs
        discarded): it captures the denoise forward's CUDA graph where the engine graphs that shape, and runs
        the VAE decode once (its first call pays one-time setup), so the first real request pays neither.
        Returns seconds."""
        from ditserve.compile import warmup

        start = time.perf_counter()
        for n in batch_sizes:
            params = SamplingParams(prompt="warmup", height=height, width=width, steps=steps, seed=0,
                                    num_images=n, num_frames=num_frames)
            complete = getattr(self.pipeline, "warmup_request", None)  # a family whose requests need more than a
            if complete is not None:  # prompt (an edit model's input image) completes the warmup's request
                params = complete(params)
            logger.info(f"warmup batch of {n}: {warmup(self.pipeline, params)['seconds']:.2f} s")
            short = dataclasses.replace(params, steps=REAL_WARMUP_STEPS)
            logger.info(f"real warmup batch of {n}: {warmup(self.pipeline, short, dummy=False)['seconds']:.2f} s")
        return time.perf_counter() - start
