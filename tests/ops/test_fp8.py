"""The fp8 tier's layer (`ditserve.ops.fp8`): quantisation, accuracy, per-row scaling, shapes, compile, and
`apply_fp8` on a tiny FLUX.1 transformer. All on the CPU, where torch._scaled_mm runs the real op; the GPU
kernel's speed and its layout rules are the bench's to check (bench/flux_step.py on an H100).

Accuracy is judged two ways: tight, against an fp64 evaluation of what the layer claims to compute (the
dequantised fp8 weight times the dequantised per-token fp8 activation, plus the bias), and loose, against the
unquantised layer (fp8 e4m3 keeps 3 mantissa bits: a few percent of relative error, not more).
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from ditserve.compile import CompileConfig
from ditserve.compile_report import compile_report
from ditserve.models.flux import flux_example_inputs
from ditserve.config import ConfigError
from ditserve.models.flux import FluxConfig, FluxTransformer
from ditserve.ops import Fp8Linear, Linear, LinearGELU, OpsConfig, apply_fp8
from ditserve.ops import fp8 as fp8_mod

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
NATIVE = OpsConfig(kernels="native")
K, N = 64, 48


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def make_linear(dtype=torch.float32, bias=True, seed=0, k=K, n=N) -> Linear:
    torch.manual_seed(seed)
    lin = Linear(k, n, bias=bias, ops=NATIVE, dtype=dtype)
    if bias:
        with torch.no_grad():
            lin.bias.normal_()  # not the tiny default init: the bias must visibly count
    return lin


def randn(*shape, dtype=torch.float32, seed=1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def fp8_definition(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """What an Fp8Linear computes, in fp64, written from the math: every row r of x (tokens) and of w (output
    channels) is scaled by s_r = max|r| / 448 (in fp32) and rounded to e4m3; y = dq(x) @ dq(w)^T + b.
    x (M, K), w (N, K) -> (M, N) float64."""

    def dequantized(t):
        s = t.float().abs().amax(-1, keepdim=True) / E4M3_MAX
        return (t.float() / s).to(E4M3).double() * s.double()

    y = dequantized(x) @ dequantized(w).T
    return y if b is None else y + b.double()


# -------------------------------------------------------------------------------------------- quantize_rows


def test_quantize_rows_scales_each_row_to_the_fp8_range():
    t = randn(5, 32) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 2.0])[:, None]  # rows of very different scales
    q, scale = fp8_mod.quantize_rows(t)
    assert q.dtype == E4M3 and q.shape == t.shape
    assert scale.dtype == torch.float32 and scale.shape == (5, 1)
    torch.testing.assert_close(scale, t.abs().amax(-1, keepdim=True) / E4M3_MAX)
    # Each row's largest magnitude lands on fp8's largest value, so every row uses the full range.
    assert torch.equal(q.float().abs().amax(-1), torch.full((5,), E4M3_MAX))
    # Round to nearest with 3 mantissa bits: every normal value is within 2^-4 relative of the original.
    dq = q.float() * scale
    normal = q.float().abs() >= 2.0 ** -6
    assert ((dq - t).abs() <= 2.0 ** -4 * t.abs() * 1.0001)[normal].all()


def test_quantize_rows_zero_row_gives_zeros_not_nan():
    t = torch.zeros(3, 16)
    t[1] = randn(16)
    q, scale = fp8_mod.quantize_rows(t)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(q[0].float(), torch.zeros(16)) and torch.equal(q[2].float(), torch.zeros(16))
    assert not torch.equal(q[1].float(), torch.zeros(16))


def test_quantize_rows_never_overflows_to_nan():
    # Values whose fp32 division by the scale can round just above 448: the clamp keeps them finite.
    t = torch.tensor([[448.0 * 3, -448.0 * 3, 1.0], [1e30, -3e29, 7.0], [3.0e-30, 1e-30, 0.0]])
    q, _ = fp8_mod.quantize_rows(t)
    assert not torch.isnan(q.float()).any()


# -------------------------------------------------------------------------------------------- Fp8Linear


def test_from_linear_layout_and_dtypes():
    lin = Linear(K, N, ops=NATIVE, dtype=torch.bfloat16, bias_dtype=torch.float32)
    before = lin.weight.detach().clone()
    op = Fp8Linear.from_linear(lin)
    assert op.weight.dtype == E4M3 and op.weight.shape == (N, K) and op.weight.is_contiguous()
    assert op.weight_scale.dtype == torch.float32 and op.weight_scale.shape == (1, N)
    assert op.bias.dtype == torch.bfloat16  # the compute dtype, whatever the source layer kept it in
    assert (op.in_features, op.out_features, op.path) == (K, N, "native")
    assert not op.weight.requires_grad and not op.bias.requires_grad
    assert torch.equal(lin.weight, before) and lin.weight.dtype == torch.bfloat16  # the source is untouched
    # The effective weight is the original within fp8 rounding, per output channel.
    w = before.float()
    assert rel_err(op.dequantized_weight(), w) < 0.05
    assert "fp8" in repr(op)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_fp64_definition_tightly(dtype, bias):
    lin = make_linear(dtype, bias)
    op = Fp8Linear.from_linear(lin)
    x = randn(37, K, dtype=dtype)
    out = op(x)
    assert out.dtype == dtype and out.shape == (37, N)
    ref = fp8_definition(x, lin.weight.detach(), None if lin.bias is None else lin.bias.detach())
    # Only the fp32 accumulation and the final rounding to `dtype` separate the op from its definition.
    tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_close_to_the_unquantised_layer(dtype):
    lin = make_linear(dtype)
    op = Fp8Linear.from_linear(lin)
    x = randn(4, 9, K, dtype=dtype)
    err = rel_err(op(x), lin(x).double())
    assert err < 0.05
    assert err > 1e-3  # and it really is quantised (a full-precision fallback would be ~1e-7 / ~3e-3 here)


def test_keeps_the_activation_of_the_layer_it_replaces():
    """An fp8 LinearGELU still applies its GELU (after the bias)."""
    lin = make_linear(torch.float32)
    act = LinearGELU(K, lin.out_features, ops=OpsConfig(kernels="native"))
    act.load_state_dict(lin.state_dict())
    op, plain = Fp8Linear.from_linear(act), Fp8Linear.from_linear(lin)
    assert (op.activation, plain.activation) == ("gelu_tanh", None)
    assert "gelu_tanh" in repr(op)
    x = randn(4, 9, K, dtype=torch.float32)
    torch.testing.assert_close(op(x), torch.nn.functional.gelu(plain(x), approximate="tanh"))
    assert rel_err(op(x), act(x).double()) < 0.05
    with pytest.raises(ValueError, match="activation"):
        Fp8Linear(op.weight.data, op.weight_scale.data, op.bias.data, activation="relu")


def test_activation_scale_is_per_row():
    """One token 10^6 times larger than the others: with per-token scales the others keep their precision.
    A single scale for the whole tensor would crush them (checked here, so the test can tell the two apart)."""
    lin = make_linear(bias=False)
    op = Fp8Linear.from_linear(lin)
    x = randn(8, K)
    x[3] *= 1e6  # beyond e4m3's dynamic range (448 / 2^-9 ~ 2e5)
    out, exact = op(x), lin(x)
    for r in range(8):
        assert rel_err(out[r], exact[r]) < 0.05, f"row {r}"
    # The per-tensor alternative, for contrast: the small rows lose most of their bits (or vanish).
    s = x.abs().max() / E4M3_MAX
    per_tensor = ((x / s).to(E4M3).float() * s) @ op.dequantized_weight().T
    small = [r for r in range(8) if r != 3]
    assert min(rel_err(per_tensor[r], exact[r]) for r in small) > 0.5


def test_zero_rows_give_the_bias():
    lin = make_linear()
    with torch.no_grad():
        lin.weight[5].zero_()  # an all-zero output channel
    op = Fp8Linear.from_linear(lin)
    x = randn(3, K)
    x[1].zero_()  # an all-zero token
    out = op(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], lin.bias.detach(), rtol=0, atol=0)
    torch.testing.assert_close(out[:, 5], lin.bias.detach()[5].expand(3), rtol=0, atol=0)


@pytest.mark.parametrize("lead", [(), (5,), (2, 7), (2, 3, 4)])
def test_shapes(lead):
    """x (..., K) -> (..., N) for 1-3 leading dims (2-4 dims in all; a 1-D input is one token); each token is
    quantised on its own, so the result does not depend on how tokens are batched."""
    lin = make_linear()
    op = Fp8Linear.from_linear(lin)
    x = randn(*lead, K)
    out = op(x)
    assert out.shape == (*lead, N)
    rows = torch.stack([op(t[None])[0] for t in x.reshape(-1, K)])  # token by token
    torch.testing.assert_close(out.reshape(-1, N), rows, rtol=1e-6, atol=1e-6)


def test_rejects_bad_layers():
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear.from_linear(Linear(24, 32, ops=NATIVE))
    with pytest.raises(ValueError, match="multiples of 16"):
        Fp8Linear.from_linear(Linear(32, 40, ops=NATIVE))
    with pytest.raises(TypeError, match="Linear"):
        Fp8Linear.from_linear(torch.nn.Conv1d(16, 16, 1))
    with pytest.raises(ValueError, match="float8"):
        Fp8Linear(torch.zeros(16, 16), torch.ones(16), None)
    with pytest.raises(ValueError, match="weight_scale"):
        Fp8Linear(torch.zeros(16, 16).to(E4M3), torch.ones(8), None)


@pytest.mark.parametrize("lead", [("B", "L"), ("L",), ("B", "L", "H")])
def test_compile_fullgraph_no_recompile_across_token_counts(lead):
    """fullgraph=True (a graph break would raise) and dynamic token counts: one graph for two token counts,
    equal to eager."""
    op = Fp8Linear.from_linear(make_linear())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(op, fullgraph=True, backend=counter, dynamic=True)
    sizes = {"B": 2, "H": 3}
    for L in (7, 13):
        x = randn(*[L if d == "L" else sizes[d] for d in lead], K, seed=L)
        torch.testing.assert_close(compiled(x), op(x), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1, f"{counter.frame_count} graphs for two token counts"
    # The fp8 limits are constants of the graph: no scalar graph input read back with .item() on every call.
    code = counter.graphs[0].code
    assert "_scaled_mm" in code and ".item()" not in code, code


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_matches_eager(dtype):
    """Inductor (the engine's backend) generates the activation quantisation itself: same result as eager,
    bit for bit here, and one compile for two token counts."""
    op = Fp8Linear.from_linear(make_linear(dtype))
    compiled = torch.compile(op, fullgraph=True, dynamic=True)
    for L in (7, 13):
        x = randn(2, L, K, dtype=dtype, seed=L)
        with torch._dynamo.config.patch(error_on_recompile=L == 13):
            got = compiled(x)
        torch.testing.assert_close(got, op(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ models


def tiny_flux(seed: int = 0, dtype=torch.float32, guidance_embeds: bool = True) -> FluxTransformer:
    """2 double + 2 single blocks, D = 2 heads x 16 = 32 (every GEMM dim a multiple of 16); every parameter
    perturbed so that no layer is trivial."""
    cfg = FluxConfig(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
                     num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                     guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(seed)
    model = FluxTransformer(cfg, ops=NATIVE, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.to(dtype).requires_grad_(False)


def eligible(model: FluxTransformer) -> set[str]:
    return {f"{list_name}.{i}.{name}" for list_name, names in model.fp8_linears
            for i in range(len(getattr(model, list_name))) for name in names}


def test_apply_fp8_swaps_exactly_the_declared_layers():
    model = apply_fp8(tiny_flux())
    fp8 = {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    linear = {name for name, m in model.named_modules() if isinstance(m, Linear)}
    assert fp8 == eligible(model)
    assert len(fp8) == 8 * 2 + 2 * 2  # 8 per double block, 2 per single block
    # Left in full precision: the per-block modulation GEMMs (M = batch), the embedders, the output layers.
    assert {"double_blocks.0.mod", "double_blocks.1.mod", "single_blocks.0.mod", "single_blocks.1.mod",
            "time_embedder.in_layer", "time_embedder.out_layer", "guidance_embedder.in_layer",
            "pooled_embedder.out_layer", "context_embedder", "x_embedder", "norm_out_mod",
            "proj_out"} <= linear
    assert not fp8 & linear


def test_apply_fp8_frees_each_layer_before_quantising_the_next(monkeypatch):
    """Peak memory: when layer k is quantised, the full-precision weights of layers 0..k-1 are already gone."""
    model = tiny_flux()
    seen: list[weakref.ref] = []
    real = Fp8Linear.from_linear.__func__

    def from_linear(cls, linear, **kw):
        assert all(ref() is None for ref in seen), "an earlier layer's full-precision weight is still alive"
        seen.append(weakref.ref(linear.weight))
        return real(cls, linear, **kw)

    monkeypatch.setattr(Fp8Linear, "from_linear", classmethod(from_linear))
    apply_fp8(model)
    assert len(seen) == len(eligible(model)) and all(ref() is None for ref in seen)


def test_apply_fp8_refusals():
    model = apply_fp8(tiny_flux())
    with pytest.raises(ValueError, match="called twice"):
        apply_fp8(model)
    with pytest.raises(ConfigError, match="declares no fp8 layers"):
        apply_fp8(torch.nn.Sequential(torch.nn.Linear(16, 16)))


def test_fast_accumulation_is_the_tier_default_and_reaches_the_gemm(monkeypatch):
    """apply_fp8 turns fast accumulation on in every layer by default, off when asked; `product` hands it to
    torch._scaled_mm (the CPU kernel ignores it: its effect is the gpu test's to show)."""
    model = apply_fp8(tiny_flux())
    layers = [m for m in model.modules() if isinstance(m, Fp8Linear)]
    assert layers and all(m.fast_accum for m in layers) and "fast accumulation" in repr(layers[0])
    assert not any(m.fast_accum for m in apply_fp8(tiny_flux(), fast_accum=False).modules()
                   if isinstance(m, Fp8Linear))
    seen = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **kw: seen.append(kw["use_fast_accum"]) or real(*a, **kw))
    for fast in (True, False):
        layer = Fp8Linear.from_linear(make_linear(), fast_accum=fast)
        layer(randn(4, K))
        assert seen[-1] is fast


def test_fast_accumulation_config_cli_and_loader():
    import argparse

    from ditserve.config import EngineConfig
    from ditserve.engine_args import add_engine_flags, engine_from_args
    from ditserve.loader import load_transformer

    with pytest.raises(ConfigError, match="--quantization fp8"):
        EngineConfig(fp8_fast_accum="on")
    with pytest.raises(ConfigError, match="unknown fp8_fast_accum"):
        EngineConfig(quantization="fp8", fp8_fast_accum="yes")
    assert EngineConfig(quantization="fp8").fp8_fast_accum_on
    assert not EngineConfig(quantization="fp8", fp8_fast_accum="off").fp8_fast_accum_on
    assert not EngineConfig().fp8_fast_accum_on  # "auto" without the tier: nothing to accumulate in fp8
    p = argparse.ArgumentParser()
    add_engine_flags(p)
    assert engine_from_args(p.parse_args(["--quantization", "fp8", "--fp8-fast-accum", "off"])).fp8_fast_accum == "off"
    for setting, want in (("auto", True), ("off", False)):
        model, _ = load_transformer(None, EngineConfig(device="cpu", quantization="fp8", fp8_fast_accum=setting))
        assert {m.fast_accum for m in model.modules() if isinstance(m, Fp8Linear)} == {want}


@pytest.mark.gpu
def test_fast_accumulation_on_cuda_is_close_to_the_definition():
    """At FLUX.1's widths (K = 3072 and 12288), both accumulations stay near the fp64 definition, and the fast
    one really differs from the fp32 one (the flag reaches the kernel)."""
    for k, n in ((3072, 3072), (12288, 3072)):
        lin = make_linear(torch.bfloat16, k=k, n=n).cuda()
        x = randn(512, k, dtype=torch.bfloat16).cuda()
        ref = fp8_definition(x, lin.weight, lin.bias)
        out = {fast: Fp8Linear.from_linear(lin, fast_accum=fast)(x) for fast in (True, False)}
        errs = {fast: rel_err(y, ref) for fast, y in out.items()}
        assert errs[False] < 5e-3 and errs[True] < 5e-3, errs
        assert not torch.equal(out[True], out[False])


def flux_inputs(model: FluxTransformer, h: int = 64, w: int = 64, dtype=torch.float32) -> dict:
    """Random (seeded) latents, text states and pooled text for a batch of 2 h x w images."""
    return flux_example_inputs(model.config, h, w, batch=2, text_len=16, dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_flux_stays_close_to_the_unquantised_model(dtype):
    model = tiny_flux(dtype=dtype)
    quantised = apply_fp8(copy.deepcopy(model))
    inputs = flux_inputs(model, dtype=dtype)
    with torch.inference_mode():
        ref, out = model(**inputs), quantised(**inputs)
    assert out.dtype == dtype and out.shape == ref.shape and torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < 0.08
    assert err > 1e-3  # the quantised layers really ran


def test_fp8_flux_compiles_without_breaks_or_recompiles():
    """The engine's regional compile (fullgraph blocks, dynamic sequence length) of the fp8 model: no graph
    break, one graph per block class, nothing recompiled at a second resolution."""
    model = apply_fp8(tiny_flux())
    report = compile_report(model, lambda h, w: flux_inputs(model, h, w), [(64, 128), (128, 128)],
                            CompileConfig(backend="aot_eager"))
    assert report["graph_breaks"] == 0 and report["break_reasons"] == []
    assert report["recompiles"] == 0 and report["recompile_reasons"] == []
    assert report["graph_count"] == 2
