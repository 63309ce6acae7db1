"""Wan transformer: parity with diffusers' WanTransformer3DModel (T2V, I2V, per-token timesteps), weight mapping,
config, presets, compile.

diffusers is the numerical reference; it is imported inside the tests only. Models are tiny: 2 heads x 12
(RoPE axes 4 + 4 + 4), 2 blocks, text_dim 32, 4 latent channels.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from ditserve.config import ConfigError
from ditserve.models import wan as W
from ditserve.models.wan import WanConfig, WanTransformer

IN_CH, TEXT = 4, 32
TINY = dict(patch_size=[1, 2, 2], num_attention_heads=2, attention_head_dim=12, in_channels=IN_CH,
            out_channels=IN_CH, text_dim=TEXT, freq_dim=16, ffn_dim=40, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
            rope_max_seq_len=64)
TINY_I2V = dict(TINY, in_channels=2 * IN_CH + 4, image_dim=20, added_kv_proj_dim=24)


@torch.no_grad()
def make_reference(config: dict = TINY, seed: int = 0):
    """A diffusers WanTransformer3DModel, seeded, every parameter perturbed (norm weights are not ones, biases
    are not zeros)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**config).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    for p in ref.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return ref


def ours_from(ref, dtype=torch.float32, **kw) -> WanTransformer:
    model = WanTransformer(WanConfig.from_diffusers(dict(ref.config)), dtype=dtype, **kw).eval()
    model.load_diffusers_state_dict(ref.state_dict())
    return model


@pytest.fixture(scope="module")
def pair():
    ref = make_reference()
    return ref, ours_from(ref)


def make_inputs(F: int, h: int, w: int, B: int = 1, T: int = 7, in_ch: int = IN_CH, image: int | None = None,
                per_token: bool = False, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    L = F * (h // 2) * (w // 2)
    t = torch.rand(B, generator=g) * 1000
    if per_token:  # TI2V-style: the first frame's tokens at t = 0
        t = t[:, None].repeat(1, L)
        t[:, : (h // 2) * (w // 2)] = 0
    inputs = dict(hidden_states=torch.randn(B, in_ch, F, h, w, generator=g), timestep=t,
                  encoder_hidden_states=torch.randn(B, T, TEXT, generator=g))
    if image is not None:
        inputs["encoder_hidden_states_image"] = torch.randn(B, image, 20, generator=g)
    return inputs


@torch.no_grad()
def run_reference(ref, inputs: dict) -> torch.Tensor:
    return ref(**inputs, return_dict=False)[0]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


# ------------------------------------------------------------------------------------------------ parity

# (latent frames, h, w, batch): odd frame / row / column token counts included
CASES = {
    "square": (3, 8, 8, 1),
    "odd_grid": (5, 6, 10, 2),  # 5 x 3 x 5 tokens
    "one_frame": (1, 14, 6, 1),
    "tall": (2, 18, 4, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_fp32(pair, case):
    ref, ours = pair
    F, h, w, B = CASES[case]
    inputs = make_inputs(F, h, w, B)
    expected = run_reference(ref, inputs)
    with torch.no_grad():
        out = ours(**inputs)
    assert out.shape == (B, IN_CH, F, h, w) and out.dtype == torch.float32
    assert expected.norm() > 1.0
    assert rel_err(out, expected) <= 1e-5, case


def test_parity_per_token_timesteps(pair):
    """Wan2.2 TI2V's (B, L) timesteps (the first frame at t = 0): per-token modulation in every block and at the end."""
    ref, ours = pair
    inputs = make_inputs(3, 6, 8, B=2, per_token=True)
    with torch.no_grad():
        assert rel_err(ours(**inputs), run_reference(ref, inputs)) <= 1e-5


def test_parity_i2v():
    """Wan2.1 I2V: CLIP image tokens through the image embedder and the added k/v attention. diffusers takes the
    last 512 context tokens as text, so the text has exactly 512 rows here."""
    ref = make_reference(TINY_I2V, seed=3)
    ours = ours_from(ref)
    inputs = make_inputs(2, 6, 6, B=2, T=512, in_ch=TINY_I2V["in_channels"], image=9)
    with torch.no_grad():
        out = ours(**inputs)
        expected = ref(hidden_states=inputs["hidden_states"], timestep=inputs["timestep"],
                       encoder_hidden_states=inputs["encoder_hidden_states"],
                       encoder_hidden_states_image=inputs["encoder_hidden_states_image"], return_dict=False)[0]
    assert out.shape == (2, IN_CH, 2, 6, 6)
    assert rel_err(out, expected) <= 1e-5
    # the image tokens matter
    other = dict(inputs, encoder_hidden_states_image=torch.randn_like(inputs["encoder_hidden_states_image"]))
    with torch.no_grad():
        assert rel_err(ours(**other), out) > 1e-2


def test_parity_without_cross_attn_norm():
    ref = make_reference(dict(TINY, cross_attn_norm=False), seed=5)
    ours = ours_from(ref)
    inputs = make_inputs(2, 4, 6)
    with torch.no_grad():
        assert rel_err(ours(**inputs), run_reference(ref, inputs)) <= 1e-5


def test_bf16_close_to_fp32_reference():
    """bf16 (fp32 time embedder, fp32 modulation tables, fp32 norms as diffusers keeps them) against the fp32
    reference, no worse than diffusers' own bf16 run by a small factor."""
    import copy

    ref = make_reference()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
    ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    ours = ours_from(ref, dtype=torch.bfloat16)
    inputs = make_inputs(3, 6, 8, B=2)
    inputs["timestep"] = torch.tensor([500.0, 250.0])
    inputs = {k: v.bfloat16().float() for k, v in inputs.items()}
    expected = run_reference(ref, inputs)
    half = {k: (v if k == "timestep" else v.bfloat16()) for k, v in inputs.items()}
    err_diffusers = rel_err(run_reference(ref_bf16, half), expected)
    with torch.no_grad():
        out = ours(**half)
    assert out.dtype == torch.bfloat16
    err = rel_err(out, expected)
    assert err < 3e-2 and err <= 1.5 * err_diffusers, (err, err_diffusers)


# ------------------------------------------------------------------------------------------------ weights

def test_weight_map_covers_diffusers_state_dict():
    for config in (TINY, TINY_I2V, dict(TINY, cross_attn_norm=False)):
        ref = make_reference(config)
        ours = WanTransformer(WanConfig.from_diffusers(dict(ref.config)), device="meta")
        assert ours.expected_diffusers_keys() == sorted(ref.state_dict())
        targets = {name for name, _, _ in ours.weight_map().values()}
        assert targets == {name for name, _ in ours.named_parameters()}
        assert not list(ours.buffers())  # the loader builds on meta: no buffers


def test_missing_key_is_refused(pair):
    ref, _ = pair
    sd = dict(ref.state_dict())
    sd.pop("blocks.1.attn2.to_k.bias")
    with pytest.raises(ValueError, match="to_k.bias"):
        WanTransformer(WanConfig.from_diffusers(dict(ref.config))).load_diffusers_state_dict(sd)


# ------------------------------------------------------------------------------------------------ config

def test_config_errors():
    with pytest.raises(ConfigError, match="unsupported WanTransformer3DModel config keys"):
        WanConfig.from_diffusers(dict(TINY, window_size=[-1, -1]))
    with pytest.raises(ConfigError, match="pos_embed_seq_len"):
        WanConfig.from_diffusers(dict(TINY, pos_embed_seq_len=514))
    with pytest.raises(ConfigError, match="image_dim and added_kv_proj_dim"):
        WanConfig.from_diffusers(dict(TINY, image_dim=20))
    with pytest.raises(ConfigError, match="qk_norm"):
        WanConfig.from_diffusers(dict(TINY, qk_norm="rms_norm"))


def test_bad_inputs_are_refused(pair):
    _, ours = pair
    good = make_inputs(2, 4, 4)
    with pytest.raises(ValueError, match="multiples of the patch"):
        ours(**dict(good, hidden_states=torch.randn(1, IN_CH, 2, 5, 4)))
    with pytest.raises(ValueError, match="timestep"):
        ours(**dict(good, timestep=torch.zeros(3)))
    with pytest.raises(ValueError, match="takes no encoder_hidden_states_image"):
        ours(**good, encoder_hidden_states_image=torch.zeros(1, 3, 20))
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        ours(**dict(good, hidden_states=torch.randn(1, IN_CH, 65, 4, 4)))


@pytest.mark.parametrize("name,params", [
    ("WAN21_T2V_1_3B_TRANSFORMER", 1_418_996_800), ("WAN21_T2V_14B_TRANSFORMER", 14_288_491_584),
    ("WAN22_TI2V_5B_TRANSFORMER", 4_999_787_712),
])
def test_preset_configs_have_the_released_parameter_counts(name, params):
    model = WanTransformer(WanConfig.from_diffusers(getattr(W, name)), device="meta")
    assert sum(p.numel() for p in model.parameters()) == params


def test_i2v_preset_matches_diffusers_parameter_count():
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        ref = WanTransformer3DModel(**W.WAN21_I2V_14B_TRANSFORMER)
    ours = WanTransformer(WanConfig.from_diffusers(W.WAN21_I2V_14B_TRANSFORMER), device="meta")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


# ------------------------------------------------------------------------------------------------ compile

def test_compiles_fullgraph_without_recompiles_across_sizes_and_frames(pair):
    """Each block compiled with fullgraph=True and dynamic shapes (as the engine's regional compile with
    --dynamic-shapes on): after the first call, two resolutions x two frame counts compile nothing more, no
    graph breaks (a break would raise under fullgraph), and the result equals eager."""
    import torch._dynamo

    _, ours = pair
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounter()
    compiled = [torch.compile(b, backend=counter, fullgraph=True, dynamic=True) for b in ours.blocks]
    first = None
    with torch.no_grad():
        for F, h, w in ((3, 8, 8), (5, 8, 8), (3, 6, 10), (5, 6, 10)):
            inputs = make_inputs(F, h, w, B=2)
            (x,), ctx = ours.prepare(**inputs)
            for block in compiled:
                x = block(x, ctx.context, ctx.image_context, ctx.mod, ctx.cos, ctx.sin)
            assert rel_err(ours.finish((x,), ctx), ours(**inputs)) <= 1e-6
            first = counter.frame_count if first is None else first
    assert 1 <= first <= 2  # (one code object; the second block instance may guard on its own module)
    assert counter.frame_count == first, "a new size or frame count recompiled"
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0


def test_example_inputs_run(pair):
    _, ours = pair
    inputs = WanTransformer.example_inputs(ours.config, 32, 48, text_len=5, num_frames=9)
    assert inputs["hidden_states"].shape == (1, IN_CH, 3, 4, 6)
    with torch.no_grad():
        assert ours(**inputs).shape == (1, IN_CH, 3, 4, 6)
    with pytest.raises(ConfigError, match="num_frames"):
        WanTransformer.example_inputs(ours.config, 32, 48, text_len=5, num_frames=8)


def test_fp8_tier_quantises_every_block_gemm():
    """`apply_fp8` (the engine's --quantization fp8) swaps the 7 token-wise GEMMs of each block for Fp8Linear; the
    reference path on CPU stays close to bf16 (the CUDA kernels run the same math; they are measured on the GPU)."""
    import copy

    from ditserve.ops import Fp8Linear, apply_fp8

    ref = make_reference(dict(TINY, attention_head_dim=16, ffn_dim=48))  # fp8 GEMMs need multiples of 16
    ours = ours_from(ref, dtype=torch.bfloat16)
    q = apply_fp8(copy.deepcopy(ours))
    assert sum(isinstance(m, Fp8Linear) for m in q.modules()) == 7 * len(q.blocks)
    inputs = {k: (v if k == "timestep" else v.bfloat16()) for k, v in make_inputs(3, 8, 8, B=2).items()}
    with torch.no_grad():
        err = rel_err(q(**inputs), ours(**inputs))
    assert 0 < err < 0.05, err  # measured 0.019


def test_first_parameter_has_the_compute_dtype():
    """Pipelines, compile-report and benches read a model's dtype from its first parameter: in a bf16 model that
    is a bf16 weight, not one of the fp32 tables diffusers keeps in fp32 (and we do too)."""
    model = WanTransformer(WanConfig.from_diffusers(TINY_I2V), dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    assert next(model.blocks[0].parameters()).dtype == torch.bfloat16
    assert model.blocks[0].scale_shift_table.weight.dtype == model.scale_shift_table.weight.dtype == torch.float32
    assert model.time_embedder.linear_1.weight.dtype == torch.float32


@pytest.fixture
def _restore_compiler_flags():
    """compile_model sets process-wide dynamo flags; keep other tests independent of them."""
    saved = torch.fx.experimental._config.use_duck_shape, torch._dynamo.config.specialize_float
    yield
    torch.fx.experimental._config.use_duck_shape, torch._dynamo.config.specialize_float = saved


def test_compile_report_no_recompile_across_sizes_and_frames(_restore_compiler_flags):
    """The engine's regional compile (`compile_model`, dynamic shapes, backend eager) through `compile_report`: a
    second resolution with another frame count (9 -> 13 frames) recompiles nothing and breaks no graph."""
    from ditserve.compile import CompileConfig
    from ditserve.compile_report import compile_report

    ref = make_reference()
    model = ours_from(ref)
    cfg = model.config

    def make(h, w):
        return WanTransformer.example_inputs(cfg, h, w, text_len=7, num_frames=9 if h == 64 else 13)

    inputs = make(64, 80)
    with torch.no_grad():
        eager = model(**inputs)
    report = compile_report(model, make, [(64, 80), (96, 64)], CompileConfig(backend="eager", dynamic=True),
                            steady_iters=1)
    assert report["graph_count"] >= 1 and report["graph_breaks"] == 0 and report["break_reasons"] == []
    assert report["recompiles"] == 0 and report["recompile_reasons"] == []
    with torch.no_grad():
        assert torch.equal(model(**inputs), eager)
