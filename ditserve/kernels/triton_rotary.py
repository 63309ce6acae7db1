"""Triton kernel of `ditserve::rms_norm_rotary` (imported by `ditserve.kernels.rotary` only on CUDA with Triton).

Why a kernel: compiled, inductor fuses FLUX.1's q/k RMSNorm + RoPE into reductions that ran at ~0.9 TB/s on an
H100 (0.125 ms a single block for 113 MB moved; bench/flux_shapes_ab.py, c44df54), a third of the copy
bandwidth. This kernel reads each (token, head) row of D channels once from wherever the projection left it,
and writes it once, normalised and rotated, into the joint output.

One program handles one token of one part and HEADS of its heads: the rows' two halves of the rotation's pairs
(interleaved: channels 2i and 2i+1; half-split: i and i + D/2) are loaded as two (HEADS, D/2) tiles, and the
token's cos/sin row is loaded once for all its heads. (A first version, one program per 16 flat (token, head)
rows with a reshape/split of whole rows and a table row per (token, head), ran at 0.3 TB/s: 0.173 ms a call at
FLUX.1's single block, slower than inductor's fusion.) Math as `ditserve.ops.functional.rms_norm_rotary`: fp32, the normed row rounded to the output dtype before
the rotation (as the unfused ops round between them), one rounding at the end. The sequence length, head count and
strides are `do_not_specialize` ints: a new resolution reuses the compiled kernel, and
`warm` (prewarm) compiles the very variant the blocks use.

Dtypes bf16, fp16, fp32 and power-of-two D run the kernel; anything else runs the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ditserve.ops import functional as Fn

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit(do_not_specialize=["L", "H", "x_sb", "x_sl", "x_sh", "o_sb", "o_sl", "c_sb", "c_sl"])
def _rms_norm_rotary_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, L, H, x_sb, x_sl, x_sh, o_sb, o_sl, c_sb, c_sl, eps,
    D: tl.constexpr, HEADS: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    tok = tl.program_id(0)  # (b, l) flat
    b = (tok // L).to(tl.int64)
    l_ = (tok % L).to(tl.int64)
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)  # (HEADS,)
    m = (h < H)[:, None]
    j = tl.arange(0, HALF)[None, :]
    if INTERLEAVED:  # the rotation's pairs: channels (2i, 2i+1), or (i, i + D/2)
        ia, ib = 2 * j, 2 * j + 1
    else:
        ia, ib = j, j + HALF
    row = b * x_sb + l_ * x_sl + h[:, None].to(tl.int64) * x_sh  # (HEADS, 1)
    xa = tl.load(x_ptr + row + ia, mask=m, other=0.0).to(tl.float32)  # (HEADS, HALF)
    xb = tl.load(x_ptr + row + ib, mask=m, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(xa * xa, axis=1) + tl.sum(xb * xb, axis=1)) / D + eps)[:, None]
    wa = tl.load(w_ptr + ia).to(tl.float32)
    wb = tl.load(w_ptr + ib).to(tl.float32)
    # the norm's output, rounded to the output dtype as the unfused ops round it
    a = (xa * rstd * wa).to(out_ptr.dtype.element_ty).to(tl.float32)
    bb = (xb * rstd * wb).to(out_ptr.dtype.element_ty).to(tl.float32)
    c_off = b * c_sb + l_ * c_sl + j  # (1, HALF): one table row per token, shared by its heads
    c = tl.load(cos_ptr + c_off).to(tl.float32)
    s = tl.load(sin_ptr + c_off).to(tl.float32)
    o_row = b * o_sb + l_ * o_sl + h[:, None].to(tl.int64) * D
    tl.store(out_ptr + o_row + ia, (a * c - bb * s).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(out_ptr + o_row + ib, (a * s + bb * c).to(out_ptr.dtype.element_ty), mask=m)


def _heads_per_program(H: int, D: int) -> int:
    return min(triton.next_power_of_2(H), max(1, 1024 // D))  # ~1k elements a program (8 heads of 128)


def _check(xs, weights, cos, sin) -> tuple[int, int, int, int]:
    if not xs or len(xs) != len(weights):
        raise ValueError(f"need one weight per part, got {len(xs)} parts and {len(weights)} weights")
    B, _, H, D = xs[0].shape
    for x, w in zip(xs, weights):
        if x.dim() != 4 or (x.shape[0], x.shape[2], x.shape[3]) != (B, H, D) or x.dtype != xs[0].dtype:
            raise ValueError(f"every part must be (B={B}, L_i, H={H}, D={D}) of one dtype, got {tuple(x.shape)} "
                             f"{x.dtype}")
        if w.shape != (D,):
            raise ValueError(f"every weight must be ({D},), got {tuple(w.shape)}")
    S = sum(x.shape[1] for x in xs)
    if cos.shape != sin.shape or cos.shape[-2:] != (S, D // 2) or cos.dim() not in (2, 3) or (
            cos.dim() == 3 and cos.shape[0] != B):
        raise ValueError(f"cos/sin must be ({S}, {D // 2}) or ({B}, {S}, {D // 2}), got {tuple(cos.shape)}")
    return B, S, H, D


def rms_norm_rotary(xs: list[torch.Tensor], weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                    eps: float, interleaved: bool, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """See `ditserve.kernels.rotary`. out: a contiguous (B, S, H, D) output to write (tests poison it)."""
    B, S, H, D = _check(xs, weights, cos, sin)
    dtype = xs[0].dtype
    if dtype not in KERNEL_DTYPES or D < 2 or D & (D - 1):
        return Fn.rms_norm_rotary(xs, weights, cos, sin, eps, interleaved).contiguous()
    if out is None:
        out = torch.empty((B, S, H, D), device=xs[0].device, dtype=dtype)
    cos, sin = cos.contiguous(), sin.contiguous()  # (tiny tables; a no-op for the model's)
    c_sb = cos.stride(0) if cos.dim() == 3 else 0
    heads = _heads_per_program(H, D)
    off = 0
    with torch.cuda.device_of(xs[0]):
        for x, w in zip(xs, weights):
            L = x.shape[1]
            if x.stride(-1) != 1:
                x = x.contiguous()
            if B * L * H:
                o, c, s = out[:, off:off + L], cos[..., off:off + L, :], sin[..., off:off + L, :]
                _rms_norm_rotary_kernel[(B * L, triton.cdiv(H, heads))](
                    x, w.contiguous(), c, s, o, L, H, x.stride(0), x.stride(1), x.stride(2),
                    o.stride(0), o.stride(1), c_sb, c.stride(-2), eps,
                    D=D, HEADS=heads, INTERLEAVED=interleaved, num_warps=4)
            off += L
    return out
