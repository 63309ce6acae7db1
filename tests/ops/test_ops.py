"""The layer library on random inputs: parity, compile behaviour, path selection, attention backends.

Parity rule (DESIGN §3.4): every op's output is compared with an fp64 evaluation of the op's definition,
written here independently of `ditserve.ops.functional`. The op's relative error at dtype X may be at most
FACTOR x the error of the same formula evaluated naively in dtype X (plus a rounding's slack), and in fp32 it
must be near 1e-6. The inputs are rounded to X first, so the fp64 reference sees exactly what the op sees.

Ops with a fast path run twice: "native" (the PyTorch reference path) and "custom" (the op's `forward_cuda`,
i.e. the `ditserve::` custom op: its default implementation on CPU, the Triton kernel on CUDA). The "cuda"
device parameters carry the `gpu` marker and run on the GPU machine only.
"""

from __future__ import annotations

import math
import operator

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter

from ditserve.ops import (
    Attention, LayerNorm, Linear, LinearGELU, MulAdd, NormScaleShift, NormTanhGate, OpsConfig, ResidualNormScaleShift,
    RMSNorm, Rotary, axial_rope_cos_sin,
)
from ditserve.ops.attention import CUDA_MAJORS
from ditserve.ops.base import CustomOp
from ditserve.platform import Platform

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
FAST_PATHS = ["native", "custom"]  # for ops that have a forward_cuda
FACTOR = 3.0
FP32_MAX_ERR = 2e-6
EPS = 1e-6
NATIVE_OPS = OpsConfig(kernels="native")

# (B, L, D, modulation): "sample" modulation is (B, 1, D), "token" modulation is (B, L, D).
SHAPES = [(1, 1, 16, "sample"), (2, 7, 33, "sample"), (2, 7, 33, "token"), (3, 64, 96, "token"), (1, 5, 257, "sample")]


# ----------------------------------------------------------------------------------------------- helpers


def make_op(cls, path: str, device: str, *args, **kwargs) -> CustomOp:
    """Build `cls` on the native path, then rebind to the custom-op path when asked."""
    op = cls(*args, ops=NATIVE_OPS, **kwargs).to(device)
    if path == "custom":
        assert cls.has_fast_path()
        op._impl = op.forward_cuda
    return op


class Inputs:
    """Seeded random tensors: drawn in fp64 on CPU, rounded to `dtype`, moved to `device`."""

    def __init__(self, seed: int, dtype: torch.dtype, device: str):
        self.gen = torch.Generator().manual_seed(seed)
        self.dtype, self.device = dtype, device

    def __call__(self, *shape, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
        t = torch.randn(*shape, generator=self.gen, dtype=torch.float64) * scale
        return t.to(dtype or self.dtype).to(self.device)


def up(*ts):
    """fp64 copies (None stays None): exact, since fp64 holds every fp32/bf16/fp16 value."""
    return [None if t is None else t.double() for t in ts]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def assert_accurate(out: torch.Tensor, ref: torch.Tensor, naive: torch.Tensor, dtype: torch.dtype, what=""):
    """out (dtype X) vs the fp64 ref: within FACTOR x the naive dtype-X error (+ a rounding's slack)."""
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    err, err_naive = rel_err(out, ref), rel_err(naive, ref)
    # Slack for the case where the naive formula happens to be exact (a softmax over one key): one rounding
    # to X plus a few roundings of the kernel's internal fp32 arithmetic.
    slack = torch.finfo(dtype).eps / 2 + 4 * torch.finfo(torch.float32).eps / 2
    assert err <= FACTOR * err_naive + slack, f"{what}: rel err {err:.3g} vs naive {dtype} {err_naive:.3g}"
    if dtype == torch.float32:
        assert err <= FP32_MAX_ERR, f"{what}: fp32 rel err {err:.3g}"


# Definitions of the ops, evaluated in whatever dtype their inputs have (fp64 for the reference, dtype X for
# the naive baseline). Written from the math, not from ditserve.ops.functional.


def def_rms(x, w, eps):
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if w is None else y * w


def def_layer(x, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def def_norm(x, w, eps, rms):
    if rms:
        return def_rms(x, w, eps)
    y = def_layer(x, eps)
    return y if w is None else y * w


def def_modulate(x, w, scale, shift, eps, rms):
    return def_norm(x, w, eps, rms) * (1 + scale) + shift


def mod_shape(B, L, D, modulation):
    return (B, 1, D) if modulation == "sample" else (B, L, D)


# ----------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 16, 8), (2, 7, 33, 17), (3, 64, 96, 160)])
def test_linear_parity(shape, bias, dtype, device):
    B, L, din, dout = shape
    r = Inputs(0, dtype, device)
    op = Linear(din, dout, bias=bias, ops=NATIVE_OPS, dtype=dtype, device=device)
    assert op.cast_bias is False
    x = r(B, L, din)
    out = op(x)
    w, b = op.weight.detach(), (op.bias.detach() if bias else None)

    def define(x, w, b):
        y = x @ w.T
        return y if b is None else y + b

    assert_accurate(out, define(*up(x, w, b)), define(x, w, b), dtype, "linear")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_bias_dtype_is_cast_once(dtype, device):
    """A bias kept in fp32 beside half-precision weights is cast to the activation dtype in forward."""
    r = Inputs(1, dtype, device)
    op = Linear(33, 17, ops=NATIVE_OPS, dtype=dtype, device=device, bias_dtype=torch.float32)
    assert op.cast_bias is True
    assert op.weight.dtype == dtype and op.bias.dtype == torch.float32
    x = r(2, 7, 33)
    out = op(x)
    w, b = op.weight.detach(), op.bias.detach()
    ref = up(x)[0] @ w.double().T + b.double()
    naive = x @ w.T + b.to(dtype)
    assert_accurate(out, ref, naive, dtype, "linear bias_dtype")
    # Without the cast F.linear refuses the mixed dtypes: the flag is what makes this work.
    op.cast_bias = False
    with pytest.raises(RuntimeError):
        op(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernels", ["native", "auto"])
def test_linear_gelu_parity(kernels, dtype, device):
    """gelu_tanh(x @ W^T + b), on every path (on a GPU "auto" in an eager model is the cuBLASLt epilogue)."""
    r = Inputs(2, dtype, device)
    op = LinearGELU(48, 80, ops=OpsConfig(device=device, dtype=dtype, kernels=kernels), dtype=dtype, device=device)
    assert op.activation == "gelu_tanh"
    assert op.path == ("cuda" if device == "cuda" and kernels == "auto" and dtype != torch.float32 else "native")
    x = r(2, 9, 48)
    w, b = op.weight.detach(), op.bias.detach()

    def define(x, w, b):
        return F.gelu(x @ w.T + b, approximate="tanh")

    assert_accurate(op(x), define(*up(x, w, b)), define(x, w, b), dtype, f"linear_gelu {op.path}")


def test_linear_cast_bias_constant():
    assert Linear(4, 3, ops=NATIVE_OPS, bias_dtype=torch.float32).cast_bias is False  # same as weight (fp32)
    assert Linear(4, 3, bias=False, ops=NATIVE_OPS, dtype=torch.bfloat16, bias_dtype=torch.float32).cast_bias is False
    assert Linear(4, 3, ops=NATIVE_OPS, dtype=torch.bfloat16).cast_bias is False
    meta = Linear(4, 3, ops=NATIVE_OPS, device="meta", dtype=torch.bfloat16, bias_dtype=torch.float32)
    assert meta.weight.is_meta and meta.cast_bias is True


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(1, 1, 16), (2, 7, 33), (3, 64, 96), (1, 5, 257)])
def test_rms_norm_parity(shape, affine, dtype, path, device):
    r = Inputs(2, dtype, device)
    op = make_op(RMSNorm, path, device, shape[-1], eps=EPS, elementwise_affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            op.weight.copy_(r(shape[-1]))
    x = r(*shape)
    w = op.weight.detach() if affine else None
    out = op(x)
    assert_accurate(out, def_rms(*up(x, w), EPS), def_rms(x, w, EPS), dtype, f"rms_norm[{path}]")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 16), (2, 7, 33), (3, 64, 96), (1, 5, 257)])
def test_layer_norm_parity(shape, dtype, device):
    r = Inputs(3, dtype, device)
    op = LayerNorm(shape[-1], eps=EPS, ops=NATIVE_OPS)
    x = r(*shape, scale=3.0) + 2.0  # a non-zero mean exercises the centring
    out = op(x)
    ref = F.layer_norm(x.double(), shape[-1:], eps=EPS)
    assert_accurate(out, ref, def_layer(x, EPS), dtype, "layer_norm")
    assert rel_err(def_layer(*up(x), EPS), ref) < 1e-12  # the explicit definition is LayerNorm's


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,affine", [("layer", False), ("layer", True), ("rms", False), ("rms", True)])
@pytest.mark.parametrize("shape", SHAPES)
def test_norm_scale_shift_parity(shape, norm, affine, dtype, path, device):
    B, L, D, modulation = shape
    r = Inputs(4, dtype, device)
    op = make_op(NormScaleShift, path, device, D, eps=EPS, norm=norm, elementwise_affine=affine, dtype=dtype)
    if affine:
        with torch.no_grad():
            op.weight.copy_(r(D))
    x = r(B, L, D)
    scale, shift = r(*mod_shape(B, L, D, modulation), scale=0.5), r(*mod_shape(B, L, D, modulation))
    w = op.weight.detach() if affine else None
    rms = norm == "rms"
    out = op(x, scale, shift)
    ref = def_modulate(*up(x, w, scale, shift), EPS, rms)
    assert_accurate(out, ref, def_modulate(x, w, scale, shift, EPS, rms), dtype, f"norm_scale_shift[{path}]")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", FAST_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,affine,gated", [
    ("layer", False, True), ("layer", False, False), ("layer", True, True),
    ("rms", False, True), ("rms", True, True), ("rms", True, False),
])
@pytest.mark.parametrize("shape", SHAPES)
def test_residual_norm_scale_shift_parity(shape, norm, affine, gated, dtype, path, device):
    B, L, D, modulation = shape
    r = Inputs(5, dtype, device)
    op = make_op(ResidualNormScaleShift, path, device, D, eps=EPS, norm=norm, elementwise_affine=affine,
                 dtype=dtype)
    if affine:
        with torch.no_grad():
            op.weight.copy_(r(D))
    ms = mod_shape(B, L, D, modulation)
    x, residual = r(B, L, D), r(B, L, D, scale=2.0)
    gate = r(*ms) if gated else None
    scale, shift = r(*ms, scale=0.5), r(*ms)
    w = op.weight.detach() if affine else None
    rms = norm == "rms"

    def define(x, residual, gate, w, scale, shift):
        new_residual = residual + (x if gate is None else gate * x)
        return def_modulate(new_residual, w, scale, shift, EPS, rms), new_residual

    y, new_residual = op(x, residual, gate, scale, shift)
    y_ref, r_ref = define(*up(x, residual, gate, w, scale, shift))
    y_naive, r_naive = define(x, residual, gate, w, scale, shift)
    assert_accurate(new_residual, r_ref, r_naive, dtype, f"residual_norm_scale_shift[{path}] residual")
    assert_accurate(y, y_ref, y_naive, dtype, f"residual_norm_scale_shift[{path}] out")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", FAST_PATHS)
def test_residual_stream_in_fp32(path, device):
    """bf16 activations with an fp32 residual stream: new residual stays fp32 (at fp32 accuracy), out is bf16."""
    B, L, D = 2, 7, 33
    r = Inputs(6, torch.bfloat16, device)
    op = make_op(ResidualNormScaleShift, path, device, D, eps=EPS, norm="layer")
    x, gate, scale, shift = r(B, L, D), r(B, 1, D), r(B, 1, D), r(B, 1, D)
    residual = r(B, L, D, dtype=torch.float32)
    y, new_residual = op(x, residual, gate, scale, shift)
    assert y.dtype == torch.bfloat16 and new_residual.dtype == torch.float32
    r_ref = residual.double() + gate.double() * x.double()
    assert rel_err(new_residual, r_ref) <= FP32_MAX_ERR
    y_ref = def_modulate(r_ref, None, *up(scale, shift), EPS, False)
    # Computed in fp32 and rounded once to bf16: within one unit roundoff of bf16 (plus fp32 noise).
    assert rel_err(y, y_ref) <= 1.1 * torch.finfo(torch.bfloat16).eps / 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm,affine,with_residual", [
    ("rms", True, True), ("rms", False, False), ("layer", False, True), ("layer", True, False),
])
@pytest.mark.parametrize("shape", SHAPES)
def test_norm_tanh_gate_parity(shape, norm, affine, with_residual, dtype, device):
    B, L, D, modulation = shape
    r = Inputs(7, dtype, device)
    op = NormTanhGate(D, eps=EPS, norm=norm, elementwise_affine=affine, ops=NATIVE_OPS, dtype=dtype).to(device)
    if affine:
        with torch.no_grad():
            op.weight.copy_(r(D))
    x, gate = r(B, L, D), r(*mod_shape(B, L, D, modulation))
    residual = r(B, L, D) if with_residual else None
    w = op.weight.detach() if affine else None
    rms = norm == "rms"

    def define(x, gate, residual, w):
        y = torch.tanh(gate) * def_norm(x, w, EPS, rms)
        return y if residual is None else residual + y

    out = op(x, gate, residual) if with_residual else op(x, gate)
    assert_accurate(out, define(*up(x, gate, residual, w)), define(x, gate, residual, w), dtype, "norm_tanh_gate")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1.0, 0.0, 2.5])
@pytest.mark.parametrize("shape", SHAPES)
def test_mul_add_parity(shape, k, dtype, device):
    B, L, D, modulation = shape
    r = Inputs(8, dtype, device)
    op = MulAdd(k, ops=NATIVE_OPS)
    a, b, c = r(B, L, D), r(*mod_shape(B, L, D, modulation), scale=0.5), r(*mod_shape(B, L, D, modulation))
    out = op(a, b, c)
    a64, b64, c64 = up(a, b, c)
    assert_accurate(out, a64 * (k + b64) + c64, a * (k + b) + c, dtype, "mul_add")


# ----------------------------------------------------------------------------------------------- rotary


def rotary_complex(x64, cos64, sin64, interleaved: bool):
    """RoPE as complex multiplication in fp64: pair (a, b) = a + ib, times e^{i theta} = cos + i sin."""
    D = x64.shape[-1]
    if interleaved:
        z = torch.view_as_complex(x64.reshape(*x64.shape[:-1], D // 2, 2).contiguous())
    else:
        z = torch.complex(x64[..., : D // 2], x64[..., D // 2:])
    rot = torch.complex(cos64, sin64).unsqueeze(-2)  # (.., L, 1, D/2): broadcast over heads
    out = z * rot
    if interleaved:
        return torch.view_as_real(out).flatten(-2)
    return torch.cat((out.real, out.imag), dim=-1)


def rotary_naive(x, cos, sin, interleaved: bool):
    """The rotation evaluated in x's dtype, tables rounded to it too."""
    c, s = cos.to(x.dtype).unsqueeze(-2), sin.to(x.dtype).unsqueeze(-2)
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        return torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    a, b = x.chunk(2, dim=-1)
    return torch.cat((a * c - b * s, a * s + b * c), dim=-1)


def angle_tables(gen, shape, device):
    theta = torch.rand(*shape, generator=gen, dtype=torch.float64) * 40 - 20
    return theta.cos().float().to(device), theta.sin().float().to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("shape,per_sample", [((1, 1, 1, 8), False), ((2, 7, 3, 16), False), ((2, 7, 3, 16), True),
                                              ((2, 33, 2, 128), False)])
def test_rotary_parity(shape, per_sample, interleaved, dtype, device):
    B, L, H, D = shape
    r = Inputs(9, dtype, device)
    x = r(*shape)
    cos, sin = angle_tables(r.gen, (B, L, D // 2) if per_sample else (L, D // 2), device)
    op = Rotary(interleaved, ops=NATIVE_OPS)
    out = op(x, cos, sin)
    ref = rotary_complex(*up(x, cos, sin), interleaved)
    assert_accurate(out, ref, rotary_naive(x, cos, sin, interleaved), dtype, f"rotary[interleaved={interleaved}]")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_layouts_are_permutations(dtype):
    """Half-split RoPE on channels permuted (evens first, then odds) is interleaved RoPE, permuted the same way."""
    B, L, H, D = 2, 5, 3, 16
    r = Inputs(10, dtype, "cpu")
    x = r(B, L, H, D)
    cos, sin = angle_tables(r.gen, (L, D // 2), "cpu")
    perm = torch.cat((torch.arange(0, D, 2), torch.arange(1, D, 2)))
    inter = Rotary(True, ops=NATIVE_OPS)(x, cos, sin)
    half = Rotary(False, ops=NATIVE_OPS)(x[..., perm], cos, sin)
    torch.testing.assert_close(half, inter[..., perm], rtol=0, atol=0)
    assert not torch.equal(Rotary(False, ops=NATIVE_OPS)(x, cos, sin), inter)  # the layouts do differ


def test_rotary_matches_diffusers_layouts():
    """Interleaved = diffusers' FLUX layout (unbind_dim=-1); half-split = unbind_dim=-2 with tables cat'ed."""
    from diffusers.models.embeddings import apply_rotary_emb

    B, L, H, D = 2, 6, 3, 16
    r = Inputs(11, torch.float32, "cpu")
    x = r(B, L, H, D)
    cos, sin = angle_tables(r.gen, (L, D // 2), "cpu")
    ours = Rotary(True, ops=NATIVE_OPS)(x, cos, sin)
    theirs = apply_rotary_emb(x, (cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)), sequence_dim=1)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    ours = Rotary(False, ops=NATIVE_OPS)(x, cos, sin)
    theirs = apply_rotary_emb(x, (torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)), use_real_unbind_dim=-2,
                              sequence_dim=1)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batched", [False, True])
def test_axial_rope_cos_sin_definition(batched):
    axes_dim, theta = (4, 6, 6), 10000.0
    ids = torch.tensor([[0, 0, 0], [0, 1, 2], [3, 5, 7], [1, 63, 17]])
    if batched:
        ids = torch.stack((ids, ids.flip(0)))
    cos, sin = axial_rope_cos_sin(ids, axes_dim, theta)
    assert cos.dtype == torch.float32 and cos.shape == (*ids.shape[:-1], sum(axes_dim) // 2)
    flat_ids = ids.reshape(-1, 3).tolist()
    flat_cos, flat_sin = cos.reshape(len(flat_ids), -1), sin.reshape(len(flat_ids), -1)
    for row, pos in enumerate(flat_ids):
        col = 0
        for axis, dim in enumerate(axes_dim):
            for j in range(dim // 2):
                angle = pos[axis] * theta ** (-2 * j / dim)
                assert flat_cos[row, col].item() == pytest.approx(math.cos(angle), abs=1e-6)
                assert flat_sin[row, col].item() == pytest.approx(math.sin(angle), abs=1e-6)
                col += 1


def test_axial_rope_matches_diffusers_flux():
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed

    axes_dim = [16, 56, 56]
    hw = torch.randint(0, 64, (20, 2), generator=torch.Generator().manual_seed(0))
    ids = torch.cat((torch.zeros(20, 1), hw), dim=1)  # FLUX's (t, h, w) ids
    cos, sin = axial_rope_cos_sin(ids, axes_dim, 10000.0)
    d_cos, d_sin = FluxPosEmbed(theta=10000, axes_dim=axes_dim)(ids)
    # diffusers repeats each angle twice (interleaved layout); we keep one per channel pair.
    torch.testing.assert_close(cos, d_cos[:, 0::2].float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, d_sin[:, 0::2].float(), rtol=0, atol=1e-6)


def test_axial_rope_rejects_bad_axes():
    with pytest.raises(ValueError, match="axes"):
        axial_rope_cos_sin(torch.zeros(3, 2), [4, 4, 4], 10000.0)
    with pytest.raises(ValueError, match="even"):
        axial_rope_cos_sin(torch.zeros(3, 2), [4, 5], 10000.0)


# ----------------------------------------------------------------------------------------------- attention


def attention_definition(q, k, v, mask=None):
    """softmax(q k^T / sqrt(D)) v on (B, L, H, D) tensors; mask: bool (True = attend) or additive."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.to(q.dtype)
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("B,Lq,Lk,H,D", [(1, 1, 1, 1, 8), (2, 7, 7, 3, 16), (2, 5, 12, 2, 64), (1, 33, 33, 2, 128)])
def test_attention_sdpa_parity(B, Lq, Lk, H, D, mask_kind, dtype, device):
    r = Inputs(12, dtype, device)
    q, k, v = r(B, Lq, H, D), r(B, Lk, H, D), r(B, Lk, H, D)
    mask = None
    if mask_kind is not None:
        keep = torch.rand(B, 1, Lq, Lk, generator=r.gen) < 0.6
        keep[..., 0] = True  # every query attends to something
        keep = keep.to(device)
        mask = keep if mask_kind == "bool" else torch.where(keep, 0.0, -1e4).to(dtype)
    out = Attention("sdpa")(q, k, v, mask)
    ref = attention_definition(*up(q, k, v), mask)
    assert_accurate(out, ref, attention_definition(q, k, v, mask), dtype, f"attention[mask={mask_kind}]")
    if mask_kind is not None and Lk > 1:  # the mask really changes the result
        assert rel_err(Attention("sdpa")(q, k, v), ref) > 1e-3


def test_attention_unknown_backend_lists_known():
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash3'.*sdpa.*flash-attn.*sage"):
        Attention("flash3")


@pytest.mark.parametrize("backend,package", [("flash-attn", "flash-attn"), ("sage", "sageattention"),
                                             ("fa3", "fa3-fwd")])
def test_attention_missing_package_named(backend, package, monkeypatch):
    import importlib.util

    from ditserve.ops import attention as A

    real_find_spec = importlib.util.find_spec
    modules = (A.BACKENDS[backend][0], *A.ALTERNATIVE_MODULES.get(backend, ()))

    def find_spec(name, *args):
        return None if name in modules else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ValueError, match=f"{package}.*not installed"):
        Attention(backend)


@pytest.mark.parametrize("backend,module,func", [("flash-attn", "flash_attn", "flash_attn_func"),
                                                 ("fa3", "flash_attn_interface", "flash_attn_func"),
                                                 ("fa4", "flash_attn.cute", "flash_attn_func"),
                                                 ("sage", "sageattention", "sageattn")])
def test_attention_package_backends_layout_and_mask(backend, module, func, monkeypatch):
    """The wrappers hand (B, L, H, D) tensors straight to the package, and refuse a mask they cannot apply."""
    import importlib.machinery
    import sys
    import types

    from ditserve.ops import attention as A

    calls = []
    # fake packages (every parent too): the module the backend calls, and the one its availability check finds
    fakes: dict[str, types.ModuleType] = {}
    for name in (module, A.BACKENDS[backend][0]):
        parts = name.split(".")
        for sub in (".".join(parts[:i]) for i in range(1, len(parts) + 1)):
            if sub not in fakes:
                fakes[sub] = types.ModuleType(sub)
                fakes[sub].__spec__ = importlib.machinery.ModuleSpec(sub, loader=None, is_package=True)
                fakes[sub].__path__ = []
                monkeypatch.setitem(sys.modules, sub, fakes[sub])
    setattr(fakes[module], func, lambda q, k, v, **kw: calls.append((q.shape, kw)) or q + 1)
    attn = Attention(backend)
    assert attn.supports_mask is False
    q = torch.zeros(2, 7, 3, 16)
    out = attn(q, q, q)
    assert torch.equal(out, q + 1) and calls[0][0] == (2, 7, 3, 16)
    with pytest.raises(ValueError, match="mask"):
        attn(q, q, q, torch.ones(2, 1, 7, 7, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------- compile

# name -> (build(ops) -> module, inputs(r, L) -> tuple). L is the (dynamic) sequence length; other sizes are
# chosen so that no other dim equals L.
B_, D_, H_ = 2, 32, 2


def _rotary_inputs(r, L):
    cos, sin = angle_tables(r.gen, (L, 8), r.device)
    return r(B_, L, H_, 16), cos, sin


COMPILE_CASES = {
    "linear": (lambda ops: Linear(D_, 24, ops=ops), lambda r, L: (r(B_, L, D_),)),
    "linear_gelu": (lambda ops: LinearGELU(D_, 24, ops=ops), lambda r, L: (r(B_, L, D_),)),
    "linear_bias_dtype": (lambda ops: Linear(D_, 24, ops=ops, dtype=torch.bfloat16, bias_dtype=torch.float32),
                          lambda r, L: (r(B_, L, D_, dtype=torch.bfloat16),)),
    "rms_norm": (lambda ops: RMSNorm(D_, ops=ops), lambda r, L: (r(B_, L, D_),)),
    "rms_norm_no_weight": (lambda ops: RMSNorm(D_, elementwise_affine=False, ops=ops), lambda r, L: (r(B_, L, D_),)),
    "layer_norm": (lambda ops: LayerNorm(D_, ops=ops), lambda r, L: (r(B_, L, D_),)),
    "norm_scale_shift": (lambda ops: NormScaleShift(D_, ops=ops),
                         lambda r, L: (r(B_, L, D_), r(B_, 1, D_), r(B_, 1, D_))),
    "norm_scale_shift_rms_token": (lambda ops: NormScaleShift(D_, norm="rms", elementwise_affine=True, ops=ops),
                                   lambda r, L: (r(B_, L, D_), r(B_, L, D_), r(B_, L, D_))),
    "residual_norm_scale_shift": (lambda ops: ResidualNormScaleShift(D_, ops=ops),
                                  lambda r, L: (r(B_, L, D_), r(B_, L, D_), r(B_, 1, D_), r(B_, 1, D_), r(B_, 1, D_))),
    "residual_norm_scale_shift_no_gate": (
        lambda ops: ResidualNormScaleShift(D_, norm="rms", elementwise_affine=True, ops=ops),
        lambda r, L: (r(B_, L, D_), r(B_, L, D_), None, r(B_, 1, D_), r(B_, 1, D_))),
    "norm_tanh_gate": (lambda ops: NormTanhGate(D_, norm="rms", elementwise_affine=True, ops=ops),
                       lambda r, L: (r(B_, L, D_), r(B_, 1, D_), r(B_, L, D_))),
    "norm_tanh_gate_no_residual": (lambda ops: NormTanhGate(D_, ops=ops), lambda r, L: (r(B_, L, D_), r(B_, 1, D_))),
    "mul_add": (lambda ops: MulAdd(1.0, ops=ops), lambda r, L: (r(B_, L, D_), r(B_, 1, D_), r(B_, 1, D_))),
    "rotary_interleaved": (lambda ops: Rotary(True, ops=ops), _rotary_inputs),
    "rotary_half_split": (lambda ops: Rotary(False, ops=ops), _rotary_inputs),
    "attention": (lambda ops: Attention("sdpa"), lambda r, L: (r(B_, L, H_, 16), r(B_, L, H_, 16), r(B_, L, H_, 16))),
    "attention_mask": (lambda ops: Attention("sdpa"),
                       lambda r, L: (r(B_, L, H_, 16), r(B_, L, H_, 16), r(B_, L, H_, 16),
                                     torch.ones(L, L, dtype=torch.bool, device=r.device).tril())),
}
CUSTOM_OP_CASES = ["rms_norm", "rms_norm_no_weight", "norm_scale_shift", "norm_scale_shift_rms_token",
                   "residual_norm_scale_shift", "residual_norm_scale_shift_no_gate"]
COMPILE_PARAMS = [(name, "native") for name in COMPILE_CASES] + [(name, "custom") for name in CUSTOM_OP_CASES]


def mark_seq_dynamic(args, L):
    """Mark every dim of size L dynamic (the sequence dims, in every tensor that has one)."""
    for t in args:
        if isinstance(t, torch.Tensor):
            dims = [i for i, n in enumerate(t.shape) if n == L]
            if dims:
                torch._dynamo.mark_dynamic(t, dims)
    return args


class GraphCounter(CompileCounter):
    """CompileCounter that also keeps the graphs it was given."""

    def __init__(self):
        super().__init__()
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return super().__call__(gm, example_inputs)


def _outputs(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name,path", COMPILE_PARAMS)
def test_compile_fullgraph_no_recompile(name, path, device):
    build, inputs = COMPILE_CASES[name]
    op = build(NATIVE_OPS).to(device)
    if path == "custom":
        op._impl = op.forward_cuda
    r = Inputs(13, torch.float32, device)
    counter = GraphCounter()
    compiled = torch.compile(op, fullgraph=True, backend=counter)
    for L in (7, 13):
        args = mark_seq_dynamic(inputs(r, L), L)
        for got, want in zip(_outputs(compiled(*args)), _outputs(op(*args))):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert counter.frame_count == 1, f"{name}[{path}]: {counter.frame_count} graphs for two sequence lengths"
    if path == "custom":
        # The custom op is one opaque node: nothing else is computed in the graph (getitem unpacks a tuple).
        nodes = counter.graphs[0].graph.nodes
        calls = [n for n in nodes if n.op == "call_function" and n.target is not operator.getitem]
        targets = [str(n.target) for n in calls]
        assert len(calls) == 1 and targets[0].startswith("ditserve."), targets


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_compile_inductor_norm_scale_shift(device):
    """Inductor fuses the native AdaLN modulation; same result as eager, one graph for two lengths."""
    op = NormScaleShift(D_, norm="rms", elementwise_affine=True, ops=NATIVE_OPS, dtype=torch.bfloat16).to(device)
    r = Inputs(14, torch.bfloat16, device)
    counter = CompileCounter()

    def backend(gm, example_inputs):
        counter(gm, example_inputs)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)

    compiled = torch.compile(op, fullgraph=True, backend=backend)
    for L in (7, 13):
        x, scale, shift = mark_seq_dynamic((r(B_, L, D_), r(B_, 1, D_), r(B_, 1, D_)), L)
        out = compiled(x, scale, shift)
        ref = def_modulate(*up(x, op.weight.detach(), scale, shift), 1e-6, True)
        naive = def_modulate(x, op.weight.detach(), scale, shift, 1e-6, True)
        assert_accurate(out, ref, naive, torch.bfloat16, "inductor norm_scale_shift")
    assert counter.frame_count == 1


# ----------------------------------------------------------------------------------------------- path selection

FAKE_CUDA = Platform("cuda", "fake GPU", (9, 0), supports_bf16=True, supports_amp=True, supports_fp8=True,
                     has_triton=True)
FAST_OP_CLASSES = [RMSNorm, NormScaleShift, ResidualNormScaleShift]
NATIVE_ONLY_CLASSES = [LayerNorm, NormTanhGate, MulAdd, Rotary, Linear]


def _build(cls, ops):
    if cls is Linear:
        return Linear(4, 4, ops=ops)
    if cls is Rotary:
        return Rotary(True, ops=ops)
    if cls is MulAdd:
        return MulAdd(1.0, ops=ops)
    return cls(16, ops=ops)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Make ops believe they are built for a CUDA device with Triton (the selection logic, no GPU needed)."""
    import ditserve.ops.base as base

    monkeypatch.setattr(base, "platform_for", lambda device: FAKE_CUDA)


def test_has_fast_path():
    assert all(cls.has_fast_path() for cls in FAST_OP_CLASSES)
    assert not any(cls.has_fast_path() for cls in NATIVE_ONLY_CLASSES)


@pytest.mark.parametrize("cls", FAST_OP_CLASSES + NATIVE_ONLY_CLASSES)
def test_native_config_selects_native(cls, fake_cuda):
    op = _build(cls, OpsConfig(device="cuda", dtype=torch.bfloat16, kernels="native"))
    assert op.path == "native" and op._impl == op.forward_native
    assert "path=native" in repr(op)


@pytest.mark.parametrize("cls", FAST_OP_CLASSES + NATIVE_ONLY_CLASSES)
def test_auto_on_cpu_selects_native(cls):
    for dtype in DTYPES:
        assert _build(cls, OpsConfig(device="cpu", dtype=dtype)).path == "native"


@pytest.mark.parametrize("device", ["cpu", "mps", "xpu", "npu", "musa"])
def test_triton_without_triton_platform_raises(device):
    with pytest.raises(ValueError, match=rf"kernels='triton'.*{device!r}"):
        RMSNorm(16, ops=OpsConfig(device=device, kernels="triton"))


@pytest.mark.parametrize("device", ["mps", "xpu", "npu", "musa"])
def test_other_accelerators_run_native(device):
    """Recognised accelerators without our kernels get the native path (no device needed to construct)."""
    assert RMSNorm(16, ops=OpsConfig(device=device, dtype=torch.bfloat16)).path == "native"


def test_bad_kernels_choice():
    with pytest.raises(ValueError, match="kernels"):
        OpsConfig(kernels="fast")


@pytest.mark.parametrize("cls", FAST_OP_CLASSES)
def test_triton_selects_fast_path_for_half_dtypes_only(cls, fake_cuda):
    for dtype in (torch.bfloat16, torch.float16):
        op = _build(cls, OpsConfig(device="cuda", dtype=dtype, kernels="triton"))
        assert op.path == "cuda" and op._impl == op.forward_cuda
    # fp32 stays native: compiled native code beats the kernel there.
    assert _build(cls, OpsConfig(device="cuda", dtype=torch.float32, kernels="triton")).path == "native"


@pytest.mark.parametrize("cls", NATIVE_ONLY_CLASSES)
def test_triton_keeps_native_for_ops_without_kernel(cls, fake_cuda):
    assert _build(cls, OpsConfig(device="cuda", dtype=torch.bfloat16, kernels="triton")).path == "native"


def test_auto_follows_fast_by_default_when_compiled(fake_cuda):
    """Compiled models take a kernel only where it beat inductor's fused native code (FAST_BY_DEFAULT)."""
    class Measured(RMSNorm):
        FAST_BY_DEFAULT = True

    class Unmeasured(RMSNorm):
        FAST_BY_DEFAULT = False

    bf16 = OpsConfig(device="cuda", dtype=torch.bfloat16, kernels="auto", compiled=True)
    assert Measured(16, ops=bf16).path == "cuda"
    assert Unmeasured(16, ops=bf16).path == "native"
    assert Measured(16, ops=OpsConfig(device="cuda", dtype=torch.float32, compiled=True)).path == "native"


@pytest.mark.parametrize("cls", FAST_OP_CLASSES)
def test_auto_takes_every_kernel_when_eager(cls, fake_cuda):
    """Eager models take every applicable kernel (the native reference is several fp32 launches there),
    whatever FAST_BY_DEFAULT says; fp32 and ops without a kernel stay native."""
    assert _build(cls, OpsConfig(device="cuda", dtype=torch.bfloat16, compiled=False)).path == "cuda"
    assert _build(cls, OpsConfig(device="cuda", dtype=torch.float32, compiled=False)).path == "native"


@pytest.mark.parametrize("cls", NATIVE_ONLY_CLASSES)
def test_auto_eager_keeps_native_for_ops_without_kernel(cls, fake_cuda):
    assert _build(cls, OpsConfig(device="cuda", dtype=torch.bfloat16, compiled=False)).path == "native"


def test_fake_cuda_without_triton_raises_for_triton(monkeypatch):
    import dataclasses

    import ditserve.ops.base as base

    monkeypatch.setattr(base, "platform_for", lambda device: dataclasses.replace(FAKE_CUDA, has_triton=False))
    with pytest.raises(ValueError, match="triton importable: False"):
        RMSNorm(16, ops=OpsConfig(device="cuda", kernels="triton"))
    assert RMSNorm(16, ops=OpsConfig(device="cuda", dtype=torch.bfloat16)).path == "native"


def test_forward_calls_the_bound_impl():
    op = RMSNorm(16, ops=NATIVE_OPS)
    op._impl = lambda *args, **kwargs: ("bound", args, kwargs)
    assert op(1, eps=2) == ("bound", (1,), {"eps": 2})


def test_base_class_paths_unimplemented():
    op = CustomOp(NATIVE_OPS)
    assert not CustomOp.has_fast_path()
    with pytest.raises(NotImplementedError):
        op(torch.zeros(1))


@pytest.mark.gpu
def test_triton_selected_on_real_gpu():
    from ditserve.kernels import norm as K

    assert K.TRITON_REGISTERED
    op = RMSNorm(64, ops=OpsConfig(device="cuda", dtype=torch.bfloat16, kernels="triton"))
    assert op.path == "cuda"


def test_fa3_backend_uses_the_forward_only_wheel_when_the_official_module_is_absent(monkeypatch):
    """fa3: flash-attention's own `flash_attn_interface` first; else the fa3-fwd wheel's `fa3_fwd_interface`,
    called with (B, L, H, D) tensors; a tuple result (out, lse) gives its out."""
    import importlib.machinery
    import importlib.util
    import sys
    import types

    from ditserve.ops import attention as A

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn_interface" else real_find_spec(name, *a))
    fake = types.ModuleType("fa3_fwd_interface")
    fake.__spec__ = importlib.machinery.ModuleSpec("fa3_fwd_interface", loader=None)
    calls = []
    fake.flash_attn_func = lambda q, k, v: calls.append(q.shape) or (q * 2, None)
    monkeypatch.setitem(sys.modules, "fa3_fwd_interface", fake)
    assert A.attention_backend_available("fa3")
    q = torch.ones(1, 5, 2, 8)
    assert torch.equal(Attention("fa3")(q, q, q), q * 2) and calls == [(1, 5, 2, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["fa3", "fa4"])
def test_package_backend_matches_sdpa_and_compiles_fullgraph(backend):
    """FlashAttention-3 / flash-attn-4 (when installed): SDPA's result at FLUX's head dim, and one opaque node in a
    compiled graph with a dynamic sequence length (no recompile)."""
    from ditserve.ops.attention import attention_backend_available

    if not attention_backend_available(backend):
        pytest.skip(f"the {backend} backend's package is not installed here")
    if torch.cuda.get_device_capability()[0] not in CUDA_MAJORS[backend]:
        pytest.skip(f"{backend}'s kernels do not run on this GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 333, 4, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    fa4, sdpa = Attention(backend), Attention("sdpa")
    ref = sdpa(q, k, v)
    assert rel_err(fa4(q, k, v), ref) < 1e-2
    f = torch.compile(lambda a, b, c: fa4(a * 1, b, c) + 1, fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for L in (333, 517):
            q, k, v = (torch.randn(1, L, 4, 128, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            assert rel_err(f(q, k, v), sdpa(q, k, v) + 1) < 1e-2


def test_attention_auto_resolves_per_model_and_device(monkeypatch):
    """--attention auto: FlashAttention-3 for long-sequence (video) models on a Hopper GPU where it is installed;
    sdpa for image models, on other devices, and where FA3 is missing. A named backend stays itself."""
    from ditserve.ops import attention as A

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    capability = [(9, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability[0])
    installed = [True]
    monkeypatch.setattr(A, "attention_backend_available", lambda name: name == "sdpa" or installed[0])
    assert A.resolve_backend("auto", cuda, long_sequences=True) == "fa3"
    assert A.resolve_backend("auto", cuda, long_sequences=False) == "sdpa"  # cuDNN is faster at image lengths
    assert A.resolve_backend("auto", cpu, long_sequences=True) == "sdpa"
    assert A.resolve_backend("sage", cuda, long_sequences=True) == "sage"
    assert A.resolve_backend("auto", cuda, long_sequences=True, head_dim=128) == "fa3"
    assert A.resolve_backend("auto", cuda, long_sequences=True, head_dim=12) == "sdpa"  # not a multiple of 8
    capability[0] = (10, 0)  # FA3's kernels are SM90 only
    assert A.resolve_backend("auto", cuda, long_sequences=True) == "sdpa"
    capability[0], installed[0] = (9, 0), False
    assert A.resolve_backend("auto", cuda, long_sequences=True) == "sdpa"
    with pytest.raises(ValueError, match="resolved when the model is built"):
        Attention("auto")


def test_build_dit_resolves_auto_attention():
    """The loader builds a model with the backend `auto` resolved to (sdpa here: a CPU), never 'auto' itself."""
    from ditserve.config import EngineConfig
    from ditserve.loader.components import build_dit
    from ditserve.testing_wan import tiny_wan_transformer

    config = dict(tiny_wan_transformer(0).config)
    model = build_dit("WanTransformer3DModel", config, EngineConfig(device="cpu", dtype="fp32"), None)
    backends = {m.backend for m in model.modules() if isinstance(m, Attention)}
    assert backends == {"sdpa"}


@pytest.mark.gpu
def test_auto_attention_video_model_on_gpu_matches_sdpa():
    """On the GPU, `auto` builds a video model (Wan) with FlashAttention-3 where it is installed and runs, at
    head dim 64; its output is SDPA's (bf16 noise)."""
    from ditserve.config import EngineConfig
    from ditserve.loader.components import build_dit
    from ditserve.ops.attention import resolve_backend
    from ditserve.testing_wan import tiny_wan_transformer

    config = dict(tiny_wan_transformer(0).config)
    config.update(attention_head_dim=64, rope_max_seq_len=64)  # FA3 takes multiples of 8
    want = resolve_backend("auto", torch.device("cuda"), True, 64)
    auto = build_dit("WanTransformer3DModel", config, EngineConfig(device="cuda", dtype="bf16"), None)
    sdpa = build_dit("WanTransformer3DModel", config, EngineConfig(device="cuda", dtype="bf16", attention="sdpa"),
                     None)
    sdpa.load_state_dict(auto.state_dict())
    assert {m.backend for m in auto.modules() if isinstance(m, Attention)} == {want}
    inputs = auto.example_inputs(auto.config, 64, 96, text_len=16, num_frames=9, device="cuda",
                                 dtype=torch.bfloat16)
    with torch.inference_mode():
        assert rel_err(auto(**inputs).float(), sdpa(**inputs).float()) < 2e-2
