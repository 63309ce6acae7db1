"""Triton kernel of `ditserve::rms_norm_rotary` (imported by `ditserve.kernels.rotary` only on CUDA with Triton).

Why a kernel: compiled, inductor fuses FLUX.1's q/k RMSNorm + RoPE into reductions that ran at ~0.9 TB/s on an
H100 (0.125 ms a single block for 113 MB moved; bench/flux_shapes_ab.py, c44df54), a third of the copy
bandwidth. This kernel reads each (token, head) row of D channels once from wherever the projection left it,
and writes it once, normalised and rotated, into the joint output.

One program (one warp) handles one token of one part and 4 of its heads (512 elements at D = 128). Each row of
D channels is loaded contiguously, and again at its channels' rotation partners (interleaved: c xor 1;
half-split: c + D/2 mod D; the same cache lines), so the output is computed and stored contiguously, with no
shuffle between lanes; the token's cos/sin row is read once for all its heads. It runs at 1.9 TB/s at FLUX.1's
single block (a copy of the same bytes: 2.9 TB/s; bench/norm_rotary.py). Two earlier versions ran at ~0.3 and
~1.0 TB/s: one program per 16 flat (token, head) rows with a reshape/split of whole rows and a table row each;
then the pairs loaded and stored as two stride-2 tiles.

Math as `ditserve.ops.functional.rms_norm_rotary`: fp32, the normed row rounded to the output dtype before the
rotation (as the unfused ops round between them), one rounding at the end. The sequence length, head count and
strides are `do_not_specialize` ints: a new resolution reuses the compiled kernel, and `warm` (prewarm)
compiles the very variant the blocks use.

Dtypes bf16, fp16, fp32 and power-of-two D run the kernel; anything else runs the reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ditserve.kernels.triton_quant import FP8_MAX, FP32_TINY  # the fp8 variant: `Fn.rms_norm_rotary_fp8`'s limits
from ditserve.ops import functional as Fn

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit(do_not_specialize=["L", "H", "x_sb", "x_sl", "x_sh", "o_sb", "o_sl", "c_sb", "c_sl"])
def _rms_norm_rotary_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, L, H, x_sb, x_sl, x_sh, o_sb, o_sl, c_sb, c_sl, eps,
    w2_ptr, descale_ptr, bound_per_w,
    D: tl.constexpr, HEADS: tl.constexpr, INTERLEAVED: tl.constexpr, QUANT: tl.constexpr,
    WRITE_DESCALE: tl.constexpr,
):
    # QUANT (the fp8 variant): the output is multiplied by 1 / descale and stored as fp8, descale = the bound
    # sqrt(D) * max(|w|, |w2|) / 448 (bound_per_w = sqrt(D) / 448; w2: the other part's weight, or w again);
    # WRITE_DESCALE: this launch's first program stores it.
    HALF: tl.constexpr = D // 2
    tok = tl.program_id(0)  # (b, l) flat
    b = (tok // L).to(tl.int64)
    l_ = (tok % L).to(tl.int64)
    h = tl.program_id(1) * HEADS + tl.arange(0, HEADS)  # (HEADS,)
    m = (h < H)[:, None]
    c = tl.arange(0, D)[None, :]  # (1, D) channel
    # Channel c's rotation partner p, its angle index, and the sign of the partner's term:
    # out[c] = y[c] cos + sign * y[p] sin, i.e. (a, b) -> (a cos - b sin, b cos + a sin) for each pair (a, b).
    if INTERLEAVED:  # pairs (2i, 2i+1)
        p = c ^ 1
        ang = c // 2
        sign = tl.where(c % 2 == 0, -1.0, 1.0)
    else:  # pairs (i, i + D/2)
        p = (c + HALF) % D
        ang = c % HALF
        sign = tl.where(c < HALF, -1.0, 1.0)
    row = b * x_sb + l_ * x_sl + h[:, None].to(tl.int64) * x_sh  # (HEADS, 1)
    x = tl.load(x_ptr + row + c, mask=m, other=0.0).to(tl.float32)  # (HEADS, D), contiguous
    xp = tl.load(x_ptr + row + p, mask=m, other=0.0).to(tl.float32)  # the partners: the same cache lines
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / D + eps)[:, None]
    # the norm's output, rounded to the input dtype as the unfused ops round it (the bf16 variant's output dtype)
    y = (x * rstd * tl.load(w_ptr + c).to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
    yp = (xp * rstd * tl.load(w_ptr + p).to(tl.float32)).to(x_ptr.dtype.element_ty).to(tl.float32)
    t_off = b * c_sb + l_ * c_sl + ang  # (1, D): one table row per token, shared by its heads
    cs = tl.load(cos_ptr + t_off).to(tl.float32)
    sn = tl.load(sin_ptr + t_off).to(tl.float32)
    out = y * cs + sign * (yp * sn)
    o_row = b * o_sb + l_ * o_sl + h[:, None].to(tl.int64) * D
    if QUANT:
        w_max = tl.max(tl.maximum(tl.abs(tl.load(w_ptr + c).to(tl.float32)),
                                  tl.abs(tl.load(w2_ptr + c).to(tl.float32))))
        descale = tl.maximum(w_max * bound_per_w, FP32_TINY)
        out = out.to(x_ptr.dtype.element_ty).to(tl.float32) * (1.0 / descale)  # rounded as the reference rounds
        tl.store(out_ptr + o_row + c, tl.clamp(out, -FP8_MAX, FP8_MAX).to(out_ptr.dtype.element_ty), mask=m)
        if WRITE_DESCALE:
            tl.store(descale_ptr, descale, mask=(tok == 0) & (tl.program_id(1) == 0))
    else:
        tl.store(out_ptr + o_row + c, out.to(out_ptr.dtype.element_ty), mask=m)


def _heads_per_program(D: int) -> int:
    """512 elements a program (4 heads of 128), one warp: the fastest of bench/norm_rotary.py's sweep on an H100
    (single block q: 29.7 us = 1.9 TB/s, against 40.5 us for 8 heads and 4 warps, 68.8 us for 1 head; cd30322).
    A function of D only, so the prewarm's tiny call compiles the variant the model's calls use whatever their
    head count (heads past H are masked)."""
    return max(1, 512 // D)


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


def _runs_kernel(xs) -> bool:
    D = xs[0].shape[-1]
    return xs[0].dtype in KERNEL_DTYPES and D >= 2 and not D & (D - 1)


def rms_norm_rotary(xs: list[torch.Tensor], weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                    eps: float, interleaved: bool, *, out: torch.Tensor | None = None, heads: int | None = None,
                    num_warps: int = 1) -> torch.Tensor:
    """See `ditserve.kernels.rotary`. out: a contiguous (B, S, H, D) output to write (tests poison it); heads
    (per program, a power of two) and num_warps override the launch (benchmarks)."""
    B, S, H, D = _check(xs, weights, cos, sin)
    if not _runs_kernel(xs):
        return Fn.rms_norm_rotary(xs, weights, cos, sin, eps, interleaved).contiguous()
    if out is None:
        out = torch.empty((B, S, H, D), device=xs[0].device, dtype=xs[0].dtype)
    _launch(xs, weights, cos, sin, eps, interleaved, out, None, heads, num_warps)
    return out


def rms_norm_rotary_fp8(xs: list[torch.Tensor], weights: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
                        eps: float, interleaved: bool, *, out: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """See `ditserve.kernels.rotary`: the kernel's QUANT variant. The scale's bound takes the maximum over at most
    two weights in the kernel (FLUX's [text, image] parts); more parts run the reference."""
    B, S, H, D = _check(xs, weights, cos, sin)
    if not _runs_kernel(xs) or len(weights) > 2:
        q, descale = Fn.rms_norm_rotary_fp8(xs, weights, cos, sin, eps, interleaved)
        return q.contiguous(), descale
    if out is None:
        out = torch.empty((B, S, H, D), device=xs[0].device, dtype=Fn.FP8_DTYPE)
    descale = torch.empty(1, device=xs[0].device, dtype=torch.float32)
    _launch(xs, weights, cos, sin, eps, interleaved, out, descale, None, 1)
    return out, descale


def _launch(xs, weights, cos, sin, eps, interleaved, out, descale, heads, num_warps) -> None:
    """Launch the kernel once per part, each writing its rows of `out`; `descale` given: the QUANT variant."""
    B, S, H, D = out.shape
    cos, sin = cos.contiguous(), sin.contiguous()  # (tiny tables; a no-op for the model's)
    c_sb = cos.stride(0) if cos.dim() == 3 else 0
    heads = heads or _heads_per_program(D)
    weights = [w.contiguous() for w in weights]
    quant = descale is not None
    write_descale = quant  # by the first launch
    off = 0
    with torch.cuda.device_of(xs[0]):
        if quant and B * S * H == 0:  # no program runs to write the scale
            descale.copy_(Fn.rms_norm_rotary_fp8(xs, weights, cos, sin, eps, interleaved)[1])
        for i, (x, w) in enumerate(zip(xs, weights)):
            L = x.shape[1]
            if x.stride(-1) != 1:
                x = x.contiguous()
            if B * L * H:
                o, c, s = out[:, off:off + L], cos[..., off:off + L, :], sin[..., off:off + L, :]
                _rms_norm_rotary_kernel[(B * L, triton.cdiv(H, heads))](
                    x, w, c, s, o, L, H, x.stride(0), x.stride(1), x.stride(2),
                    o.stride(0), o.stride(1), c_sb, c.stride(-2), eps,
                    weights[-1 - i] if quant else w, descale if quant else o, math.sqrt(D) / torch.finfo(Fn.FP8_DTYPE).max,
                    D=D, HEADS=heads, INTERLEAVED=interleaved, QUANT=quant, WRITE_DESCALE=write_descale,
                    num_warps=num_warps)
                write_descale = False
            off += L
