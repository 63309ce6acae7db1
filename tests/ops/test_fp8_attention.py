"""fp8 attention (`--fp8-attention`): the q/k norm + RoPE with an fp8 output whose scale the weights fix
(`ditserve::rms_norm_rotary_fp8`), the per-tensor quantisation of v, the attention of fp8 inputs with an fp8
output (`ditserve::fp8_attention`: cuDNN on CUDA), the GELU quantisation reading that fp8 output, and their use in
the FLUX blocks.

On the CPU: the references keep their contracts (the bound never overflows and is reached, scales as documented,
the attention equals SDPA of the dequantised inputs), an fp8-attention FLUX model stays close to the bf16 one
and compiles whole, and the refusals. gpu-marked: the Triton kernels agree with the references, cuDNN's fp8
attention stays within its measured error of fp32, and the compiled CUDA model agrees with the native one.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ditserve.compile import CompileConfig
from ditserve.compile_report import compile_report
from ditserve.config import ConfigError, EngineConfig
from ditserve.kernels import attention_fp8 as KA
from ditserve.kernels import rotary as KR
from ditserve.ops import Fp8Attention, OpsConfig, apply_fp8
from ditserve.ops import functional as Fn
from .test_fp8 import flux_inputs, rel_err, tiny_flux

FP8_MAX = 448.0


def qk_parts(device="cpu", B=2, T=5, L=11, H=3, D=64, dtype=torch.bfloat16, seed=0):
    """FLUX's double-block q: a text and an image part, each a strided view of a fused projection's output
    (B, L_i, 3, H, D)[:, :, 0]; their norm weights; the joint sequence's cos/sin tables (S, D/2)."""
    g = torch.Generator().manual_seed(seed)
    parts = [(torch.randn(B, n, 3, H, D, generator=g) * 4).to(dtype)[:, :, 0].to(device) for n in (T, L)]
    weights = [(torch.rand(D, generator=g) * s + 0.1).to(dtype).to(device) for s in (1.0, 3.0)]
    ang = torch.rand(T + L, D // 2, generator=g) * 2 * math.pi
    return parts, weights, ang.cos().to(device), ang.sin().to(device)


# --------------------------------------------------------------------------------------------- references


@pytest.mark.parametrize("n_parts", [1, 2])
def test_norm_rotary_fp8_reference_scale_is_the_weights_bound(n_parts):
    parts, weights, cos, sin = qk_parts()
    parts, weights = parts[-n_parts:], weights[-n_parts:]
    cos, sin = cos[-sum(p.shape[1] for p in parts):], sin[-sum(p.shape[1] for p in parts):]
    q, descale = Fn.rms_norm_rotary_fp8(parts, weights, cos, sin, 1e-6, True)
    D = parts[0].shape[-1]
    w_max = max(w.float().abs().max().item() for w in weights)
    assert q.dtype == Fn.FP8_DTYPE and descale.shape == (1,) and descale.dtype == torch.float32
    assert descale.item() == pytest.approx(w_max * math.sqrt(D) / FP8_MAX, rel=1e-6)
    ref = Fn.rms_norm_rotary(parts, weights, cos, sin, 1e-6, True).float()
    # within half an fp8 step (3 mantissa bits: 1/16 relative) of the bf16 output, or of fp8's subnormal spacing
    assert ((q.float() * descale - ref).abs() <= ref.abs() / 16 + 2 ** -9 * descale).all()


def test_norm_rotary_fp8_bound_is_reached_and_never_overflows():
    """A row with all its energy in the channel of the largest weight (and no rotation) reaches the bound: 448
    exactly, not beyond; the bound holds for any row."""
    D = 32
    w = torch.linspace(0.1, 2.0, D)
    x = torch.zeros(1, 1, 1, D)
    x[..., -1] = 5.0  # normed: sqrt(D) in the last channel (the largest weight), 0 elsewhere
    cos, sin = torch.ones(1, D // 2), torch.zeros(1, D // 2)
    q, descale = Fn.rms_norm_rotary_fp8([x], [w], cos, sin, 0.0, True)
    assert q.float().abs().max().item() == FP8_MAX
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 64, 2, D, generator=g) ** 3  # heavy-tailed rows
    ang = torch.rand(64, D // 2, generator=g) * 6
    q, _ = Fn.rms_norm_rotary_fp8([x], [w], ang.cos(), ang.sin(), 1e-6, True)
    assert torch.isfinite(q.float()).all()


def test_quantize_tensor():
    t = torch.tensor([[-3.0, 0.5], [1.0, 0.0]])
    q, descale, scale = Fn.quantize_tensor(t)
    assert descale.item() == pytest.approx(3.0 / FP8_MAX) and scale.item() == pytest.approx(FP8_MAX / 3.0)
    assert q.float()[0, 0].item() == -FP8_MAX and q.shape == t.shape
    q, descale, _ = Fn.quantize_tensor(torch.zeros(3))
    assert descale.item() > 0 and (q.float() == 0).all()  # no 0/0


def test_fp8_attention_reference_is_sdpa_of_the_dequantised_inputs():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 3, 16, generator=g) for _ in range(3))
    (q8, dq, _), (k8, dk, _), (v8, dv, sv) = (Fn.quantize_tensor(t) for t in (q, k, v))
    out = Fn.fp8_attention(q8, k8, v8, dq, dk, dv, sv)
    deq = [(t.float() * d).transpose(1, 2) for t, d in ((q8, dq), (k8, dk), (v8, dv))]
    ref = F.scaled_dot_product_attention(*deq).transpose(1, 2)
    assert out.dtype == Fn.FP8_DTYPE and out.shape == q.shape
    assert ((out.float() * dv - ref).abs() <= ref.abs() / 16 + 2 ** -9 * dv).all()
    assert rel_err(out.float() * dv, F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)) < 0.08


def test_gelu_quantize_reads_an_fp8_plain_part_with_its_scale():
    g = torch.Generator().manual_seed(1)
    plain = (torch.randn(6, 16, generator=g) * 100).clamp(-FP8_MAX, FP8_MAX).to(Fn.FP8_DTYPE)
    pre, descale = torch.randn(6, 32, generator=g).to(torch.bfloat16), torch.tensor([0.01])
    q, s = Fn.gelu_quantize_rows(plain, pre, None, descale)
    q_ref, s_ref = Fn.gelu_quantize_rows(plain.float() * descale, pre, None)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_opcheck(device):
    parts, weights, cos, sin = qk_parts(device, B=1)
    torch.library.opcheck(torch.ops.ditserve.rms_norm_rotary_fp8.default, (parts, weights, cos, sin, 1e-6, True))
    if device == "cuda":
        pytest.importorskip(KA.CUDNN_MODULE)
    g = torch.Generator().manual_seed(0)
    q8, dq, _ = Fn.quantize_tensor(torch.randn(1, 8, 2, 16, generator=g).to(device))
    # (not test_schema: its mutation check multiplies the inputs, which fp8 tensors do not support on the CPU)
    torch.library.opcheck(torch.ops.ditserve.fp8_attention.default, (q8, q8, q8, dq, dq, dq, 1 / dq),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


# -------------------------------------------------------------------------------------------------- model


def fp8_attention_flux(dtype=torch.bfloat16, ops=OpsConfig(kernels="native")):
    model = apply_fp8(tiny_flux(dtype=dtype))
    model.use_fp8_attention(ops)
    return model


def test_fp8_attention_flux_stays_close_and_really_runs():
    model = tiny_flux(dtype=torch.bfloat16)
    fp8 = apply_fp8(copy.deepcopy(model))
    fp8_attn = copy.deepcopy(fp8)
    fp8_attn.use_fp8_attention(OpsConfig(kernels="native"))
    inputs = flux_inputs(model, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref, out_fp8, out = model(**inputs), fp8(**inputs), fp8_attn(**inputs)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert rel_err(out, ref) < 0.1
    assert not torch.equal(out, out_fp8)  # the fp8 attention really ran
    assert all(isinstance(b.fp8_attn, Fp8Attention) for b in (*fp8_attn.double_blocks, *fp8_attn.single_blocks))


def test_fp8_attention_flux_compiles_without_breaks_or_recompiles():
    model = fp8_attention_flux(dtype=torch.float32)
    report = compile_report(model, lambda h, w: flux_inputs(model, h, w), [(64, 128), (128, 128)],
                            CompileConfig(backend="aot_eager"))
    assert report["graph_breaks"] == 0 and report["break_reasons"] == []
    assert report["recompiles"] == 0 and report["recompile_reasons"] == []


def test_refusals(monkeypatch):
    with pytest.raises(ConfigError, match="--quantization fp8"):
        EngineConfig(fp8_attention=True)
    EngineConfig(fp8_attention=True, quantization="fp8")
    with pytest.raises(ConfigError, match="apply_fp8"):
        tiny_flux().use_fp8_attention(OpsConfig(kernels="native"))
    # a CUDA path without the cuDNN frontend: refused at construction, naming the package
    monkeypatch.setattr(KA, "CUDNN_REGISTERED", False)
    monkeypatch.setattr(Fp8Attention, "_select_path", lambda self, ops: "cuda")
    with pytest.raises(ConfigError, match="nvidia-cudnn-frontend"):
        Fp8Attention()


def test_loader_applies_it():
    """load_transformer with fp8_attention: every block's attention in fp8, on top of the fp8 layers (the CPU runs
    the references), close to the fp8 model's output."""
    from ditserve.models.flux import flux_example_inputs
    from ditserve.loader import load_transformer

    fp8, _ = load_transformer(None, EngineConfig(device="cpu", quantization="fp8"))
    model, _ = load_transformer(None, EngineConfig(device="cpu", quantization="fp8", fp8_attention=True))
    blocks = (*model.double_blocks, *model.single_blocks)
    assert all(isinstance(b.fp8_attn, Fp8Attention) and b.norm_rotary.warm_quantized for b in blocks)
    assert all(b.fp8_attn is None for b in (*fp8.double_blocks, *fp8.single_blocks))
    inputs = flux_example_inputs(model.config, 64, 64, batch=2, text_len=16)
    with torch.inference_mode():
        out, ref = model(**inputs), fp8(**inputs)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 0.05


def test_prewarm_covers_the_fp8_variant_only_where_used(monkeypatch):
    """`RMSNormRotary.warm` (the compile prewarm) runs the fp8 variant, with two parts as the double block calls it,
    only once the model uses fp8 attention (it would cost every other model a kernel compile)."""
    from ditserve.ops import RMSNormRotary

    calls = []
    real = KR.rms_norm_rotary_fp8
    monkeypatch.setattr(KR, "rms_norm_rotary_fp8", lambda xs, *a: calls.append(len(xs)) or real(xs, *a))
    op = RMSNormRotary(64)
    op.warm(torch.device("cpu"), torch.bfloat16)
    assert calls == []
    model = fp8_attention_flux()
    assert all(b.norm_rotary.warm_quantized for b in (*model.double_blocks, *model.single_blocks))
    op.warm_quantized = True
    op.warm(torch.device("cpu"), torch.bfloat16)
    assert calls == [2]


def test_cli_flag():
    from ditserve.engine_args import add_engine_flags, engine_from_args
    import argparse

    p = argparse.ArgumentParser()
    add_engine_flags(p)
    engine = engine_from_args(p.parse_args(["--quantization", "fp8", "--fp8-attention"]))
    assert engine.fp8_attention and engine.quantization == "fp8"
    assert not engine_from_args(p.parse_args([])).fp8_attention


# ------------------------------------------------------------------------------------------------- CUDA


def fp8_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in fp8 steps (e4m3 values of one sign are consecutive integers in their encoding)."""
    return (a.view(torch.uint8).int() - b.view(torch.uint8).int()).abs()


@pytest.mark.gpu
@pytest.mark.parametrize("n_parts", [1, 2])
@pytest.mark.parametrize("shape", [(2, 5, 11, 3, 64), (1, 512, 4096, 24, 128)])
def test_norm_rotary_fp8_kernel_matches_the_reference(n_parts, shape):
    B, T, L, H, D = shape
    parts, weights, cos, sin = qk_parts("cuda", B, T, L, H, D)
    parts, weights = parts[-n_parts:], weights[-n_parts:]
    S = sum(p.shape[1] for p in parts)
    cos, sin = cos[-S:], sin[-S:]
    q, descale = KR.rms_norm_rotary_fp8(parts, weights, cos, sin, 1e-6, True)  # CUDA dispatch: the kernel
    q_ref, d_ref = Fn.rms_norm_rotary_fp8(parts, weights, cos, sin, 1e-6, True)
    assert q.shape == q_ref.shape and q.dtype == Fn.FP8_DTYPE and q.is_contiguous()
    assert torch.equal(descale, d_ref)
    steps = fp8_steps(q, q_ref)
    assert steps.max().item() <= 1 and (steps > 0).float().mean().item() <= 1e-2


@pytest.mark.gpu
def test_gelu_quantize_kernel_reads_fp8_plain():
    from ditserve.kernels import quant as KQ

    g = torch.Generator().manual_seed(1)
    plain = (torch.randn(300, 3072, generator=g) * 100).clamp(-FP8_MAX, FP8_MAX).to(Fn.FP8_DTYPE).cuda()
    pre = torch.randn(300, 12288, generator=g).to(torch.bfloat16).cuda()
    descale = torch.tensor([0.01], device="cuda")
    q, s = KQ.gelu_quantize_rows(plain, pre, None, descale)
    q_ref, s_ref = Fn.gelu_quantize_rows(plain, pre, None, descale)
    assert torch.allclose(s, s_ref, rtol=2e-7, atol=0)
    steps = fp8_steps(q, q_ref)
    assert steps.max().item() <= 1 and (steps > 0).float().mean().item() <= 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 4608, 24, 128), (2, 300, 3, 64)])
def test_cudnn_fp8_attention_against_fp32(shape):
    """cuDNN's fp8 attention (P rounded to fp8 too) within 8% relative L2 of fp32 SDPA (5.9% measured at FLUX's
    shape, bench/fp8_attention.py), and close to the reference of the same fp8 inputs."""
    pytest.importorskip(KA.CUDNN_MODULE)
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(*shape, device="cuda", generator=g) for _ in range(3))
    (q8, dq, _), (k8, dk, _), (v8, dv, sv) = (Fn.quantize_tensor(t) for t in (q, k, v))
    out = KA.fp8_attention(q8, k8, v8, dq, dk, dv, sv)  # CUDA dispatch: cuDNN
    assert out.dtype == Fn.FP8_DTYPE and out.shape == q.shape and out.is_contiguous()
    ref = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    assert rel_err(out.float() * dv, ref) < 0.08
    same_inputs = Fn.fp8_attention(q8, k8, v8, dq, dk, dv, sv).float() * dv
    assert rel_err(out.float() * dv, same_inputs) < 0.08


@pytest.mark.gpu
def test_cuda_model_compiled_agrees_with_native():
    """The compiled CUDA fp8-attention model (the Triton kernels, cuDNN, inductor) against the same weights'
    native path."""
    pytest.importorskip(KA.CUDNN_MODULE)
    from ditserve.compile import compile_model
    from ditserve.models.flux import FluxTransformer

    ref_model = tiny_flux(dtype=torch.bfloat16)
    ops = OpsConfig(device="cuda", dtype=torch.bfloat16, compiled=True)
    fast = FluxTransformer(ref_model.config, ops=ops, dtype=torch.bfloat16, device="cuda").eval()
    fast.load_state_dict(ref_model.state_dict())
    native = apply_fp8(ref_model.cuda())
    native.use_fp8_attention(OpsConfig(kernels="native"))
    apply_fp8(fast).use_fp8_attention(ops)
    assert fast.double_blocks[0].fp8_attn.path == "cuda" and fast.single_blocks[0].norm_rotary.path == "cuda"
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v
              for k, v in flux_inputs(native, 128, 128, dtype=torch.bfloat16).items()}
    with torch.inference_mode():
        ref = native(**inputs)
        compile_model(fast, CompileConfig())
        out = fast(**inputs)
    assert torch.isfinite(out).all() and rel_err(out, ref) < 0.05
