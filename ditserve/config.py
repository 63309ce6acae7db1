"""Settings, split by lifetime.

- `ModelSpec`: one per model preset (architecture + sampling defaults), frozen.
- `EngineConfig`: one per process (device, dtype, compile, kernels, attention backend, load format).
- `SamplingParams`: one per request (prompt, size, steps, guidance, seed, ...).

The CLI and the HTTP server both parse into these classes; validation lives here so both give the same errors.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ditserve.cache.policy import parse_cache
from ditserve.errors import ConfigError
from ditserve.lora import LoRAConfig
from ditserve.parallel.config import ParallelConfig

__all__ = ["ConfigError", "EngineConfig", "ModelSpec", "SamplingParams"]

if TYPE_CHECKING:
    import torch

# Compute dtype names; `DTYPES` (name -> torch.dtype) is built on first use, so that importing this module (the
# CLI's argument parsing) does not import torch.
DTYPE_NAMES = ("bf16", "fp16", "fp32")


def _dtypes() -> dict[str, torch.dtype]:
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def __getattr__(name: str) -> Any:
    if name == "DTYPES":
        return _dtypes()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

LOAD_FORMATS = ("auto", "safetensors", "dummy")
QUANTIZATIONS = ("fp8",)  # weight quantisation tiers (lossy, off by default); None means off
VAE_TILING = ("auto", "on", "off")  # tiled VAE decode: above 1024x1024 pixels, always, never
VAE_STREAMING = ("auto", "on", "off")  # streamed (exact, memory-lean) VAE decode: on CUDA, always, never
# compiled DiT and image sizes: static for the first size then symbolic token counts, or symbolic from the start
DYNAMIC_SHAPES = ("auto", "on")
FP8_FAST_ACCUM = ("auto", "on", "off")  # fp8 GEMMs' fast accumulation: the tier's default (on), on, off
# The fp8 tier's default for fast accumulation (`ditserve.ops.fp8`): on (measured there).
FP8_FAST_ACCUM_DEFAULT = True
CFG_MODES = ("batched", "split")  # classifier-free guidance: both branches in one forward, or one after the other
CUDA_GRAPHS = ("auto", "on", "off")  # CUDA graphs of the DiT forward: small shapes, every shape, never
NATIVE_COMPONENTS = ("auto", "off")  # ditserve.native's components: the packaged default model on CPU, never


@dataclass(frozen=True)
class ModelSpec:
    """A model preset: the architecture configs of its components and its sampling defaults.

    `components` maps a component name (as in model_index.json) to (class name, config dict); `--load-format
    dummy` builds exactly these. Sampling defaults apply when a request does not set them.
    """

    name: str
    pipeline: str  # pipeline class name in diffusers' model_index.json, e.g. "FluxPipeline"
    components: dict[str, tuple[str, dict[str, Any]]]
    default_steps: int
    default_guidance: float
    default_height: int
    default_width: int
    max_sequence_length: int
    # --load-format dummy: component name -> "module:function" returning the tokenizer of a preset (tokenizers
    # have no config-only form); empty: the packaged default model's tokenizers (FLUX.1).
    tokenizers: dict[str, str] = field(default_factory=dict)
    # Video families: the frame count and frames per second a request gets when it sets none (None: images).
    default_num_frames: int | None = None
    default_fps: float | None = None


@dataclass(frozen=True)
class EngineConfig:
    """Per-process engine settings.

    device: "cuda", "cpu", ... or None for the best available.
    dtype: compute dtype of the DiT ("bf16", "fp16", "fp32"); None means bf16 on GPUs and fp32 on CPU.
    compile: torch.compile the DiT (regionally: each repeated block once).
    dynamic_shapes: how the compiled DiT handles image sizes (with `compile`). "auto" (default): compiled for
        the first size it runs; the first other size compiles once more with the token counts symbolic, and
        from then on every size reuses that graph (torch's automatic dynamic shapes). "on": symbolic token
        counts from the first compile, so no size ever recompiles. Measured on H100s (FLUX.1-dev, 1024x1024,
        cold compile cache): compile + first forward 12.3-14.4 s with "auto", 15.5-19.5 s with "on" (symbolic
        shapes make dynamo, AOTAutograd and inductor slower); both graphs run the same kernels at the same speed
        (bench/flux_shapes_ab.py, f6b0abc). "on" suits a server (sizes vary, no request waits for a compile);
        "auto" a process that makes one size.
    compile_prewarm: (with `compile`, CUDA) start inductor's compile workers before the weights load and compile
        the Triton norm kernels on a side thread while dynamo traces (exact: only when things compile moves;
        measured -1.8 to -6.9 s of a cold start on an H100). On by default.
    kernels: "auto" | "native" | "triton" (see `ditserve.ops.OpsConfig`).
    attention: attention backend name ("sdpa", "flash-attn", "fa3", "fa4", "sage"), or "auto" (default): resolved
        per model when it is built (`ditserve.ops.attention.resolve_backend`: FlashAttention-3 for long-sequence
        models where installed and runnable, else "sdpa").
    load_format: "auto" (safetensors from the model folder), "safetensors", or "dummy" (random weights at full
        size, for benchmarks and capacity planning).
    cache: a DiT block cache, "NAME[:knob=value,...]" (see `ditserve.cache.policy`; lossy), or None (off).
    cache_backend: "ditserve" (the engine's own cache) or "cache-dit" (the cache-dit library, if installed).
    quantization: None (off) or "fp8" (lossy: fp8 weights and per-token fp8 activations in the DiT's block
        GEMMs, see `ditserve.ops.fp8`; CUDA compute capability 8.9+ and bf16 only).
    fp8_attention: (with quantization "fp8"; lossy, off by default) the DiT's attention in fp8 too: q, k, v and
        the output with one scale each, on cuDNN's fp8 SDPA (`ditserve.ops.attention.Fp8Attention`; needs the
        nvidia-cudnn-frontend package). FLUX.1's attention on an H100: 299.5 us instead of 439.8 us a block.
    fp8_fast_accum: (the fp8 tier's GEMMs; lossy) "auto" (default: on with quantization "fp8"), "on" (a
        ConfigError without it) or "off": accumulate in the fp8 tensor cores' own format instead of promoting
        partial sums to fp32 (`ditserve.ops.fp8`); FLUX.1-dev's double-block GEMMs run 4-18% faster on an H100.
    vae_tiling: "auto" (tiled VAE decode for images larger than 1024x1024 pixels, whole-image decode up to that,
        so FLUX.1 at its native size decodes exactly as diffusers does), "on" (always tiled) or "off" (never).
        Tiled decode bounds the decode's activation memory by the tile size instead of the image size; the
        overlapping tiles are blended, so it is lossy (see `ditserve.pipelines.base.VAE_TILE`).
    cuda_graphs: the denoise loop's transformer forward, and the text encoders a family lists, replayed from
        CUDA graphs (exact: the same kernels), which removes their host (CPU) launch work. "auto" (default): on a
        CUDA GPU, the forwards small enough that the host bounds them (`ditserve.cuda_graphs.AUTO_MAX_TOKENS`
        image tokens over the batch), decided per shape; larger ones run as they are (their GPU work hides the
        launches, and a graph would keep a forward's activations reserved); text encoders always. "on": every
        shape (else a ConfigError where it cannot apply); "off": never. With ditserve's block cache, "on" graphs
        the block ranges it runs instead of the whole forward (its per-step decision runs between them) and
        "auto" graphs none (not measured yet); a cache-dit cache cannot be graphed.
    vae_streaming: "auto" (default: on a CUDA GPU, images that are not tiled decode in strips of rows,
        `ditserve.pipelines.vae_decode`: the whole decode's result, summed in another order, with 431 MiB of
        activations at 1024x1024 instead of 2428 MiB, so the decode is not a request's memory peak; 129.6 ms
        instead of 91.8 on an H100, bench/vae_decode.py; a video VAE decoded frame by frame: its
        high-resolution layers in strips, by the family's pipeline), "on" (also on the CPU; a ConfigError for a
        VAE it cannot decode or with `compile_vae`) or "off" (diffusers' `vae.decode`; a video VAE: frame chunk
        by frame chunk).
    compile_vae: channels-last + torch.compile of the VAE decoder (lossless: the same math, other kernels).
        Measured on an H100 at 1024x1024: decode 91 -> 38 ms, its activation memory 2.38 -> 1.25 GiB; the
        first decode compiles (18-24 s with an empty compile cache; its artefacts go to the same cache folder as
        the DiT's). Off by default.
    cfg_mode: classifier-free guidance (families with a negative prompt): "batched" (default: both branches in
        one forward of twice the batch) or "split" (one forward per branch, each with its own DiT-cache state;
        less activation memory). Exact either way, up to the rounding of batched kernels.
    lora: LoRA adapters (`ditserve.lora.LoRAConfig`: files and weights, "fuse" or "unfused" mode), or None.
    parallel: several processes (GPUs, or gloo processes on a CPU) for one model (`ditserve.parallel`):
        "ulysses=U,ring=R,cfg=C", each part optional (default 1), their product the number of processes. None or
        a product of 1: one process.
    offload_text_encoder: the text encoder lives in host memory and comes to the device only while it encodes
        prompts (families that declare it: one whose DiT and text encoder do not fit on the GPU together; each
        request then copies the encoder's weights to the device). Refused by the other families. Off by default.
    native_components: "auto" (default): the packaged default model on the CPU loads ditserve's own forward
        passes of its text encoders, tokenizers, VAE decoder and scheduler (`ditserve.native`: the same math as
        the library classes, without importing diffusers or transformers, which cost seconds of start-up) unless
        a setting needs the library classes (`compile_vae`, `vae_tiling` or `vae_streaming` "on"); "off": the
        library classes always. Every other model always loads the library classes.
    """

    device: str | None = None
    dtype: str | None = None
    compile: bool = False
    dynamic_shapes: str = "auto"
    compile_prewarm: bool = True
    kernels: str = "auto"
    attention: str = "auto"
    load_format: str = "auto"
    cache: str | None = None
    cache_backend: str = "ditserve"
    quantization: str | None = None
    fp8_attention: bool = False
    fp8_fast_accum: str = "auto"
    vae_tiling: str = "auto"
    compile_vae: bool = False
    cuda_graphs: str = "auto"
    vae_streaming: str = "auto"
    cfg_mode: str = "batched"
    lora: LoRAConfig | None = None
    offload_text_encoder: bool = False
    parallel: str | None = None  # "ulysses=U,ring=R,cfg=C" (`ditserve.parallel.ParallelConfig`); None: one process
    native_components: str = "auto"

    def __post_init__(self):
        parse_cache(self.cache)  # raises ConfigError for unknown names, knobs or values
        if ParallelConfig.parse(self.parallel).enabled and self.cuda_graphs == "on":  # (bad parts: ConfigError)
            raise ConfigError("--cuda-graphs on cannot run with --parallel (CUDA graphs of collectives are not "
                              "built); use --cuda-graphs auto or off")
        if self.cache_backend not in ("ditserve", "cache-dit"):
            raise ConfigError(f"unknown cache backend {self.cache_backend!r}; valid: ditserve, cache-dit")
        if self.dtype is not None and self.dtype not in DTYPE_NAMES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; valid: {', '.join(DTYPE_NAMES)}")
        if self.load_format not in LOAD_FORMATS:
            raise ConfigError(f"unknown load format {self.load_format!r}; valid: {', '.join(LOAD_FORMATS)}")
        if self.dynamic_shapes not in DYNAMIC_SHAPES:
            raise ConfigError(f"unknown dynamic_shapes {self.dynamic_shapes!r}; valid: {', '.join(DYNAMIC_SHAPES)}")
        if self.kernels not in ("auto", "native", "triton"):
            raise ConfigError(f"unknown kernels choice {self.kernels!r}; valid: auto, native, triton")
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ConfigError(f"unknown quantization {self.quantization!r}; valid: {', '.join(QUANTIZATIONS)} "
                              f"(or None: off)")
        if self.fp8_attention and self.quantization != "fp8":
            raise ConfigError("--fp8-attention is part of the fp8 tier: add --quantization fp8")
        if self.fp8_fast_accum not in FP8_FAST_ACCUM:
            raise ConfigError(f"unknown fp8_fast_accum {self.fp8_fast_accum!r}; valid: {', '.join(FP8_FAST_ACCUM)}")
        if self.fp8_fast_accum == "on" and self.quantization != "fp8":
            raise ConfigError("--fp8-fast-accum on is part of the fp8 tier: add --quantization fp8")
        if self.cuda_graphs not in CUDA_GRAPHS:
            raise ConfigError(f"unknown cuda_graphs {self.cuda_graphs!r}; valid: {', '.join(CUDA_GRAPHS)}")
        if self.vae_streaming not in VAE_STREAMING:
            raise ConfigError(f"unknown vae_streaming {self.vae_streaming!r}; valid: {', '.join(VAE_STREAMING)}")
        if self.cfg_mode not in CFG_MODES:
            raise ConfigError(f"unknown cfg_mode {self.cfg_mode!r}; valid: {', '.join(CFG_MODES)}")
        if self.vae_tiling not in VAE_TILING:
            raise ConfigError(f"unknown vae_tiling {self.vae_tiling!r}; valid: {', '.join(VAE_TILING)}")
        if self.native_components not in NATIVE_COMPONENTS:
            raise ConfigError(f"unknown native_components {self.native_components!r}; valid: "
                              f"{', '.join(NATIVE_COMPONENTS)}")

    @property
    def fp8_fast_accum_on(self) -> bool:
        """Whether the fp8 tier's GEMMs accumulate fast ("auto" = the tier's default, `ops.fp8.FAST_ACCUM_DEFAULT`)."""
        if self.quantization != "fp8" or self.fp8_fast_accum == "off":
            return False
        if self.fp8_fast_accum == "on":
            return True
        return FP8_FAST_ACCUM_DEFAULT

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device is not None:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        if self.dtype is not None:
            return _dtypes()[self.dtype]
        return torch.bfloat16 if self.torch_device.type != "cpu" else torch.float32


# Image sizes must be multiples of 16 (8x VAE downsampling, then 2x2 latent packing) within these bounds.
SIZE_MULTIPLE = 16
MIN_SIZE, MAX_SIZE = 64, 4096


def check_image_size(name: str, v: int) -> None:
    """Raise ConfigError unless `v` is a multiple of SIZE_MULTIPLE within [MIN_SIZE, MAX_SIZE]."""
    if not (MIN_SIZE <= v <= MAX_SIZE) or v % SIZE_MULTIPLE:
        raise ConfigError(f"{name} must be a multiple of {SIZE_MULTIPLE} between {MIN_SIZE} and {MAX_SIZE}, got {v}")


# The documented range of each numeric request field (inclusive), checked by `SamplingParams.validate` for the CLI
# and the server alike (the server's OpenAPI schema states them too). Each range is finite: a guidance of 1e38
# passes `math.isfinite` and still overflows the float32 tensor it becomes in a pipeline. Guidance stops at 50:
# a guidance embedding scales it by 1000 in the model's dtype, and fp16 ends at 65504 (66 would embed inf).
REQUEST_RANGES: dict[str, tuple[float, float]] = {
    "steps": (1, 1000),
    "guidance": (0.0, 50.0),
    "guidance_2": (0.0, 50.0),
    "seed": (0, 2**63 - 1),
    "num_images": (1, 16),
    "num_frames": (1, 1024),
    "fps": (1.0, 120.0),
}
# A LoRA adapter's weight in a request (`extra["lora"]`): finite and bounded, so weight x scale x B stays finite in
# the adapter buffers' dtype; the adapter code checks the names and the rest of the entry.
LORA_WEIGHT_RANGE = (-10.0, 10.0)


def _range_text(name: str) -> str:
    if name not in REQUEST_RANGES:
        return ""
    low, high = REQUEST_RANGES[name]
    return f" between {low:g} and {high:g}" if isinstance(low, float) else f" between {low} and {high}"


def check_unicode(name: str, text: str) -> None:
    """Raise ConfigError unless `text` is valid Unicode: a lone surrogate (JSON's "\\ud800", or a command-line
    byte that is not UTF-8) reaches no tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ConfigError(f"{name} is not valid Unicode: a lone surrogate {text[e.start]!r} at character "
                          f"{e.start}") from None


@dataclass
class SamplingParams:
    """One generation request (`ditserve.engine.GenerationRequest` is this class), parsed identically by the
    CLI and the server. None fields take the model's defaults via `resolved(spec)`; what a family cannot do
    (a negative prompt without classifier-free guidance, frames for an image model, ...) is refused by its
    pipeline's `Capabilities.check`.

    prompt: one string or a list (each prompt makes `num_images` outputs).
    negative_prompt: the prompt classifier-free guidance steers away from (families with CFG only; default
        the empty prompt, as diffusers).
    guidance: the family's own guidance scale (a distilled guidance embedding's, or the classifier-free
        scale); guidance_2: a second scale for two-expert models (the low-noise expert).
    num_frames: frames of a video (video families only); fps: its frames per second (default the model's).
    images: input images (edit / image-to-video families), as paths or PIL images. extra: family-specific
    options.
    """

    prompt: str | list[str]
    height: int | None = None
    width: int | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int | None = None
    num_images: int = 1
    max_sequence_length: int | None = None
    negative_prompt: str | None = None
    guidance_2: float | None = None
    num_frames: int | None = None
    fps: float | None = None
    images: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def resolved(self, spec: ModelSpec) -> "SamplingParams":
        """A copy with defaults from `spec` filled in, validated. Raises ConfigError on bad values."""
        p = SamplingParams(
            prompt=self.prompt,
            height=self.height if self.height is not None else spec.default_height,
            width=self.width if self.width is not None else spec.default_width,
            steps=self.steps if self.steps is not None else spec.default_steps,
            guidance=self.guidance if self.guidance is not None else spec.default_guidance,
            seed=self.seed,
            num_images=self.num_images,
            max_sequence_length=(self.max_sequence_length if self.max_sequence_length is not None
                                 else spec.max_sequence_length),
            negative_prompt=self.negative_prompt,
            guidance_2=self.guidance_2,
            num_frames=self.num_frames if self.num_frames is not None else spec.default_num_frames,
            fps=self.fps if self.fps is not None else spec.default_fps,
            images=list(self.images),
            extra=dict(self.extra),
        )
        p.validate(spec)
        return p

    def validate(self, spec: ModelSpec | None = None) -> None:
        """Raise ConfigError, naming the field and its range (`REQUEST_RANGES`), for a value no family can take:
        text that is not valid Unicode, a non-integer count, a non-finite or out-of-range number."""
        prompt = self.prompt
        if not (isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt
                                           and all(isinstance(s, str) for s in prompt))):
            raise ConfigError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise ConfigError(f"negative_prompt must be a string, got {self.negative_prompt!r}")
        for name, text in [("prompt", s) for s in self.prompts] + [("negative_prompt", self.negative_prompt or "")]:
            check_unicode(name, text)
        # Counts and sizes must be integers (2.5 steps or a 512.0 height would fail deep in the pipeline).
        for name in ("height", "width", "steps", "seed", "num_images", "max_sequence_length", "num_frames"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
                raise ConfigError(f"{name} must be an integer, got {v!r}")
        # Real numbers must be finite and in range: a huge guidance overflows the float32 tensor it becomes.
        for name in ("guidance", "guidance_2", "fps"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
                raise ConfigError(f"{name} must be a finite number{_range_text(name)}, got {v!r}")
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_image_size(name, getattr(self, name))
        for name in REQUEST_RANGES:
            v = getattr(self, name)
            low, high = REQUEST_RANGES[name]
            if v is not None and not low <= v <= high:
                raise ConfigError(f"{name} must be{_range_text(name)}, got {v}")
        msl = self.max_sequence_length
        if msl is not None and spec is None and msl < 1:
            raise ConfigError(f"max_sequence_length must be >= 1, got {msl}")
        if msl is not None and spec is not None and not (1 <= msl <= spec.max_sequence_length):
            raise ConfigError(
                f"max_sequence_length must be between 1 and {spec.max_sequence_length} for {spec.name}, got {msl}")
        entries = self.extra.get("lora") if isinstance(self.extra, dict) else None
        for entry in entries if isinstance(entries, (list, tuple)) else ():
            weight = (entry.get("weight") if isinstance(entry, dict)
                      else entry[1] if isinstance(entry, (list, tuple)) and len(entry) == 2 else None)
            low, high = LORA_WEIGHT_RANGE
            if isinstance(weight, numbers.Real) and not isinstance(weight, bool) and not low <= weight <= high:
                raise ConfigError(f"lora: a weight must be a finite number between {low:g} and {high:g}, got {weight}")
