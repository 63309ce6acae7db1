"""Triton kernels of the norm custom ops (imported by `ditserve.kernels.norm` only on CUDA with Triton).

Each public function here is the CUDA implementation of the custom op of the same name in
`ditserve.kernels.norm` and follows `ditserve.ops.functional` exactly: math in fp32, the new residual stream
rounded to residual's dtype before it is normalised, one rounding of y to x's dtype at the end.

Layout handling, done explicitly in the wrappers:
  - x and residual are made contiguous with `.contiguous()` (a copy only when they are not): the kernels
    read rows of D elements at a row stride of D.
  - weight is made contiguous (it is (D,)).
  - scale / shift / gate are viewed as (B, L, D) with `expand`, so per-sample (B, 1, D) modulation gets a
    stride of 0 over L and per-token (B, L, D) modulation its real stride; any (B, L) strides are read as
    they are (no copy for the chunked slices of a modulation vector), and only a modulation tensor whose last
    dim is not unit-stride is copied (`.contiguous()` of the expanded view).
  - outputs are new contiguous tensors (or the `out=` tensors, which must be contiguous), written fully.

Launch: one program per ROWS rows (ROWS = 1 for D >= 1024; several rows for small D, e.g. per-head
q/k norms with D = 128), a whole row held in registers (BLOCK = next_pow2(D), D <= MAX_D), fp32 reductions.
The row count and L only set the grid and the index math: they are `do_not_specialize` ints, so a new
resolution or batch size reuses the compiled kernel.

Dtypes: bf16, fp16, fp32 run the kernels; any other dtype (fp64) runs the reference from
`ditserve.ops.functional` (the op classes never send fp64 here; this keeps the custom op total).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ditserve.ops import functional as Fn

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_D = 16384  # a whole row lives in registers; past this it would spill


def launch_config(D: int, num_warps: int | None = None) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps) for rows of D elements."""
    if D > MAX_D:
        raise ValueError(f"the Triton norm kernels take rows of at most {MAX_D} elements, got D={D}")
    block = triton.next_power_of_2(D)
    rows = max(1, 1024 // block)  # small rows: several per program so each program moves >= 1k elements
    if num_warps is None:
        # 32 elements of a row a thread: 4 warps at D <= 4096, 8 at 8192 (bench/ops.py's num_warps sweep).
        num_warps = min(16, max(4, block * rows // 1024))
    return block, rows, num_warps


# ----------------------------------------------------------------------------------------------------- kernels


@triton.jit
def _row_block(n_rows, D, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's rows (ROWS,) as int64, the columns (BLOCK,), and the in-bounds mask (ROWS, BLOCK)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < D)[None, :]
    return rows, cols, mask


@triton.jit
def _normalize(v, mask, D, eps, RMS: tl.constexpr):
    """Normalise each row of v (ROWS, BLOCK) fp32, whose masked lanes hold 0: RMS or mean/variance.

    Same formulas as the reference: rsqrt(mean(v^2) + eps), or rsqrt(biased var + eps) of the centred row.
    """
    if RMS:
        ms = tl.sum(v * v, axis=1) / D
        y = v * tl.rsqrt(ms + eps)[:, None]
    else:
        mean = tl.sum(v, axis=1) / D
        vc = tl.where(mask, v - mean[:, None], 0.0)
        var = tl.sum(vc * vc, axis=1) / D
        y = vc * tl.rsqrt(var + eps)[:, None]
    return y


@triton.jit
def _mod_offsets(rows, cols, L, stride_b, stride_l):
    """Offsets (ROWS, BLOCK) into a (B, L, D) modulation tensor with unit stride over D."""
    return ((rows // L) * stride_b + (rows % L) * stride_l)[:, None] + cols[None, :]


@triton.jit(do_not_specialize=["n_rows"])
def _rms_norm_kernel(
    x_ptr, w_ptr, y_ptr, n_rows, D, eps,
    HAS_WEIGHT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows, cols, mask = _row_block(n_rows, D, ROWS, BLOCK)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    y = _normalize(x, mask, D, eps, True)
    if HAS_WEIGHT:
        y = y * w
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "L", "sc_b", "sh_b"])
def _norm_scale_shift_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, n_rows, L, D, sc_b, sc_l, sh_b, sh_l, eps,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows, cols, mask = _row_block(n_rows, D, ROWS, BLOCK)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Every load is issued before the reductions, so their latencies overlap instead of adding up.
    scale = tl.load(scale_ptr + _mod_offsets(rows, cols, L, sc_b, sc_l), mask=mask, other=0.0)
    shift = tl.load(shift_ptr + _mod_offsets(rows, cols, L, sh_b, sh_l), mask=mask, other=0.0)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    y = _normalize(x, mask, D, eps, RMS)
    if HAS_WEIGHT:
        y = y * w
    y = y * (1 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["n_rows", "L", "g_b", "sc_b", "sh_b"])
def _residual_norm_scale_shift_kernel(
    x_ptr, res_ptr, gate_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, r_ptr,
    n_rows, L, D, g_b, g_l, sc_b, sc_l, sh_b, sh_l, eps,
    RMS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    rows, cols, mask = _row_block(n_rows, D, ROWS, BLOCK)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # Every load is issued before the reductions, so their latencies overlap instead of adding up.
    if HAS_GATE:
        gate = tl.load(gate_ptr + _mod_offsets(rows, cols, L, g_b, g_l), mask=mask, other=0.0)
    scale = tl.load(scale_ptr + _mod_offsets(rows, cols, L, sc_b, sc_l), mask=mask, other=0.0)
    shift = tl.load(shift_ptr + _mod_offsets(rows, cols, L, sh_b, sh_l), mask=mask, other=0.0)
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    if HAS_GATE:
        x = x * gate.to(tl.float32)
    # The new residual stream is rounded to its dtype first, and that rounded value is what gets normalised.
    r = (res + x).to(r_ptr.dtype.element_ty)
    tl.store(r_ptr + offs, r, mask=mask)
    y = _normalize(r.to(tl.float32), mask, D, eps, RMS)
    if HAS_WEIGHT:
        y = y * w
    y = y * (1 + scale.to(tl.float32)) + shift.to(tl.float32)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------- wrappers


def _weight(weight: torch.Tensor | None, D: int, like: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(pointer tensor, HAS_WEIGHT). A missing weight passes `like` as an unread placeholder pointer."""
    if weight is None:
        return like, False
    if weight.shape != (D,):
        raise ValueError(f"weight must have shape ({D},), got {tuple(weight.shape)}")
    return weight.contiguous(), True


def _modulation(t: torch.Tensor, B: int, L: int, D: int) -> tuple[torch.Tensor, int, int]:
    """View a scale/shift/gate tensor as (B, L, D): returns (view, stride over B, stride over L).

    Broadcast dims get stride 0 (so (B, 1, D) reads one vector per sample); a tensor that is not unit-stride
    over D after the expand (e.g. (B, 1, 1)) is copied to a contiguous (B, L, D).
    """
    e = t.expand(B, L, D)
    if e.stride(2) != 1:
        e = e.contiguous()
    return e, e.stride(0), e.stride(1)


def _out(out: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if out is None:
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    if out.shape != like.shape or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {tuple(like.shape)} {dtype} tensor")
    return out


def _check_3d(x: torch.Tensor, residual: torch.Tensor | None = None) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, D), got shape {tuple(x.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float,
    *, out: torch.Tensor | None = None, num_warps: int | None = None,
) -> torch.Tensor:
    """y = x / rms(x) * weight over the last dim. x: (..., D) -> contiguous (..., D) in x's dtype."""
    if x.dtype not in KERNEL_DTYPES:
        return Fn.rms_norm(x, weight, eps).contiguous()
    D = x.shape[-1]
    block, rows, num_warps = launch_config(D, num_warps)
    x = x.contiguous()
    w, has_w = _weight(weight, D, x)
    y = _out(out, x, x.dtype)
    n_rows = x.numel() // D if D else 0
    if n_rows == 0:
        return y
    with torch.cuda.device_of(x):
        _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
            x, w, y, n_rows, D, eps, HAS_WEIGHT=has_w, ROWS=rows, BLOCK=block, num_warps=num_warps
        )
    return y


def norm_scale_shift(
    x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor, eps: float, rms: bool,
    *, out: torch.Tensor | None = None, num_warps: int | None = None,
) -> torch.Tensor:
    """y = norm(x) * (1 + scale) + shift. x: (B, L, D); scale, shift: broadcastable to (B, L, D), typically
    (B, 1, D) or (B, L, D). Returns a contiguous (B, L, D) in x's dtype."""
    if x.dtype not in KERNEL_DTYPES:
        return Fn.norm_scale_shift(x, weight, scale, shift, eps, rms).contiguous()
    _check_3d(x)
    B, L, D = x.shape
    block, rows, num_warps = launch_config(D, num_warps)
    x = x.contiguous()
    w, has_w = _weight(weight, D, x)
    scale, sc_b, sc_l = _modulation(scale, B, L, D)
    shift, sh_b, sh_l = _modulation(shift, B, L, D)
    y = _out(out, x, x.dtype)
    n_rows = B * L
    if n_rows == 0 or D == 0:
        return y
    with torch.cuda.device_of(x):
        _norm_scale_shift_kernel[(triton.cdiv(n_rows, rows),)](
            x, w, scale, shift, y, n_rows, L, D, sc_b, sc_l, sh_b, sh_l, eps,
            RMS=rms, HAS_WEIGHT=has_w, ROWS=rows, BLOCK=block, num_warps=num_warps,
        )
    return y


def residual_norm_scale_shift(
    x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None,
    scale: torch.Tensor, shift: torch.Tensor, eps: float, rms: bool,
    *, out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r = residual + gate * x (gate None means 1), rounded to residual's dtype; y = norm(r) * (1 + scale) + shift.

    x, residual: (B, L, D); gate, scale, shift: broadcastable to (B, L, D). Returns (y, r), contiguous,
    y in x's dtype and r in residual's dtype.
    """
    if x.dtype not in KERNEL_DTYPES or residual.dtype not in KERNEL_DTYPES:
        y, r = Fn.residual_norm_scale_shift(x, residual, gate, weight, scale, shift, eps, rms)
        return y.contiguous(), r.contiguous()
    _check_3d(x, residual)
    B, L, D = x.shape
    block, rows, num_warps = launch_config(D, num_warps)
    x, residual = x.contiguous(), residual.contiguous()
    w, has_w = _weight(weight, D, x)
    if gate is None:
        gate_t, g_b, g_l = x, 0, 0  # unread placeholder
    else:
        gate_t, g_b, g_l = _modulation(gate, B, L, D)
    scale, sc_b, sc_l = _modulation(scale, B, L, D)
    shift, sh_b, sh_l = _modulation(shift, B, L, D)
    y = _out(out, x, x.dtype)
    r = _out(residual_out, residual, residual.dtype)
    n_rows = B * L
    if n_rows == 0 or D == 0:
        return y, r
    with torch.cuda.device_of(x):
        _residual_norm_scale_shift_kernel[(triton.cdiv(n_rows, rows),)](
            x, residual, gate_t, w, scale, shift, y, r,
            n_rows, L, D, g_b, g_l, sc_b, sc_l, sh_b, sh_l, eps,
            RMS=rms, HAS_GATE=gate is not None, HAS_WEIGHT=has_w, ROWS=rows, BLOCK=block, num_warps=num_warps,
        )
    return y, r
