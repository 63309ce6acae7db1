"""Engine flags shared by the subcommands that load a model (generate, serve, compile-report), and the checks
that can refuse an engine configuration before the (slow) model load. One definition, so the subcommands
cannot drift apart."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

from ditserve.config import (
    CFG_MODES, CUDA_GRAPHS, DTYPE_NAMES, DYNAMIC_SHAPES, FP8_FAST_ACCUM, LOAD_FORMATS, NATIVE_COMPONENTS, QUANTIZATIONS,
    VAE_STREAMING, VAE_TILING, ConfigError, EngineConfig,
)

# The names of `ditserve.ops.attention.BACKENDS` (a test holds them equal), here so that parsing the flags does
# not import torch: `ditserve --help` and an argument error stay fast.
ATTENTION_BACKENDS = ("sdpa", "flash-attn", "fa3", "fa4", "sage")
ATTENTION_CHOICES = ("auto", *ATTENTION_BACKENDS)
# Flags that only matter once a whole pipeline runs (VAE decode, CFG, CUDA graphs of the denoise loop, the cache
# backend): a subcommand that runs the transformer alone (compile-report) leaves them out.
PIPELINE_FLAGS = ("--vae-tiling", "--compile-vae", "--cuda-graphs", "--vae-streaming", "--cfg-mode",
                  "--cache-backend", "--offload-text-encoder", "--parallel")


def add_engine_flags(p: argparse.ArgumentParser, dynamic_shapes: str = "auto", pipeline: bool = True) -> None:
    """--model, --dtype, --device, --load-format, --kernels, --attention, --cache, --cache-backend,
    --quantization, --vae-tiling, --compile-vae, --no-compile-prewarm, --dynamic-shapes (default
    `dynamic_shapes`: a server's requests vary in size, a generate run's do not). `pipeline=False` leaves out
    `PIPELINE_FLAGS` (their defaults still reach `engine_from_args`). Imports no torch."""
    from ditserve.cache.policy import PRESETS

    if not pipeline:  # the flags below that name themselves in PIPELINE_FLAGS are skipped
        p = _Skipping(p, PIPELINE_FLAGS)
    p.add_argument("--model", default=None,
                   help="diffusers-format model folder or hub id (default: the small packaged model)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default=None,
                   help="compute dtype (default: bf16 on GPUs, fp32 on CPU)")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: best available)")
    p.add_argument("--load-format", choices=list(LOAD_FORMATS), default="auto",
                   help="auto/safetensors: the model's weights; dummy: random weights at full size")
    p.add_argument("--kernels", choices=["auto", "native", "triton"], default="auto",
                   help="fused-op code paths: auto (fast where measured faster), native (PyTorch), triton")
    p.add_argument("--attention", choices=list(ATTENTION_CHOICES), default="auto",
                   help="attention backend; auto: FlashAttention-3 for video models where it is installed and runs "
                        "(Hopper), else sdpa (see the README)")
    p.add_argument("--cache", default=None,
                   help=f"DiT block cache (lossy, off by default): a preset ({', '.join(PRESETS)}), optionally "
                        "with knobs, e.g. dbcache:fn=8,bn=0,threshold=0.12,warmup=4,max_consecutive=3,taylorseer=1")
    p.add_argument("--cache-backend", choices=["ditserve", "cache-dit"], default="ditserve",
                   help="ditserve's own cache, or the cache-dit library (must be installed)")
    p.add_argument("--quantization", choices=list(QUANTIZATIONS), default=None,
                   help="quantise the DiT (lossy, off by default): fp8 = fp8 weights and per-token fp8 "
                        "activations in the transformer blocks' GEMMs; Hopper/Ada GPUs only (compute "
                        "capability 8.9+), bf16")
    p.add_argument("--fp8-attention", action="store_true",
                   help="with --quantization fp8 (lossy, off by default): attention in fp8 too, on cuDNN's fp8 "
                        "attention (needs the nvidia-cudnn-frontend package; measured gain: README, "
                        "Optimisations)")
    p.add_argument("--fp8-fast-accum", choices=list(FP8_FAST_ACCUM), default="auto",
                   help="the fp8 tier's GEMMs accumulate in the fp8 tensor cores' own format instead of fp32 "
                        "(lossy, 4-18%% faster GEMMs on Hopper): auto = on with --quantization fp8 (default), "
                        "on, off")
    p.add_argument("--vae-tiling", choices=list(VAE_TILING), default="auto",
                   help="tiled VAE decode (lossy: overlapping tiles are blended; bounds decode memory): auto = "
                        "only for images larger than 1024x1024 pixels (default), on = always, off = never")
    p.add_argument("--compile-vae", action="store_true",
                   help="channels-last + torch.compile of the VAE decoder (lossless; faster and about half the "
                        "decode's memory, measured in the README; the first decode compiles)")
    p.add_argument("--cuda-graphs", choices=list(CUDA_GRAPHS), default="auto",
                   help="replay the denoise loop's transformer forward and the text encoders from CUDA graphs "
                        "(exact; removes their host launch work): auto = on a CUDA GPU, forwards of at most 8192 "
                        "image tokens over the batch (e.g. 1024x1024 x2, 512x512 x8) without --cache, text "
                        "encoders always (default); on = every forward shape (an error without a CUDA GPU or with "
                        "--cache); off = never")
    p.add_argument("--vae-streaming", choices=list(VAE_STREAMING), default="auto",
                   help="decode the VAE in strips of rows (exact up to summation order; 0.42 GiB of activations "
                        "at 1024x1024 instead of 2.37; a video VAE: its high-resolution layers): auto = on a "
                        "CUDA GPU (default), on = always, off = diffusers' whole decode")
    p.add_argument("--native-components", choices=list(NATIVE_COMPONENTS), default="auto",
                   help="the packaged default model on the CPU: auto = ditserve's own text encoders, tokenizers, "
                        "VAE decoder and scheduler (the same math, without importing diffusers and transformers: "
                        "seconds less start-up; default), off = diffusers' and transformers' classes. Other models "
                        "always use the libraries")
    p.add_argument("--dynamic-shapes", choices=list(DYNAMIC_SHAPES), default=dynamic_shapes,
                   help="with --compile: auto = compile for the first image size, and once more (token counts "
                        "symbolic) at the first other size; on = one graph for every size from the start, at a "
                        f"slower first compile (default: {dynamic_shapes})")
    p.add_argument("--cfg-mode", choices=list(CFG_MODES), default="batched",
                   help="classifier-free guidance (families with a negative prompt): batched = both branches in "
                        "one forward of twice the batch (default), split = one forward per branch (less memory)")
    p.add_argument("--lora", action="append", default=[], metavar="[NAME=]PATH[:WEIGHT]",
                   help="a LoRA adapter for the DiT (diffusers/PEFT or kohya safetensors; a file or a folder with "
                        "pytorch_lora_weights.safetensors), at WEIGHT (default 1); repeat to stack several. NAME= "
                        "names it (default: the file's stem), as server requests select it (serve: the adapters "
                        "requests that name none get)")
    p.add_argument("--lora-mode", choices=["fuse", "unfused"], default=None,
                   help="with --lora: fuse = merged into the weights at load (no per-step cost; generate's and "
                        "bench's default), unfused = low-rank side products at run time (adapters chosen per "
                        "request: serve's default; with "
                        "--quantization fp8 in bf16 on the GEMMs' dequantised input)")
    p.add_argument("--offload-text-encoder", action="store_true",
                   help="keep the text encoder in host memory, on the device only while it encodes (families "
                        "that support it: for a DiT and text encoder that do not fit on the GPU together)")
    p.add_argument("--parallel", default=None, metavar="ulysses=U,ring=R,cfg=C",
                   help="run on several processes, one per GPU (with --device cpu: gloo processes): Ulysses and "
                        "ring sequence parallelism and the two CFG branches on two ranks; each part optional "
                        "(default 1), their product the number of processes (generate and bench; also under torchrun)")
    p.add_argument("--no-compile-prewarm", dest="compile_prewarm", action="store_false",
                   help="with --compile: do not start the compile workers and the Triton kernels' compile early "
                        "(torch's default timing; slower cold start)")


class _Skipping:
    """An argparse parser's `add_argument` that drops the flags named in `skip` (and passes the rest on)."""

    def __init__(self, parser: argparse.ArgumentParser, skip: tuple[str, ...]):
        self._parser, self._skip = parser, skip

    def add_argument(self, *names, **kwargs):
        if not set(names) & set(self._skip):
            self._parser.add_argument(*names, **kwargs)


def engine_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The EngineConfig of the flags `add_engine_flags` added (plus `--compile` where the subcommand has it);
    `overrides` replace fields (e.g. compile-report's compile=True, cache=None). A flag the subcommand does not
    have (`PIPELINE_FLAGS` of compile-report) keeps EngineConfig's default."""
    names = ("device", "dtype", "compile", "kernels", "attention", "load_format", "cache", "cache_backend",
             "quantization", "fp8_attention", "fp8_fast_accum", "vae_tiling", "compile_vae", "dynamic_shapes",
             "compile_prewarm", "cuda_graphs", "vae_streaming", "cfg_mode", "offload_text_encoder", "parallel",
             "native_components")
    fields = {name: getattr(args, name) for name in names if hasattr(args, name)}
    lora_dir = getattr(args, "lora_dir", None)
    if getattr(args, "lora", None) or lora_dir:
        fields["lora"] = lora_from_args(args)
    elif getattr(args, "lora_mode", None):
        raise ConfigError("--lora-mode applies to LoRA adapters: add at least one --lora PATH[:WEIGHT]")
    fields.update(overrides)
    return EngineConfig(**fields)


LORA_NAME = re.compile(r"([A-Za-z0-9_-][A-Za-z0-9_.-]*)=(.+)")


def parse_lora(text: str):
    """`--lora [NAME=]PATH[:WEIGHT]` -> a LoRASpec. A leading plain name (letters, digits, '_', '-', '.') and '='
    name the adapter; otherwise the whole text is `PATH[:WEIGHT]` (so a path holding '=' is written with a
    folder, e.g. ./a=b.safetensors, whose '/' makes the prefix no name)."""
    from ditserve.lora import LoRASpec

    m = LORA_NAME.fullmatch(text)
    spec = LoRASpec.parse(m[2] if m else text)
    return dataclasses.replace(spec, name=m[1]) if m else spec


def lora_from_args(args: argparse.Namespace):
    """The LoRAConfig of --lora (and, for serve, --lora-dir). generate / bench: --lora-mode defaults to fuse.
    serve: to unfused (requests choose adapters: `lora` in the request); with --lora-dir, slots on every Linear
    of rank --lora-max-rank, for adapters loaded on request."""
    from ditserve.lora import LoRAConfig

    specs = tuple(parse_lora(s) for s in getattr(args, "lora", None) or ())
    serving = hasattr(args, "lora_dir")
    mode = args.lora_mode or ("unfused" if serving else "fuse")
    if getattr(args, "lora_dir", None) is None:
        return LoRAConfig(specs, mode=mode)
    folder = Path(args.lora_dir)
    if not folder.is_dir():
        raise ConfigError(f"--lora-dir {args.lora_dir}: no such folder")
    if mode != "unfused":
        raise ConfigError("--lora-dir loads adapters when requests name them: it needs --lora-mode unfused")
    if args.lora_max_rank < 1:
        raise ConfigError(f"--lora-max-rank must be >= 1, got {args.lora_max_rank}")
    return LoRAConfig(specs, mode=mode, targets="all", max_rank=args.lora_max_rank)


def check_engine(engine: EngineConfig) -> None:
    """Engine choices that can be refused before the (slow) model load."""
    import torch

    from ditserve.ops.attention import BACKENDS, CUDA_MAJORS, attention_backend_available

    if engine.device is not None:
        try:
            device = torch.device(engine.device)
        except RuntimeError as e:
            raise ConfigError(f"--device {engine.device!r}: {e}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {engine.device!r}: torch sees no CUDA device")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {engine.device!r}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    if engine.kernels == "triton":
        from ditserve.platform import platform_for

        plat = platform_for(engine.torch_device)
        if not plat.fast_kernels:
            raise ConfigError(f"--kernels triton: this platform cannot run Triton kernels (device "
                              f"{plat.device_type!r}, triton importable: {plat.has_triton}); use --kernels auto")
    if engine.cache_backend == "cache-dit":
        from ditserve.cache import cache_dit

        if not engine.cache:
            raise ConfigError("--cache-backend cache-dit: give the cache to mount with --cache (e.g. --cache fbcache)")
        cache_dit.check_available()
    if engine.cuda_graphs == "on":
        from ditserve.cuda_graphs import resolve_cuda_graphs

        resolve_cuda_graphs(engine.cuda_graphs, engine.torch_device,
                            cache=engine.cache_backend if engine.cache else None)
    if engine.quantization == "fp8":
        from ditserve.ops.fp8 import check_fp8_device

        check_fp8_device(engine.torch_device, engine.torch_dtype)
    if engine.fp8_attention and engine.torch_device.type == "cuda" and engine.kernels != "native":
        from ditserve.kernels import attention_fp8

        attention_fp8.check_available()
    if engine.attention != "auto" and not attention_backend_available(engine.attention):
        _, package = BACKENDS[engine.attention]
        raise ConfigError(f"--attention {engine.attention}: needs the Python package {package!r}, which is not "
                          f"installed (install it, or use --attention sdpa)")
    if engine.attention in CUDA_MAJORS:
        majors = CUDA_MAJORS[engine.attention]
        dev = engine.torch_device
        major = torch.cuda.get_device_capability(dev)[0] if dev.type == "cuda" else None
        if major not in majors:
            where = f"a CUDA GPU of compute capability {major}.x" if major is not None else f"device {dev.type!r}"
            raise ConfigError(f"--attention {engine.attention}: its kernels run on CUDA compute capability "
                              f"{' or '.join(f'{m}.x' for m in majors)} only, not on {where}; use --attention sdpa")
