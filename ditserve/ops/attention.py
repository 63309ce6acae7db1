"""Attention dispatcher with named backends, chosen once at construction.

All backends take and return (B, L, H, D) tensors. `sdpa` (PyTorch's scaled_dot_product_attention, which
picks cuDNN / flash / memory-efficient kernels itself) works everywhere and is what `auto` (the engine's default,
`resolve_backend`) picks except for long-sequence models where FlashAttention-3 is installed and runs. `flash-attn`
(the flash_attn package, FlashAttention-2), `fa3` (FlashAttention-3's Hopper kernels: the `flash_attn_interface`
module that flash-attention's hopper/ build installs, or the forward-only `fa3-fwd` wheel's `fa3_fwd_interface`),
`fa4` (the flash-attn-4 package: FlashAttention's CuTe-DSL kernels, Hopper and Blackwell) and `sage` (the
sageattention package) are used when importable; asking for one that is not installed raises an error naming the
package. No mask is passed unless the caller gives one, so SDPA can take
its fastest (mask-free) kernels.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.kernels import attention_fp8 as K
from ditserve.ops import functional as Fn
from ditserve.ops.base import CustomOp, OpsConfig

# backend name -> (python module it needs, pip package name); None for always-available backends.
BACKENDS: dict[str, tuple[str, str] | None] = {
    "sdpa": None,
    "flash-attn": ("flash_attn.flash_attn_interface", "flash-attn"),
    "fa3": ("flash_attn_interface", "flash-attn 3 (flash-attention's hopper/ build) or fa3-fwd"),
    "fa4": ("flash_attn.cute", "flash-attn-4"),
    "sage": ("sageattention", "sageattention"),
}
# Modules that provide a backend besides BACKENDS' own (the first importable one is used).
ALTERNATIVE_MODULES: dict[str, tuple[str, ...]] = {"fa3": ("fa3_fwd_interface",)}
# CUDA compute capabilities (major) each backend's kernels run on; absent = any device its package supports.
CUDA_MAJORS: dict[str, tuple[int, ...]] = {"fa3": (9,), "fa4": (9, 10)}


def _sdpa(q, k, v, mask):
    # SDPA wants (B, H, L, D); the transposes are views.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _maskless(name: str, fn: Callable) -> Callable:
    """A package backend's (q, k, v, mask) call: `fn(q, k, v)` on (B, L, H, D) tensors, refusing a mask it cannot
    apply rather than ignoring it (None-ness is static under torch.compile: no graph break)."""

    def call(q, k, v, mask):
        if mask is not None:
            raise ValueError(f"the '{name}' attention backend takes no mask; use backend='sdpa'")
        return fn(q, k, v)

    return call


def _make_flash_attn() -> Callable:
    from flash_attn import flash_attn_func

    return _maskless("flash-attn", flash_attn_func)  # takes (B, L, H, D) natively


# flash-attn-4's kernels are CuTe-DSL Python that dynamo cannot trace: wrapped as a custom op, a compiled block keeps
# them as one opaque call (no graph break) and inductor fuses around it as around SDPA.
@torch.library.custom_op("ditserve::fa4_attention", mutates_args=())
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) q, k, v -> (B, L, H, D) softmax(q k^T / sqrt(D)) v, by flash-attn-4 (JIT-compiled at the first
    call of each shape class; FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 keeps the compiled kernels on disk)."""
    from flash_attn.cute import flash_attn_func

    out = flash_attn_func(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # (some versions also return the log-sum-exp)


@fa4_attention.register_fake
def _(q, k, v):
    return q.new_empty(q.shape)  # contiguous (B, L, H, D), as the kernel writes it


def _make_fa4() -> Callable:
    return _maskless("fa4", fa4_attention)


def _fa3_module():
    for name in (BACKENDS["fa3"][0], *ALTERNATIVE_MODULES["fa3"]):
        if _importable(name):
            return importlib.import_module(name)
    raise ModuleNotFoundError("no FlashAttention-3 module (flash_attn_interface or fa3_fwd_interface)")


# The FlashAttention-3 `flash_attn_func` the op calls: found once, when an fa3 backend is built (`_make_fa3`), not
# on every call (the module lookup searches sys.path).
_fa3_func: Callable | None = None


# FlashAttention-3's wrappers differ between builds (an autograd Function over torch.ops.flash_attn_3 or
# torch.ops.fa3_fwd, returning out or (out, lse)): one custom op of ditserve's own keeps the compiled graph the
# same whichever is installed.
@torch.library.custom_op("ditserve::fa3_attention", mutates_args=())
def fa3_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) q, k, v -> (B, L, H, D) softmax(q k^T / sqrt(D)) v, by FlashAttention-3's SM90 kernel."""
    out = (_fa3_func or _fa3_module().flash_attn_func)(q, k, v)
    return out[0] if isinstance(out, tuple) else out


@fa3_attention.register_fake
def _(q, k, v):
    return q.new_empty(q.shape)


def _make_fa3() -> Callable:
    global _fa3_func
    _fa3_func = _fa3_module().flash_attn_func
    return _maskless("fa3", fa3_attention)


def _make_sage() -> Callable:
    from sageattention import sageattn

    return _maskless("sage", lambda q, k, v: sageattn(q, k, v, tensor_layout="NHD"))


def attention_backend_available(name: str) -> bool:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}")
    need = BACKENDS[name]
    if need is None:
        return True
    return any(_importable(m) for m in (need[0], *ALTERNATIVE_MODULES.get(name, ())))


# `--attention auto` (the default) on a model whose class sets LONG_SEQUENCES (video: tens of thousands of tokens
# a sequence at its sizes): the first of these that is installed and runs on the device. FlashAttention-3 beat
# cuDNN's SDPA by 10-17% at 32,760 and 75,600 tokens on an H200, while cuDNN was 7-17% faster at the image
# families' 4,224-4,608 (bench/attention.py --shapes all, bench/results/README.md): image models keep `sdpa`.
AUTO_LONG_SEQUENCES = ("fa3",)


# Head dims each backend's kernels take (FlashAttention-3: multiples of 8 up to 256); absent = any.
HEAD_DIMS: dict[str, Callable[[int], bool]] = {"fa3": lambda d: d % 8 == 0 and d <= 256}


def resolve_backend(name: str, device: torch.device, long_sequences: bool, head_dim: int | None = None) -> str:
    """The backend a model is built with: `name` itself, or for "auto" the measured-fastest exact backend that
    is installed and runs on `device` at `head_dim` (see AUTO_LONG_SEQUENCES), else "sdpa"."""
    if name != "auto":
        return name
    if long_sequences and device.type == "cuda" and torch.cuda.is_available():
        major = torch.cuda.get_device_capability(device)[0]
        for backend in AUTO_LONG_SEQUENCES:
            fits = head_dim is None or HEAD_DIMS.get(backend, lambda d: True)(head_dim)
            if major in CUDA_MAJORS.get(backend, (major,)) and fits and attention_backend_available(backend):
                return backend
    return "sdpa"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is absent
        return False


class Attention(nn.Module):
    """softmax(q k^T / sqrt(D)) v. q: (B, Lq, H, D), k, v: (B, Lk, H, D) -> (B, Lq, H, D).

    `mask` (optional, SDPA only: the other backends raise if given one, rather than ignore it): boolean
    (True = attend) or additive, broadcastable to (B, H, Lq, Lk).
    """

    def __init__(self, backend: str = "sdpa"):
        super().__init__()
        if backend == "auto":
            raise ValueError("attention backend 'auto' is resolved when the model is built "
                             "(ditserve.ops.attention.resolve_backend); pass the backend it chose")
        if not attention_backend_available(backend):
            module, package = BACKENDS[backend]
            raise ValueError(
                f"attention backend {backend!r} needs the Python package {package!r} (module {module!r}), "
                f"which is not installed; install it or use backend='sdpa'"
            )
        self.backend = backend
        self.supports_mask = backend == "sdpa"
        makers = {"sdpa": lambda: _sdpa, "flash-attn": _make_flash_attn, "fa3": _make_fa3, "fa4": _make_fa4,
                  "sage": _make_sage}
        self._impl: Callable = makers[backend]()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
        return self._impl(q, k, v, mask)

    def extra_repr(self) -> str:
        return f"backend={self.backend}"


class Fp8Attention(CustomOp):
    """fp8 attention (`--fp8-attention`, lossy, off by default; part of the fp8 tier): q, k and v in fp8 with one
    scale each, P rounded to fp8 in the kernel, the output in fp8 with one scale.

    forward(q, descale_q, k, descale_k, v) -> (o (B, S, H, D) float8_e4m3fn, descale_o (1,) fp32), o * descale_o
    ~= softmax(q k^T / sqrt(D)) v. q, k: (B, S, H, D) fp8 with their (1,) descales, as the q/k norm + RoPE writes
    them (`RMSNormRotary(..., quantize=True)`); v: (B, S, H, D) in the compute dtype, quantised here over the
    whole tensor (under torch.compile, one fused reduction and one fused pass with the concatenation that makes v).
    The output's scale is v's: each output row is a convex combination of v's rows, so it cannot overflow.

    On CUDA: cuDNN's fp8 SDPA (`ditserve::fp8_attention`), which needs the nvidia-cudnn-frontend package; its
    absence raises ConfigError at construction. Elsewhere (and with kernels="native"): the fp32 reference.
    """

    FAST_BY_DEFAULT = True  # the fast path is the point: 299.5 vs 439.8 us at FLUX.1's attention (H100)

    def __init__(self, ops: OpsConfig | None = None):
        super().__init__(ops)
        if self.path == "cuda":
            K.check_available()

    def forward_native(self, q, descale_q, k, descale_k, v):
        v, descale_v, scale_v = Fn.quantize_tensor(v)
        return Fn.fp8_attention(q, k, v, descale_q, descale_k, descale_v, scale_v), descale_v

    def forward_cuda(self, q, descale_q, k, descale_k, v):
        v, descale_v, scale_v = Fn.quantize_tensor(v)  # plain torch: fused by inductor
        return K.fp8_attention(q, k, v, descale_q, descale_k, descale_v, scale_v), descale_v
