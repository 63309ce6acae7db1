"""The fp8 tier's fused ops: GELU + activation quantisation (`ditserve::gelu_quantize_rows`, `GeluQuantize`,
`Fp8Linear.forward_after_gelu`), the norms with an fp8 output (`ditserve::norm_scale_shift_fp8`,
`ditserve::residual_norm_scale_shift_fp8`, `QuantizedRows`), the fp8 bias in the GEMM's epilogue, and their use
in the FLUX blocks.

On the CPU: each op's reference is exactly the unfused ops (bias add, tanh GELU, concatenation, norm, per-row
quantisation), `forward_after_gelu` is exactly the layer applied to the GELU'd concatenation, and an fp8 FLUX
model computes the same function through the fused path as through the unfused one. gpu-marked: the Triton
kernels agree with the references (scales to fp32 rounding, fp8 values within one step on rare rounding
boundaries), reading row-strided views in place.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from ditserve.kernels import quant as K
from ditserve.models.flux import FluxDoubleBlock
from ditserve.ops import Fp8Linear, Linear, OpsConfig, apply_fp8
from ditserve.ops import functional as Fn
from .test_fp8 import flux_inputs, make_linear, randn, tiny_flux

NATIVE = OpsConfig(kernels="native")
OP = torch.ops.ditserve.gelu_quantize_rows.default


def unfused(plain, pre, bias):
    """The ops the fused path replaces, written out one by one."""
    y = F.gelu(pre if bias is None else pre + bias, approximate="tanh")
    return Fn.quantize_rows(y if plain is None else torch.cat((plain, y), dim=-1))


def cases(dtype, device="cpu", R=7, A=16, G=48):
    """(plain, pre, bias) with pre a row-strided view of a wider buffer, as the single block's MLP slice is."""
    wide = (randn(R, A + G + 32, dtype=dtype, seed=2) * 3).to(device)
    pre = wide[:, 32:32 + G]  # (R, G), row stride A + G + 32
    plain = (randn(R, A, dtype=dtype, seed=3) * 2).to(device)
    bias = randn(G, dtype=dtype, seed=4).to(device)
    return {"plain_bias": (plain, pre, bias), "plain": (plain, pre, None), "bias": (None, pre, bias),
            "pre_only": (None, pre, None)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["plain_bias", "plain", "bias", "pre_only"])
def test_reference_is_the_unfused_ops(dtype, case):
    plain, pre, bias = cases(dtype)[case]
    q, s = Fn.gelu_quantize_rows(plain, pre, bias)
    q_ref, s_ref = unfused(plain, pre, bias)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (pre.shape[0], 1)
    assert q.shape == (pre.shape[0], pre.shape[1] + (0 if plain is None else plain.shape[1]))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    # the bias and the plain part really count
    if bias is not None:
        assert not torch.equal(q, Fn.gelu_quantize_rows(plain, pre, None)[0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("case", ["plain_bias", "pre_only"])
def test_opcheck(device, case):
    torch.library.opcheck(OP, cases(torch.bfloat16, device)[case])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_plain", [True, False])
def test_forward_after_gelu_is_the_layer_on_the_gelu_concatenation(dtype, with_plain):
    A, G = 16, 48
    op = Fp8Linear.from_linear(make_linear(dtype, k=(A if with_plain else 0) + G, n=32))
    plain = randn(2, 5, A, dtype=dtype, seed=5) if with_plain else None
    pre, bias = randn(2, 5, G, dtype=dtype, seed=6) * 2, randn(G, dtype=dtype, seed=7)
    y = F.gelu(pre + bias, approximate="tanh")
    ref = op(y if plain is None else torch.cat((plain, y), dim=-1))  # (2, 5, 32)
    out = op.forward_after_gelu(plain, pre, bias)
    assert out.shape == (2, 5, 32) and out.dtype == dtype
    assert torch.equal(out, ref)


def test_forward_after_gelu_rejects_widths_that_do_not_add_up():
    op = Fp8Linear.from_linear(make_linear(k=64, n=32))
    with pytest.raises(ValueError, match="in_features"):
        op.forward_after_gelu(randn(3, 16), randn(3, 32))  # 48 != 64
    with pytest.raises(ValueError, match="in_features"):
        op.forward_after_gelu(None, randn(3, 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bias_in_gemm_computes_the_same_layer(dtype):
    lin = make_linear(dtype)
    after, inside = Fp8Linear.from_linear(lin), Fp8Linear.from_linear(lin, bias_in_gemm=True)
    assert inside.bias_in_gemm and not after.bias_in_gemm and inside.pending_bias() is None
    x = randn(9, lin.in_features, dtype=dtype)
    ref, out = after(x), inside(x)
    # the epilogue adds the bias before the one rounding to the output dtype: within one rounding of the output
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(out.float(), ref.float(), rtol=tol, atol=tol * ref.abs().max().item())
    assert not torch.allclose(out.float(), inside.product(*Fn.quantize_rows(x)).float() * 0, atol=1e-3)
    # matmul: the GEMM alone (the bias only when it is in the GEMM)
    assert torch.equal(after.matmul(x), after.product(*Fn.quantize_rows(x)))
    assert torch.equal(inside.matmul(x), out)


def test_bias_in_gemm_without_a_bias_is_off():
    op = Fp8Linear.from_linear(make_linear(bias=False), bias_in_gemm=True)
    assert not op.bias_in_gemm


def test_apply_fp8_puts_the_declared_biases_in_the_gemm():
    model = apply_fp8(tiny_flux())
    inside = {n for n, m in model.named_modules() if isinstance(m, Fp8Linear) and m.bias_in_gemm}
    expected = {f"{lst}.{i}.{name}" for lst, names in model.fp8_linears
                for i in range(len(getattr(model, lst))) for name in names if name in model.fp8_bias_in_gemm}
    assert inside == expected and len(inside) == 2 * 4 + 2 * 1


def test_gelu_quantize_takes_the_model_ops_path():
    lin = Linear(32, 16, ops=NATIVE)
    assert Fp8Linear.from_linear(lin).gelu_quantize.path == "native"


def _unfused_fp8_paths(monkeypatch):
    """Make the fp8 blocks run the unfused ops: forward_after_gelu as the layer on the GELU'd concatenation."""

    def forward_after_gelu(self, plain, pre, bias=None):
        y = F.gelu(pre if bias is None else pre + bias, approximate="tanh")
        return self(y if plain is None else torch.cat((plain, y), dim=-1))

    monkeypatch.setattr(Fp8Linear, "forward_after_gelu", forward_after_gelu)
    monkeypatch.setattr(FluxDoubleBlock, "mlp", staticmethod(lambda mlp_in, mlp_out, x: mlp_out(mlp_in(x))))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_flux_fused_path_is_the_unfused_function(dtype, monkeypatch):
    model = apply_fp8(tiny_flux(dtype=dtype))
    inputs = flux_inputs(model, dtype=dtype)
    calls = []
    real = Fn.gelu_quantize_rows
    monkeypatch.setattr(Fn, "gelu_quantize_rows", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        fused = model(**inputs)
    assert len(calls) == 2 * 2 + 2  # two MLPs per double block, one per single block
    _unfused_fp8_paths(monkeypatch)
    with torch.inference_mode():
        ref = copy.deepcopy(model)(**inputs)
    assert torch.equal(fused, ref)


# ------------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["plain_bias", "plain", "bias", "pre_only"])
@pytest.mark.parametrize("shape", [(7, 16, 48), (300, 3072, 12288), (64, 0, 12288), (5, 24, 40)])
def test_kernel_matches_the_reference(case, shape):
    """Scales agree to fp32 rounding and fp8 values bit for bit, except where the kernel's tanh or a contracted
    multiply-add (FMA) lands a value on the other side of an fp8 rounding boundary: then one fp8 step apart,
    and rarely."""
    R, A, G = shape
    if A == 0 and "plain" in case:
        pytest.skip("no plain part at this shape")
    plain, pre, bias = cases(torch.bfloat16, "cuda", R=R, A=max(A, 1), G=G)[case]
    q, s = K.gelu_quantize_rows(plain, pre, bias)  # the CUDA dispatch: the Triton kernel
    q_ref, s_ref = Fn.gelu_quantize_rows(plain, pre, bias)
    assert q.shape == q_ref.shape and q.is_contiguous() and s.is_contiguous()
    assert torch.allclose(s, s_ref, rtol=2e-7, atol=0)
    differ = q.view(torch.uint8) != q_ref.view(torch.uint8)
    assert differ.float().mean().item() <= 1e-3, f"{differ.float().mean().item():.2e} of the fp8 values differ"
    # one fp8 step at most: e4m3 values 1 apart in their integer encoding (same sign)
    steps = (q.view(torch.uint8).int() - q_ref.view(torch.uint8).int()).abs()
    assert steps.max().item() <= 1


@pytest.mark.gpu
def test_kernel_handles_no_rows():
    q, s = K.gelu_quantize_rows(None, torch.zeros(0, 64, device="cuda", dtype=torch.bfloat16), None)
    assert q.shape == (0, 64) and s.shape == (0, 1)


# ------------------------------------------------------------------ norms with an fp8 output (QuantizedRows)

NORM_OPS = {"norm_scale_shift_fp8": torch.ops.ditserve.norm_scale_shift_fp8.default,
            "residual_norm_scale_shift_fp8": torch.ops.ditserve.residual_norm_scale_shift_fp8.default}


def norm_args(name, device="cpu", B=2, L=33, D=3072, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g).to(dtype).to(device)  # noqa: E731
    x, mod = r(B, L, D), (r(B, 1, D), r(B, 1, D))
    if name == "norm_scale_shift_fp8":
        return (x, None, *mod, 1e-6, False)
    return (x, r(B, L, D), r(B, 1, D), None, *mod, 1e-6, False)


def norm_reference(name, args):
    """The unfused ops: the norm, then `quantize_rows` of its output."""
    if name == "norm_scale_shift_fp8":
        y = Fn.norm_scale_shift(*args)
        return (*Fn.quantize_rows(y.reshape(-1, y.shape[-1])),)
    y, r = Fn.residual_norm_scale_shift(*args)
    return (*Fn.quantize_rows(y.reshape(-1, y.shape[-1])), r)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(NORM_OPS))
def test_norm_fp8_opcheck(device, name):
    torch.library.opcheck(NORM_OPS[name], norm_args(name, device, D=64))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", list(NORM_OPS))
@pytest.mark.parametrize("D", [3072, 200, 5120])  # FLUX's width (resident), an odd one, Wan's (looped: unfused)
def test_norm_fp8_matches_the_unfused_ops(device, name, D):
    args = norm_args(name, device, D=D)
    out, ref = NORM_OPS[name](*args), norm_reference(name, args)
    q, s, q_ref, s_ref = out[0], out[1], ref[0], ref[1]
    assert q.shape == q_ref.shape == (2 * 33, D) and q.dtype == torch.float8_e4m3fn and s.shape == (2 * 33, 1)
    if device == "cpu":  # the default implementation is the reference
        assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    else:
        # The kernel's fp32 norm differs from the reference's by ulps, which can move the bf16 rounding of an
        # element (and so a row's amax) by one bf16 step: compare dequantised values, within one fp8 step.
        assert torch.allclose(s, s_ref, rtol=1e-2, atol=0)
        deq, deq_ref = q.float() * s, q_ref.float() * s_ref
        assert ((deq - deq_ref).abs() <= 0.13 * deq_ref.abs() + 2 * s_ref).all()
        assert (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item() < 1e-2
    if name == "residual_norm_scale_shift_fp8":
        assert torch.equal(out[2], ref[2])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_norm_ops_hand_an_fp8_layer_its_input(device):
    """NormScaleShift(quantize=True) -> Fp8Linear gives the layer applied to the norm's output."""
    from ditserve.ops import NormScaleShift

    ops = OpsConfig(device=device, dtype=torch.bfloat16, kernels="auto", compiled=True)
    norm = NormScaleShift(64, ops=ops)
    lin = Fp8Linear.from_linear(make_linear(torch.bfloat16, k=64, n=32)).to(device)
    x, _, scale, shift, *_ = norm_args("norm_scale_shift_fp8", device, D=64)
    quantized = norm(x, scale, shift, quantize=True)
    assert isinstance(quantized, Fn.QuantizedRows) and quantized.shape == x.shape
    out, ref = lin(quantized), lin(norm(x, scale, shift))
    assert out.shape == ref.shape == (2, 33, 32)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 2e-2
