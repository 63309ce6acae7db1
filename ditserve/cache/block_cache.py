"""The block cache: per step, compute the first blocks, and reuse the residual of the middle blocks when the
first blocks' output barely changed since the middle blocks were last computed.

A model opts in by declaring the block interface (every DiT in `ditserve.models` does):

    num_blocks                                  blocks in a flat order (FLUX: 19 double, then 38 single)
    run_blocks(state, ctx, start, stop)         run blocks [start, stop) -> state
    block_cache                                 attribute its forward consults: None, or a BlockCache

The block state is a tuple of tensors whose first entry is the image stream (FLUX: (img, txt); a single-stream
model: (x,)). Its forward does `prepare` -> `run_all_blocks(model, state, ctx)` (through
the cache if one is mounted, else all blocks) -> `finish`.
One step of the cache, for the active CFG branch:

    state    = blocks [0, fn)                        always
    signal   = state[0] - state_in[0]                the first blocks' residual, (B, L, D)
    diff     = relL1(signal, signal at the last computed step)   a 0-d tensor on the device
    cached   = past warmup and under the consecutive cap and diff.item() < threshold   (one host sync;
               none with threshold inf, a fixed step mask)
    state    = state + residual                      if cached (the stored, or TaylorSeer-extrapolated, one)
             = blocks [fn, N - bn), residual stored  else
    state    = blocks [N - bn, N)                    always

Compile: the blocks are the compiled regions and this code runs eagerly between them, so its control flow is
in no graph: the cached path adds no graph, no break and no recompile, and the only host sync of a step is the
`.item()` above (warmup steps and steps past the cap make none). Because the regions are the same blocks
whatever the cache decides, mounting the cache never changes which compiled code runs; it must still be
mounted before a whole-model compile (which `mount_cache` and `compile_model` refuse to combine).

State is kept per CFG branch (`with cache.branch("uncond"): ...`), reset per request by the pipeline
(`reset(num_steps)`); a branch that has done `num_steps` steps, or sees a new input shape, starts afresh.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Protocol, runtime_checkable

import torch

from ditserve.cache.policy import CacheSettings
from ditserve.errors import ConfigError

State = tuple[torch.Tensor, ...]  # the block state: (img (B, L, D), txt (B, T, D)) for FLUX, (x (B, S, D),) ...


@runtime_checkable
class BlockCacheable(Protocol):
    """The interface a model declares to take a block cache (see the module docstring)."""

    block_cache: "BlockCache | None"

    @property
    def num_blocks(self) -> int: ...

    def run_blocks(self, state: State, ctx, start: int, stop: int) -> State: ...



def run_all_blocks(model: BlockCacheable, state: State, ctx) -> State:
    """Every block of `model` on `state` (what a model's forward does between `prepare` and `finish`): through
    its mounted block cache, or blocks [0, num_blocks) when none is mounted."""
    if model.block_cache is None:
        return model.run_blocks(state, ctx, 0, model.num_blocks)
    return model.block_cache.run(model, state, ctx)

class TaylorSeer:
    """Extrapolates a sequence of tensor tuples sampled at integer steps (the computed steps) to a later step.

    order 0 returns the last sample. Order k keeps the backward divided differences of the last k+1 samples
    (Newton's form), so the prediction is exact for sequences polynomial of degree <= k in the step index,
    whatever the spacing of the samples. With fewer samples than k+1 the order drops to what is available.
    Memory: k+1 tuples.
    """

    def __init__(self, order: int):
        self.order = order
        self.steps: list[int] = []  # sample steps, newest first
        self.diffs: list[State] = []  # diffs[j] = f[x_n, ..., x_{n-j}], newest sample first

    def update(self, step: int, value: State) -> None:
        """Add the sample `value` at `step` (later than every earlier sample)."""
        new = [value]
        for j in range(1, min(self.order, len(self.steps)) + 1):
            span = float(step - self.steps[j - 1])
            new.append(tuple((a - b) / span for a, b in zip(new[j - 1], self.diffs[j - 1])))
        self.diffs = new
        self.steps = ([step] + self.steps)[:self.order + 1]

    def predict(self, step: int) -> State:
        """The extrapolated tuple at `step`."""
        out = self.diffs[0]
        weight = 1.0
        for j in range(1, len(self.diffs)):
            weight *= float(step - self.steps[j - 1])
            out = tuple(o + weight * d for o, d in zip(out, self.diffs[j]))
        return out


@dataclass
class _Branch:
    """The cache state of one CFG branch for the current request."""

    order: int
    step: int = 0  # steps done in this request
    consecutive: int = 0  # cached steps since the last computed one
    signal: torch.Tensor | None = None  # the first blocks' residual at the last computed step
    residual: TaylorSeer = field(init=False)

    def __post_init__(self):
        self.residual = TaylorSeer(self.order)


@dataclass
class CacheStats:
    """Since the last reset, summed over CFG branches: steps (transformer calls) whose middle blocks were
    computed or cached, and host syncs made for cache decisions (at most one per step)."""

    computed: int = 0
    cached: int = 0
    host_syncs: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"computed": self.computed, "cached": self.cached, "host_syncs": self.host_syncs}


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mean|a - b| / mean|b| as a 0-d float32 tensor on the tensors' device (inf where b is all zeros)."""
    return (a - b).abs().mean(dtype=torch.float32) / b.abs().mean(dtype=torch.float32)


class BlockCache:
    """Runtime of the block cache for one model (see the module docstring). Built by `mount_cache`."""

    def __init__(self, settings: CacheSettings, num_blocks: int):
        self.settings = settings
        self.num_blocks = num_blocks
        self.num_steps: int | None = None
        self._branches: dict[str, _Branch] = {}
        self._branch = "cond"
        self._stats = CacheStats()
        # What runs a block range: the model's `run_blocks`, or (set by the pipeline for EngineConfig.cuda_graphs)
        # its replay from CUDA graphs, `ditserve.cuda_graphs.GraphedBlocks`.
        self.runner = None

    @property
    def name(self) -> str:
        return self.settings.name

    # ------------------------------------------------------------------------------------- request API

    def reset(self, num_steps: int | None = None) -> None:
        """Forget all state (every branch): call at the start of each request. With `num_steps`, a branch
        that has done that many steps starts afresh at its next call (so state never outlives a request)."""
        self.num_steps = num_steps
        self._branches.clear()
        self._stats = CacheStats()

    @contextlib.contextmanager
    def branch(self, key: str) -> Iterator[None]:
        """Calls inside this block use (and update) the state of CFG branch `key` ("cond" outside any)."""
        saved, self._branch = self._branch, key
        try:
            yield
        finally:
            self._branch = saved

    def stats(self) -> CacheStats:
        return CacheStats(**self._stats.as_dict())

    # ------------------------------------------------------------------------------------------ a step

    def _state(self, signal: torch.Tensor) -> _Branch:
        st = self._branches.get(self._branch)
        stale = st is not None and (
            (self.num_steps is not None and st.step >= self.num_steps)
            or (st.signal is not None and st.signal.shape != signal.shape))
        if st is None or stale:
            st = self._branches[self._branch] = _Branch(order=self.settings.taylorseer)
        return st

    def run(self, model: BlockCacheable, state: State, ctx) -> State:
        """One transformer step over all blocks of `model`: the block state in -> the block state out."""
        s, N = self.settings, self.num_blocks
        run_blocks = self.runner or model.run_blocks
        x_in = state[0]
        state = run_blocks(state, ctx, 0, s.fn)
        signal = state[0] - x_in  # (B, L, D)
        st = self._state(signal)
        step = st.step
        st.step += 1

        use_cache = (s.threshold > 0 and step >= s.warmup and st.signal is not None
                     and (s.max_consecutive == 0 or st.consecutive < s.max_consecutive))
        if use_cache and s.threshold != math.inf:
            use_cache = relative_l1(signal, st.signal).item() < s.threshold  # the step's one host sync
            self._stats.host_syncs += 1
        if use_cache:
            state = tuple(x + r for x, r in zip(state, st.residual.predict(step)))
            self._stats.cached += 1
            st.consecutive += 1
        else:
            mid = state
            state = run_blocks(state, ctx, s.fn, N - s.bn)
            st.residual.update(step, tuple(x - m for x, m in zip(state, mid)))
            st.signal = signal
            self._stats.computed += 1
            st.consecutive = 0
        if s.bn:
            state = run_blocks(state, ctx, N - s.bn, N)
        return state


def mount_cache(model, settings: CacheSettings | None) -> BlockCache | None:
    """Mount a block cache with `settings` on `model` (replacing any mounted one); None unmounts.

    Raises ConfigError when the model does not declare the block interface, when fn + bn leaves no block to
    cache, or when the model was compiled whole (the cache's Python control flow would be traced into the
    graph). Regionally compiled blocks are fine: the cache runs between them.
    """
    from ditserve.compile import is_compiled

    if settings is None:
        if isinstance(model, BlockCacheable):
            model.block_cache = None
        return None
    name = type(model).__name__
    if not isinstance(model, BlockCacheable):
        raise ConfigError(f"--cache {settings.name}: {name} does not declare the block-cache interface "
                          f"(num_blocks, run_blocks, block_cache)")
    if is_compiled(model):
        raise ConfigError(f"--cache {settings.name}: {name} was compiled whole; mount the cache before compiling, "
                          f"and compile regionally (the blocks are the compiled regions)")
    settings.check_model(model.num_blocks, name)
    model.block_cache = BlockCache(settings, model.num_blocks)
    return model.block_cache
