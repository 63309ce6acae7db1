"""Norm custom ops: `ditserve::rms_norm`, `ditserve::norm_scale_shift`, `ditserve::residual_norm_scale_shift`.

Contracts (B batch, L tokens, D channels; any leading dims are flattened into rows):
  rms_norm(x (.., D), weight (D,) | None, eps) -> (.., D)
  norm_scale_shift(x (B, L, D), weight (D,) | None, scale, shift (B, 1|L, D), eps, rms) -> (B, L, D)
  residual_norm_scale_shift(x, residual (B, L, D), gate | None, weight | None, scale, shift, eps, rms)
      -> (out (B, L, D), new_residual (B, L, D))
and their fp8 variants `norm_scale_shift_fp8` -> (q (B*L, D) fp8, scale (B*L, 1) fp32) and
`residual_norm_scale_shift_fp8` -> (q, scale, new_residual): the output quantised per row (the fp8 tier).
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


# The fp8 tier's variants: the same norms, their output quantised to fp8 per row (`Fn.quantize_rows`) in the
# kernel that computes it, for an fp8 GEMM to read. q is (B*L, D) float8_e4m3fn, scale (B*L, 1) float32.


@torch.library.custom_op("ditserve::norm_scale_shift_fp8", mutates_args=())
def norm_scale_shift_fp8(
    x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor, eps: float, rms: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    q, s = Fn.quantize_rows(Fn.norm_scale_shift(x, weight, scale, shift, eps, rms).reshape(-1, x.shape[-1]))
    return q.contiguous(), s.contiguous()


@norm_scale_shift_fp8.register_fake
def _(x, weight, scale, shift, eps, rms):
    return _fake_fp8(x)


@torch.library.custom_op("ditserve::residual_norm_scale_shift_fp8", mutates_args=())
def residual_norm_scale_shift_fp8(
    x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None,
    scale: torch.Tensor, shift: torch.Tensor, eps: float, rms: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, r = Fn.residual_norm_scale_shift(x, residual, gate, weight, scale, shift, eps, rms)
    q, s = Fn.quantize_rows(y.reshape(-1, x.shape[-1]))
    return q.contiguous(), s.contiguous(), r.contiguous()


@residual_norm_scale_shift_fp8.register_fake
def _(x, residual, gate, weight, scale, shift, eps, rms):
    return (*_fake_fp8(x), torch.empty_like(residual, memory_format=torch.contiguous_format))


def _fake_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty((rows, x.shape[-1]), dtype=Fn.FP8_DTYPE), x.new_empty((rows, 1), dtype=torch.float32)


def _register_triton() -> bool:
    """Register the Triton kernels for CUDA when Triton is importable. Returns whether it did."""
    import importlib.util

    # No CUDA probe here: registering a kernel for the "cuda" dispatch key needs no GPU (it is simply never
    # dispatched without one), and importing ditserve must not touch the driver.
    if importlib.util.find_spec("triton") is None:
        return False
    from ditserve.kernels import triton_norm

    rms_norm.register_kernel("cuda")(triton_norm.rms_norm)
    norm_scale_shift.register_kernel("cuda")(triton_norm.norm_scale_shift)
    residual_norm_scale_shift.register_kernel("cuda")(triton_norm.residual_norm_scale_shift)
    norm_scale_shift_fp8.register_kernel("cuda")(triton_norm.norm_scale_shift_fp8)
    residual_norm_scale_shift_fp8.register_kernel("cuda")(triton_norm.residual_norm_scale_shift_fp8)
    return True


TRITON_REGISTERED: bool = _register_triton()
