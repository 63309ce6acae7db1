"""Norm custom ops: `ditserve::rms_norm`, `ditserve::norm_scale_shift`, `ditserve::residual_norm_scale_shift`.

Contracts (B batch, L tokens, D channels; any leading dims are flattened into rows):
  rms_norm(x (.., D), weight (D,) | None, eps) -> (.., D)
  norm_scale_shift(x (B, L, D), weight (D,) | None, scale, shift (B, 1|L, D), eps, rms) -> (B, L, D)
  residual_norm_scale_shift(x, residual (B, L, D), gate | None, weight | None, scale, shift, eps, rms)
      -> (out (B, L, D), new_residual (B, L, D))
Inputs may be non-contiguous: the CUDA implementation makes them contiguous explicitly (a copy only when
needed). Outputs are contiguous and have x's dtype (new_residual has residual's dtype).
"""

from __future__ import annotations

import torch

from ditserve.ops import functional as Fn


@torch.library.custom_op("ditserve::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    return Fn.rms_norm(x, weight, eps).contiguous()


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("ditserve::norm_scale_shift", mutates_args=())
def norm_scale_shift(
    x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor, eps: float, rms: bool
) -> torch.Tensor:
    return Fn.norm_scale_shift(x, weight, scale, shift, eps, rms).contiguous()


@norm_scale_shift.register_fake
def _(x, weight, scale, shift, eps, rms):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("ditserve::residual_norm_scale_shift", mutates_args=())
def residual_norm_scale_shift(
    x: torch.Tensor,
    residual: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    y, r = Fn.residual_norm_scale_shift(x, residual, gate, weight, scale, shift, eps, rms)
    return y.contiguous(), r.contiguous()


@residual_norm_scale_shift.register_fake
def _(x, residual, gate, weight, scale, shift, eps, rms):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(residual, memory_format=torch.contiguous_format),
    )


def _register_triton() -> bool:
    """Register the Triton kernels for CUDA when Triton is importable. Returns whether it did."""
    import importlib.util

    if importlib.util.find_spec("triton") is None or not torch.cuda.is_available():
        return False
    from ditserve.kernels import triton_norm

    rms_norm.register_kernel("cuda")(triton_norm.rms_norm)
    norm_scale_shift.register_kernel("cuda")(triton_norm.norm_scale_shift)
    residual_norm_scale_shift.register_kernel("cuda")(triton_norm.residual_norm_scale_shift)
    return True


TRITON_REGISTERED: bool = _register_triton()
