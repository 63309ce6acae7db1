"""`ditserve bench`: how fast this engine runs one model here, offline (no server, no competitor).

Loads the model as `generate` does (same engine flags), runs `--warmup` untimed requests (they pay for a
compile), then `--runs` timed ones, and reports per-request latency, per-stage medians, images per second and
peak device memory. A table goes to stderr and one JSON line last to stdout. Comparisons with diffusers live in
the repository's `bench/` scripts; this command answers "what will my requests cost on this machine".

    ditserve bench                                   # the packaged default model, its defaults
    ditserve bench --model /models/FLUX.1-dev --compile --height 1024 --width 1024 --runs 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from typing import Any

from ditserve.config import ConfigError, EngineConfig, SamplingParams

DEFAULT_PROMPT = "a red circle on a blue background"


def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", default=DEFAULT_PROMPT,
                   help=f"the prompt of every request (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--height", type=int, default=None, help="image height (default: model's)")
    p.add_argument("--width", type=int, default=None, help="image width (default: model's)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: model's)")
    p.add_argument("--guidance", type=float, default=None, help="the family's guidance scale (default: model's)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (families with classifier-free guidance)")
    p.add_argument("--num-images", type=int, default=1, help="images per request, denoised as one batch (default: 1)")
    p.add_argument("--num-frames", type=int, default=None, help="video models: frames per video (default: model's)")
    p.add_argument("--runs", type=int, default=5, help="timed requests (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed requests first, which compile (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first request; request i uses seed + i")


def _dtype_name(dtype) -> str:
    """torch.bfloat16 -> "bf16" (the --dtype names), else torch's own name."""
    from ditserve.config import DTYPES

    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_bench(model: str | None, engine: EngineConfig, params: SamplingParams, runs: int, warmup: int,
              log=lambda msg: None) -> dict[str, Any]:
    """Load `model`, run `warmup` + `runs` requests of `params` (seed + i for request i); return the record."""
    import torch

    from ditserve.engine import Engine

    if runs < 1:
        raise ConfigError(f"--runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {warmup}")
    params.validate()
    t0 = time.perf_counter()
    pipe = Engine.load(model, engine)
    name = pipe.name
    load_s = time.perf_counter() - t0
    log(f"{name}: loaded in {load_s:.2f} s on {pipe.device}")

    def request(i: int):
        return pipe.generate(replace(params, seed=params.seed + i), progress=False)

    t1 = time.perf_counter()
    for i in range(warmup):
        request(i)
    warmup_s = time.perf_counter() - t1
    if warmup:
        log(f"warmup: {warmup} request(s) in {warmup_s:.2f} s")

    results = []
    for i in range(runs):
        r = request(warmup + i)
        results.append(r)
        log(f"run {i + 1}/{runs}: {r.timings['total_s']:.3f} s")
    totals = [r.timings["total_s"] for r in results]
    resolved = results[0].params
    n_images = len(results[0].frames)
    peaks = [r.peak_memory_bytes for r in results if r.peak_memory_bytes is not None]
    stage_peaks: dict[str, int] = {}
    for r in results:
        for stage, b in (r.stage_peak_memory_bytes or {}).items():
            if b is not None:
                stage_peaks[stage] = max(stage_peaks.get(stage, 0), b)
    return {
        "bench": "ditserve-bench", "model": name, "device": str(pipe.device),
        "gpu": torch.cuda.get_device_name(pipe.device) if pipe.device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        # The engine's settings, with the device and dtype it resolved to (None in the flags means "the default").
        "engine": {**asdict(engine), "device": str(pipe.device), "dtype": _dtype_name(pipe.pipeline.dtype)},
        "dtype": _dtype_name(pipe.pipeline.dtype),
        "height": resolved.height, "width": resolved.width, "num_frames": resolved.num_frames,
        "steps": resolved.steps,
        "guidance": resolved.guidance, "negative_prompt": resolved.negative_prompt,
        "family": pipe.capabilities.family, "images_per_request": n_images,
        "load_s": round(load_s, 3), "warmup_requests": warmup, "warmup_s": round(warmup_s, 3), "runs": runs,
        "latency_s": {"median": round(_median(totals), 4), "min": round(min(totals), 4),
                      "max": round(max(totals), 4)},
        "stages_median_s": {k: round(_median([r.timings[k] for r in results]), 4)
                            for k in ("text_encode_s", "denoise_s", "decode_s")},
        "steps_per_s": round(resolved.steps / _median([r.timings["denoise_s"] for r in results]), 2),
        "images_per_s": round(n_images / _median(totals), 3),
        "peak_memory_gib": round(max(peaks) / 2**30, 3) if peaks else None,
        # each stage's own peak (text_encode, denoise, decode): which one sets the request's
        "stage_peak_memory_gib": {k: round(v / 2**30, 3) for k, v in stage_peaks.items()} or None,
        # device memory the captured CUDA graphs (denoise forward, text encoders) hold
        "cuda_graph_mib": round(pipe.pipeline.graph_memory_bytes / 2**20, 1),
    }


def stage_peaks_text(peaks_gib: dict[str, float]) -> str:
    """{"text_encode": 12.0, "denoise": 30.5, ...} (GiB) -> " (text encode 12.00, denoise 30.50, ...)": which stage
    sets a request's peak, as `bench`'s table and `generate`'s summary print it."""
    return " (" + ", ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in peaks_gib.items()) + ")"


def format_table(rec: dict[str, Any]) -> str:
    s = rec["stages_median_s"]
    lat = rec["latency_s"]
    peak = "n/a" if rec["peak_memory_gib"] is None else f"{rec['peak_memory_gib']:.2f} GiB"
    if rec.get("stage_peak_memory_gib"):
        peak += stage_peaks_text(rec["stage_peak_memory_gib"])
    frames = f" x {rec['num_frames']} frames" if rec.get("num_frames") else ""
    return "\n".join([
        f"{rec['model']} on {rec['gpu'] or rec['device']}: {rec['width']}x{rec['height']}{frames}, {rec['steps']} steps, "
        f"{rec['images_per_request']} image(s) per request, {rec['runs']} timed runs",
        f"  latency   median {lat['median']:.3f} s  (min {lat['min']:.3f}, max {lat['max']:.3f})",
        f"  stages    text encode {s['text_encode_s']:.3f} s | denoise {s['denoise_s']:.3f} s "
        f"({rec['steps_per_s']} step/s) | decode {s['decode_s']:.3f} s",
        f"  rate      {rec['images_per_s']} images/s | peak memory {peak} (CUDA graphs "
        f"{rec['cuda_graph_mib']:.0f} MiB) | load {rec['load_s']:.2f} s | "
        f"warmup {rec['warmup_s']:.2f} s",
    ])


def bench_params(args: argparse.Namespace) -> SamplingParams:
    """The request every run makes (not validated); `--runs` / `--warmup` checked."""
    if args.runs < 1:
        raise ConfigError(f"--runs must be >= 1, got {args.runs}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    return SamplingParams(prompt=args.prompt, height=args.height, width=args.width, steps=args.steps,
                          guidance=args.guidance, seed=args.seed, num_images=args.num_images,
                          negative_prompt=args.negative_prompt, num_frames=args.num_frames)


def bench_main(args: argparse.Namespace, engine: EngineConfig) -> int:
    params = bench_params(args)
    rec = run_bench(args.model, engine, params, args.runs, args.warmup,
                    log=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(format_table(rec), file=sys.stderr)
    print(json.dumps(rec))
    return 0
