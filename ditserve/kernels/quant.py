"""The fp8 tier's fused activation quantisation, `ditserve::gelu_quantize_rows`.

Contract (R rows = tokens, A plain channels, G channels before the GELU):
  gelu_quantize_rows(plain (R, A) | None, pre (R, G), bias (G,) | None, plain_descale (1,) fp32 | None)
      -> (q (R, A + G) float8_e4m3fn contiguous, scale (R, 1) float32)
It is `ditserve.ops.functional.gelu_quantize_rows`: the rows [plain | gelu_tanh(pre + bias)] quantised to fp8
with one scale per row (with plain_descale, plain is fp8 with that one scale for all of it). The inputs may be
row-strided views (the MLP slice of a fused projection's output): the CUDA kernel reads them in place and writes
each quantised row once.
"""

from __future__ import annotations

import torch

from ditserve.ops import functional as Fn


@torch.library.custom_op("ditserve::gelu_quantize_rows", mutates_args=())
def gelu_quantize_rows(plain: torch.Tensor | None, pre: torch.Tensor, bias: torch.Tensor | None,
                       plain_descale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = Fn.gelu_quantize_rows(plain, pre, bias, plain_descale)
    return q.contiguous(), scale.contiguous()


@gelu_quantize_rows.register_fake
def _(plain, pre, bias, plain_descale=None):
    R, G = pre.shape
    A = 0 if plain is None else plain.shape[1]
    return pre.new_empty((R, A + G), dtype=Fn.FP8_DTYPE), pre.new_empty((R, 1), dtype=torch.float32)


def _register_triton() -> bool:
    """Register the Triton kernel for CUDA when Triton is importable. Returns whether it did."""
    import importlib.util

    # No CUDA probe here: registering a kernel for the "cuda" dispatch key needs no GPU (it is simply never
    # dispatched without one), and importing ditserve must not touch the driver.
    if importlib.util.find_spec("triton") is None:
        return False
    from ditserve.kernels import triton_quant

    gelu_quantize_rows.register_kernel("cuda")(triton_quant.gelu_quantize_rows)
    return True


TRITON_REGISTERED: bool = _register_triton()
