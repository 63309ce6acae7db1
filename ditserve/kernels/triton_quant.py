"""Triton kernel of `ditserve::gelu_quantize_rows` (imported by `ditserve.kernels.quant` only on CUDA with Triton).

Why a kernel: in the fp8 tier, the input of FLUX.1's MLP output projections is gelu_tanh(hidden + bias)
quantised per token (and, in the single block, concatenated after the attention output). Compiled, inductor
writes that as a looped reduction that reads each row twice (once for the row's amax, once to quantise); with
15360 channels a row, it took 7.99 ms a forward in the single blocks and 3.72 ms in the double blocks
(bench/flux_shapes_ab.py --variants static,fp8 at 1c36007), ~2.5x the time of reading the inputs once and
writing fp8 once.

One program handles one row: it loads the row's plain part and its pre-activation part into registers, adds
the bias, applies the tanh GELU, takes the row's amax, and stores the fp8 row and its scale. Each input byte is
read once and each output byte written once.

Math as `ditserve.ops.functional.gelu_quantize_rows`: the bias add and the GELU each rounded to the input dtype
(as the unfused ops round; the GELU's fp32 value within a few ulps of PyTorch's), the amax and the scaling in
fp32, clamped to +-448 before the fp8 cast. The row
count is the launch grid, not an argument: a new resolution reuses the compiled kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ditserve.ops import functional as Fn

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
# Constants the kernel reads (Triton kernels see only constexpr globals).
FP8_MAX = tl.constexpr(448.0)  # torch.finfo(torch.float8_e4m3fn).max
FP32_TINY = tl.constexpr(1.1754943508222875e-38)  # torch.finfo(torch.float32).tiny: the scale's floor (quantize_rows)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
MINUS_2_LOG2E = tl.constexpr(-2.8853900817779268)  # -2 / ln 2: e^(-2z) = 2^(z * MINUS_2_LOG2E)


# The strides are specialised (not `do_not_specialize`): they are the model's widths, fixed for every resolution,
# and Triton only vectorises the row loads and stores when it knows they keep 16-byte alignment.
@triton.jit
def _gelu_quantize_rows_kernel(
    a_ptr, p_ptr, bias_ptr, q_ptr, s_ptr, a_stride, p_stride, q_stride, a_descale_ptr,
    A: tl.constexpr, G: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_G: tl.constexpr, HAS_BIAS: tl.constexpr,
    A_SCALED: tl.constexpr,
):
    # A_SCALED: the plain part is fp8 with one scale for all of it (fp8 attention's output), read as a * descale
    row = tl.program_id(0).to(tl.int64)
    dtype = p_ptr.dtype.element_ty
    cg = tl.arange(0, BLOCK_G)
    mg = cg < G
    y = tl.load(p_ptr + row * p_stride + cg, mask=mg, other=0.0).to(tl.float32)  # (BLOCK_G,)
    if HAS_BIAS:
        y = (y + tl.load(bias_ptr + cg, mask=mg, other=0.0).to(tl.float32)).to(dtype).to(tl.float32)
    # tanh GELU (masked lanes: gelu(0) = 0, which leaves the amax alone), rounded as F.gelu's output is. Written
    # as 0.5 x (1 + tanh(z)) = x * sigmoid(2z) = x / (1 + e^(-2z)): one exp2 and one division, where libdevice's
    # tanh is a long instruction sequence (the kernel is compute-bound at FLUX's widths: bench/gelu_quantize.py).
    z = SQRT_2_OVER_PI * (y + 0.044715 * (y * y * y))
    y = (y / (1.0 + tl.exp2(z * MINUS_2_LOG2E))).to(dtype).to(tl.float32)
    amax = tl.max(tl.abs(y), axis=0)
    if A > 0:
        ca = tl.arange(0, BLOCK_A)
        ma = ca < A
        x = tl.load(a_ptr + row * a_stride + ca, mask=ma, other=0.0).to(tl.float32)  # (BLOCK_A,)
        if A_SCALED:
            x = x * tl.load(a_descale_ptr)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
    scale = tl.maximum(amax / FP8_MAX, FP32_TINY)
    # Values times the row's reciprocal scale, not divided by it (IEEE division, div_rn, made the kernel 2.3x
    # slower: 19.3 vs 8.3 ms a forward in the FLUX.1-dev profile). Within an fp32 ulp of PyTorch's division, which
    # moves an fp8 value by one step only on a rounding boundary (rare).
    inv = 1.0 / scale
    q_row = q_ptr + row * q_stride
    if A > 0:
        tl.store(q_row + ca, tl.clamp(x * inv, -FP8_MAX, FP8_MAX).to(q_ptr.dtype.element_ty), mask=ma)
    tl.store(q_row + A + cg, tl.clamp(y * inv, -FP8_MAX, FP8_MAX).to(q_ptr.dtype.element_ty), mask=mg)
    tl.store(s_ptr + row, scale)


# 8 warps a row: the fastest of bench/gelu_quantize.py's sweep (4-32) at FLUX.1's rows (3072 + 12288 and 12288
# elements; H100, f49456f).
NUM_WARPS = 8


def gelu_quantize_rows(plain: torch.Tensor | None, pre: torch.Tensor, bias: torch.Tensor | None,
                       plain_descale: torch.Tensor | None = None, *, num_warps: int | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """See `ditserve.kernels.quant`. num_warps overrides the launch (benchmarks)."""
    plain_dtype = pre.dtype if plain_descale is None else Fn.FP8_DTYPE
    if pre.dim() != 2 or (plain is not None and (plain.dim() != 2 or plain.shape[0] != pre.shape[0]
                                                  or plain.dtype != plain_dtype)):
        raise ValueError(f"gelu_quantize_rows: pre must be (R, G) and plain (R, A) of its dtype (fp8 with "
                         f"plain_descale), got {tuple(pre.shape)} {pre.dtype} and "
                         f"{None if plain is None else (tuple(plain.shape), plain.dtype)}")
    if bias is not None and tuple(bias.shape) != (pre.shape[1],):
        raise ValueError(f"gelu_quantize_rows: bias must be ({pre.shape[1]},), got {tuple(bias.shape)}")
    if plain_descale is not None and (plain_descale.numel() != 1 or plain_descale.dtype != torch.float32):
        raise ValueError(f"gelu_quantize_rows: plain_descale must be one float32 value, got "
                         f"{tuple(plain_descale.shape)} {plain_descale.dtype}")
    if pre.dtype not in KERNEL_DTYPES:
        q, s = Fn.gelu_quantize_rows(plain, pre, bias, plain_descale)
        return q.contiguous(), s.contiguous()
    R, G = pre.shape
    A = 0 if plain is None else plain.shape[1]
    q = torch.empty((R, A + G), device=pre.device, dtype=Fn.FP8_DTYPE)
    scale = torch.empty((R, 1), device=pre.device, dtype=torch.float32)
    if R == 0:
        return q, scale
    if pre.stride(1) != 1:
        pre = pre.contiguous()
    if plain is not None and plain.stride(1) != 1:
        plain = plain.contiguous()
    block_g = triton.next_power_of_2(G)
    block_a = triton.next_power_of_2(A) if A else 1
    with torch.cuda.device_of(pre):
        _gelu_quantize_rows_kernel[(R,)](
            pre if plain is None else plain, pre, pre if bias is None else bias.contiguous(), q, scale,
            0 if plain is None else plain.stride(0), pre.stride(0), q.stride(0),
            scale if plain_descale is None else plain_descale,
            A=A, G=G, BLOCK_A=block_a, BLOCK_G=block_g, HAS_BIAS=bias is not None,
            A_SCALED=plain is not None and plain_descale is not None,
            num_warps=num_warps or NUM_WARPS)
    return q, scale
