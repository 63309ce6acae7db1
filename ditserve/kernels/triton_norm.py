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

Launch, two layouts chosen by row width (`launch_config`):
  - resident (D <= RESIDENT_MAX_D; RMS_RESIDENT_MAX_D for rms_norm): a whole row in registers
    (BLOCK = next_pow2(D)), one program per ROWS rows (ROWS = 1 for D >= 1024; several rows for small D,
    e.g. per-head q/k norms with D = 128), reductions over registers; every input read once.
  - looped (wider rows, e.g. Wan's 5120): one program per row walks it in CHUNK-wide pieces: a pass for the
    mean (LayerNorm), a pass for the variance / mean square, a pass writing the output. The re-reads hit
    L1/L2, and the small register footprint keeps many rows in flight (a resident 5120-row padded to 8192
    left too few rows in flight per SM: ~40% of copy bandwidth on an H200).
All math is fp32. The row count and L only set the grid and the index math: they are `do_not_specialize`
ints, so a new resolution or batch size reuses the compiled kernel.

Dtypes: bf16, fp16, fp32 run the kernels; any other dtype (fp64) runs the reference from
`ditserve.ops.functional` (the op classes never send fp64 here; this keeps the custom op total).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ditserve.kernels.triton_quant import FP8_MAX, FP32_TINY  # fp8 variants: `Fn.quantize_rows`' limits
from ditserve.ops import functional as Fn

KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Widest rows kept resident; wider rows take the looped kernels (bench/ops.py's layout sweep, H200, D=5120:
# norm_scale_shift resident 0.357 ms vs looped 0.259; rms_norm, with only the weight beside the row,
# resident 0.171-0.173 vs looped 0.200).
RESIDENT_MAX_D = 4096
RMS_RESIDENT_MAX_D = 8192
MAX_RESIDENT_D = 16384  # a resident row past this would spill registers
LOOP_CHUNK = 1024
# The fp8 variants (QUANT, resident rows) launch with more warps: their third reduction (the row's max, for its
# fp8 scale) lengthens each program, and more warps a row shorten it. bench/ops.py's sweep, H100, FLUX.1-dev's
# 4608 x 3072 (d677921): norm_scale_shift_fp8 41.1 us at 4 warps, 44.9 at 8, 39.0 at 16;
# residual_norm_scale_shift_fp8 65.2 / 65.9 / 51.6 us (the bf16 variants: 27.3 and 43.7 us, best at 4 warps).
FP8_NUM_WARPS = 16


def fp8_num_warps(D: int, quantize: bool) -> int | None:
    """The fp8 variants' warps for rows as wide as the sweep measured (FLUX's 3072: a 4096-wide block); None (the
    default launch) otherwise."""
    return FP8_NUM_WARPS if quantize and 2048 < D <= RESIDENT_MAX_D else None


@dataclass(frozen=True)
class LaunchConfig:
    looped: bool
    block: int  # resident: next_pow2(D); looped: the chunk width
    rows: int  # rows per program (resident only; looped programs take one row)
    num_warps: int


def launch_config(D: int, num_warps: int | None = None, looped: bool | None = None,
                  chunk: int | None = None, resident_max_d: int = RESIDENT_MAX_D) -> LaunchConfig:
    """How to launch over rows of D elements. None picks by D; the explicit choices are for benchmarks."""
    if looped is None:
        looped = D > resident_max_d
    if looped:
        return LaunchConfig(True, chunk or LOOP_CHUNK, 1, num_warps or 4)
    if D > MAX_RESIDENT_D:
        raise ValueError(f"resident rows hold at most {MAX_RESIDENT_D} elements, got D={D}")
    block = triton.next_power_of_2(D)
    rows = max(1, 1024 // block)  # small rows: several per program so each program moves >= 1k elements
    # 32 elements of a row a thread: 4 warps at D <= 4096, 8 at 8192 (bench/ops.py's num_warps sweep).
    return LaunchConfig(False, block, rows, num_warps or min(16, max(4, block * rows // 1024)))


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


@triton.jit
def _modulate_store(y, rows, cols, mask, offs, w_ptr, scale_ptr, shift_ptr, y_ptr, q_scale_ptr, n_rows, L, D,
                    sc_b, sc_l, sh_b, sh_l, HAS_WEIGHT: tl.constexpr, QUANT: tl.constexpr, OUT_TY: tl.constexpr):
    """The modulated norms' epilogue: y (ROWS, BLOCK) normalised fp32 -> y [* w] * (1 + scale) + shift, stored
    at y_ptr + offs. The vectors are loaded after the reductions: loading them first kept more registers live
    and measured ~15% slower at D=3072 (H200).

    QUANT (the fp8 variants): y is rounded to OUT_TY (the activation dtype, as the unfused norm returns it),
    then quantised per row as `Fn.quantize_rows` does (scale = max|row| / 448, floored at fp32's tiny; values
    times 1 / scale, clamped to +-448): the fp8 row goes to y_ptr, its scale to q_scale_ptr + row."""
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
    scale = tl.load(scale_ptr + _mod_offsets(rows, cols, L, sc_b, sc_l), mask=mask, other=0.0).to(tl.float32)
    shift = tl.load(shift_ptr + _mod_offsets(rows, cols, L, sh_b, sh_l), mask=mask, other=0.0).to(tl.float32)
    y = y * (1 + scale) + shift
    if QUANT:
        y = tl.where(mask, y.to(OUT_TY).to(tl.float32), 0.0)
        q_scale = tl.maximum(tl.max(tl.abs(y), axis=1) / FP8_MAX, FP32_TINY)  # (ROWS,)
        y = tl.clamp(y * (1.0 / q_scale)[:, None], -FP8_MAX, FP8_MAX)
        tl.store(q_scale_ptr + rows, q_scale, mask=rows < n_rows)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


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
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, q_scale_ptr, n_rows, L, D, sc_b, sc_l, sh_b, sh_l, eps,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, QUANT: tl.constexpr,
):
    rows, cols, mask = _row_block(n_rows, D, ROWS, BLOCK)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _normalize(x, mask, D, eps, RMS)
    _modulate_store(y, rows, cols, mask, offs, w_ptr, scale_ptr, shift_ptr, y_ptr, q_scale_ptr, n_rows, L, D,
                    sc_b, sc_l, sh_b, sh_l, HAS_WEIGHT, QUANT, x_ptr.dtype.element_ty)


@triton.jit(do_not_specialize=["n_rows", "L", "g_b", "sc_b", "sh_b"])
def _residual_norm_scale_shift_kernel(
    x_ptr, res_ptr, gate_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, r_ptr, q_scale_ptr,
    n_rows, L, D, g_b, g_l, sc_b, sc_l, sh_b, sh_l, eps,
    RMS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
    QUANT: tl.constexpr,
):
    rows, cols, mask = _row_block(n_rows, D, ROWS, BLOCK)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GATE:
        x = x * tl.load(gate_ptr + _mod_offsets(rows, cols, L, g_b, g_l), mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # The new residual stream is rounded to its dtype first, and that rounded value is what gets normalised.
    r = (res + x).to(r_ptr.dtype.element_ty)
    tl.store(r_ptr + offs, r, mask=mask)
    y = _normalize(r.to(tl.float32), mask, D, eps, RMS)
    _modulate_store(y, rows, cols, mask, offs, w_ptr, scale_ptr, shift_ptr, y_ptr, q_scale_ptr, n_rows, L, D,
                    sc_b, sc_l, sh_b, sh_l, HAS_WEIGHT, QUANT, x_ptr.dtype.element_ty)


# Looped kernels: one program per row, CHUNK-wide pieces.


@triton.jit
def _looped_stats(row_ptr, D, eps, RMS: tl.constexpr, CHUNK: tl.constexpr):
    """(mean, rstd) of one row of D elements at row_ptr; mean is 0 for RMS. Same formulas as `_normalize`."""
    cols = tl.arange(0, CHUNK)
    acc = tl.zeros([CHUNK], dtype=tl.float32)
    for k in range(0, D, CHUNK):
        v = tl.load(row_ptr + k + cols, mask=k + cols < D, other=0.0).to(tl.float32)
        if RMS:
            acc += v * v
        else:
            acc += v
    if RMS:
        mean = 0.0
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / D + eps)
    else:
        mean = tl.sum(acc, axis=0) / D
        acc = tl.zeros([CHUNK], dtype=tl.float32)
        for k in range(0, D, CHUNK):
            m = k + cols < D
            v = tl.load(row_ptr + k + cols, mask=m, other=0.0).to(tl.float32)
            vc = tl.where(m, v - mean, 0.0)
            acc += vc * vc
        rstd = tl.rsqrt(tl.sum(acc, axis=0) / D + eps)
    return mean, rstd


@triton.jit
def _looped_output(src_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, D, mean, rstd,
                   HAS_WEIGHT: tl.constexpr, MODULATE: tl.constexpr, CHUNK: tl.constexpr):
    """y = (src - mean) * rstd [* w] [* (1 + scale) + shift] over one row; pointers at the row's start."""
    cols = tl.arange(0, CHUNK)
    for k in range(0, D, CHUNK):
        m = k + cols < D
        y = (tl.load(src_ptr + k + cols, mask=m, other=0.0).to(tl.float32) - mean) * rstd
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + k + cols, mask=m, other=0.0).to(tl.float32)
        if MODULATE:
            scale = tl.load(scale_ptr + k + cols, mask=m, other=0.0).to(tl.float32)
            shift = tl.load(shift_ptr + k + cols, mask=m, other=0.0).to(tl.float32)
            y = y * (1 + scale) + shift
        tl.store(y_ptr + k + cols, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _rms_norm_looped_kernel(x_ptr, w_ptr, y_ptr, D, eps, HAS_WEIGHT: tl.constexpr, CHUNK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    mean, rstd = _looped_stats(x_ptr + row * D, D, eps, True, CHUNK)
    _looped_output(x_ptr + row * D, w_ptr, x_ptr, x_ptr, y_ptr + row * D, D, mean, rstd, HAS_WEIGHT, False, CHUNK)


@triton.jit(do_not_specialize=["L", "sc_b", "sh_b"])
def _norm_scale_shift_looped_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, L, D, sc_b, sc_l, sh_b, sh_l, eps,
    RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, l = row // L, row % L
    mean, rstd = _looped_stats(x_ptr + row * D, D, eps, RMS, CHUNK)
    _looped_output(x_ptr + row * D, w_ptr, scale_ptr + b * sc_b + l * sc_l, shift_ptr + b * sh_b + l * sh_l,
                   y_ptr + row * D, D, mean, rstd, HAS_WEIGHT, True, CHUNK)


@triton.jit(do_not_specialize=["L", "g_b", "sc_b", "sh_b"])
def _residual_norm_scale_shift_looped_kernel(
    x_ptr, res_ptr, gate_ptr, w_ptr, scale_ptr, shift_ptr, y_ptr, r_ptr,
    L, D, g_b, g_l, sc_b, sc_l, sh_b, sh_l, eps,
    RMS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_WEIGHT: tl.constexpr, CHUNK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b, l = row // L, row % L
    cols = tl.arange(0, CHUNK)
    # Pass 1 writes the new residual stream r (rounded to its dtype); the statistics and the output then
    # read r back. The barrier orders those reads after every thread's writes.
    for k in range(0, D, CHUNK):
        m = k + cols < D
        x = tl.load(x_ptr + row * D + k + cols, mask=m, other=0.0).to(tl.float32)
        if HAS_GATE:
            x = x * tl.load(gate_ptr + b * g_b + l * g_l + k + cols, mask=m, other=0.0).to(tl.float32)
        res = tl.load(res_ptr + row * D + k + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(r_ptr + row * D + k + cols, (res + x).to(r_ptr.dtype.element_ty), mask=m)
    tl.debug_barrier()
    mean, rstd = _looped_stats(r_ptr + row * D, D, eps, RMS, CHUNK)
    _looped_output(r_ptr + row * D, w_ptr, scale_ptr + b * sc_b + l * sc_l, shift_ptr + b * sh_b + l * sh_l,
                   y_ptr + row * D, D, mean, rstd, HAS_WEIGHT, True, CHUNK)


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
    *, out: torch.Tensor | None = None, num_warps: int | None = None, looped: bool | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """y = x / rms(x) * weight over the last dim. x: (..., D) -> contiguous (..., D) in x's dtype.

    out: a contiguous output to write (tests poison it); num_warps / looped / chunk override
    `launch_config` (benchmarks). The other two ops take the same keywords."""
    if x.dtype not in KERNEL_DTYPES:
        return Fn.rms_norm(x, weight, eps).contiguous()
    D = x.shape[-1]
    cfg = launch_config(D, num_warps, looped, chunk, RMS_RESIDENT_MAX_D)
    x = x.contiguous()
    w, has_w = _weight(weight, D, x)
    y = _out(out, x, x.dtype)
    n_rows = x.numel() // D if D else 0
    if n_rows == 0:
        return y
    with torch.cuda.device_of(x):
        if cfg.looped:
            _rms_norm_looped_kernel[(n_rows,)](
                x, w, y, D, eps, HAS_WEIGHT=has_w, CHUNK=cfg.block, num_warps=cfg.num_warps
            )
        else:
            _rms_norm_kernel[(triton.cdiv(n_rows, cfg.rows),)](
                x, w, y, n_rows, D, eps, HAS_WEIGHT=has_w, ROWS=cfg.rows, BLOCK=cfg.block, num_warps=cfg.num_warps
            )
    return y


def norm_scale_shift(
    x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor, eps: float, rms: bool,
    *, out: torch.Tensor | None = None, num_warps: int | None = None, looped: bool | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """y = norm(x) * (1 + scale) + shift. x: (B, L, D); scale, shift: broadcastable to (B, L, D), typically
    (B, 1, D) or (B, L, D). Returns a contiguous (B, L, D) in x's dtype."""
    return _norm_scale_shift(x, weight, scale, shift, eps, rms, False, out, num_warps, looped, chunk)[0]


def norm_scale_shift_fp8(
    x: torch.Tensor, weight: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor, eps: float, rms: bool,
    *, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`norm_scale_shift`, its output quantised per row: (q (B*L, D) float8_e4m3fn, scale (B*L, 1) float32).
    Resident rows (D <= RESIDENT_MAX_D, FLUX's 3072) quantise in the norm's kernel; wider rows run the norm
    kernel, then the reference quantisation."""
    return _norm_scale_shift(x, weight, scale, shift, eps, rms, True, num_warps=num_warps)


def _unfused_quantization(x: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """Whether an fp8 variant runs the plain norm, then `Fn.quantize_rows` (not one kernel): a dtype the kernels
    do not take, or rows too wide to stay resident (the looped kernels write as they go)."""
    return (any(t.dtype not in KERNEL_DTYPES for t in (x, *tensors)) or x.dim() != 3
            or launch_config(x.shape[-1]).looped)


def _norm_scale_shift(x, weight, scale, shift, eps, rms, quantize: bool, out=None, num_warps=None, looped=None,
                      chunk=None) -> tuple[torch.Tensor, ...]:
    """`norm_scale_shift` -> (y,), or with `quantize` `norm_scale_shift_fp8` -> (q, q_scale)."""
    if quantize and _unfused_quantization(x):
        y = norm_scale_shift(x, weight, scale, shift, eps, rms)
        return Fn.quantize_rows(y.reshape(-1, y.shape[-1]))
    if x.dtype not in KERNEL_DTYPES:
        return (Fn.norm_scale_shift(x, weight, scale, shift, eps, rms).contiguous(),)
    _check_3d(x)
    B, L, D = x.shape
    cfg = launch_config(D, num_warps or fp8_num_warps(D, quantize), looped, chunk)
    x = x.contiguous()
    w, has_w = _weight(weight, D, x)
    scale, sc_b, sc_l = _modulation(scale, B, L, D)
    shift, sh_b, sh_l = _modulation(shift, B, L, D)
    n_rows = B * L
    y, q_scale = _outputs(out, x, n_rows, D, quantize)
    if n_rows == 0 or D == 0:
        return (y, q_scale) if quantize else (y,)
    with torch.cuda.device_of(x):
        if cfg.looped:
            _norm_scale_shift_looped_kernel[(n_rows,)](
                x, w, scale, shift, y, L, D, sc_b, sc_l, sh_b, sh_l, eps,
                RMS=rms, HAS_WEIGHT=has_w, CHUNK=cfg.block, num_warps=cfg.num_warps,
            )
        else:
            _norm_scale_shift_kernel[(triton.cdiv(n_rows, cfg.rows),)](
                x, w, scale, shift, y, q_scale, n_rows, L, D, sc_b, sc_l, sh_b, sh_l, eps,
                RMS=rms, HAS_WEIGHT=has_w, ROWS=cfg.rows, BLOCK=cfg.block, QUANT=quantize,
                num_warps=cfg.num_warps,
            )
    return (y, q_scale) if quantize else (y,)


def _outputs(out: torch.Tensor | None, x: torch.Tensor, n_rows: int, D: int, quantize: bool
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """The modulated norms' y output and its per-row fp8 scales: with `quantize`, new (n_rows, D) float8_e4m3fn and
    (n_rows, 1) float32 tensors; otherwise y in x's dtype (`out` if given) and y again as the scales' unread
    placeholder pointer."""
    if quantize:
        return (torch.empty((n_rows, D), dtype=Fn.FP8_DTYPE, device=x.device),
                torch.empty((n_rows, 1), dtype=torch.float32, device=x.device))
    y = _out(out, x, x.dtype)
    return y, y


def residual_norm_scale_shift(
    x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None,
    scale: torch.Tensor, shift: torch.Tensor, eps: float, rms: bool,
    *, out: torch.Tensor | None = None, residual_out: torch.Tensor | None = None, num_warps: int | None = None,
    looped: bool | None = None, chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """r = residual + gate * x (gate None means 1), rounded to residual's dtype; y = norm(r) * (1 + scale) + shift.

    x, residual: (B, L, D); gate, scale, shift: broadcastable to (B, L, D). Returns (y, r), contiguous,
    y in x's dtype and r in residual's dtype.
    """
    return _residual_norm_scale_shift(x, residual, gate, weight, scale, shift, eps, rms, False, out, residual_out,
                                      num_warps, looped, chunk)


def residual_norm_scale_shift_fp8(
    x: torch.Tensor, residual: torch.Tensor, gate: torch.Tensor | None, weight: torch.Tensor | None,
    scale: torch.Tensor, shift: torch.Tensor, eps: float, rms: bool, *, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`residual_norm_scale_shift`, y quantised per row: (q (B*L, D) float8_e4m3fn, scale (B*L, 1) float32, r).
    Resident rows quantise in the kernel; wider rows run the norm kernel, then the reference quantisation."""
    return _residual_norm_scale_shift(x, residual, gate, weight, scale, shift, eps, rms, True, num_warps=num_warps)


def _residual_norm_scale_shift(x, residual, gate, weight, scale, shift, eps, rms, quantize: bool, out=None,
                               residual_out=None, num_warps=None, looped=None, chunk=None) -> tuple[torch.Tensor, ...]:
    """`residual_norm_scale_shift` -> (y, r), or with `quantize` `residual_norm_scale_shift_fp8` -> (q, q_scale, r)."""
    if quantize and _unfused_quantization(x, residual):
        y, r = residual_norm_scale_shift(x, residual, gate, weight, scale, shift, eps, rms)
        return (*Fn.quantize_rows(y.reshape(-1, y.shape[-1])), r)
    if x.dtype not in KERNEL_DTYPES or residual.dtype not in KERNEL_DTYPES:
        y, r = Fn.residual_norm_scale_shift(x, residual, gate, weight, scale, shift, eps, rms)
        return y.contiguous(), r.contiguous()
    _check_3d(x, residual)
    B, L, D = x.shape
    cfg = launch_config(D, num_warps or fp8_num_warps(D, quantize), looped, chunk)
    x, residual = x.contiguous(), residual.contiguous()
    w, has_w = _weight(weight, D, x)
    if gate is None:
        gate_t, g_b, g_l = x, 0, 0  # unread placeholder
    else:
        gate_t, g_b, g_l = _modulation(gate, B, L, D)
    scale, sc_b, sc_l = _modulation(scale, B, L, D)
    shift, sh_b, sh_l = _modulation(shift, B, L, D)
    n_rows = B * L
    y, q_scale = _outputs(out, x, n_rows, D, quantize)
    r = _out(residual_out, residual, residual.dtype)
    outs = (y, q_scale, r) if quantize else (y, r)
    if n_rows == 0 or D == 0:
        return outs
    with torch.cuda.device_of(x):
        if cfg.looped:
            _residual_norm_scale_shift_looped_kernel[(n_rows,)](
                x, residual, gate_t, w, scale, shift, y, r, L, D, g_b, g_l, sc_b, sc_l, sh_b, sh_l, eps,
                RMS=rms, HAS_GATE=gate is not None, HAS_WEIGHT=has_w, CHUNK=cfg.block, num_warps=cfg.num_warps,
            )
        else:
            _residual_norm_scale_shift_kernel[(triton.cdiv(n_rows, cfg.rows),)](
                x, residual, gate_t, w, scale, shift, y, r, q_scale,
                n_rows, L, D, g_b, g_l, sc_b, sc_l, sh_b, sh_l, eps,
                RMS=rms, HAS_GATE=gate is not None, HAS_WEIGHT=has_w, ROWS=cfg.rows, BLOCK=cfg.block,
                QUANT=quantize, num_warps=cfg.num_warps,
            )
    return outs
