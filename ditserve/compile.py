"""Compile policy: regional torch.compile of a DiT, and the `ditserve compile-report` diagnostic.

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
token counts) symbolic; every later size reuses that graph. With `dynamic=True` ("on") the sequence lengths are
symbolic from the first compile, so no size recompiles, at a slower first compile: symbolic shapes make dynamo,
AOTAutograd and inductor do more work (on an H100, FLUX.1-dev's cold compile + first forward took 12.3-14.4 s
static against 15.5-19.5 s symbolic, bench/results). Dynamo's "duck shaping" would give two dimensions that
happen to be equal at the first call one shared symbol, so an image whose token count equals the hidden width
(FLUX.1: 3072 tokens at 768x1024, 3072 = D) or the text length would specialise the graph to that size and every
other resolution would recompile.
`compile_model` therefore turns duck shaping off for the process (`torch.fx.experimental._config.
use_duck_shape = False`): the one global compiler flag ditserve sets, set when a model is compiled, never at
import.

`compile_report` compiles a model as the engine would (but with fullgraph=False, to count graph breaks
rather than stop at the first), runs it at two resolutions and reports graph count, graph breaks with their
reasons and locations, recompiles at the second resolution with their reasons, and compile time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ditserve.config import MIN_SIZE, SIZE_MULTIPLE, ConfigError, check_image_size
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

    Regional (default): every block of `model.repeated_blocks` gets `block.compile(...)`. Whole
    (regional=False): `model.compile(...)`. A module compiled before (tracked by identity) is skipped if it
    was compiled with the same settings; other settings, or mixing regional and whole-model compilation on
    one model, raise ValueError. Compilation itself happens lazily, at each region's first call.
    """
    if not cfg.enabled:
        return model
    if cfg.regional:
        if model in _compiled:
            raise ValueError(f"{type(model).__name__} was compiled whole; it cannot also be compiled regionally")
        targets = [block for _, block in compile_regions(model)]
    else:
        inner = [name for name in compiled_modules(model) if name]
        if inner:
            raise ValueError(f"{type(model).__name__} has regionally compiled blocks ({inner[0]}, ...); "
                             f"it cannot also be compiled whole")
        if getattr(model, "block_cache", None) is not None:
            raise ConfigError(f"{type(model).__name__} has a block cache mounted: its per-step decision would "
                              f"break a whole-model graph; compile regionally (the blocks are the regions)")
        targets = [model]
    set_process_compiler_flags()
    if cfg.prewarm and cfg.backend == "inductor":
        warm_compile_workers(model)
        prewarm_kernels(model)
    for module in targets:
        done = _compiled.get(module)
        if done is not None:
            if done != cfg:
                raise ValueError(f"a {type(module).__name__} was already compiled with {done}; "
                                 f"it cannot be recompiled with {cfg}")
            continue  # the same module object, e.g. listed twice or a second compile_model call
        module.compile(**cfg.compile_kwargs())
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
        result = pipeline.generate(params, progress=False)
    return {"seconds": time.perf_counter() - start, "cache_stats": result.cache_stats}


# ---------------------------------------------------------------------------------------------- report


def flux_example_inputs(config, height: int, width: int, batch: int = 1, text_len: int = 512,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        seed: int = 0) -> dict[str, torch.Tensor | None]:
    """FluxTransformer kwargs for a `height` x `width` image: random (seeded, drawn on the CPU) tensors.

    `config` is a FluxConfig. Image tokens L = (height/16) * (width/16) (8x VAE, then 2x2 packing);
    hidden_states (B, L, in_channels), encoder_hidden_states (B, text_len, joint_attention_dim),
    pooled_projections (B, pooled_projection_dim), timestep (B,) in [0, 1], img_ids (L, 3) = (0, row, col),
    txt_ids (text_len, 3) zeros, guidance (B,) if the model is guidance-distilled else None.
    """
    for name, v in (("height", height), ("width", width)):
        if v % SIZE_MULTIPLE or v <= 0:
            raise ConfigError(f"{name} must be a positive multiple of {SIZE_MULTIPLE}, got {v}")
    gen = torch.Generator().manual_seed(seed)
    rows, cols = height // SIZE_MULTIPLE, width // SIZE_MULTIPLE
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return dict(
        hidden_states=rand(batch, rows * cols, config.in_channels),
        encoder_hidden_states=rand(batch, text_len, config.joint_attention_dim),
        pooled_projections=rand(batch, config.pooled_projection_dim),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=img_ids.reshape(rows * cols, 3).to(device=device, dtype=dtype),
        txt_ids=torch.zeros(text_len, 3, device=device, dtype=dtype),
        guidance=torch.full((batch,), 3.5, device=device, dtype=dtype) if config.guidance_embeds else None,
    )


# dynamo logs every graph break, with its location, to this artifact logger when it is enabled at DEBUG.
_GRAPH_BREAK_LOGGER = "torch._dynamo.symbolic_convert.__graph_breaks"
_GRAPH_BREAK_RE = re.compile(r"in user code at (?P<loc>[^\n]+:\d+)\nGraph Break Reason: (?P<reason>.*?)"
                             r"(?:\nUser code traceback:|$)", re.DOTALL)


def _short_reason(reason: str) -> str:
    """dynamo's multi-paragraph break message -> "<break type>: <explanation>" (or its first line)."""
    lines = [line.strip() for line in reason.strip().splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("Explanation:") and i > 0:
            return f"{lines[i - 1]}: {line.removeprefix('Explanation:').strip()}"
    return lines[0] if lines else ""


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _capture_graph_break_logs() -> Iterator[_ListHandler]:
    """Collect dynamo's graph-break log records (they carry the user file:line) without printing them; the
    logger's level, handlers and propagation are restored on exit."""
    logger = logging.getLogger(_GRAPH_BREAK_LOGGER)
    saved = (logger.level, logger.propagate, list(logger.handlers))
    handler = _ListHandler()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.handlers = [handler]
    try:
        yield handler
    finally:
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        logger.handlers = saved[2]


def _break_reasons(log_messages: list[str], counted: Counter) -> list[str]:
    """Unique "file:line: break type: explanation" strings from the captured logs; without logs (a torch
    that renamed its logger), dynamo's counted messages without the location."""
    reasons = []
    for msg in log_messages:
        m = _GRAPH_BREAK_RE.search(msg)
        if m:
            reasons.append(f"{m['loc']}: {_short_reason(m['reason'])}")
    if not reasons:
        reasons = [_short_reason(msg) for msg in counted]
    return sorted(set(reasons))


@contextlib.contextmanager
def _record_compiles() -> Iterator[list[str]]:
    """The compile ids ("frame/attempt") of every frame dynamo compiles inside the block, in order.

    Dynamo's compile-start callback fires once per top-level frame compilation (not for compilations nested
    inside one, such as inductor's own traced helpers, nor for CUDA graph recordings, which are filtered
    out): one entry per frame = one graph for a frame without a break.
    """
    ids: list[str] = []

    def on_start(args) -> None:
        if args.callback_trigger == torch._dynamo.callback.CallbackTrigger.DYNAMO:
            ids.append(args.compile_id)

    torch._dynamo.callback_handler.register_start_callback(on_start)
    try:
        yield ids
    finally:
        torch._dynamo.callback_handler.remove_start_callback(on_start)


def _sync(device: torch.device) -> None:
    if device.type != "cpu":
        torch.accelerator.synchronize(device)


def _timed_call(model: nn.Module, inputs: dict, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    model(**inputs)
    _sync(device)
    return time.perf_counter() - t0


def compile_report(model: nn.Module, make_inputs: Callable[[int, int], dict], sizes: list[tuple[int, int]],
                   cfg: CompileConfig | None = None, name: str | None = None, steady_iters: int = 3
                   ) -> dict[str, Any]:
    """Compile `model` as the engine would and report what the compiler did, at two resolutions.

    make_inputs(height, width) -> the model's forward kwargs. sizes: [(h, w), (h2, w2)]; the second size
    must give another sequence length. The model must not be compiled yet; it is left compiled with
    fullgraph=False (so breaks are counted, not raised) and the report's backend.

    Returns a JSON-able dict:
      graph_count: frames dynamo compiled at the first size, i.e. graphs (regional FLUX: one per block
          class; a graph break adds the frame that resumes after it).
      graph_breaks: graph-break events while tracing, both sizes; break_reasons: unique "file:line: reason".
      recompiles: frames compiled during the second size's calls (0 where shapes are meant to be dynamic);
          recompile_reasons: the guard failures dynamo gave for them.
      compile_seconds: first call minus a steady-state call (the fastest of `steady_iters`) at the first
          size; second_size_compile_seconds: the same at the second size (~0 when nothing recompiles).
      steady_seconds: the steady-state call at the first size. Plus model, sizes, device, dtype, torch, and
          compile: `cfg` (the engine's settings; the report itself traces with fullgraph=False).
    Counts come from dynamo's process-wide counters: compile nothing else in the process meanwhile.
    """
    cfg = cfg if cfg is not None else CompileConfig()
    if len(sizes) != 2:
        raise ConfigError(f"compile_report needs two sizes, got {len(sizes)}")
    if compiled_modules(model):
        raise ValueError("compile_report needs a model that compile_model has not compiled yet")
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    report_cfg = replace(cfg, enabled=True, fullgraph=False)

    # Inputs are made in inference mode too: dynamo guards on it, and the engine runs the DiT in it.
    with torch.inference_mode(), _capture_graph_break_logs() as logs, _record_compiles() as compiles:
        inputs = [make_inputs(h, w) for h, w in sizes]
        compile_model(model, report_cfg)

        breaks_before = Counter(torch._dynamo.utils.counters["graph_break"])
        first = _timed_call(model, inputs[0], device)
        steady = min(_timed_call(model, inputs[0], device) for _ in range(steady_iters))
        graph_count = len(compiles)

        compiles.clear()
        metrics_before = torch._dynamo.utils.get_compilation_metrics()  # (a list: holds the records, so
        seen = {id(m) for m in metrics_before}  # their ids stay unique while we compare)
        second_first = _timed_call(model, inputs[1], device)
        second_steady = min(_timed_call(model, inputs[1], device) for _ in range(steady_iters))
        recompiles = len(compiles)
        recompile_reasons = sorted({
            f"{m.co_filename}:{m.co_firstlineno} {m.co_name}: {' '.join(m.recompile_reason.split())}"
            for m in torch._dynamo.utils.get_compilation_metrics()
            if id(m) not in seen and m.recompile_reason})

    breaks = Counter(torch._dynamo.utils.counters["graph_break"])
    breaks.subtract(breaks_before)
    breaks = +breaks  # the breaks of this report only
    return {
        "model": name if name is not None else type(model).__name__,
        "sizes": [list(s) for s in sizes],
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "compile": asdict(cfg),
        "graph_count": graph_count,
        # dynamo's counter misses some kinds (data-dependent branching is logged, not counted): take the larger.
        "graph_breaks": max(sum(breaks.values()), sum(bool(_GRAPH_BREAK_RE.search(m)) for m in logs.messages)),
        "break_reasons": _break_reasons(logs.messages, breaks),
        "recompiles": recompiles,
        "recompile_reasons": recompile_reasons,
        # Clamped at 0: with nothing to compile, the difference is timing noise.
        "compile_seconds": round(max(first - steady, 0.0), 3),
        "second_size_compile_seconds": round(max(second_first - second_steady, 0.0), 3),
        "steady_seconds": round(steady, 4),
    }


# ------------------------------------------------------------------------------------------------- CLI


def add_compile_report_args(parser: argparse.ArgumentParser) -> None:
    """The flags of `ditserve compile-report`: the engine flags every model-loading subcommand shares, plus
    the sizes and compiler settings of the report."""
    from ditserve.engine_args import add_engine_flags

    add_engine_flags(parser, dynamic_shapes="on")  # the report's recompile check is about dynamic shapes
    parser.add_argument("--height", type=int, default=None,
                        help="first image height, a multiple of 16 (default: the model's default size)")
    parser.add_argument("--width", type=int, default=None, help="first image width (default: the model's)")
    parser.add_argument("--height2", type=int, default=None,
                        help="second image height, for the recompile check (default: half the first height, "
                             "or the first + 32 where half is below the minimum)")
    parser.add_argument("--width2", type=int, default=None, help="second image width (default: the first width)")
    parser.add_argument("--text-len", type=int, default=None,
                        help="text tokens (default: the model's max_sequence_length: 512 for FLUX.1-dev-like "
                             "models, 256 for schnell-like ones, capped by the T5 tokenizer's model_max_length)")
    parser.add_argument("--backend", choices=list(BACKENDS), default="inductor",
                        help="compiler backend: inductor (the engine's), or aot_eager / eager for a quick "
                             "graph-break and recompile check without code generation")
    parser.add_argument("--mode", choices=list(MODES), default=None, help="inductor mode (default: default)")
    parser.add_argument("--static", action="store_true",
                        help="compile with static shapes (dynamic=False): every resolution recompiles "
                             "(overrides --dynamic-shapes)")
    parser.add_argument("--whole-model", action="store_true",
                        help="compile the whole model as one graph instead of each repeated block")


def second_size(height: int, width: int) -> tuple[int, int]:
    """The default second resolution: half the height (a multiple of 16), or the height + 32 where half would
    be below the minimum size. Its token count always differs from the first's."""
    h2 = height // 2 // SIZE_MULTIPLE * SIZE_MULTIPLE
    return (h2 if h2 >= MIN_SIZE else height + 2 * SIZE_MULTIPLE), width


def _checkpoint_defaults(model: str | None, load_format: str) -> tuple[int, int, int | None]:
    """(height, width, T5 tokenizer limit) the pipeline would default to: a preset's own size and no tokenizer
    limit; for a folder the VAE's sample_size (see FluxPipeline.spec_for) and tokenizer_2's model_max_length
    (None where the file is absent). The folder is resolved once."""
    from ditserve import registry
    from ditserve.loader import resolve_model
    from ditserve.pipelines.flux import default_image_size

    if load_format == "dummy" and model in registry.PRESETS:
        spec = registry.preset(model)
        return spec.default_height, spec.default_width, None
    folder = resolve_model(model, weights=load_format != "dummy")

    def config(path: str) -> dict:
        file = folder / path
        return json.loads(file.read_text()) if file.is_file() else {}

    size = default_image_size(config("vae/config.json").get("sample_size"))
    return size, size, config("tokenizer_2/tokenizer_config.json").get("model_max_length")


def _example_inputs_fn(model: nn.Module, tokenizer_limit: int | None) -> tuple[Callable[..., dict], int]:
    """The model family's example-input builder and its default text length (the pipeline's rule)."""
    from ditserve.models.flux import FluxTransformer
    from ditserve.pipelines.flux import default_max_sequence_length

    if isinstance(model, FluxTransformer):
        return flux_example_inputs, default_max_sequence_length(model.config.guidance_embeds, tokenizer_limit)
    raise ConfigError(f"compile-report has no example inputs for {type(model).__name__}")


def _progress(msg: str) -> None:
    print(f"compile-report: {msg}", file=sys.stderr, flush=True)


def compile_report_main(args: argparse.Namespace) -> int:
    """`ditserve compile-report`: load the DiT only, report, print one JSON line last on stdout.
    User mistakes raise ConfigError."""
    from ditserve.engine_args import check_engine, engine_from_args
    from ditserve.loader import load_transformer

    if args.cache_backend != "ditserve":
        raise ConfigError("compile-report mounts ditserve's own cache only; drop --cache-backend")
    # The cache is mounted below, on the bare transformer, so the engine itself carries none.
    engine = engine_from_args(args, compile=True, cache=None, cache_backend="ditserve")
    check_engine(engine)
    engine_cfg = CompileConfig.for_engine(engine)  # --dynamic-shapes, --no-compile-prewarm
    cfg = replace(engine_cfg, mode=args.mode, dynamic=False if args.static else engine_cfg.dynamic,
                  backend=args.backend, regional=not args.whole_model)
    from ditserve.cache import mount_cache, parse_cache

    cache_settings = parse_cache(args.cache)
    if cache_settings is not None and args.whole_model:
        raise ConfigError("--cache needs regional compilation (the blocks are the compiled regions); "
                          "drop --whole-model")
    for name in ("height", "width", "height2", "width2"):
        if getattr(args, name) is not None:
            check_image_size(f"--{name}", getattr(args, name))
    if args.text_len is not None and args.text_len < 1:
        raise ConfigError(f"--text-len must be >= 1, got {args.text_len}")

    height, width = args.height, args.width
    default_h, default_w, t5_limit = _checkpoint_defaults(args.model, args.load_format)
    height, width = height or default_h, width or default_w
    h2, w2 = second_size(height, width)
    h2, w2 = args.height2 or h2, args.width2 or w2
    if (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE) == (h2 // SIZE_MULTIPLE) * (w2 // SIZE_MULTIPLE):
        raise ConfigError(f"the two sizes {height}x{width} and {h2}x{w2} give the same number of image tokens; "
                          f"pick a second size with another area")

    _progress(f"loading the transformer of {args.model or 'the packaged default model'}")
    t0 = time.perf_counter()
    model, _ = load_transformer(args.model, engine)
    make, text_len = _example_inputs_fn(model, t5_limit)
    text_len = args.text_len or text_len
    param = next(model.parameters())
    _progress(f"loaded in {time.perf_counter() - t0:.1f} s ({param.device}, {param.dtype}); compiling with "
              f"{cfg.backend} and running {height}x{width}, then {h2}x{w2} ({text_len} text tokens)")

    def make_inputs(h: int, w: int) -> dict:
        return make(model.config, h, w, text_len=text_len, device=param.device, dtype=param.dtype)

    steady_iters = 3
    cache = mount_cache(model, cache_settings)  # before compiling, as the engine does
    if cache is not None:  # each size: warmup steps, then cached steps (the inputs repeat, so they are cached)
        steady_iters = max(steady_iters, cache_settings.warmup + 2)
    report = compile_report(model, make_inputs, [(height, width), (h2, w2)], cfg,
                            name=args.model or "default", steady_iters=steady_iters)
    report["text_len"] = text_len
    if cache is not None:
        report["cache"] = {"settings": cache_settings.spec(), **cache.stats().as_dict()}
    _progress(f"{report['graph_count']} graphs, {report['graph_breaks']} graph breaks, "
              f"{report['recompiles']} recompiles, compile {report['compile_seconds']:.1f} s")
    print(json.dumps(report))
    return 0
