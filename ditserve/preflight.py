"""What to tell a user before a run: work that cannot finish in reasonable time here, a size far from the one
the model was made for, words the packaged default model does not know. Each is one line; the run still
happens (Ctrl-C stops it). Also the image sizes a model draws well, for the server's web page.

    for line in preflight_warnings(engine, resolved_params): print(f"ditserve: warning: {line}")
"""

from __future__ import annotations

import re
from typing import Any

from ditserve.config import MAX_SIZE, MIN_SIZE, SIZE_MULTIPLE

DEFAULT_MODEL_NAME = "default-model"
# A request's denoise estimated above this many seconds is said up front.
SLOW_SECONDS = 120.0
# Sustained FLOP/s assumed for the estimate: fp32 GEMMs on one CPU core, bf16 on a data-centre GPU. The estimate
# says "about"; it only has to tell minutes from hours.
CPU_FLOPS_PER_THREAD = 5e10
GPU_FLOPS = 3e14
# A size whose area is more than this factor away from the model's default (the size it was made for) is said.
FAR_AREA_FACTOR = 4.0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_denoise_seconds(forward_flops: float, forwards: int, device_type: str, threads: int) -> float:
    rate = GPU_FLOPS if device_type == "cuda" else CPU_FLOPS_PER_THREAD * max(1, threads)
    return forward_flops * forwards / rate


def far_from_default(height: int, width: int, default_height: int, default_width: int) -> bool:
    ratio = (height * width) / (default_height * default_width)
    return ratio > FAR_AREA_FACTOR or ratio < 1 / FAR_AREA_FACTOR


def unknown_words(prompt: str) -> list[str]:
    """Words of `prompt` outside the packaged default model's world (`ditserve.shapes`: "a {colour} {shape} on
    a {background} background"), in order, each once."""
    from ditserve.shapes import COLOUR_NAMES, PROMPT_TEMPLATE, SHAPES

    known = set(COLOUR_NAMES) | set(SHAPES) | set(re.findall(r"[a-z]+", re.sub(r"\{\w+\}", "", PROMPT_TEMPLATE)))
    seen: list[str] = []
    for word in re.findall(r"[^\W_]+", prompt.lower()):
        if word not in known and word not in seen:
            seen.append(word)
    return seen


def suggested_sizes(default_height: int, default_width: int) -> list[str]:
    """"WIDTHxHEIGHT" sizes a model draws well, its default first: scales of its default size (and 4:3 / 3:4
    of the same area) within `FAR_AREA_FACTOR` of its area, multiples of 16 in the engine's limits."""
    out: list[str] = []

    def add(w: float, h: float) -> None:
        w, h = round(w / SIZE_MULTIPLE) * SIZE_MULTIPLE, round(h / SIZE_MULTIPLE) * SIZE_MULTIPLE
        size = f"{w}x{h}"
        if (MIN_SIZE <= w <= MAX_SIZE and MIN_SIZE <= h <= MAX_SIZE and size not in out
                and not far_from_default(h, w, default_height, default_width)):
            out.append(size)

    add(default_width, default_height)
    for scale in (0.5, 0.75, 1.5, 2.0):
        add(default_width * scale, default_height * scale)
    for scale in (1.0, 2.0):
        add(default_width * scale * 1.1547, default_height * scale * 0.866)  # 4:3 of the same area
        add(default_width * scale * 0.866, default_height * scale * 1.1547)  # 3:4
    return out


def preflight_warnings(engine: Any, params: Any) -> list[str]:
    """One line each for what a user should know before `params` (resolved) runs on `engine` (a loaded
    `ditserve.engine.Engine`): hopeless work, a far size, unknown words (packaged default model only)."""
    from ditserve.threads import forward_flops

    lines = []
    spec = engine.spec
    pipeline = engine.pipeline
    outputs = len(params.prompts) * params.num_images
    image_tokens = pipeline.forward_tokens(params)
    tokens = image_tokens + params.max_sequence_length
    cfg = 2 if pipeline.cfg_active(params.guidance) else 1
    flops = forward_flops(pipeline.transformer, tokens) * outputs * cfg
    device = engine.device
    threads = 1
    if device.type == "cpu":
        import torch

        threads = torch.get_num_threads()
    seconds = estimate_denoise_seconds(flops, params.steps, device.type, threads)
    if seconds > SLOW_SECONDS:
        where = f"{device.type} ({threads} thread{'s' if threads > 1 else ''})" if device.type == "cpu" else str(device)
        lines.append(f"{params.width}x{params.height} is {image_tokens:,} image tokens (+{params.max_sequence_length} "
                     f"text) x {params.steps} steps x {outputs * cfg} row(s) on {where}: about "
                     f"{_duration(seconds)} of denoising (an estimate); Ctrl-C stops it")
    if far_from_default(params.height, params.width, spec.default_height, spec.default_width):
        lines.append(f"{engine.name} was made for {spec.default_width}x{spec.default_height} images; "
                     f"{params.width}x{params.height} is far from that and may come out poorly")
    if engine.name == DEFAULT_MODEL_NAME:
        words = list(dict.fromkeys(w for p in params.prompts for w in unknown_words(p)))
        if words:
            lines.append(f"{engine.name} does not know the word{'s' if len(words) > 1 else ''} "
                         f"{', '.join(repr(w) for w in words)}: it draws only 'a {{colour}} {{shape}} on a "
                         f"{{background}} background' (see `ditserve.shapes`)")
    return lines
