"""The engine's typed contract: one request type in, one output type out, and what a family can do.

    GenerationRequest (= `ditserve.config.SamplingParams`)  ->  Engine  ->  Output

The CLI and the HTTP server parse into `GenerationRequest` and read `Output`; `Capabilities` is declared by each
family's pipeline (never by the CLI or the server) and refuses a request asking for something the family does
not do, naming the option and the family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ditserve.config import SamplingParams
from ditserve.errors import ConfigError

GenerationRequest = SamplingParams

GUIDANCE_KINDS = ("none", "distilled", "cfg")  # no guidance, a distilled guidance embedding, classifier-free
OUTPUT_KINDS = ("image", "video")


@dataclass(frozen=True)
class Capabilities:
    """What a family (for one loaded checkpoint) accepts.

    family: the family's name, for messages (the pipeline's FAMILY).
    guidance: "none" (guidance must be 0 or unset), "distilled" (a guidance embedding in the DiT) or "cfg"
        (classifier-free guidance with a negative prompt: two branches a step).
    output: "image" or "video". max_input_images: input images accepted (0: text-to-image/video only).
    two_experts: a second (low-noise) expert with its own guidance scale, `guidance_2` (a two-expert video model).
    size_multiple, min_size, max_size: the output size rule in pixels.
    frame_rule: (k, r): num_frames % k == r (video families), None for images.
    """

    family: str
    guidance: str
    output: str = "image"
    max_input_images: int = 0
    size_multiple: int = 16
    min_size: int = 64
    max_size: int = 4096
    frame_rule: tuple[int, int] | None = None
    two_experts: bool = False

    def __post_init__(self):
        if self.guidance not in GUIDANCE_KINDS:
            raise ValueError(f"guidance kind must be one of {GUIDANCE_KINDS}, got {self.guidance!r}")
        if self.output not in OUTPUT_KINDS:
            raise ValueError(f"output kind must be one of {OUTPUT_KINDS}, got {self.output!r}")

    def check(self, p: SamplingParams) -> None:
        """Raise ConfigError for an option of `p` (resolved or not) this family does not support."""
        if p.negative_prompt is not None and self.guidance != "cfg":
            kind = {"none": "no guidance", "distilled": "distilled guidance (a guidance embedding)"}[self.guidance]
            raise ConfigError(f"negative_prompt is not supported by {self.family}: it has {kind}, no "
                              f"classifier-free guidance pass that a negative prompt could steer")
        if self.guidance == "none" and p.guidance:
            raise ConfigError(f"guidance is not supported by {self.family} (this checkpoint has no guidance "
                              f"embedding, e.g. a schnell-like model): guidance must be 0 or unset, got {p.guidance}")
        if p.guidance_2 is not None and not self.two_experts:
            raise ConfigError(f"guidance_2 is not supported by {self.family}: it has no second (low-noise) expert")
        for name in ("num_frames", "fps"):
            if getattr(p, name) is not None and self.output != "video":
                raise ConfigError(f"{name} is not supported by {self.family}: it makes images, not videos")
        if p.images and len(p.images) > self.max_input_images:
            what = "no input images" if self.max_input_images == 0 else f"at most {self.max_input_images} input images"
            raise ConfigError(f"images: {self.family} takes {what}, got {len(p.images)}")
        for name in ("height", "width"):
            v = getattr(p, name)
            if v is not None and (v % self.size_multiple or not self.min_size <= v <= self.max_size):
                raise ConfigError(f"{name} must be a multiple of {self.size_multiple} between {self.min_size} and "
                                  f"{self.max_size} for {self.family}, got {v}")
        if p.num_frames is not None and self.frame_rule is not None:
            k, r = self.frame_rule
            if p.num_frames % k != r:
                raise ConfigError(f"num_frames must be {k}n + {r} for {self.family}, got {p.num_frames}")


@dataclass
class Output:
    """What the engine returns for one request.

    kind: "image" or "video". frames: uint8 RGB, (N, H, W, 3) for images, (N, F, H, W, 3) for videos; N =
        len(prompts) * num_images, prompt-major (all outputs of the first prompt, then the second's, ...);
        empty (N = 0) after a dummy run. fps: frames per second of a video (None for images).
    timings: seconds per stage: "text_encode_s", "denoise_s", "decode_s", and "total_s".
    peak_memory_bytes: peak device memory allocated during the request (CUDA), or None where torch does not
        track it (CPU). stage_peak_memory_bytes: the same per stage, {"text_encode", "denoise", "decode"} (each
        stage's own peak, so a decode that is not the request's peak shows below the denoise's), or None.
    params: the request with every default filled in, including the seed actually used.
    cache_stats: with a DiT cache, {"policy": name, "computed": steps, "cached": steps, ...} of the denoise
        loop (a batch's requests share one loop and so one count); None without a cache.
    """

    kind: str
    frames: np.ndarray
    timings: dict[str, float]
    peak_memory_bytes: int | None
    params: SamplingParams
    cache_stats: dict[str, Any] | None = None
    fps: float | None = None
    stage_peak_memory_bytes: dict[str, int] | None = None

    @property
    def images(self) -> list[Any]:
        """The outputs as PIL images (image outputs only)."""
        from PIL import Image

        if self.kind != "image":
            raise ValueError(f"a {self.kind} output has no images; read `frames`")
        return [Image.fromarray(f) for f in self.frames]
