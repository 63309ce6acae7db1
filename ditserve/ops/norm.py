"""Norm ops: RMSNorm, LayerNorm without affine, and the fused AdaLN family.

Each op's `forward_native` is the reference from `ditserve.ops.functional`; `forward_cuda` calls the Triton
custom op from `ditserve.kernels.norm` (one opaque node under torch.compile). Which one runs is decided in
the constructor (see `CustomOp`). fp32 always stays native: inductor's fused fp32 code beats the kernel
there (the Z-Image fp32 RMSNorm lesson), so FAST_DTYPES holds the half dtypes only.
"""

from __future__ import annotations

import torch
from torch import nn

from ditserve.kernels import norm as K
from ditserve.ops import functional as Fn
from ditserve.ops.base import CustomOp, OpsConfig


class RMSNorm(CustomOp):
    """y = x / rms(x) * weight over the last dim. x: (..., D) -> (..., D), x's dtype."""

    # Not flipped: FLUX's RMSNorms are the per-head q/k norms (D=128), where the kernel is ~2.5% slower than
    # compiled native (H200, bench/results/ops-2026-11-21-40596fb.json), and in the whole compiled FLUX.1-dev
    # forward forcing it costs 6 ms (141.2 vs 133.7 ms, H100, flux_step-2026-11-21-bac797b-h100.json): the
    # opaque op stops inductor fusing the norm with the rotary embedding. Eager models take it regardless. (FLUX's
    # blocks now apply these weights through `RMSNormRotary`, whose kernel does the norm and the rotation.)
    FAST_BY_DEFAULT = False

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True, ops: OpsConfig | None = None,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__(ops)
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device)) if elementwise_affine else None

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return Fn.rms_norm(x, self.weight, self.eps)

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        return K.rms_norm(x, self.weight, self.eps)


class LayerNorm(CustomOp):
    """LayerNorm over the last dim without affine parameters (the AdaLN pre-norm). x: (..., D)."""

    def __init__(self, dim: int, eps: float = 1e-6, ops: OpsConfig | None = None):
        super().__init__(ops)
        self.dim, self.eps = dim, eps

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return Fn.layer_norm(x, self.eps)


class _ModulatedNorm(CustomOp):
    """Shared constructor of the AdaLN family: norm kind ("layer" or "rms") and optional norm weight."""

    def __init__(self, dim: int, eps: float = 1e-6, norm: str = "layer", elementwise_affine: bool = False,
                 ops: OpsConfig | None = None, dtype: torch.dtype | None = None, device=None):
        if norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {norm!r}")
        super().__init__(ops)
        self.dim, self.eps, self.rms = dim, eps, norm == "rms"
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device)) if elementwise_affine else None

    def extra_repr(self) -> str:
        return f"{self.dim}, norm={'rms' if self.rms else 'layer'}, eps={self.eps}, {super().extra_repr()}"

    def warm_inputs(self, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """Tiny inputs with the kernel specialisation of a DiT block's call: x (1, 16, D) and per-sample
        (1, 1, D) modulation (Triton specialises on D and on the modulation's token stride, 0 here as in the
        blocks, not on the row count), for `ditserve.compile.prewarm_kernels`."""
        x = torch.zeros(1, 16, self.dim, device=device, dtype=dtype)
        mod = torch.zeros(1, 1, self.dim, device=device, dtype=dtype)
        return x, mod


class NormScaleShift(_ModulatedNorm):
    """y = norm(x) * (1 + scale) + shift.

    x: (B, L, D); scale, shift: (B, 1, D) or (B, L, D). Returns (B, L, D) in x's dtype, or with quantize=True
    (the fp8 tier, for an fp8 layer to read) y quantised per row: a `QuantizedRows` (on CUDA, in the kernel).
    """

    # Kernel 0.026 ms vs compiled native 0.038 at FLUX.1-dev size, 0.247 vs 0.310 at Wan-14B size
    # (H200, bf16, GPU time; bench/results/ops-2026-11-21-40596fb.json).
    FAST_BY_DEFAULT = True

    def forward_native(self, x, scale, shift, quantize: bool = False):
        y = Fn.norm_scale_shift(x, self.weight, scale, shift, self.eps, self.rms)
        return Fn.quantized(y) if quantize else y

    def forward_cuda(self, x, scale, shift, quantize: bool = False):
        if quantize:
            return Fn.QuantizedRows(*K.norm_scale_shift_fp8(x, self.weight, scale, shift, self.eps, self.rms),
                                    x.shape)
        return K.norm_scale_shift(x, self.weight, scale, shift, self.eps, self.rms)

    def warm(self, device: torch.device, dtype: torch.dtype) -> None:
        """Run the fast path once on tiny inputs (its Triton kernel is compiled now, not at the first call)."""
        x, mod = self.warm_inputs(device, dtype)
        self.forward_cuda(x, mod, mod)


class ResidualNormScaleShift(_ModulatedNorm):
    """r = residual + gate * x; y = norm(r) * (1 + scale) + shift. Returns (y, r); with quantize=True, y as a
    `QuantizedRows` (see `NormScaleShift`).

    x, residual: (B, L, D); gate (or None for 1), scale, shift: (B, 1, D) or (B, L, D).
    """

    # Kernel 0.039 ms vs compiled native 0.045 at FLUX.1-dev size, 0.393 vs 0.453 at Wan-14B size
    # (H200, bf16, GPU time; bench/results/ops-2026-11-21-40596fb.json).
    FAST_BY_DEFAULT = True

    def forward_native(self, x, residual, gate, scale, shift, quantize: bool = False):
        y, r = Fn.residual_norm_scale_shift(x, residual, gate, self.weight, scale, shift, self.eps, self.rms)
        return (Fn.quantized(y), r) if quantize else (y, r)

    def forward_cuda(self, x, residual, gate, scale, shift, quantize: bool = False):
        if quantize:
            q, q_scale, r = K.residual_norm_scale_shift_fp8(x, residual, gate, self.weight, scale, shift, self.eps,
                                                            self.rms)
            return Fn.QuantizedRows(q, q_scale, x.shape), r
        return K.residual_norm_scale_shift(x, residual, gate, self.weight, scale, shift, self.eps, self.rms)

    def warm(self, device: torch.device, dtype: torch.dtype) -> None:
        """Run the fast path once on tiny inputs, gated (as the DiT blocks call it)."""
        x, mod = self.warm_inputs(device, dtype)
        self.forward_cuda(x, x, mod, mod, mod)


class NormTanhGate(_ModulatedNorm):
    """y = residual + tanh(gate) * norm(x) (residual None means 0). Z-Image's gated post-norm.

    x: (B, L, D); gate: (B, 1, D) or (B, L, D); residual: (B, L, D) or None.
    """

    def forward_native(self, x, gate, residual=None):
        return Fn.norm_tanh_gate(x, gate, residual, self.weight, self.eps, self.rms)


class MulAdd(CustomOp):
    """y = a * (k + b) + c with a constant k (k=1 is the AdaLN `x * (1 + scale) + shift`)."""

    def __init__(self, k: float = 1.0, ops: OpsConfig | None = None):
        super().__init__(ops)
        self.k = float(k)

    def forward_native(self, a, b, c):
        return Fn.mul_add(a, b, c, self.k)
