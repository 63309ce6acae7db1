"""An fp8 attention forward for Hopper in Triton (experimental: measured by bench/fp8_attention.py, not wired into
the engine).

Why: in the fp8 tier, attention (25.6 ms of FLUX.1-dev's 90.8 ms fp8 forward on an H100) still runs in bf16 on
cuDNN at ~620 TFLOP/s; no fp8 attention kernel for Hopper is importable here. fp8 tensor cores do twice the bf16
rate, so an fp8 kernel at even 800 TFLOP/s would take ~6 ms off a forward.

Math (non-causal, no mask): q, k quantised to float8_e4m3fn per (token, head) row of D channels, v per (head,
channel) over all tokens, each with an fp32 scale; S = (q8 k8^T) * sq_i * sk_j / sqrt(D); online softmax in fp32
(exp2); P rounded to fp8 (values in [0, 1]); O = (P8 v8) / l * sv. Lossy: fp8 keeps 3 mantissa bits.

Layouts: q8, k8 (B, H, S, D) contiguous; v8 transposed, (B, H, D, S) contiguous, as Hopper's fp8 tensor-core
instructions want both operands of P @ V contiguous along S; the output (B, S, H, D) in the input dtype, the
layout the engine's attention ops return.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["S"])
def _fp8_attention_kernel(q_ptr, k_ptr, vt_ptr, sq_ptr, sk_ptr, sv_ptr, o_ptr, S, H, qk_scale,
                          D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
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
        k = tl.load(k_ptr + base + cols[:, None] * D + d[None, :], mask=in_k[:, None], other=0.0)  # (BN, D)
        sk = tl.load(sk_ptr + bh * S + cols, mask=in_k, other=0.0)  # (BN,)
        s = tl.dot(q, tl.trans(k)) * sq[:, None] * sk[None, :]  # (BM, BN) fp32 logits * log2(e) / sqrt(D)
        s = tl.where(in_k[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp2(s - m_new[:, None])  # (BM, BN) in [0, 1]
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(vt_ptr + base + d[:, None] * S + cols[None, :], mask=in_k[None, :], other=0.0)  # (D, BN)
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
                                    D=D, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
                                    num_stages=num_stages)
    return out


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **launch) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v with fp8 inputs: q, k, v (B, S, H, D) -> (B, S, H, D) in q's dtype."""
    return fp8_attention_quantized(*quantize_qkv(q, k, v), out_dtype=q.dtype, **launch)
