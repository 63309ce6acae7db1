"""Rotary position embedding: angle tables and their application to (B, L, H, D) queries and keys."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ditserve.kernels import rotary as K
from ditserve.ops import functional as Fn
from ditserve.ops.base import CustomOp, OpsConfig


def axial_rope_cos_sin(
    ids: torch.Tensor, axes_dim: Sequence[int], theta: float, out_dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables for multi-axis RoPE (FLUX's (t, h, w) position ids).

    ids: (L, n_axes) or (B, L, n_axes) positions. Axis i contributes axes_dim[i] / 2 channel pairs with
    frequencies theta^(-2j / axes_dim[i]). Angles are computed in float64 (as diffusers does on CUDA/CPU) and
    returned as (L, D/2) or (B, L, D/2) in `out_dtype`, D = sum(axes_dim).
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(f"ids has {ids.shape[-1]} axes, axes_dim has {len(axes_dim)}")
    pos = ids.to(torch.float64)
    angles = []
    for i, dim in enumerate(axes_dim):
        if dim % 2:
            raise ValueError(f"every RoPE axis dim must be even, got {list(axes_dim)}")
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim))
        angles.append(pos[..., i : i + 1] * freqs)  # (..., L, dim/2)
    ang = torch.cat(angles, dim=-1)
    return ang.cos().to(out_dtype), ang.sin().to(out_dtype)


class Rotary(CustomOp):
    """Apply RoPE: x (B, L, H, D), cos/sin (L, D/2) or (B, L, D/2) -> (B, L, H, D) in x's dtype.

    interleaved=True rotates channel pairs (2i, 2i+1) (FLUX, Wan); False rotates (i, i + D/2).
    """

    def __init__(self, interleaved: bool, ops: OpsConfig | None = None):
        super().__init__(ops)
        self.interleaved = interleaved

    def forward_native(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return Fn.apply_rotary(x, cos, sin, self.interleaved)

    def extra_repr(self) -> str:
        return f"interleaved={self.interleaved}, {super().extra_repr()}"


class RMSNormRotary(CustomOp):
    """A DiT's per-head q/k RMSNorm, then RoPE over the joint sequence, as one op:
    forward(xs, weights, cos, sin) = `ditserve.ops.functional.rms_norm_rotary` (each part of xs RMS-normed with
    its weight, concatenated over tokens, rotated).

    xs: tuple of (B, L_i, H, D) (views of a fused projection are read in place); weights: tuple of (D,);
    cos, sin: (sum L_i, D/2) or (B, sum L_i, D/2) fp32 -> (B, sum L_i, H, D) in xs' dtype. With quantize=True
    (fp8 attention's input): (q (B, sum L_i, H, D) float8_e4m3fn, descale (1,) fp32), the output quantised with
    one scale that the weights fix (`ditserve.ops.functional.rms_norm_rotary_fp8`; on CUDA, in the kernel).
    """

    # Fast path: the Triton kernel `ditserve::rms_norm_rotary`, which reads each row once and writes it once.
    # Compiled native, inductor fused FLUX.1's q/k norm + RoPE into kernels at ~0.9 TB/s (H100, c44df54); the
    # kernel runs at 1.9 TB/s and the compiled FLUX.1-dev forward takes 4.9 ms less with it (2559e2e).
    FAST_BY_DEFAULT = True
    warm_quantized = False  # whether `warm` also compiles the fp8 variant (set where the model uses it)

    def __init__(self, head_dim: int, eps: float = 1e-6, interleaved: bool = True, ops: OpsConfig | None = None):
        super().__init__(ops)
        self.head_dim, self.eps, self.interleaved = head_dim, eps, interleaved

    def forward_native(self, xs, weights, cos, sin, quantize: bool = False):
        fn = Fn.rms_norm_rotary_fp8 if quantize else Fn.rms_norm_rotary
        return fn(xs, weights, cos, sin, self.eps, self.interleaved)

    def forward_cuda(self, xs, weights, cos, sin, quantize: bool = False):
        fn = K.rms_norm_rotary_fp8 if quantize else K.rms_norm_rotary
        return fn(list(xs), list(weights), cos, sin, self.eps, self.interleaved)

    def warm(self, device: torch.device, dtype: torch.dtype) -> None:
        """Run the fast path once on tiny inputs (the kernel specialises on D and the dtype only)."""
        x = torch.zeros(1, 4, 2, self.head_dim, device=device, dtype=dtype)
        w = torch.ones(self.head_dim, device=device, dtype=dtype)
        tab = torch.zeros(4, self.head_dim // 2, device=device, dtype=torch.float32)
        self.forward_cuda((x,), (w,), tab, tab)
        if self.warm_quantized:  # two parts (FLUX's double block): both launch variants, the one writing the scale
            both = torch.cat((tab, tab))
            self.forward_cuda((x, x), (w, w), both, both, quantize=True)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, eps={self.eps}, interleaved={self.interleaved}, {super().extra_repr()}"
