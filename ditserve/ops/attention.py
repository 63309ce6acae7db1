"""Attention dispatcher with named backends, chosen once at construction.

All backends take and return (B, L, H, D) tensors. `sdpa` (PyTorch's scaled_dot_product_attention, which
picks cuDNN / flash / memory-efficient kernels itself) is the default and works everywhere. `flash-attn`
(the flash_attn package) and `sage` (the sageattention package) are used when importable; asking for one
that is not installed raises an error naming the package. No mask is passed unless the caller gives one, so
SDPA can take its fastest (mask-free) kernels.
"""

from __future__ import annotations

import importlib.util
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# backend name -> (python module it needs, pip package name); None for always-available backends.
BACKENDS: dict[str, tuple[str, str] | None] = {
    "sdpa": None,
    "flash-attn": ("flash_attn", "flash-attn"),
    "sage": ("sageattention", "sageattention"),
}


def _sdpa(q, k, v, mask):
    # SDPA wants (B, H, L, D); the transposes are views.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def _make_flash_attn() -> Callable:
    from flash_attn import flash_attn_func

    def flash(q, k, v, mask):
        if mask is not None:  # None-ness is static under torch.compile: no graph break
            raise ValueError("the 'flash-attn' attention backend takes no mask; use backend='sdpa'")
        return flash_attn_func(q, k, v)  # takes (B, L, H, D) natively

    return flash


def _make_sage() -> Callable:
    from sageattention import sageattn

    def sage(q, k, v, mask):
        if mask is not None:
            raise ValueError("the 'sage' attention backend takes no mask; use backend='sdpa'")
        return sageattn(q, k, v, tensor_layout="NHD")

    return sage


def attention_backend_available(name: str) -> bool:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; known: {', '.join(BACKENDS)}")
    need = BACKENDS[name]
    return need is None or importlib.util.find_spec(need[0]) is not None


class Attention(nn.Module):
    """softmax(q k^T / sqrt(D)) v. q: (B, Lq, H, D), k, v: (B, Lk, H, D) -> (B, Lq, H, D).

    `mask` (optional, SDPA only: the other backends raise if given one, rather than ignore it): boolean
    (True = attend) or additive, broadcastable to (B, H, Lq, Lk).
    """

    def __init__(self, backend: str = "sdpa"):
        super().__init__()
        if not attention_backend_available(backend):
            module, package = BACKENDS[backend]
            raise ValueError(
                f"attention backend {backend!r} needs the Python package {package!r} (module {module!r}), "
                f"which is not installed; install it or use backend='sdpa'"
            )
        self.backend = backend
        self.supports_mask = backend == "sdpa"
        self._impl: Callable = {"sdpa": lambda: _sdpa, "flash-attn": _make_flash_attn, "sage": _make_sage}[backend]()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None):
        return self._impl(q, k, v, mask)

    def extra_repr(self) -> str:
        return f"backend={self.backend}"
