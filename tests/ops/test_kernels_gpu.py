"""The Triton norm kernels (ditserve/kernels/triton_norm.py) on CUDA: accuracy against an fp64 reference,
bit-level agreement with the native path in half precision, full writes, layouts, opcheck, compile.

Error rule (DESIGN §3.4): ‖kernel − ref64‖ / ‖ref64‖ ≤ 2 × the same error of the native path at the
same dtype (+ 1e-6 so fp32's ~1e-7 errors are not judged on rounding noise).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ditserve.kernels import norm as K
from ditserve.ops import NormScaleShift, OpsConfig, ResidualNormScaleShift, RMSNorm
from ditserve.ops import functional as Fn

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (B, L, D): FLUX's and Wan's widths, a per-head width, a large width, and odd widths/row counts.
SHAPES = [(1, 37, 3072), (2, 129, 5120), (3, 255, 128), (1, 7, 8192), (5, 11, 200)]
EPS = 1e-6


def _triton():
    """The kernel module (imports triton, so only inside GPU tests)."""
    from ditserve.kernels import triton_norm

    return triton_norm


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def _d(t):
    return None if t is None else t.double()


def _check(out: torch.Tensor, native: torch.Tensor, ref: torch.Tensor) -> None:
    """out (kernel) is as accurate as native against ref (fp64), and in half precision rounds like native."""
    assert out.dtype == native.dtype and out.shape == native.shape and out.is_contiguous()
    assert not out.isnan().any()
    err, err_native = _rel(out, ref), _rel(native, ref)
    assert err <= 2 * err_native + 1e-6, (err, err_native)
    if out.dtype in (torch.bfloat16, torch.float16):
        # Same fp32 math, one rounding: outputs differ only where fp32 noise straddles a rounding boundary.
        mismatch = (out != native).float().mean().item()
        assert mismatch < 0.01, mismatch


def _inputs(B, L, D, dtype, per_token: bool, n_mod: int, seed: int = 0):
    """x (B, L, D) with a non-zero mean, and n_mod modulation tensors (B, 1|L, D) sliced from one vector
    as models do (chunk over the last dim, so they are not contiguous)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = (torch.randn(B, L, D, generator=g, device="cuda") * 2 + 0.3).to(dtype)
    emb = (torch.randn(B, L if per_token else 1, n_mod * D, generator=g, device="cuda") * 0.5).to(dtype)
    return x, emb.chunk(n_mod, dim=-1)


def _weight(D, dtype, has_weight: bool):
    return (torch.randn(D, device="cuda") * 0.5 + 1).to(dtype) if has_weight else None


# ------------------------------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("has_weight", [True, False])
def test_rms_norm_matches_reference(dtype, shape, has_weight):
    B, L, D = shape
    x, _ = _inputs(B, L, D, dtype, per_token=False, n_mod=1)
    w = _weight(D, dtype, has_weight)
    out = K.rms_norm(x, w, EPS)
    _check(out, Fn.rms_norm(x, w, EPS), Fn.rms_norm(x.double(), _d(w), EPS))


def test_rms_norm_per_head_4d():
    """FLUX's q/k norm: (B, L, H, 128), several rows per program, a row count not a multiple of that."""
    x = torch.randn(1, 37, 24, 128, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(128, device="cuda", dtype=torch.bfloat16) + 0.5
    out = K.rms_norm(x, w, EPS)
    assert out.shape == x.shape
    _check(out, Fn.rms_norm(x, w, EPS), Fn.rms_norm(x.double(), w.double(), EPS))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rms,per_token,has_weight", list(itertools.product([False, True], repeat=3)))
def test_norm_scale_shift_matches_reference(dtype, shape, rms, per_token, has_weight):
    B, L, D = shape
    x, (scale, shift) = _inputs(B, L, D, dtype, per_token, n_mod=2)
    w = _weight(D, dtype, has_weight)
    out = K.norm_scale_shift(x, w, scale, shift, EPS, rms)
    native = Fn.norm_scale_shift(x, w, scale, shift, EPS, rms)
    ref = Fn.norm_scale_shift(x.double(), _d(w), scale.double(), shift.double(), EPS, rms)
    _check(out, native, ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    "rms,per_token,has_gate,has_weight", list(itertools.product([False, True], repeat=4))
)
def test_residual_norm_scale_shift_matches_reference(dtype, shape, rms, per_token, has_gate, has_weight):
    B, L, D = shape
    x, (gate, scale, shift) = _inputs(B, L, D, dtype, per_token, n_mod=3)
    gate = gate if has_gate else None
    residual = torch.randn(B, L, D, device="cuda").to(dtype) * 3
    w = _weight(D, dtype, has_weight)
    y, r = K.residual_norm_scale_shift(x, residual, gate, w, scale, shift, EPS, rms)
    y_n, r_n = Fn.residual_norm_scale_shift(x, residual, gate, w, scale, shift, EPS, rms)
    y_ref, r_ref = Fn.residual_norm_scale_shift(
        x.double(), residual.double(), _d(gate), _d(w), scale.double(), shift.double(), EPS, rms
    )
    _check(r, r_n, r_ref)
    _check(y, y_n, y_ref)


def test_residual_keeps_residual_dtype():
    """bf16 activations on an fp32 residual stream: r stays fp32, y is bf16."""
    x, (gate, scale, shift) = _inputs(2, 33, 3072, torch.bfloat16, per_token=False, n_mod=3)
    residual = torch.randn(2, 33, 3072, device="cuda")
    y, r = K.residual_norm_scale_shift(x, residual, gate, None, scale, shift, EPS, False)
    assert y.dtype == torch.bfloat16 and r.dtype == torch.float32
    y_n, r_n = Fn.residual_norm_scale_shift(x, residual, gate, None, scale, shift, EPS, False)
    y_ref, r_ref = Fn.residual_norm_scale_shift(
        x.double(), residual.double(), gate.double(), None, scale.double(), shift.double(), EPS, False
    )
    _check(r, r_n, r_ref)
    _check(y, y_n, y_ref)


# ------------------------------------------------------------------------------------- writes and layouts


@pytest.mark.parametrize("D", [128, 200, 3072, 5120])  # resident (several rows, one row), looped
def test_every_output_element_is_written(D):
    """Outputs pre-filled with NaN: after the kernel none is left, and the values equal a fresh call's."""
    T = _triton()
    B, L = 3, 37  # 111 rows: not a multiple of the rows per program at D=128
    x, (gate, scale, shift) = _inputs(B, L, D, torch.bfloat16, per_token=True, n_mod=3)
    residual = torch.randn_like(x)

    def nan_like(t):
        return torch.full_like(t, float("nan"))

    y = T.rms_norm(x, None, EPS, out=nan_like(x))
    assert not y.isnan().any() and torch.equal(y, T.rms_norm(x, None, EPS))
    y = T.norm_scale_shift(x, None, scale, shift, EPS, False, out=nan_like(x))
    assert not y.isnan().any() and torch.equal(y, T.norm_scale_shift(x, None, scale, shift, EPS, False))
    y, r = T.residual_norm_scale_shift(
        x, residual, gate, None, scale, shift, EPS, True, out=nan_like(x), residual_out=nan_like(x)
    )
    y2, r2 = T.residual_norm_scale_shift(x, residual, gate, None, scale, shift, EPS, True)
    assert not y.isnan().any() and not r.isnan().any()
    assert torch.equal(y, y2) and torch.equal(r, r2)


@pytest.mark.parametrize("per_token", [False, True])
def test_non_contiguous_inputs(per_token):
    """x / residual transposed views, modulation sliced from a wider tensor: same result as native."""
    B, L, D = 2, 65, 3072
    dtype = torch.bfloat16
    x = torch.randn(B, D, L, device="cuda", dtype=dtype).transpose(1, 2)  # (B, L, D), stride over D = L
    residual = torch.randn(B, D, L, device="cuda", dtype=dtype).transpose(1, 2)
    w = torch.randn(2 * D, device="cuda", dtype=dtype)[::2]  # (D,), stride 2
    mod = torch.randn(B, L if per_token else 1, 4 * D, device="cuda", dtype=dtype)
    gate, scale, shift = mod[..., :D], mod[..., 2 * D : 3 * D], mod[..., 3 * D :]
    scale_t = torch.randn(B, L if per_token else 1, 2 * D, device="cuda", dtype=dtype)[..., ::2]  # stride 2 over D
    assert not any(t.is_contiguous() for t in (x, residual, w, gate, scale, shift, scale_t))

    _check(K.rms_norm(x, w, EPS), Fn.rms_norm(x, w, EPS), Fn.rms_norm(x.double(), w.double(), EPS))
    for s in (scale, scale_t):
        _check(
            K.norm_scale_shift(x, w, s, shift, EPS, False),
            Fn.norm_scale_shift(x, w, s, shift, EPS, False),
            Fn.norm_scale_shift(x.double(), w.double(), s.double(), shift.double(), EPS, False),
        )
    y, r = K.residual_norm_scale_shift(x, residual, gate, w, scale_t, shift, EPS, True)
    y_n, r_n = Fn.residual_norm_scale_shift(x, residual, gate, w, scale_t, shift, EPS, True)
    y_ref, r_ref = Fn.residual_norm_scale_shift(
        x.double(), residual.double(), gate.double(), w.double(), scale_t.double(), shift.double(), EPS, True
    )
    _check(r, r_n, r_ref)
    _check(y, y_n, y_ref)


@pytest.mark.parametrize("looped", [False, True])
@pytest.mark.parametrize("D", [200, 3072, 5120])
@pytest.mark.parametrize("rms,per_token", [(False, False), (True, True)])
def test_both_row_layouts(looped, D, rms, per_token):
    """Resident and looped kernels each forced at widths the automatic choice would give the other."""
    T = _triton()
    x, (gate, scale, shift) = _inputs(3, 37, D, torch.bfloat16, per_token, n_mod=3)
    residual = torch.randn_like(x)
    w = _weight(D, torch.bfloat16, True)
    _check(T.rms_norm(x, w, EPS, looped=looped), Fn.rms_norm(x, w, EPS), Fn.rms_norm(x.double(), w.double(), EPS))
    _check(
        T.norm_scale_shift(x, w, scale, shift, EPS, rms, looped=looped),
        Fn.norm_scale_shift(x, w, scale, shift, EPS, rms),
        Fn.norm_scale_shift(x.double(), w.double(), scale.double(), shift.double(), EPS, rms),
    )
    y, r = T.residual_norm_scale_shift(x, residual, gate, w, scale, shift, EPS, rms, looped=looped)
    y_n, r_n = Fn.residual_norm_scale_shift(x, residual, gate, w, scale, shift, EPS, rms)
    y_ref, r_ref = Fn.residual_norm_scale_shift(
        x.double(), residual.double(), gate.double(), w.double(), scale.double(), shift.double(), EPS, rms
    )
    _check(r, r_n, r_ref)
    _check(y, y_n, y_ref)


def test_very_wide_rows():
    """Rows wider than a resident block can hold go through the looped kernels."""
    T = _triton()
    D = 2 * T.MAX_RESIDENT_D + 7
    x, (scale, shift) = _inputs(1, 5, D, torch.bfloat16, per_token=False, n_mod=2)
    _check(K.rms_norm(x, None, EPS), Fn.rms_norm(x, None, EPS), Fn.rms_norm(x.double(), None, EPS))
    _check(
        K.norm_scale_shift(x, None, scale, shift, EPS, False),
        Fn.norm_scale_shift(x, None, scale, shift, EPS, False),
        Fn.norm_scale_shift(x.double(), None, scale.double(), shift.double(), EPS, False),
    )
    with pytest.raises(ValueError, match="resident rows"):
        T.rms_norm(x, None, EPS, looped=False)


def test_bad_shapes_raise():
    T = _triton()
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    s = torch.zeros(4, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        T.norm_scale_shift(x, None, s, s, EPS, False)
    with pytest.raises(ValueError, match="weight"):
        T.rms_norm(x, torch.ones(32, device="cuda", dtype=torch.bfloat16), EPS)


# ------------------------------------------------------------------------------------ custom op contracts


def _opcheck_cases():
    x, (gate, scale, shift) = _inputs(2, 19, 256, torch.bfloat16, per_token=False, n_mod=3)
    xt, (gt, st, ht) = _inputs(2, 19, 256, torch.float16, per_token=True, n_mod=3)
    w = _weight(256, torch.bfloat16, True)
    res = torch.randn_like(x)
    ops = torch.ops.ditserve
    return [
        (ops.rms_norm.default, (x, w, EPS)),
        (ops.rms_norm.default, (xt, None, EPS)),
        (ops.norm_scale_shift.default, (x, None, scale, shift, EPS, False)),
        (ops.norm_scale_shift.default, (xt, None, st, ht, EPS, True)),
        (ops.residual_norm_scale_shift.default, (x, res, gate, w, scale, shift, EPS, False)),
        (ops.residual_norm_scale_shift.default, (xt, torch.randn_like(xt), None, None, st, ht, EPS, True)),
    ]


def test_triton_kernels_are_registered():
    assert K.TRITON_REGISTERED


@pytest.mark.parametrize("case", range(6))
def test_opcheck_cuda(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def _count_triton_compiles(monkeypatch) -> list[str]:
    """Names of Triton kernels JIT-compiled from now on (through Triton's post-compile hook)."""
    import triton

    compiled: list[str] = []

    def hook(*args, **kwargs):
        compiled.append(kwargs["fn"].name)

    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", hook)
    return compiled


@pytest.mark.parametrize("D", [3072, 5120])  # resident and looped kernels
def test_new_row_counts_reuse_the_compiled_kernels(monkeypatch, D):
    """Row count and L are not specialised: after a first call, other row counts compile nothing new."""
    compiled = _count_triton_compiles(monkeypatch)
    for i, L in enumerate((37, 64, 129, 1000)):
        x, (gate, scale, shift) = _inputs(2, L, D, torch.bfloat16, per_token=(i % 2 == 1), n_mod=3)
        K.rms_norm(x, None, EPS)
        K.norm_scale_shift(x, None, scale, shift, EPS, False)
        K.residual_norm_scale_shift(x, torch.randn_like(x), gate, None, scale, shift, EPS, False)
        torch.cuda.synchronize()
        if i == 1:  # by now both the broadcast and the per-token variants have run once
            compiled.clear()
    assert compiled == []


def test_prewarm_compiles_what_the_model_forward_needs(monkeypatch):
    """ditserve.compile.prewarm_kernels on a FLUX model: it compiles the blocks' norm and q/k norm + RoPE kernels,
    with the specialisation of the real calls, so the model's first forward compiles no Triton kernel. (D = 40 x 16
    = 640 takes BLOCK = 1024, which no other test's width does, so the norm kernels are not already in this
    process's cache: Triton's key holds the constexprs and D's divisibility, not D.)"""
    from ditserve.compile import prewarm_kernels
    from ditserve.models.flux import flux_example_inputs
    from ditserve.models.flux import FluxConfig, FluxTransformer

    cfg = FluxConfig(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=40,
                     joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    ops = OpsConfig(device="cuda", dtype=torch.bfloat16, kernels="auto", compiled=True)
    model = FluxTransformer(cfg, ops=ops, dtype=torch.bfloat16, device="cuda").eval()
    from ditserve.kernels import triton_rotary

    # the rotary kernel's variants (head dim 16) may already be in this process from other tests: forget them
    triton_rotary._rms_norm_rotary_kernel.device_caches.clear()
    compiled = _count_triton_compiles(monkeypatch)
    thread = prewarm_kernels(model)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert sorted(set(compiled)) == ["_norm_scale_shift_kernel", "_residual_norm_scale_shift_kernel",
                                     "_rms_norm_rotary_kernel"]
    compiled.clear()
    inputs = flux_example_inputs(cfg, 64, 128, text_len=8, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        model(**inputs)
    torch.cuda.synchronize()
    assert compiled == []


def test_compiled_fullgraph_dynamic_no_recompile():
    """The ops inside an inductor graph (fullgraph, dynamic): three row counts, one graph, right values."""

    def block(x, residual, gate, scale, shift, w):
        h = K.norm_scale_shift(x * 2, None, scale, shift, EPS, False)
        y, r = K.residual_norm_scale_shift(h, residual, gate, None, scale, shift, EPS, False)
        return K.rms_norm(y, w, EPS) + 1, r

    def native(x, residual, gate, scale, shift, w):
        h = Fn.norm_scale_shift(x * 2, None, scale, shift, EPS, False)
        y, r = Fn.residual_norm_scale_shift(h, residual, gate, None, scale, shift, EPS, False)
        return Fn.rms_norm(y, w, EPS) + 1, r

    compiled = torch.compile(block, backend="inductor", fullgraph=True, dynamic=True)
    w = _weight(3072, torch.bfloat16, True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for L in (37, 64, 129):
            x, (gate, scale, shift) = _inputs(2, L, 3072, torch.bfloat16, per_token=False, n_mod=3)
            residual = torch.randn_like(x)
            out, r = compiled(x, residual, gate, scale, shift, w)
            out_n, r_n = native(x, residual, gate, scale, shift, w)
            assert out.shape == (2, L, 3072)
            torch.testing.assert_close(r, r_n, atol=0.05, rtol=0.02)
            torch.testing.assert_close(out, out_n, atol=0.05, rtol=0.02)


# ------------------------------------------------------------------------------------------- op classes


def test_op_classes_take_the_cuda_path():
    cfg = OpsConfig(device="cuda", dtype=torch.bfloat16, kernels="triton")
    D = 3072
    rms = RMSNorm(D, ops=cfg, dtype=torch.bfloat16, device="cuda")
    nss = NormScaleShift(D, ops=cfg)
    rnss = ResidualNormScaleShift(D, norm="rms", elementwise_affine=True, ops=cfg, dtype=torch.bfloat16,
                                  device="cuda")
    assert (rms.path, nss.path, rnss.path) == ("cuda", "cuda", "cuda")

    x, (gate, scale, shift) = _inputs(2, 33, D, torch.bfloat16, per_token=False, n_mod=3)
    residual = torch.randn_like(x)
    assert torch.equal(rms(x), K.rms_norm(x, rms.weight, rms.eps))
    assert torch.equal(nss(x, scale, shift), K.norm_scale_shift(x, None, scale, shift, nss.eps, False))
    y, r = rnss(x, residual, gate, scale, shift)
    y_k, r_k = K.residual_norm_scale_shift(x, residual, gate, rnss.weight, scale, shift, rnss.eps, True)
    assert torch.equal(y, y_k) and torch.equal(r, r_k)

    # fp32 models and kernels="native" keep the reference path.
    assert RMSNorm(D, ops=OpsConfig(device="cuda", dtype=torch.float32, kernels="triton")).path == "native"
    assert NormScaleShift(D, ops=OpsConfig(device="cuda", kernels="native")).path == "native"
