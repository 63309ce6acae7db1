"""The `ditserve` command line.

    ditserve generate --prompt "a red circle on a blue background" --output out.png
    ditserve compile-report --model /models/FLUX.1-dev
    ditserve bench --model /models/FLUX.1-dev --compile --runs 5
    ditserve serve --model /models/FLUX.1-dev --port 30000

Flags parse into the same settings classes the server uses (`EngineConfig`, `SamplingParams`), which do the
validation. A user mistake (bad flag, bad size, bad model path) prints one `ditserve: error: ...` line on
stderr and exits with status 2; no traceback. Logging and compiler settings are set up here, never on import.

Parsing imports no torch (`ditserve --help` and an argument error answer at once): torch, diffusers and the
engine are imported by the subcommand that runs. Ctrl-C stops generate / bench / compile-report at once, with
one line and exit status 130 (`ditserve.interrupt`); outputs appear only once complete (`ditserve.media`).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from ditserve.config import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE, ConfigError, EngineConfig, SamplingParams
from ditserve.engine_args import add_engine_flags, check_engine, engine_from_args

EXIT_USAGE = 2
MAX_IMAGES = 16  # SamplingParams' num_images cap
# Request fields whose messages ("num_images must be ...") the CLI words as its flags ("--num-images must ...").
FIELD_FLAGS = {"height": "--height", "width": "--width", "steps": "--steps", "guidance": "--guidance",
               "seed": "--seed", "num_images": "--num-images", "max_sequence_length": "--max-sequence-length",
               "guidance_2": "--guidance-2", "num_frames": "--num-frames", "fps": "--fps",
               "negative_prompt": "--negative-prompt", "prompt": "--prompt", "images": "--image"}
BATCH_COMMANDS = ("generate", "bench", "compile-report")  # Ctrl-C ends these at once (not serve: it drains)


class _Parser(argparse.ArgumentParser):
    """argparse, with errors as one line ("ditserve generate: error: ...") instead of usage + error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _check_flag_names(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """An unknown `--flag` is reported first, with the closest real flag ("--promt": did you mean --prompt?),
    instead of argparse's complaint about the required flag it then misses."""
    sub_action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    command = next((a for a in argv if not a.startswith("-")), None)
    sub = sub_action.choices.get(command)
    if sub is None:
        return
    flags = [s for a in sub._actions for s in a.option_strings if s.startswith("--")]
    for token in argv[argv.index(command) + 1:]:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if not name.startswith("--") or any(f.startswith(name) for f in flags):
            continue
        close = difflib.get_close_matches(name, flags, n=1, cutoff=0.6)
        sub.error(f"unrecognized argument {name}" + (f"; did you mean {close[0]}?" if close else ""))


def _cli_wording(message: str) -> str:
    """A request field at the start of a message, named as its flag: "num_images must be ..." -> "--num-images
    must be ..."."""
    m = re.match(r"(\w+) must ", message)
    if m and m[1] in FIELD_FLAGS:
        return FIELD_FLAGS[m[1]] + message[len(m[1]):]
    return message


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ditserve", description="Fast inference for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    g = sub.add_parser("generate", help="generate images from a prompt",
                       description="Generate images from a text prompt and save them.")
    g.add_argument("--prompt", required=True, help="the text prompt")
    g.add_argument("--negative-prompt", default=None,
                   help="what classifier-free guidance steers away from (families with classifier-free "
                        "guidance; default: the empty prompt)")
    g.add_argument("--height", type=int, default=None,
                   help=f"image height, a multiple of {SIZE_MULTIPLE} in {MIN_SIZE}-{MAX_SIZE} (default: model's)")
    g.add_argument("--width", type=int, default=None,
                   help=f"image width, a multiple of {SIZE_MULTIPLE} in {MIN_SIZE}-{MAX_SIZE} (default: model's)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: model's)")
    g.add_argument("--guidance", type=float, default=None,
                   help="the family's own guidance scale (default: model's): a distilled guidance embedding's "
                        "or the classifier-free scale, as the family defines it (see the README's model table)")
    g.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    g.add_argument("--guidance-2", type=float, default=None,
                   help="two-expert models: the low-noise expert's guidance scale (default: model's)")
    g.add_argument("--num-images", type=int, default=1,
                   help=f"outputs to generate, 1-{MAX_IMAGES}, denoised as one batch (numbered files if > 1)")
    g.add_argument("--num-frames", type=int, default=None, help="video models: frames to generate (default: model's)")
    g.add_argument("--fps", type=float, default=None, help="video models: frames per second, 1-120 (default: model's)")
    g.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="an input image (models that take images: editing, image-to-video); repeat for several")
    g.add_argument("--max-sequence-length", type=int, default=None,
                   help="prompt tokens of the text encoder (default: model's, capped by the tokenizer's "
                        "model_max_length)")
    g.add_argument("--output", default="out.png",
                   help="images: .png, .jpg/.jpeg, .webp or .gif; videos: .mp4 (H.264), animated .webp or .gif; "
                        "or a folder (DIR/): numbered PNG files; several outputs are saved as NAME-0.png, ... "
                        "(default: out.png)")
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
    s.add_argument("--max-image-bytes", type=int, default=20 << 20,
                   help="largest body of an image edit request (/v1/images/edits: its images and fields); more "
                        "is 413 (default: 20 MiB; the JSON routes keep --max-body-bytes)")
    s.add_argument("--max-input-pixels", type=int, default=4096 * 4096,
                   help="most pixels (width x height) of one input image of an edit, checked before it is "
                        "decoded; more is 400 (default: 16777216, 4096x4096)")
    s.add_argument("--lora-dir", default=None,
                   help="a folder of LoRA adapters (NAME.safetensors) that requests select by name (\"lora\": "
                        "[{\"name\": NAME, \"weight\": W}]), loaded on first use (needs --lora-mode unfused, "
                        "serve's default); --lora NAME=PATH adds adapters loaded at start")
    s.add_argument("--lora-max-loaded", type=int, default=8,
                   help="most --lora-dir adapters loaded at once; the least recently used is unloaded first "
                        "(default: 8)")
    s.add_argument("--lora-max-rank", type=int, default=64,
                   help="with --lora-dir: the rank of the LoRA slots on every Linear (an adapter, or the adapters "
                        "of one request together, of a larger rank is refused; default: 64)")
    s.add_argument("--max-steps", type=int, default=None,
                   help="most denoise steps a request may ask for (also caps the model's default; default: 1000)")
    s.add_argument("--max-image-size", type=int, default=None,
                   help="largest width or height a request may ask for, in pixels (default: 4096)")
    s.add_argument("--max-connections", type=int, default=256,
                   help="most open connections; a request on one more gets 503 (default: 256)")
    s.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's headers; then 408 and close (default: 10)")
    s.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send a request's body after its headers; then 408 (default: 30)")
    s.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle keep-alive connection stays open (default: 5)")
    s.add_argument("--output-dir", default=None,
                   help="folder for response_format=url images (default: a temporary folder removed at exit)")
    s.add_argument("--url-ttl", type=float, default=3600.0, help="seconds an image URL stays valid (default: 3600)")
    s.add_argument("--output-max-bytes", type=int, default=1 << 30,
                   help="largest total size of the URL image folder; the oldest go first (default: 1 GiB)")
    s.add_argument("--video-ttl", type=float, default=3600.0,
                   help="seconds a finished video job and its MP4 are kept; then 404 (default: 3600)")
    s.add_argument("--max-video-jobs", type=int, default=256,
                   help="most video jobs kept; the oldest finished goes first, else 429 (default: 256)")
    s.add_argument("--video-max-bytes", type=int, default=4 << 30,
                   help="most bytes of MP4 files kept; the oldest finished videos go first (default: 4 GiB)")
    s.add_argument("--warmup-size", action="append", default=None,
                   help="WIDTHxHEIGHT of a warmup run (default: the model's size); repeat it for every size your "
                        "requests use: each is compiled and its CUDA graphs captured before /ready")
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

    from ditserve.compile_report import add_compile_report_args

    r = sub.add_parser("compile-report", help="compile the DiT, report graph breaks and recompiles as JSON",
                       description="Compile the model's transformer as the engine does, run it at two sizes, "
                                   "and print graph count, graph breaks, recompiles and compile time; the last "
                                   "stdout line is JSON.")
    add_compile_report_args(r)
    r.set_defaults(func=_compile_report)
    return parser


# ------------------------------------------------------------------------------------------------- generate


def open_images(paths: list[str]) -> list[Any]:
    """`--image` files as RGB PIL images; a missing or unreadable file is a ConfigError naming it."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for path in paths:
        try:
            with Image.open(path) as img:
                images.append(img.convert("RGB"))
        except FileNotFoundError:
            raise ConfigError(f"--image {path!r}: no such file") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ConfigError(f"--image {path!r}: not an image Pillow can read ({e})") from None
    return images


def _setup_logging(args: argparse.Namespace) -> None:
    """ditserve's log level (INFO with --verbose), once the request's own checks passed (logging imports torch)."""
    from ditserve.logging import setup_logging

    setup_logging("INFO" if getattr(args, "verbose", False) else "WARNING")


def _quiet_libraries() -> None:
    """diffusers' and transformers' own loading chatter (per-file progress bars, advice to install
    accelerate) off: the CLI logs what it loads itself. Their errors still show. A library not imported yet is
    not imported for this (the packaged default model never needs them, `ditserve.native`): it reads the same
    settings from the environment when it is imported (a user's own settings win)."""
    for name, variable in (("diffusers", "DIFFUSERS_VERBOSITY"), ("transformers", "TRANSFORMERS_VERBOSITY")):
        lib = sys.modules.get(name)
        if lib is None:
            os.environ.setdefault(variable, "error")
        else:
            lib.utils.logging.set_verbosity_error()
            lib.utils.logging.disable_progress_bar()
    if "transformers" not in sys.modules:  # what transformers' disable_progress_bar does: the hub's bars too
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _format_summary(result, n_steps: int) -> str:
    t = result.timings
    rate = n_steps / t["denoise_s"] if t["denoise_s"] > 0 else float("inf")
    peak = "n/a" if result.peak_memory_bytes is None else f"{result.peak_memory_bytes / 2**30:.2f} GiB"
    stages = {k: v / 2**30 for k, v in (result.stage_peak_memory_bytes or {}).items() if v is not None}
    if result.peak_memory_bytes is not None and stages:
        from ditserve.bench import stage_peaks_text

        peak += stage_peaks_text(stages)
    c = result.cache_stats
    cache = "" if c is None else f" | cache {c['policy']}: {c['computed']} computed, {c['cached']} cached"
    return (f"text encode {t['text_encode_s']:.2f} s | denoise {t['denoise_s']:.2f} s "
            f"({n_steps} steps, {rate:.1f} step/s){cache} | decode {t['decode_s']:.2f} s | "
            f"total {t['total_s']:.2f} s | peak memory {peak} | seed {result.params.seed}")


def _generate(args: argparse.Namespace) -> int:
    from ditserve import media

    params = SamplingParams(prompt=args.prompt, height=args.height, width=args.width, steps=args.steps,
                            guidance=args.guidance, seed=args.seed, num_images=args.num_images,
                            max_sequence_length=args.max_sequence_length, negative_prompt=args.negative_prompt,
                            guidance_2=args.guidance_2, num_frames=args.num_frames, fps=args.fps,
                            images=open_images(args.image))
    params.validate()  # size, steps, seed, ... before the model load; model limits are checked after it
    targets = media.output_targets(args.output, args.num_images)
    engine = engine_from_args(args)
    _setup_logging(args)
    check_engine(engine)

    from ditserve.parallel.launch import needs_workers

    if needs_workers(engine.parallel):  # one process per rank; rank 0 writes the outputs
        from ditserve.parallel.launch import run_workers

        return run_workers(_generate_rank, engine.parallel, engine.device, (args, engine, params, targets))
    return _generate_run(args, engine, params, targets)


def _generate_rank(state, args: argparse.Namespace, engine: EngineConfig, params: SamplingParams,
                   targets) -> int:
    """One rank of `generate --parallel` (spawned by `_generate`)."""
    _setup_logging(args)
    return _generate_run(args, engine, params, targets)


def _generate_run(args: argparse.Namespace, engine: EngineConfig, params: SamplingParams, targets) -> int:
    """Load, generate, write: the whole of generate in one process, or one rank's part of a parallel run (every
    rank runs the model; only rank 0 writes and prints)."""
    from ditserve import media
    from ditserve.engine import Engine
    from ditserve.parallel.state import current

    _quiet_libraries()
    t0 = time.perf_counter()
    model = Engine.load(args.model, engine)
    load_s = time.perf_counter() - t0
    name = model.name
    media.check_kind(targets, model.capabilities.output, args.output)
    params = model.resolve(params)
    main_rank = current() is None or current().is_main
    if not args.quiet and main_rank:
        from ditserve.preflight import preflight_warnings

        for line in preflight_warnings(model, params):
            print(f"ditserve: warning: {line}", file=sys.stderr, flush=True)

    result = model.generate(params, progress=not (args.quiet or args.no_progress) and main_rank)
    if not main_rank:
        return 0
    for path in media.write_outputs(result, targets):
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
    _setup_logging(args)
    from ditserve.server import ServerConfig, run_server
    from ditserve.server.app import parse_size

    warmup_size = None
    if args.warmup_size:  # repeatable: every size is warmed up (compiled, CUDA graphs captured)
        try:
            warmup_size = tuple(parse_size(size) for size in args.warmup_size)
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
                          warmup_size=warmup_size, warmup_steps=args.warmup_steps, max_steps=args.max_steps,
                          max_image_size=args.max_image_size, max_connections=args.max_connections,
                          header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                          keep_alive_timeout=args.keep_alive_timeout, max_image_bytes=args.max_image_bytes,
                          max_input_pixels=args.max_input_pixels, lora_max_loaded=args.lora_max_loaded,
                          lora_dir=Path(args.lora_dir) if args.lora_dir else None, video_ttl=args.video_ttl,
                          max_video_jobs=args.max_video_jobs, video_max_bytes=args.video_max_bytes)
    engine = engine_from_args(args)
    check_engine(engine)
    _refuse_parallel(engine, "serve")
    _quiet_libraries()
    run_server(args.model, engine, config, args.host, args.port, verbose=args.verbose,
               announce=lambda line: print(line, file=sys.stderr, flush=True))
    return 0


# ------------------------------------------------------------------------------------------------------ bench


def _refuse_parallel(engine: EngineConfig, command: str) -> None:
    """serve runs in one process for now (rank 0 owning the queue is not built): --parallel is refused."""
    from ditserve.parallel import ParallelConfig

    if ParallelConfig.parse(engine.parallel).enabled:
        raise ConfigError(f"--parallel: {command} runs on one process for now; use generate --parallel")


def _bench(args: argparse.Namespace) -> int:
    from ditserve.bench import bench_params

    bench_params(args).validate()
    engine = engine_from_args(args)
    _setup_logging(args)
    check_engine(engine)

    from ditserve.parallel.launch import needs_workers

    if needs_workers(engine.parallel):  # one process per rank, each running the same requests; rank 0 reports
        from ditserve.parallel.launch import run_workers

        return run_workers(_bench_rank, engine.parallel, engine.device, (args, engine))
    return _bench_rank(None, args, engine)


def _bench_rank(state, args: argparse.Namespace, engine: EngineConfig) -> int:
    """bench in one process, or one rank of `bench --parallel` (spawned, or under torchrun): every rank runs the
    same requests in lockstep (their collectives keep them so); only rank 0 prints the table and the record."""
    from ditserve.bench import bench_main, bench_params, run_bench

    _quiet_libraries()
    if state is None and os.environ.get("RANK", "0") == "0" or state is not None and state.is_main:
        return bench_main(args, engine)
    run_bench(args.model, engine, bench_params(args), args.runs, args.warmup)
    return 0


def _compile_report(args: argparse.Namespace) -> int:
    from ditserve.compile_report import compile_report_main

    _setup_logging(args)
    return compile_report_main(args)


# ------------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ditserve` and `python -m ditserve` (argv None: the process's own arguments; then Ctrl-C
    ends generate / bench / compile-report at once, see `ditserve.interrupt`). Returns the exit status."""
    from ditserve import threads

    threads.start_sampling()  # the CPU-thread choice measures free cores from here to the engine's build
    parser = build_parser()
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        _check_flag_names(parser, arguments)
        args = parser.parse_args(arguments)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), message already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if argv is None and args.command in BATCH_COMMANDS:
        from ditserve import interrupt

        interrupt.install(args.command)
    try:
        code = args.func(args)
    except ConfigError as e:
        message = _cli_wording(" ".join(str(e).split()))  # one line, whatever the message
        print(f"{parser.prog}: error: {message}", file=sys.stderr)
        code = EXIT_USAGE
    if argv is None and args.command in ("generate", "bench") and not getattr(args, "compile", False):
        # The outputs are written and closed: skip the interpreter's teardown (freeing torch, diffusers and
        # transformers module by module, which takes about a second). Not after a compile, whose worker
        # processes get their own shutdown.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing left to tell
                pass
        os._exit(code)
    return code
