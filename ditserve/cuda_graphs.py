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
output is cloned out of the graph's memory, so a caller may keep it.

Which shapes. `admit()` (if given) is asked before a capture: the engine's "auto" setting admits the shapes whose
forward is small enough for the host's launch work to matter (`AUTO_MAX_TOKENS`), and runs larger ones as they
are. Memory. All graphs of one wrapper capture into one shared memory pool: calls run one at a time and each
output is cloned out at once, so no graph's memory is live while another replays, and the pool holds what the
largest captured forward needs instead of the sum. `memory_bytes` is the device memory the captures reserved.
At most `max_graphs` signatures are kept: capturing another evicts the least recently replayed one, and
`release_idle(seconds)` drops graphs not replayed for that long (a server's shapes come and go).

Requirements on `fn`, checked by the GPU tests and the bench: no device-to-host synchronisation (the denoise loop
has none, see bench/flux_step.py), and no control flow on anything but the signature.

With a block cache. The cache decides per step which blocks run (`ditserve.cache.block_cache`), so the whole
forward is not one fixed set of kernels. Under "on", `GraphedBlocks` graphs the model's block ranges instead: one
graph per (range, shapes), replayed by the cache's `run_blocks` calls, while the model's prepare and finish, the
cache's decision (its one host sync a step) and its residual arithmetic run eagerly between them. The blocks are
nearly all of a forward's launches, so most of the host's launch work still goes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from torch.utils import _pytree as pytree

from ditserve.logging import init_logger

logger = init_logger(__name__)

DEFAULT_WARMUP = 1  # plain calls per signature before the capture (the first compiles the model)
DEFAULT_MAX_GRAPHS = 8  # signatures kept captured per wrapper (they share one memory pool)
# "auto": graph a forward of at most this many image tokens (all rows of the batch together, e.g. 1024x1024 at
# batch 2 or 512x512 at batch 8 for a 16-pixel patch). Below it the host's launch work bounds the forward; above
# it the GPU work hides the launches and a graph gains nothing (bench/family_step.py --sweep).
AUTO_MAX_TOKENS = 8192


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # static copies of the call's tensor leaves, in leaf order
    output: Any  # the output of the captured call (tensors in the graph's pool)
    replays: int = 0
    last_used: float = 0.0  # time.monotonic() of the last replay (or the capture)


@dataclass
class GraphedForward:
    """fn(*args, **kwargs), replayed from CUDA graphs per call signature (see the module docstring)."""

    fn: Callable[..., Any]
    # Calls for which this returns True run `fn` as it is, uncounted: calls whose computation differs at equal
    # signatures (the engine's dummy warmup runs skip the output projection, `ditserve.dummy_run`).
    bypass: Callable[[], bool] | None = None
    # Asked before capturing a new signature: False runs the call as it is (the "auto" setting's size rule).
    admit: Callable[[], bool] | None = None
    warmup: int = DEFAULT_WARMUP
    max_graphs: int = DEFAULT_MAX_GRAPHS
    graphs: dict[tuple, _Graph] = field(default_factory=dict)
    calls: dict[tuple, int] = field(default_factory=dict)  # plain calls so far, per signature
    memory_bytes: int = 0  # device memory reserved by the captures (the shared pool's growth)
    pool: Any = None  # the shared memory pool handle, made at the first capture
    refused: set = field(default_factory=set)  # signatures whose capture failed: they run as they are

    def __call__(self, *args, **kwargs):
        if self.bypass is not None and self.bypass():
            return self.fn(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = (spec, tuple(_leaf_key(x) for x in leaves))
        entry = self.graphs.get(key)
        if entry is None:
            seen = self.calls.get(key, 0)
            if (seen < self.warmup or key in self.refused or not _graphable(leaves)
                    or (self.admit is not None and not self.admit())):
                self.calls[key] = seen + 1
                return self.fn(*args, **kwargs)
            if len(self.graphs) >= self.max_graphs:
                self._evict(min(self.graphs, key=lambda k: self.graphs[k].last_used))
            try:
                entry = self._capture(leaves, spec)
            except RuntimeError as e:  # e.g. a host sync inside fn: not capturable, so this signature runs plainly
                logger.warning("CUDA graphs: %s cannot be captured (%s); it runs without a graph",
                               type(self.fn).__name__, " ".join(str(e).split())[:200])
                self.refused.add(key)
                torch.cuda.synchronize()
                return self.fn(*args, **kwargs)
            self.graphs[key] = entry
        for static, x in zip(entry.inputs, (x for x in leaves if isinstance(x, torch.Tensor))):
            static.copy_(x)
        entry.graph.replay()
        entry.replays += 1
        entry.last_used = time.monotonic()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, entry.output)

    def release_idle(self, seconds: float) -> int:
        """Drop the graphs not replayed for `seconds`; returns how many were dropped."""
        now = time.monotonic()
        idle = [k for k, g in self.graphs.items() if now - g.last_used > seconds]
        for k in idle:
            self._evict(k)
        return len(idle)

    def _evict(self, key: tuple) -> None:
        logger.info("CUDA graphs: released a captured forward (%d kept)", len(self.graphs) - 1)
        del self.graphs[key]
        self.calls.pop(key, None)
        if not self.graphs:  # the pool's memory goes back to the allocator with its last graph
            self.pool, self.memory_bytes = None, 0

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
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # torch.cuda.graph empties the allocator's cache on entry: empty it first, so that the growth of the
        # reserved memory is the capture's own.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved()
        # thread_local: another thread's CUDA calls (a kernel prewarm, a server thread) do not void this capture.
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = self.fn(*args, **kwargs)
        self.memory_bytes += max(0, torch.cuda.memory_reserved() - before)
        logger.info("CUDA graphs: captured a forward (%d tensor inputs; graphs reserve %.0f MiB)", len(inputs),
                    self.memory_bytes / 2**20)
        return _Graph(graph, inputs, output, last_used=time.monotonic())


class GraphedModule(GraphedForward):
    """A GraphedForward that stands in for a module: attributes it does not have (`config`, `dtype`, ...) are
    the module's, so the code that calls a text encoder reads it as before."""

    def __getattr__(self, name: str) -> Any:
        if name == "fn":  # not set yet (during construction)
            raise AttributeError(name)
        return getattr(self.fn, name)


class GraphedBlocks:
    """A model's `run_blocks(state, ctx, start, stop)` replayed from CUDA graphs, one per block range and shapes
    (what a block cache calls; see the module docstring). `graphed` is the GraphedForward that holds them; the
    keyword arguments are its (bypass, admit, warmup, max_graphs)."""

    def __init__(self, run_blocks: Callable[..., Any], **kwargs):
        def run(state, ctx, start: int, stop: int):
            return run_blocks(state, _from_tree(ctx), start, stop)

        # (a dataclass context becomes a pytree of its fields: the graph copies its tensors, keys on the rest)
        self.graphed = GraphedForward(run, max_graphs=3 * kwargs.pop("max_graphs", DEFAULT_MAX_GRAPHS), **kwargs)

    def __call__(self, state, ctx, start: int, stop: int):
        return self.graphed(state, _to_tree(ctx), start, stop)


class _Fields(NamedTuple):
    """A dataclass instance as a pytree: its class (a leaf compared by value) and its fields."""

    cls: type
    fields: dict[str, Any]


def _to_tree(x: Any) -> Any:
    """`x` with each dataclass instance that is not a pytree node of its own made a `_Fields` (recursively)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type) and type(x) not in pytree.SUPPORTED_NODES:
        return _Fields(type(x), {f.name: _to_tree(getattr(x, f.name)) for f in dataclasses.fields(x)})
    return x


def _from_tree(x: Any) -> Any:
    if isinstance(x, _Fields):
        return x.cls(**{name: _from_tree(value) for name, value in x.fields.items()})
    return x


def _leaf_key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("tensor", tuple(x.shape), x.stride(), x.dtype, x.device)
    return x  # other leaves (None, numbers, strings) by value


def _graphable(leaves: list) -> bool:
    """Whether a call with these leaves can be captured: it has tensors, all on CUDA. (Its other leaves, part of
    the key, are the plain values a forward takes: None, numbers, strings.)"""
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    return bool(tensors) and all(t.is_cuda for t in tensors)


def resolve_cuda_graphs(setting: str, device: torch.device, cache: str | None = None) -> bool:
    """Whether the engine may graph the denoise forward (EngineConfig.cuda_graphs): "auto" and "on" on CUDA ("on"
    elsewhere is a ConfigError; which shapes "auto" graphs is `AUTO_MAX_TOKENS`'s rule, applied per call
    signature); "off" never. `cache` is the DiT cache's backend (EngineConfig.cache_backend) when one is mounted:
    ditserve's block cache is graphed by block range (`GraphedBlocks`) under "on" only, since "auto" graphs what
    was measured to gain and this has not been measured yet; cache-dit's, whose hooks decide inside the blocks'
    forward, cannot be graphed ("on" is a ConfigError, "auto" runs without graphs)."""
    from ditserve.config import CUDA_GRAPHS, ConfigError

    if setting not in CUDA_GRAPHS:
        raise ConfigError(f"unknown cuda_graphs {setting!r}; valid: {', '.join(CUDA_GRAPHS)}")
    if setting == "off":
        return False
    why = ("the device is not a CUDA GPU" if device.type != "cuda"
           else f"the {cache} cache backend decides inside the blocks' forward which of them run (a graph replays "
                f"one fixed set; ditserve's own block cache is graphed block range by block range)"
           if cache not in (None, "ditserve") else None)
    if why and setting == "on":
        raise ConfigError(f"--cuda-graphs on cannot apply: {why}; use --cuda-graphs auto or off")
    return why is None and (setting == "on" or cache is None)
