"""The fused q/k norm + RoPE custom op, `ditserve::rms_norm_rotary`.

Contract (B batch, L_i tokens of part i, S = sum L_i, H heads, D head dim):
  rms_norm_rotary(xs [(B, L_i, H, D)], weights [(D,)], cos, sin (S, D/2) | (B, S, D/2) fp32, eps, interleaved)
      -> (B, S, H, D) contiguous, in xs' dtype
It is `ditserve.ops.functional.rms_norm_rotary`: each part RMS-normed with its weight and rounded to its dtype,
the parts concatenated over tokens (FLUX's double block: [text, image]; a single part otherwise), then rotated.
The parts may be strided views (the q or k slice of a fused projection's output): the CUDA kernel reads them in
place and writes each part's rows of the joint output, so neither the slices nor the concatenation is copied.

  rms_norm_rotary_fp8(the same arguments) -> (q (B, S, H, D) float8_e4m3fn contiguous, descale (1,) float32)
is `ditserve.ops.functional.rms_norm_rotary_fp8`: that output quantised with one scale that the weights fix.
"""

from __future__ import annotations

import torch

from ditserve.ops import functional as Fn


@torch.library.custom_op("ditserve::rms_norm_rotary", mutates_args=())
def rms_norm_rotary(xs: list[torch.Tensor], weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                    eps: float, interleaved: bool) -> torch.Tensor:
    return Fn.rms_norm_rotary(xs, weights, cos, sin, eps, interleaved).contiguous()


@rms_norm_rotary.register_fake
def _(xs, weights, cos, sin, eps, interleaved):
    B, _, H, D = xs[0].shape
    return xs[0].new_empty((B, sum(x.shape[1] for x in xs), H, D))


# The fp8 attention's input (`--fp8-attention`): the same op, its output quantised to fp8 with one scale fixed by
# the weights (`Fn.rms_norm_rotary_fp8`), in the kernel.
@torch.library.custom_op("ditserve::rms_norm_rotary_fp8", mutates_args=())
def rms_norm_rotary_fp8(xs: list[torch.Tensor], weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                        eps: float, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    q, descale = Fn.rms_norm_rotary_fp8(xs, weights, cos, sin, eps, interleaved)
    return q.contiguous(), descale


@rms_norm_rotary_fp8.register_fake
def _(xs, weights, cos, sin, eps, interleaved):
    B, _, H, D = xs[0].shape
    return (xs[0].new_empty((B, sum(x.shape[1] for x in xs), H, D), dtype=Fn.FP8_DTYPE),
            xs[0].new_empty((1,), dtype=torch.float32))


def _register_triton() -> bool:
    """Register the Triton kernel for CUDA when Triton is importable. Returns whether it did."""
    import importlib.util

    # No CUDA probe here: registering a kernel for the "cuda" dispatch key needs no GPU (it is simply never
    # dispatched without one), and importing ditserve must not touch the driver.
    if importlib.util.find_spec("triton") is None:
        return False
    from ditserve.kernels import triton_rotary

    rms_norm_rotary.register_kernel("cuda")(triton_rotary.rms_norm_rotary)
    rms_norm_rotary_fp8.register_kernel("cuda")(triton_rotary.rms_norm_rotary_fp8)
    return True


TRITON_REGISTERED: bool = _register_triton()
