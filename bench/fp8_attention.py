"""fp8 attention on Hopper against cuDNN's bf16 SDPA: cuDNN's fp8 SDPA (what `--fp8-attention` runs, through the
nvidia-cudnn-frontend package, when importable) and an fp8 kernel in Triton (an experiment, kept here with its
measurement).

cuDNN's fp8 SDPA (def84cb + these rows, H100): 299.5 us against bf16's 439.8 us at FLUX.1's attention, 5.9%
relative L2 against fp32 with per-tensor scales; a bf16 output is refused on Hopper, so its output is fp8.

Why: in the fp8 tier, attention (25.6 ms of FLUX.1-dev's 90.8 ms fp8 forward on an H100) runs in bf16 on cuDNN at
~620 TFLOP/s; no fp8 attention kernel for Hopper is importable here. Measured (4ae5a77): this straightforward
kernel (one program per block of queries and head, online softmax, P rounded to fp8, V transposed) runs at best
at 632 TFLOP/s, cuDNN's bf16 rate, before 99 us of quantising q, k, v, with 5.2% relative L2 error against fp32
(SDPA bf16: 0.23%): not used (4fb70cc, with the sequence length unspecialised, ran at 170-220 TFLOP/s). FA3-class
kernels reach fp8 rates with warp specialisation and TMA.

Kernel math (non-causal, no mask): q, k quantised to float8_e4m3fn per (token, head) row of D channels, v per
(head, channel) over all tokens, each with an fp32 scale; S = (q8 k8^T) * sq_i * sk_j / sqrt(D); online softmax in
fp32 (exp2); P rounded to fp8; O = (P8 v8) / l * sv. Layouts: q8, k8 (B, H, S, D); v8 transposed (B, H, D, S), as
Hopper's fp8 tensor-core instructions want both operands of P @ V contiguous along S; output (B, S, H, D).

GPU only. FLUX.1's attention at 1024x1024: q, k, v (1, 4608, 24, 128) bf16. Times (CUDA-graph replays, GPU time
alone) SDPA (cuDNN), the fp8 kernel on already quantised inputs at several launch shapes, and the quantisation of
q, k, v (compiled torch ops); reports TFLOP/s (4 B H L^2 D) and each output's relative L2 error against an fp32
reference. One JSON line last.

    python bench/fp8_attention.py
"""

from __future__ import annotations

import json
import math
import sys

import torch
import triton
import triton.language as tl
from benchutil import commit, log

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
LOG2E = 1.4426950408889634


@triton.jit
def _fp8_attention_kernel(q_ptr, k_ptr, vt_ptr, sq_ptr, sk_ptr, sv_ptr, o_ptr, S, H, qk_scale,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN: tl.constexpr):
    # S is specialised (4fb70cc had it `do_not_specialize`: Triton then cannot prove the rows 16-byte aligned);
    # EVEN: S a multiple of both blocks, no masks
    pid_m = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # b * H + h
    b, h = bh // H, bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query tokens
    d = tl.arange(0, D)
    base = bh * S * D
    q = tl.load(q_ptr + base + rows[:, None] * D + d[None, :], mask=(rows < S)[:, None], other=0.0)  # (BM, D) fp8
    sq = tl.load(sq_ptr + bh * S + rows, mask=rows < S, other=0.0) * qk_scale  # (BM,) fp32, log2 domain
    m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for start in range(0, S, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)  # (BN,) key tokens
        in_k = cols < S
        if EVEN:
            k = tl.load(k_ptr + base + cols[:, None] * D + d[None, :])  # (BN, D)
            sk = tl.load(sk_ptr + bh * S + cols)  # (BN,)
        else:
            k = tl.load(k_ptr + base + cols[:, None] * D + d[None, :], mask=in_k[:, None], other=0.0)
            sk = tl.load(sk_ptr + bh * S + cols, mask=in_k, other=0.0)
        s = tl.dot(q, tl.trans(k)) * sq[:, None] * sk[None, :]  # (BM, BN) fp32 logits * log2(e) / sqrt(D)
        if not EVEN:
            s = tl.where(in_k[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])  # (BM, BN) in [0, 1]
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if EVEN:
            vt = tl.load(vt_ptr + base + d[:, None] * S + cols[None, :])  # (D, BN)
        else:
            vt = tl.load(vt_ptr + base + d[:, None] * S + cols[None, :], mask=in_k[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), tl.trans(vt))  # (BM, D)
        m_i = m_new
    sv = tl.load(sv_ptr + bh * D + d)  # (D,)
    out = acc / l_i[:, None] * sv[None, :]
    o_off = b * S * H * D + rows[:, None] * (H * D) + h * D + d[None, :]  # (B, S, H, D) layout
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=(rows < S)[:, None])


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(B, S, H, D) q, k, v -> q8, k8 (B, H, S, D) fp8 with per-(b, h, token) scales (B, H, S) fp32, and v8^T
    (B, H, D, S) fp8 with per-(b, h, channel) scales (B, H, D) fp32. Plain torch ops (fused under compile)."""
    def rows(x):  # per token and head, over D
        xh = x.transpose(1, 2).float()  # (B, H, S, D)
        scale = (xh.abs().amax(-1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # (B, H, S)
        return (xh / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous(), scale

    q8, sq = rows(q)
    k8, sk = rows(k)
    vt = v.permute(0, 2, 3, 1).float()  # (B, H, D, S)
    sv = (vt.abs().amax(-1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # (B, H, D)
    vt8 = (vt / sv[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8).contiguous()
    return q8, k8, vt8, sq, sk, sv


def fp8_attention_quantized(q8, k8, vt8, sq, sk, sv, out_dtype=torch.bfloat16, *, block_m: int = 128,
                            block_n: int = 128, num_warps: int = 8, num_stages: int = 3) -> torch.Tensor:
    """The kernel on already quantised inputs (see `quantize_qkv`) -> (B, S, H, D) in out_dtype."""
    B, H, S, D = q8.shape
    out = torch.empty((B, S, H, D), device=q8.device, dtype=out_dtype)
    grid = (triton.cdiv(S, block_m), B * H)
    with torch.cuda.device_of(q8):
        _fp8_attention_kernel[grid](q8, k8, vt8, sq, sk, sv, out, S, H, LOG2E / math.sqrt(D),
                                    D=D, BLOCK_M=block_m, BLOCK_N=block_n,
                                    EVEN=S % block_m == 0 and S % block_n == 0, num_warps=num_warps,
                                    num_stages=num_stages)
    return out


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **launch) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with fp8 inputs: q, k, v (B, S, H, D) -> (B, S, H, D) in q's dtype."""
    return fp8_attention_quantized(*quantize_qkv(q, k, v), out_dtype=q.dtype, **launch)



def main() -> int:
    if not torch.cuda.is_available():
        log("bench/fp8_attention.py needs a CUDA GPU")
        return 2
    import triton.testing

    from ditserve.ops.attention import Attention

    B, L, H, D = 1, 4608, 24, 128
    flops = 4 * B * H * L * L * D
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    sdpa = Attention("sdpa")
    ref = sdpa(q.float(), k.float(), v.float())

    def err(out):
        return round(((out.float() - ref).norm() / ref.norm()).item(), 5)

    rows = {}

    def record(name, fn, out=None):
        ms = triton.testing.do_bench_cudagraph(fn)
        rows[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
        if out is not None:
            rows[name]["rel_l2_vs_fp32"] = err(out)
        log(f"{name:34s} {ms * 1e3:8.1f} us  {flops / ms / 1e9:7.1f} TFLOP/s  {rows[name].get('rel_l2_vs_fp32', '')}")

    record("sdpa_bf16", lambda: sdpa(q, k, v), sdpa(q, k, v))
    quant = torch.compile(quantize_qkv, fullgraph=True)
    packed = quant(q, k, v)
    record("quantize_qkv (compiled)", lambda: quant(q, k, v))
    rows["quantize_qkv (compiled)"].pop("tflops")
    for bm, bn, warps, stages in ((128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 4), (128, 64, 8, 4),
                                  (64, 128, 4, 3), (128, 128, 4, 3), (256, 128, 8, 3), (128, 256, 8, 3)):
        name = f"fp8_kernel_m{bm}_n{bn}_w{warps}_s{stages}"
        try:
            out = fp8_attention_quantized(*packed, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
            record(name, lambda: fp8_attention_quantized(*packed, block_m=bm, block_n=bn, num_warps=warps,
                                                           num_stages=stages), out)
        except Exception as e:  # a launch shape that does not fit (shared memory, registers)
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
            log(f"{name:34s} {rows[name]['error']}")
    cudnn_rows(q, k, v, record, rows)
    print(json.dumps({"bench": "fp8_attention", "commit": commit(), "gpu": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "shape": [B, L, H, D], "rows": rows}))
    return 0


def cudnn_rows(q, k, v, record, rows) -> None:
    """cuDNN's fp8 SDPA as `--fp8-attention` runs it (`ditserve::fp8_attention`): q, k, v with one scale each
    (`Fn.quantize_tensor`), P scaled by 448 (it is in [0, 1]), the fp8 output by v's scale (a convex combination of
    v's rows). (def84cb's run also asked cuDNN for a bf16 output: refused on Hopper, "only supported on Blackwell".)"""
    from ditserve.kernels import attention_fp8 as KA
    from ditserve.ops import functional as Fn

    if not KA.CUDNN_REGISTERED:  # nvidia-cudnn-frontend not carried
        rows["cudnn_fp8"] = {"error": f"{KA.CUDNN_PACKAGE} is not importable"}
        log(f"cudnn_fp8: {rows['cudnn_fp8']['error']}")
        return
    import cudnn

    log(f"cudnn frontend {cudnn.__version__}, backend {cudnn.backend_version()}")
    quant = torch.compile(lambda q, k, v: [Fn.quantize_tensor(x) for x in (q, k, v)], fullgraph=True)
    (q8, dq, _), (k8, dk, _), (v8, dv, sv) = quant(q, k, v)
    record("quantize_qkv_tensorwise (compiled)", lambda: quant(q, k, v))
    rows["quantize_qkv_tensorwise (compiled)"].pop("tflops")
    out = KA.fp8_attention(q8, k8, v8, dq, dk, dv, sv)
    record("cudnn_fp8_out_fp8", lambda: KA.fp8_attention(q8, k8, v8, dq, dk, dv, sv), out.float() * dv)


if __name__ == "__main__":
    sys.exit(main())
