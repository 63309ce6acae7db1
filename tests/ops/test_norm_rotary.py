"""The fused q/k norm + RoPE op: `ditserve::rms_norm_rotary` (ditserve/kernels/rotary.py), its Triton kernel
(ditserve/kernels/triton_rotary.py, gpu-marked tests) and the `RMSNormRotary` op class.

The reference is the composition FLUX's blocks ran before the op existed: each part RMSNorm-ed with its own
weight, concatenated over tokens, rotated. The kernel must match it (same roundings: in fp16 bit-exact but for
fp32 noise at rounding boundaries, as accurate as it against fp64), read strided views in place, write every
output element, and stay one opaque node under torch.compile.
"""

from __future__ import annotations

import pytest
import torch

from ditserve.kernels import rotary as K
from ditserve.ops import OpsConfig, RMSNorm, RMSNormRotary, Rotary
from ditserve.ops import functional as Fn

EPS = 1e-6
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def make(B, Ls, H, D, dtype, device, batched_tables=False, seed=0):
    """Parts of xs as the k slices of fused [q | k | v] projections (strided views), weights, cos/sin."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for L in Ls:
        qkv = (torch.randn(B, L, 3 * H * D + 16, generator=g) * 2 + 0.3).to(dtype).to(device)
        xs.append(qkv[..., H * D:2 * H * D].unflatten(-1, (H, D)))
    ws = [(torch.randn(D, generator=g) * 0.5 + 1).to(dtype).to(device) for _ in Ls]
    S = sum(Ls)
    ang = torch.randn((B, S, D // 2) if batched_tables else (S, D // 2), generator=g) * 3
    return xs, ws, ang.cos().to(device), ang.sin().to(device)


def unfused(xs, ws, cos, sin, interleaved):
    """What FLUX's blocks computed with separate ops (RMSNorm modules, torch.cat, Rotary)."""
    native = OpsConfig(device="cpu", kernels="native")
    normed = []
    for x, w in zip(xs, ws):
        norm = RMSNorm(x.shape[-1], eps=EPS, ops=native, dtype=w.dtype)
        norm.weight.data.copy_(w)
        normed.append(norm(x))
    return Rotary(interleaved, ops=native)(torch.cat(normed, dim=1), cos, sin)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("Ls", [(5,), (3, 7)])
def test_reference_is_the_unfused_composition(interleaved, Ls):
    xs, ws, cos, sin = make(2, Ls, 3, 16, torch.bfloat16, "cpu")
    out = Fn.rms_norm_rotary(xs, ws, cos, sin, EPS, interleaved)
    assert out.shape == (2, sum(Ls), 3, 16) and out.dtype == torch.bfloat16
    assert torch.equal(out, unfused(xs, ws, cos, sin, interleaved))
    # each part really uses its own weight and its own rows of the tables
    if len(Ls) == 2:
        swapped = Fn.rms_norm_rotary(xs, ws[::-1], cos, sin, EPS, interleaved)
        assert not torch.equal(out, swapped)


def _opcheck_cases(device):
    xs, ws, cos, sin = make(2, (3, 5), 2, 16, torch.bfloat16, device)
    xb, wb, cb, sb = make(2, (4,), 1, 8, torch.float32, device, batched_tables=True)
    return [(xs, ws, cos, sin, EPS, True), (xs[:1], ws[:1], cos[:3], sin[:3], EPS, False),
            ([x.contiguous() for x in xb], wb, cb, sb, 1e-5, True)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", range(3))
def test_opcheck(device, case):
    torch.library.opcheck(torch.ops.ditserve.rms_norm_rotary.default, _opcheck_cases(device)[case])


def test_op_class_compiles_fullgraph_with_dynamic_tokens():
    """One graph for three sequence lengths (CPU, aot_eager: the op stays one node; no graph break)."""
    op = RMSNormRotary(16, eps=EPS, ops=OpsConfig(device="cpu", dtype=torch.float32))

    def f(a, b, wa, wb, cos, sin):
        return op((a, b), (wa, wb), cos, sin) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for L in (6, 10, 18):  # (S = 3 + L never equals D/2 = 8: no duck-sized guard)
            xs, ws, cos, sin = make(1, (3, L), 2, 16, torch.float32, "cpu")
            torch.testing.assert_close(compiled(*xs, *ws, cos, sin),
                                       2 * Fn.rms_norm_rotary(xs, ws, cos, sin, EPS, True))


# ------------------------------------------------------------------------------------------ the kernel (GPU)


def _kernel():
    from ditserve.kernels import triton_rotary

    return triton_rotary


def _rel(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
def test_triton_kernel_is_registered():
    assert K.TRITON_REGISTERED


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("B,Ls,H,D,batched", [(1, (4608,), 24, 128, False), (1, (512, 4096), 24, 128, False),
                                              (2, (7, 33), 3, 64, True), (3, (1, 2, 5), 1, 16, False)])
def test_kernel_matches_reference(dtype, interleaved, B, Ls, H, D, batched):
    xs, ws, cos, sin = make(B, Ls, H, D, dtype, "cuda", batched)
    S = sum(Ls)
    poisoned = torch.full((B, S, H, D), float("nan"), device="cuda", dtype=dtype)
    out = _kernel().rms_norm_rotary(xs, ws, cos, sin, EPS, interleaved, out=poisoned)
    native = Fn.rms_norm_rotary(xs, ws, cos, sin, EPS, interleaved)
    ref = Fn.rms_norm_rotary([x.double() for x in xs], [w.double() for w in ws], cos.double(), sin.double(), EPS,
                             interleaved)
    assert out.shape == (B, S, H, D) and out.dtype == dtype and out.is_contiguous()
    assert not out.isnan().any()  # every element written
    assert _rel(out, ref) <= 2 * _rel(native, ref) + 1e-6
    if dtype != torch.float32:  # same fp32 math and roundings: differences only at rounding boundaries
        assert (out != native).float().mean().item() < 0.01


@pytest.mark.gpu
def test_kernel_falls_back_for_other_head_dims():
    xs, ws, cos, sin = make(1, (5,), 2, 24, torch.bfloat16, "cuda")  # D = 24: not a power of two
    out = _kernel().rms_norm_rotary(xs, ws, cos, sin, EPS, True)
    assert torch.equal(out, Fn.rms_norm_rotary(xs, ws, cos, sin, EPS, True))


@pytest.mark.gpu
def test_kernel_bad_shapes_raise():
    xs, ws, cos, sin = make(1, (3, 5), 2, 16, torch.bfloat16, "cuda")
    T = _kernel()
    with pytest.raises(ValueError, match="cos/sin"):
        T.rms_norm_rotary(xs, ws, cos[:7], sin[:7], EPS, True)
    with pytest.raises(ValueError, match="weight"):
        T.rms_norm_rotary(xs, ws[:1], cos, sin, EPS, True)
    with pytest.raises(ValueError, match="weight"):
        T.rms_norm_rotary(xs, [w[:8] for w in ws], cos, sin, EPS, True)


@pytest.mark.gpu
def test_op_class_takes_the_kernel_compiled_and_new_lengths_compile_nothing(monkeypatch):
    import triton

    op = RMSNormRotary(128, eps=EPS, ops=OpsConfig(device="cuda", dtype=torch.bfloat16, compiled=True))
    assert op.path == "cuda"  # FAST_BY_DEFAULT: compiled models take the kernel under kernels="auto"
    assert RMSNormRotary(128, ops=OpsConfig(device="cuda", kernels="native")).path == "native"
    op.warm(torch.device("cuda"), torch.bfloat16)
    compiled: list[str] = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", lambda *a, **kw: compiled.append(kw["fn"].name))
    f = torch.compile(lambda a, b, wa, wb, c, s: op((a, b), (wa, wb), c, s), fullgraph=True, dynamic=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for L in (65, 333, 1000):  # (no L equals D/2 = 64: no duck-sized guard)
            xs, ws, cos, sin = make(1, (17, L), 4, 128, torch.bfloat16, "cuda")
            out = f(*xs, *ws, cos, sin)
            native = Fn.rms_norm_rotary(xs, ws, cos, sin, EPS, True)
            assert (out != native).float().mean().item() < 0.01
    assert "_rms_norm_rotary_kernel" not in compiled  # the warm call compiled the variant the calls use
