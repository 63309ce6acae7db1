"""`ditserve compile-report`: compile a model's DiT as the engine would and report what the compiler did.

It sits above the engine (it loads a checkpoint through the loader, takes the family's defaults from its
pipeline's spec and the model's own `example_inputs`), while `ditserve.compile` (the compile policy) imports
nothing of the engine. The report compiles with fullgraph=False (to count graph breaks rather than stop at the
first), runs the DiT at two resolutions and gives graph count, graph breaks with their reasons and locations,
recompiles at the second resolution with their reasons, and compile time, as one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ditserve.config import MIN_SIZE, SIZE_MULTIPLE, check_image_size
from ditserve.errors import ConfigError

if TYPE_CHECKING:  # torch and the compile policy are imported where they are used: the CLI parses without them
    import torch
    from torch import nn

    from ditserve.compile import CompileConfig

# `ditserve.compile.BACKENDS` / `MODES` (a test holds them equal), named here so that parsing imports no torch.
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


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
    import torch

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
    import torch

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
    import torch

    from ditserve.compile import CompileConfig, compile_model, compiled_modules

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

    # The report's recompile check is about dynamic shapes; it runs the transformer alone (no VAE, CFG, CUDA graphs).
    add_engine_flags(parser, dynamic_shapes="on", pipeline=False)
    parser.add_argument("--height", type=int, default=None,
                        help="first image height, a multiple of 16 (default: the model's default size)")
    parser.add_argument("--width", type=int, default=None, help="first image width (default: the model's)")
    parser.add_argument("--height2", type=int, default=None,
                        help="second image height, for the recompile check (default: half the first height, "
                             "or the first + 32 where half is below the minimum)")
    parser.add_argument("--width2", type=int, default=None, help="second image width (default: the first width)")
    parser.add_argument("--text-len", type=int, default=None,
                        help="text tokens (default: the model's max_sequence_length, e.g. 512 for FLUX.1-dev-like "
                             "models, 256 for schnell-like ones, capped by the tokenizer's model_max_length)")
    parser.add_argument("--backend", choices=list(COMPILE_BACKENDS), default="inductor",
                        help="compiler backend: inductor (the engine's), or aot_eager / eager for a quick "
                             "graph-break and recompile check without code generation")
    parser.add_argument("--mode", choices=list(COMPILE_MODES), default=None, help="inductor mode (default: default)")
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


class _Config(dict):
    """A config.json dict read with attribute access too (`config.guidance_embeds`), as diffusers' and
    transformers' configs are: what a pipeline's `spec_for` reads of its components."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _ConfigOnly:
    """A component known by its config files only: `.config` (config.json or scheduler_config.json) and, for
    a tokenizer, `model_max_length` (tokenizer_config.json)."""

    def __init__(self, folder):
        def read(name: str) -> dict:
            file = folder / name
            return json.loads(file.read_text()) if file.is_file() else {}

        self.config = _Config(read("config.json") or read("scheduler_config.json"))
        limit = read("tokenizer_config.json").get("model_max_length")
        if limit is not None:
            self.model_max_length = limit


def _report_defaults(model: str | None, load_format: str) -> tuple[int, int, int]:
    """(height, width, text tokens) the engine would default to for this checkpoint: its pipeline's spec
    (`spec_for`), computed from the components' config files alone (no weights are read or built)."""
    from ditserve import registry
    from ditserve.loader import read_model_index, resolve_model

    if load_format == "dummy" and model in registry.PRESETS:
        spec = registry.preset(model)
    else:
        folder = resolve_model(model, weights=load_format != "dummy")
        index = read_model_index(folder)
        components = {name: _ConfigOnly(folder / name) for name in index.components}
        spec = registry.pipeline_class(index.pipeline_class).spec_for(folder.name, components)
    return spec.default_height, spec.default_width, spec.max_sequence_length


def _progress(msg: str) -> None:
    print(f"compile-report: {msg}", file=sys.stderr, flush=True)


def compile_report_main(args: argparse.Namespace) -> int:
    """`ditserve compile-report`: load the DiT only, report, print one JSON line last on stdout.
    User mistakes raise ConfigError."""
    from ditserve.compile import CompileConfig
    from ditserve.engine_args import check_engine, engine_from_args
    from ditserve.loader import load_transformer

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
    default_h, default_w, default_text_len = _report_defaults(args.model, args.load_format)
    height, width = height or default_h, width or default_w
    h2, w2 = second_size(height, width)
    h2, w2 = args.height2 or h2, args.width2 or w2
    if (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE) == (h2 // SIZE_MULTIPLE) * (w2 // SIZE_MULTIPLE):
        raise ConfigError(f"the two sizes {height}x{width} and {h2}x{w2} give the same number of image tokens; "
                          f"pick a second size with another area")

    _progress(f"loading the transformer of {args.model or 'the packaged default model'}")
    t0 = time.perf_counter()
    model, _ = load_transformer(args.model, engine)
    make = getattr(model, "example_inputs", None)
    if make is None:
        raise ConfigError(f"compile-report: {type(model).__name__} declares no example_inputs")
    text_len = args.text_len or default_text_len
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
                            name=args.model or "default-model", steady_iters=steady_iters)
    report["text_len"] = text_len
    if cache is not None:
        report["cache"] = {"settings": cache_settings.spec(), **cache.stats().as_dict()}
    _progress(f"{report['graph_count']} graphs, {report['graph_breaks']} graph breaks, "
              f"{report['recompiles']} recompiles, compile {report['compile_seconds']:.1f} s")
    print(json.dumps(report))
    return 0
