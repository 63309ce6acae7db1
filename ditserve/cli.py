"""The `ditserve` command line.

    ditserve generate --prompt "a red circle on a blue background" --output out.png
    ditserve compile-report --model /models/FLUX.1-dev
    ditserve bench --model /models/FLUX.1-dev --compile --runs 5
    ditserve serve --model /models/FLUX.1-dev --port 30000

Flags parse into the same settings classes the server uses (`EngineConfig`, `SamplingParams`), which do the
validation. A user mistake (bad flag, bad size, bad model path) prints one `ditserve: error: ...` line on
stderr and exits with status 2; no traceback. Logging and compiler settings are set up here, never on import.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from ditserve.config import ConfigError, SamplingParams
from ditserve.engine_args import add_engine_flags, check_engine, engine_from_args

# Output suffix -> PIL format name.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line ("ditserve generate: error: ...") instead of usage + error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ditserve", description="Fast inference for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    g = sub.add_parser("generate", help="generate images from a prompt",
                       description="Generate images from a text prompt and save them.")
    g.add_argument("--prompt", required=True, help="the text prompt")
    g.add_argument("--negative-prompt", default=None,
                   help="what classifier-free guidance steers away from (families with classifier-free "
                        "guidance; default: the empty prompt)")
    g.add_argument("--height", type=int, default=None, help="image height, a multiple of 16 (default: model's)")
    g.add_argument("--width", type=int, default=None, help="image width, a multiple of 16 (default: model's)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: model's)")
    g.add_argument("--guidance", type=float, default=None,
                   help="the family's own guidance scale (default: model's): a distilled guidance embedding's "
                        "or the classifier-free scale, as the family defines it (see the README's model table)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    g.add_argument("--num-images", type=int, default=1, help="images to generate (numbered outputs if > 1)")
    g.add_argument("--max-sequence-length", type=int, default=None,
                   help="prompt tokens of the text encoder (default: model's, capped by the tokenizer's "
                        "model_max_length)")
    g.add_argument("--output", default="out.png",
                   help="output file: .png, .jpg/.jpeg or .webp; several images are saved as NAME-0.png, ...")
    add_engine_flags(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer (regionally)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--quiet", "-q", action="store_true",
                   help="print only the output paths and errors (no progress bar, no timing summary)")
    g.add_argument("--verbose", "-v", action="store_true", help="log what is loaded and how (INFO level)")
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve POST /v1/images/generations (OpenAI's image API), /v1/models, /health, "
                                   "/ready, /metrics and a web page at /. The model loads in the background; "
                                   "/ready turns 200 once it is loaded and warmed up.")
    add_engine_flags(s, dynamic_shapes="on")
    s.add_argument("--compile", action="store_true", help="torch.compile the transformer (warmed up before /ready)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=30000, help="TCP port (default: 30000; 0 picks a free one)")
    key = s.add_mutually_exclusive_group()
    key.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* (visible in the "
                                                     "process list: prefer --api-key-file)")
    key.add_argument("--api-key-file", default=None, help="read the API key from the first line of this file")
    s.add_argument("--max-batch-size", type=int, default=4,
                   help="most images in one denoise batch, and the largest n of a request (default: 4)")
    s.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting; more get 429 with Retry-After (default: 64)")
    s.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take from arrival to answer; then 504 (default: 600)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body; more is 413 "
                                                                       "(default: 1 MiB)")
    s.add_argument("--output-dir", default=None,
                   help="folder for response_format=url images (default: a temporary folder removed at exit)")
    s.add_argument("--url-ttl", type=float, default=3600.0, help="seconds an image URL stays valid (default: 3600)")
    s.add_argument("--output-max-bytes", type=int, default=1 << 30,
                   help="largest total size of the URL image folder; the oldest go first (default: 1 GiB)")
    s.add_argument("--warmup-size", default=None,
                   help="WIDTHxHEIGHT of the warmup run (default: the model's size); use your requests' size")
    s.add_argument("--warmup-steps", type=int, default=None, help="steps of the warmup run (default: the model's)")
    s.add_argument("--no-warmup", action="store_true", help="ready as soon as the model is loaded")
    s.add_argument("--verbose", "-v", action="store_true", help="INFO logs and an access log")
    s.set_defaults(func=_serve)

    from ditserve.bench import add_bench_args

    b = sub.add_parser("bench", help="time requests of a model on this machine, report latency as JSON",
                       description="Load the model as generate does, run warmup requests (they compile), then "
                                   "timed ones; print latency, per-stage times, images/s and peak memory. The "
                                   "last stdout line is JSON.")
    add_engine_flags(b)
    b.add_argument("--compile", action="store_true", help="torch.compile the transformer (the warmup compiles)")
    add_bench_args(b)
    b.set_defaults(func=_bench)

    from ditserve.compile_report import add_compile_report_args, compile_report_main

    r = sub.add_parser("compile-report", help="compile the DiT, report graph breaks and recompiles as JSON",
                       description="Compile the model's transformer as the engine does, run it at two sizes, "
                                   "and print graph count, graph breaks, recompiles and compile time; the last "
                                   "stdout line is JSON.")
    add_compile_report_args(r)
    r.set_defaults(func=compile_report_main)
    return parser


# ------------------------------------------------------------------------------------------------- generate


def output_paths(output: str, n: int) -> list[Path]:
    """The files `n` images go to: `output` itself for one image, NAME-0.ext, NAME-1.ext, ... for more.
    Raises ConfigError for a suffix we cannot encode."""
    path = Path(output)
    if path.suffix.lower() not in IMAGE_FORMATS:
        raise ConfigError(f"--output {output!r}: unsupported image format {path.suffix or '(no suffix)'!r}; "
                          f"use one of {', '.join(IMAGE_FORMATS)}")
    if IMAGE_FORMATS[path.suffix.lower()] == "WEBP":
        from PIL import features

        if not features.check("webp"):
            raise ConfigError(f"--output {output!r}: this Pillow was built without WebP support; use .png or .jpg")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(n)]


def save_image(image, path: Path) -> None:
    fmt = IMAGE_FORMATS[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    image.save(path, format=fmt, **options)


def _quiet_libraries() -> None:
    """diffusers' and transformers' own loading chatter (per-file progress bars, advice to install
    accelerate) off: the CLI logs what it loads itself. Their errors still show."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def _format_summary(result, n_steps: int) -> str:
    t = result.timings
    rate = n_steps / t["denoise_s"] if t["denoise_s"] > 0 else float("inf")
    peak = "n/a" if result.peak_memory_bytes is None else f"{result.peak_memory_bytes / 2**30:.2f} GiB"
    c = result.cache_stats
    cache = "" if c is None else f" | cache {c['policy']}: {c['computed']} computed, {c['cached']} cached"
    return (f"text encode {t['text_encode_s']:.2f} s | denoise {t['denoise_s']:.2f} s "
            f"({n_steps} steps, {rate:.1f} step/s){cache} | decode {t['decode_s']:.2f} s | "
            f"total {t['total_s']:.2f} s | peak memory {peak} | seed {result.params.seed}")


def _generate(args: argparse.Namespace) -> int:
    params = SamplingParams(prompt=args.prompt, height=args.height, width=args.width, steps=args.steps,
                            guidance=args.guidance, seed=args.seed, num_images=args.num_images,
                            max_sequence_length=args.max_sequence_length, negative_prompt=args.negative_prompt)
    params.validate()  # size, steps, seed, ... before the model load; model limits are checked after it
    paths = output_paths(args.output, args.num_images)
    engine = engine_from_args(args)
    check_engine(engine)

    from ditserve.engine import Engine

    _quiet_libraries()
    t0 = time.perf_counter()
    model = Engine.load(args.model, engine)
    load_s = time.perf_counter() - t0
    name = model.name

    result = model.generate(params, progress=not (args.quiet or args.no_progress))
    for image, path in zip(result.images, paths):
        save_image(image, path)
        print(path)
    if not args.quiet:
        quant = (f" | quantization {engine.quantization}" + (" + fp8 attention" if engine.fp8_attention else "")
                 + ("" if engine.fp8_fast_accum_on else " (fp32 accumulation)") if engine.quantization else "")
        print(f"{name}: load {load_s:.2f} s{quant} | {_format_summary(result, result.params.steps)}",
              file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------------ serve


def _read_api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file is None:
        return args.api_key
    try:
        lines = Path(args.api_key_file).expanduser().read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"--api-key-file {args.api_key_file!r}: {e.strerror or e}") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise ConfigError(f"--api-key-file {args.api_key_file!r}: the first line is empty")
    return key


def _serve(args: argparse.Namespace) -> int:
    from ditserve.server import ServerConfig, run_server
    from ditserve.server.app import parse_size

    warmup_size = None
    if args.warmup_size is not None:
        try:
            warmup_size = parse_size(args.warmup_size)
        except ConfigError as e:
            raise ConfigError(f"--warmup-size: {e}") from None
    if args.warmup_steps is not None:
        SamplingParams(prompt="", steps=args.warmup_steps).validate()
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
    config = ServerConfig(api_key=_read_api_key(args), max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                          request_timeout=args.request_timeout, max_body_bytes=args.max_body_bytes,
                          output_dir=Path(args.output_dir) if args.output_dir else None, url_ttl=args.url_ttl,
                          output_max_bytes=args.output_max_bytes, warmup=not args.no_warmup,
                          warmup_size=warmup_size, warmup_steps=args.warmup_steps)
    engine = engine_from_args(args)
    check_engine(engine)
    _quiet_libraries()
    run_server(args.model, engine, config, args.host, args.port, verbose=args.verbose,
               announce=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


# ------------------------------------------------------------------------------------------------------ bench


def _bench(args: argparse.Namespace) -> int:
    from ditserve.bench import bench_main

    engine = engine_from_args(args)
    check_engine(engine)
    _quiet_libraries()
    return bench_main(args, engine)


# ------------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ditserve` and `python -m ditserve`. Returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), message already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE

    from ditserve.logging import setup_logging

    setup_logging("INFO" if getattr(args, "verbose", False) else "WARNING")
    try:
        return args.func(args)
    except ConfigError as e:
        message = " ".join(str(e).split())  # one line, whatever the message
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
