"""Pipelines: a model family's stages, from a request to images. One file per family (`flux.py`).

Shared here: the result type every pipeline returns, the device helpers a pipeline binds at construction,
and the conversion of decoded images to PIL. Family pipelines are looked up by their diffusers class name
through `ditserve.registry.pipeline_class`, so importing this package imports no model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ditserve.config import SamplingParams


@dataclass
class GenerationResult:
    """What a pipeline returns for one request.

    images: the decoded images, len = len(prompts) * num_images, ordered prompt-major (all images of the
        first prompt, then the second's, ...).
    timings: seconds per stage: "text_encode_s", "denoise_s", "decode_s", and "total_s" (all of `generate`).
    peak_memory_bytes: peak device memory allocated during the request (CUDA), or None where torch does not
        track it (CPU).
    params: the request with every default filled in, including the seed actually used.
    cache_stats: with a DiT cache, {"policy": name, "computed": steps, "cached": steps} of the denoise loop
        (transformer calls; a batch's requests share one loop and so one count); None without a cache.
    """

    images: list[Any]  # list[PIL.Image.Image]
    timings: dict[str, float]
    peak_memory_bytes: int | None
    params: SamplingParams
    cache_stats: dict[str, Any] | None = None


def load_pipeline(model: str | None, engine) -> tuple[str, Any]:
    """Load `model` for `engine` (see `ditserve.loader.load_model`) and build its family's pipeline, with the
    checkpoint's sampling defaults: (model name, pipeline). What generate, serve and bench run."""
    from ditserve.loader import load_model
    from ditserve.registry import pipeline_class

    if engine.compile and engine.compile_prewarm:  # compile workers start while the weights load (ditserve.compile)
        from ditserve.compile import warm_compile_workers

        warm_compile_workers(device=engine.torch_device)
    loaded = load_model(model, engine)
    cls = pipeline_class(loaded.pipeline_class)
    return loaded.name, cls(loaded.components, engine, cls.spec_for(loaded.name, loaded.components))


def synchronizer(device: torch.device) -> Callable[[], None]:
    """The function that waits for `device`'s queued work (a no-op on CPU). Bound once, for stage timings."""
    module = getattr(torch, device.type, None)
    sync = getattr(module, "synchronize", None)
    if sync is None:
        return lambda: None
    if device.type == "cpu":
        return sync
    return lambda: sync(device)


def to_pil(images: torch.Tensor) -> list[Any]:
    """Decoded images (B, 3, H, W) in [-1, 1] -> B uint8 RGB PIL images, rounded as diffusers'
    `VaeImageProcessor.postprocess` does (denormalise and clamp in the tensor's dtype, then x255 in fp32)."""
    from PIL import Image

    images = (images * 0.5 + 0.5).clamp(0, 1)  # (B, 3, H, W) in [0, 1]
    images = images.permute(0, 2, 3, 1).float().mul(255).round().to(torch.uint8).cpu()  # (B, H, W, 3)
    return [Image.fromarray(img.numpy()) for img in images]
