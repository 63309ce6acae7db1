"""CUDA graphs for the denoise loop's transformer forward (EngineConfig.cuda_graphs; exact: the same kernels).

Why. A compiled FLUX.1-dev forward launches ~1000 kernels through Python: dynamo's guards, inductor's wrappers,
our custom ops' wrappers, Triton's and cuBLAS's launchers. On an H100 host that costs 60-120 ms of CPU time a
forward, depending on the host's CPU (bench/flux_shapes_ab.py --cpu-top); the fp8 tier's GPU time is ~89 ms, so
on slower hosts the GPU waits for the CPU (111 ms a forward at 611bd6a). A CUDA graph replays the whole forward's
kernels with one launch.

How. `GraphedForward(fn)` wraps a callable whose tensor arguments keep their shapes from step to step (the
transformer in the denoise loop). Calls are keyed by their signature (the argument structure, and each tensor's
shape, stride, dtype and device; other arguments by value). A signature's first `warmup` calls run `fn` as it is
(torch.compile compiles there: compiling cannot be captured); the next one captures `fn` into a CUDA graph, with
static copies of the tensor arguments; every later call copies its tensors into those and replays the graph. The
output is cloned out of the graph's memory, so a caller may keep it. At most `max_graphs` signatures are captured
(each holds its forward's activation memory in a private pool); calls with other signatures run `fn` directly.

Requirements on `fn`, checked by the GPU tests and the bench: no device-to-host synchronisation (the denoise loop
has none, see bench/flux_step.py), and no control flow on anything but the signature (a block cache decides per
step which blocks run, so the engine never graphs a model with a cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from ditserve.logging import init_logger

logger = init_logger(__name__)

DEFAULT_WARMUP = 1  # plain calls per signature before the capture (the first compiles the model)
DEFAULT_MAX_GRAPHS = 2  # signatures captured per wrapper; each keeps one forward's activations in its pool


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # static copies of the call's tensor leaves, in leaf order
    output: Any  # the output of the captured call (tensors in the graph's pool)
    replays: int = 0


@dataclass
class GraphedForward:
    """fn(*args, **kwargs), replayed from CUDA graphs per call signature (see the module docstring)."""

    fn: Callable[..., Any]
    # Calls for which this returns True run `fn` as it is, uncounted: calls whose computation differs at equal
    # signatures (the engine's dummy warmup runs skip the output projection, `ditserve.dummy_run`).
    bypass: Callable[[], bool] | None = None
    warmup: int = DEFAULT_WARMUP
    max_graphs: int = DEFAULT_MAX_GRAPHS
    graphs: dict[tuple, _Graph] = field(default_factory=dict)
    calls: dict[tuple, int] = field(default_factory=dict)  # plain calls so far, per signature

    def __call__(self, *args, **kwargs):
        if self.bypass is not None and self.bypass():
            return self.fn(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = (spec, tuple(_leaf_key(x) for x in leaves))
        entry = self.graphs.get(key)
        if entry is None:
            seen = self.calls.get(key, 0)
            if seen < self.warmup or len(self.graphs) >= self.max_graphs or not _graphable(leaves):
                if seen == self.warmup and len(self.graphs) >= self.max_graphs:
                    logger.info("CUDA graphs: %d signatures captured already; this one runs without a graph",
                                self.max_graphs)
                self.calls[key] = seen + 1
                return self.fn(*args, **kwargs)
            entry = self.graphs[key] = self._capture(leaves, spec)
        for static, x in zip(entry.inputs, (x for x in leaves if isinstance(x, torch.Tensor))):
            static.copy_(x)
        entry.graph.replay()
        entry.replays += 1
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry.output)

    def _capture(self, leaves: list, spec) -> _Graph:
        inputs = [x.clone() for x in leaves if isinstance(x, torch.Tensor)]
        it = iter(inputs)
        static_leaves = [next(it) if isinstance(x, torch.Tensor) else x for x in leaves]
        args, kwargs = pytree.tree_unflatten(static_leaves, spec)
        # One call on a side stream first, as PyTorch asks before a capture (lazy inits, cuBLAS workspaces).
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.fn(*args, **kwargs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (a kernel prewarm, a server thread) do not void this capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            output = self.fn(*args, **kwargs)
        logger.info("CUDA graphs: captured a forward (%d tensor inputs)", len(inputs))
        return _Graph(graph, inputs, output)


def _leaf_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.stride(), x.dtype, x.device)
    return x  # other leaves (None, numbers, strings) by value


def _graphable(leaves: list) -> bool:
    """Whether a call with these leaves can be captured: it has tensors, all on CUDA. (Its other leaves, part of
    the key, are the plain values a forward takes: None, numbers, strings.)"""
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    return bool(tensors) and all(t.is_cuda for t in tensors)


def resolve_cuda_graphs(setting: str, device: torch.device, cache: bool, quantized: bool) -> bool:
    """Whether the engine graphs the denoise forward (EngineConfig.cuda_graphs): "auto" for a quantised (fp8)
    model on CUDA without a block cache; "on" on CUDA without a block cache, or a ConfigError; "off" never."""
    from ditserve.config import CUDA_GRAPHS, ConfigError

    if setting not in CUDA_GRAPHS:
        raise ConfigError(f"unknown cuda_graphs {setting!r}; valid: {', '.join(CUDA_GRAPHS)}")
    if setting == "off":
        return False
    why = ("the device is not a CUDA GPU" if device.type != "cuda"
           else "a block cache decides per step which blocks run (a graph replays one fixed set)" if cache
           else None)
    if why and setting == "on":
        raise ConfigError(f"--cuda-graphs on cannot apply: {why}; use --cuda-graphs auto or off")
    return why is None and (setting == "on" or quantized)
