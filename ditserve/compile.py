"""Compile policy: regional torch.compile of a DiT (`ditserve.compile_report` holds the diagnostic command).

Regional compilation: a DiT is a stack of a few block classes repeated many times. A model declares them in
its class attribute `repeated_blocks` (names of nn.ModuleLists); `compile_model` compiles every block in
place with `block.compile(...)`. Dynamo caches compiled code per code object (the block class's forward), so
the 19 double blocks of FLUX.1 share one graph and the 38 single blocks another: compile time is paid once per
block class, not once per block. `regional=False` compiles the whole model instead (one big graph, a few
percent faster at several times the compile time).

Compiled modules are tracked by identity (a weak registry), so calling `compile_model` again (after mounting
a cache, from a warmup path, ...) compiles nothing twice; asking to recompile a module with other settings is
an error, never a silent no-op.

Dynamic shapes: the engine's default (`EngineConfig.dynamic_shapes="auto"`, `dynamic=None` here) compiles for
the first size a model runs and, at the first other size, compiles once more with the dims that changed (the
token counts) symbolic; every later size reuses that graph. A model whose blocks of one class run at several
token counts within every forward (say, refiner blocks on the image tokens, then the same block class on image +
text tokens) names those block lists in `varying_shape_blocks`: under "auto" they compile with symbolic shapes
from the first call, as a static first compile would be followed by a symbolic recompile in the same forward.
With `dynamic=True` ("on") the sequence lengths are symbolic from the first compile, so no size recompiles, at a
slower first compile: symbolic shapes make dynamo, AOTAutograd and inductor do more work (on an H100, FLUX.1-dev's
cold compile + first forward took 12.3-14.4 s static against 15.5-19.5 s symbolic, bench/results). Dynamo's "duck
shaping" would give two dimensions that happen to be equal at the first call one shared symbol, so an image whose
token count equals the hidden width (FLUX.1: 3072 tokens at 768x1024, 3072 = D) or the text length would specialise
the graph to that size and every other resolution would recompile. `compile_model` therefore turns duck shaping off
for the process (`torch.fx.experimental._config.use_duck_shape = False`): the one global compiler flag ditserve
sets, set when a model is compiled, never at import.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditserve.errors import ConfigError
from ditserve.logging import init_logger

logger = init_logger(__name__)

# Backends a user may pick. inductor is the engine's; eager / aot_eager trace exactly as inductor does (same
# graphs, breaks and recompiles) but skip code generation: quick graph-break checks.
BACKENDS = ("inductor", "aot_eager", "eager")
# inductor modes (None = inductor's default).
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class CompileConfig:
    """How the DiT is compiled.

    enabled: compile at all (`compile_model` returns the model untouched when False).
    mode: inductor mode (None = default; "max-autotune-no-cudagraphs" tunes GEMM/conv kernels; modes with
        CUDA graphs need static input addresses, see torch.compile).
    dynamic: True makes sequence lengths symbolic from the first compile, so a new resolution does not
        recompile; False specialises to each shape (one compile per resolution); None lets dynamo decide
        (static first, dynamic after the first recompile: the engine's "auto", see `for_engine`).
    fullgraph: a graph break inside a compiled region is an error (the engine's setting: zero breaks).
    backend: "inductor" (the engine's), "aot_eager" or "eager" (quick checks, no code generation).
    regional: compile each block of `model.repeated_blocks` (True) or the whole model as one graph (False).
    prewarm: (inductor, CUDA) start the first-call work that does not depend on the traced graph while dynamo
        traces: inductor's Triton compile workers, and our own Triton kernels compiled on a side thread
        (`warm_compile_workers`, `prewarm_kernels`). Exact: the same kernels run, only their compile moves.
    """

    enabled: bool = True
    mode: str | None = None
    dynamic: bool | None = True
    fullgraph: bool = True
    backend: str = "inductor"
    regional: bool = True
    prewarm: bool = True

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown compile backend {self.backend!r}; valid: {', '.join(BACKENDS)}")
        if self.mode is not None:
            if self.mode not in MODES:
                raise ConfigError(f"unknown compile mode {self.mode!r}; valid: {', '.join(MODES)}")
            if self.backend != "inductor":
                raise ConfigError(f"compile mode {self.mode!r} needs backend 'inductor', got {self.backend!r}")

    @classmethod
    def for_engine(cls, engine) -> "CompileConfig":
        """The engine's compile settings for an EngineConfig: its `dynamic_shapes` ("auto" -> dynamic=None,
        "on" -> dynamic=True) and `compile_prewarm`, everything else default."""
        return cls(dynamic={"auto": None, "on": True}[engine.dynamic_shapes], prewarm=engine.compile_prewarm)

    def compile_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `torch.compile` / `nn.Module.compile`."""
        kw: dict[str, Any] = dict(backend=self.backend, fullgraph=self.fullgraph, dynamic=self.dynamic)
        if self.mode is not None:
            kw["mode"] = self.mode
        return kw


# module -> the CompileConfig it was compiled with. Weak keys: the registry never keeps a model alive.
# nn.Module hashes and compares by identity, so two equal-looking blocks are two entries.
_compiled: "weakref.WeakKeyDictionary[nn.Module, CompileConfig]" = weakref.WeakKeyDictionary()


def is_compiled(module: nn.Module) -> bool:
    """Whether `compile_model` compiled this very module object."""
    return module in _compiled


def compiled_modules(model: nn.Module) -> list[str]:
    """Qualified names ("" for the model itself) of the modules of `model` that `compile_model` compiled."""
    return [name for name, m in model.named_modules(remove_duplicate=False) if m in _compiled]


def compile_regions(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (qualified name, block) pairs regional compilation compiles: the children of every ModuleList
    named in the model class's `repeated_blocks`. Raises ConfigError when the model declares none."""
    names = getattr(type(model), "repeated_blocks", None)
    if not names:
        raise ConfigError(f"{type(model).__name__} declares no `repeated_blocks`, so it cannot be compiled "
                          f"regionally; compile it whole (regional=False)")
    regions = []
    for list_name in names:
        blocks = getattr(model, list_name, None)
        if not isinstance(blocks, nn.ModuleList):
            raise ConfigError(f"{type(model).__name__}.repeated_blocks names {list_name!r}, which is not an "
                              f"nn.ModuleList attribute of the model")
        regions.extend((f"{list_name}.{i}", block) for i, block in enumerate(blocks))
    return regions


def compile_cache_dir() -> Path:
    """Where compiled artefacts persist between processes: $DITSERVE_CACHE_DIR/torch-compile if set, else
    ~/.cache/ditserve/torch-compile (XDG_CACHE_HOME honoured)."""
    root = os.environ.get("DITSERVE_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "torch-compile"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "ditserve" / "torch-compile"


def set_process_compiler_flags() -> None:
    """Compiler flags ditserve needs for the whole process (idempotent):

    - duck shaping off, so that sizes that happen to coincide at the first call (tokens == hidden width,
      image tokens == text tokens) do not specialise a dynamic graph (see the module docstring);
    - Python floats specialised: with dynamic=True dynamo otherwise traces a block's float attributes (norm eps,
      MulAdd's k) as symbolic inputs, fails to turn them into tensors, and restarts the analysis of every block
      class once: measured on FLUX.1-dev (H100), that second trace was 7.7 s of a 21.8 s cold compile and 5.9 s
      of an 8.9 s warm one. The floats are constants of the model, so specialising them costs no recompile;
    - a persistent cache folder for compiled artefacts. Inductor keeps its FX-graph, AOTAutograd, autotuning
      and Triton kernel caches under $TORCHINDUCTOR_CACHE_DIR, by default in /tmp, which containers and
      reboots empty. Unless the user set that variable, ditserve points it at `compile_cache_dir()`, so a second
      process (a restarted server, the next `generate --compile`) reuses the first one's kernels instead of
      compiling them again. Importing inductor writes its /tmp default into the variable, so "the user set it"
      means: it holds something other than that default. Inductor reads the variable at each cache lookup, so
      setting it here, before the first compile, is enough.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    torch.fx.experimental._config.use_duck_shape = False
    torch._dynamo.config.specialize_float = True
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(compile_cache_dir())


def _model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype] | None:
    p = next(model.parameters(), None)
    return None if p is None else (p.device, p.dtype)


def warm_compile_workers(model: nn.Module | None = None, device: torch.device | str | None = None) -> None:
    """Start inductor's Triton compile workers now (idempotent), for a model on (or about to load onto) a CUDA
    device; a no-op elsewhere.

    Inductor starts them itself only when it first compiles a graph, i.e. after dynamo has traced the first
    block, and until they are up it compiles that graph's kernels one by one in this process. Started at load
    (the engine calls this before reading weights) or at `compile_model`, their start-up overlaps work that
    has to happen anyway."""
    if device is None:
        found = _model_device_dtype(model) if model is not None else None
        device = found[0] if found else None
    if device is None or torch.device(device).type != "cuda":
        return
    from torch._inductor.async_compile import maybe_warm_pool  # honours TORCH_WARM_POOL=0; needs triton

    maybe_warm_pool()


def warm_ops(model: nn.Module) -> list[nn.Module]:
    """The ops `prewarm_kernels` warms: one per distinct configuration (class and settings) among the model's
    modules that took the "cuda" path and define `warm`."""
    ops, seen = [], set()
    for m in model.modules():
        if getattr(m, "path", None) == "cuda" and callable(getattr(m, "warm", None)):
            key = (type(m), m.extra_repr())
            if key not in seen:
                seen.add(key)
                ops.append(m)
    return ops


def prewarm_kernels(model: nn.Module) -> threading.Thread | None:
    """Compile the Triton kernels of the model's fast-path ops (those that took the "cuda" path and define
    `warm(device, dtype)`) on a daemon thread, one call per distinct op configuration; returns the thread, or
    None when there is nothing to warm (no CUDA, no such op).

    The compiled graphs call these kernels as opaque custom ops, so inductor does not compile them: without
    this, Triton compiles them at the first forward (1-2.4 s of an H100 cold start, measured at df981f5). Run
    while dynamo traces, that work overlaps the trace. The warm calls run tiny tensors through the same
    kernels with the specialisation of the real calls (see the ops' `warm_inputs`). A failure is logged and
    changes nothing: the kernel then compiles at its first call as before."""
    found = _model_device_dtype(model)
    if found is None or found[0].type != "cuda":
        return None
    device, dtype = found
    ops = warm_ops(model)
    if not ops:
        return None

    def run() -> None:
        try:
            with torch.inference_mode(), torch.cuda.device(device):
                for op in ops:
                    op.warm(device, dtype)
                torch.cuda.synchronize(device)
        except Exception as e:  # the first real call compiles the kernel instead
            logger.warning("prewarming the Triton kernels failed (%s: %s); they compile at their first call",
                           type(e).__name__, e)

    thread = threading.Thread(target=run, name="ditserve-prewarm-kernels", daemon=True)
    thread.start()
    return thread


def compile_model(model: nn.Module, cfg: CompileConfig) -> nn.Module:
    """Compile `model` in place as `cfg` says and return it.

    Regional (default): every block of `model.repeated_blocks` gets `block.compile(...)` (with dynamic=True where
    `cfg.dynamic` is None and the block's list is one of `model.varying_shape_blocks`, see above). Whole
    (regional=False): `model.compile(...)`. A module compiled before (tracked by identity) is skipped if it
    was compiled with the same settings; other settings, or mixing regional and whole-model compilation on
    one model, raise ValueError. Compilation itself happens lazily, at each region's first call.
    """
    if not cfg.enabled:
        return model
    if cfg.regional:
        if model in _compiled:
            raise ValueError(f"{type(model).__name__} was compiled whole; it cannot also be compiled regionally")
        varying = set(getattr(type(model), "varying_shape_blocks", ()))
        targets = [(block, name.split(".", 1)[0] in varying) for name, block in compile_regions(model)]
    else:
        inner = [name for name in compiled_modules(model) if name]
        if inner:
            raise ValueError(f"{type(model).__name__} has regionally compiled blocks ({inner[0]}, ...); "
                             f"it cannot also be compiled whole")
        if getattr(model, "block_cache", None) is not None:
            raise ConfigError(f"{type(model).__name__} has a block cache mounted: its per-step decision would "
                              f"break a whole-model graph; compile regionally (the blocks are the regions)")
        targets = [(model, False)]
    set_process_compiler_flags()
    if cfg.prewarm and cfg.backend == "inductor":
        warm_compile_workers(model)
        prewarm_kernels(model)
    for module, varying_shapes in targets:
        done = _compiled.get(module)
        if done is not None:
            if done != cfg:
                raise ValueError(f"a {type(module).__name__} was already compiled with {done}; "
                                 f"it cannot be recompiled with {cfg}")
            continue  # the same module object, e.g. listed twice or a second compile_model call
        kwargs = cfg.compile_kwargs()
        if varying_shapes and cfg.dynamic is None:  # "auto" on a block list named in `varying_shape_blocks`
            kwargs["dynamic"] = True
        module.compile(**kwargs)
        _compiled[module] = cfg
    return model


# ---------------------------------------------------------------------------------------------- warmup


def warmup(pipeline, params, dummy: bool = True) -> dict[str, Any]:
    """Run one request as real ones will run, so that they compile nothing: call it after the cache is mounted
    and the model compiled (the pipeline's constructor does both), with the size, step count and batch of the
    expected requests (with dynamic_shapes "on" other sizes reuse the compiled graphs; with "auto" the first
    other size compiles once more; a step count or a batch of 1 may specialise).

    With `dummy` (default) it runs under `ditserve.dummy_run`: the DiT's output projection and the VAE decode
    are skipped (neither is a compiled region, so the compiled graphs are those real requests use; with
    `compile_vae` the decode runs, for its compile) and no images are made. Returns {"seconds": wall time,
    "cache_stats": the run's cache stats or None}.
    """
    from ditserve.dummy_run import dummy_run

    start = time.perf_counter()
    with dummy_run() if dummy else contextlib.nullcontext():
        (result,) = pipeline.generate_batch([params])
    return {"seconds": time.perf_counter() - start, "cache_stats": result.cache_stats}
