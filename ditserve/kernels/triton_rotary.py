"""Triton kernel of `ditserve::rms_norm_rotary` (imported by `ditserve.kernels.rotary` only on CUDA with Triton).

Why a kernel: compiled, inductor fuses FLUX.1's q/k RMSNorm + RoPE into reductions that ran at ~0.9 TB/s on an
H100 (0.125 ms a single block for 113 MB moved; bench/flux_shapes_ab.py, c44df54), a third of the copy
bandwidth. This kernel reads each (token, head) row of D channels once from wherever the projection left it,
and writes it once, normalised and rotated, into the joint output.

One program handles ROWS rows of one part. A row is (b, l, h); its D channels are loaded whole, split into the
rotation's pairs (interleaved: (2i, 2i+1); half-split: (i, i + D/2)) by a reshape, and joined back for the
store. Math as `ditserve.ops.functional.rms_norm_rotary`: fp32, the normed row rounded to the output dtype before
the rotation (as the unfused ops round between them), one rounding at the end. The row count, sequence length,
head count and strides are `do_not_specialize` ints: a new resolution reuses the compiled kernel, and
`warm` (prewarm) compiles the very variant the blocks use.

Dtypes bf16, fp16, fp32 and power-of-two D run the kernel; anything else runs the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ditserve.ops import functional as Fn

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit(do_not_specialize=["n_rows", "L", "H", "x_sb", "x_sl", "x_sh", "o_sb", "o_sl", "c_sb", "c_sl"])
def _rms_norm_rotary_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, L, H, x_sb, x_sl, x_sh, o_sb, o_sl, c_sb, c_sl, eps,
    D: tl.constexpr, ROWS: tl.constexpr, INTERLEAVED: tl.constexpr,
):
    HALF: tl.constexpr = D // 2
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,) flat (b, l, h)
    in_bounds = (rows < n_rows)[:, None]
    h = rows % H
    bl = rows // H
    l_ = bl % L
    b = bl // L
    cols = tl.arange(0, D)[None, :]
    x = tl.load(x_ptr + (b * x_sb + l_ * x_sl + h * x_sh)[:, None] + cols, mask=in_bounds, other=0.0)
    x = x.to(tl.float32)  # (ROWS, D)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    w = tl.load(w_ptr + cols).to(tl.float32)  # (1, D)
    y = (x * rstd * w).to(out_ptr.dtype.element_ty).to(tl.float32)  # the norm's output, rounded as unfused
    if INTERLEAVED:
        a, bb = tl.split(tl.reshape(y, (ROWS, HALF, 2)))  # channels 2i, 2i+1
    else:
        a, bb = tl.split(tl.permute(tl.reshape(y, (ROWS, 2, HALF)), (0, 2, 1)))  # channels i, i + D/2
    half = tl.arange(0, HALF)[None, :]
    c_off = (b * c_sb + l_ * c_sl)[:, None] + half
    c = tl.load(cos_ptr + c_off, mask=in_bounds, other=0.0).to(tl.float32)  # (ROWS, HALF)
    s = tl.load(sin_ptr + c_off, mask=in_bounds, other=0.0).to(tl.float32)
    ra = a * c - bb * s
    rb = a * s + bb * c
    if INTERLEAVED:
        out = tl.reshape(tl.join(ra, rb), (ROWS, D))
    else:
        out = tl.reshape(tl.permute(tl.join(ra, rb), (0, 2, 1)), (ROWS, D))
    o_off = (b * o_sb + l_ * o_sl + h * D)[:, None] + cols
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty), mask=in_bounds)


def _rows_per_program(D: int) -> int:
    return max(1, 2048 // D)  # ~2k elements (4 KiB of bf16) in and out per program


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
    rows = _rows_per_program(D)
    off = 0
    with torch.cuda.device_of(xs[0]):
        for x, w in zip(xs, weights):
            L = x.shape[1]
            if x.stride(-1) != 1:
                x = x.contiguous()
            n_rows = B * L * H
            if n_rows:
                o, c, s = out[:, off:off + L], cos[..., off:off + L, :], sin[..., off:off + L, :]
                _rms_norm_rotary_kernel[(triton.cdiv(n_rows, rows),)](
                    x, w.contiguous(), c, s, o, n_rows, L, H, x.stride(0), x.stride(1), x.stride(2),
                    o.stride(0), o.stride(1), c_sb, c.stride(-2), eps,
                    D=D, ROWS=rows, INTERLEAVED=interleaved, num_warps=4)
            off += L
    return out
