"""Z-Image transformer: parity with diffusers' ZImageTransformer2DModel (basic mode), weight mapping, config,
presets, compile, op path selection.

diffusers is the numerical reference; it is imported inside the tests only. Models are tiny: dim 64, 2 heads x 32
(rope axes 8+12+12), 2 refiner + 2 main layers, cap_feat_dim 32, 4 latent channels (patch 2: 16 features).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from ditserve.config import ConfigError
from ditserve.models.z_image import (
    QWEN3_4B_TEXT, Z_IMAGE_TURBO_SCHEDULER, Z_IMAGE_TURBO_TRANSFORMER, Z_IMAGE_VAE, ZImageConfig, ZImageTransformer,
    rope_cos_sin,
)
from ditserve.ops import OpsConfig, RMSNorm, RMSNormRotary

IN_CH, CAP = 4, 32
TINY = dict(all_patch_size=[2], all_f_patch_size=[1], in_channels=IN_CH, dim=64, n_layers=2, n_refiner_layers=2,
            n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=CAP, siglip_feat_dim=None,
            rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[256, 64, 64])


@torch.no_grad()
def make_reference(seed: int = 0):
    """A diffusers ZImageTransformer2DModel, seeded, every parameter perturbed: norm weights are no longer ones
    and the pad tokens (zeros at init) are random, so nothing is trivially zero."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    ref = ZImageTransformer2DModel(**TINY).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    for name, p in ref.named_parameters():
        p.add_(torch.randn(p.shape, generator=gen) * (1.0 if "pad_token" in name else 0.1))
    return ref


def ours_from(ref, dtype=torch.float32, **kw) -> ZImageTransformer:
    model = ZImageTransformer(ZImageConfig.from_diffusers(dict(ref.config)), dtype=dtype, **kw).eval()
    model.load_diffusers_state_dict(ref.state_dict())
    return model


@pytest.fixture(scope="module")
def pair():
    ref = make_reference()
    return ref, ours_from(ref)


def make_inputs(h: int, w: int, lens: list[int] | None, T: int | None = None, B: int = 1, seed: int = 1) -> dict:
    """Our forward kwargs: latents (B, C, h, w), t (B,), text (B, T, CAP) (T = max(lens) unless given)."""
    g = torch.Generator().manual_seed(seed)
    B = B if lens is None else len(lens)
    T = T or max(lens)
    return dict(hidden_states=torch.randn(B, IN_CH, h, w, generator=g), timestep=torch.rand(B, generator=g),
                encoder_hidden_states=torch.randn(B, T, CAP, generator=g), encoder_lens=lens)


@torch.no_grad()
def run_reference(ref, inputs: dict) -> torch.Tensor:
    """diffusers' call: lists of (C, 1, h, w) latents and (len_i, CAP) captions; output stacked, frame dim gone."""
    x, enc = inputs["hidden_states"], inputs["encoder_hidden_states"]
    lens = inputs["encoder_lens"] or [enc.shape[1]] * x.shape[0]
    out = ref([xi.unsqueeze(1) for xi in x], inputs["timestep"], [e[:n] for e, n in zip(enc, lens)],
              return_dict=False)[0]
    return torch.stack(out).squeeze(2)


@torch.no_grad()
def run_ours(model, inputs: dict) -> torch.Tensor:
    return model(**inputs)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


# ------------------------------------------------------------------------------------------------ parity

# (latent h, w, caption lengths, text rows T or None = max length)
CASES = {
    "caption_multiple_of_32": (8, 8, [32], None),
    "caption_not_multiple_of_32": (8, 8, [45], None),
    "batch_different_padded_lengths": (8, 8, [45, 20], None),  # P_i 64 and 32: masked, per-item RoPE
    "batch_same_padded_length": (8, 12, [40, 60], None),  # both 64: no mask, per-item pad tokens
    "text_rows_batch_padded": (8, 12, [70, 3], 80),  # T beyond every length: rows past len_i are never read
    "image_tokens_not_multiple_of_32": (6, 10, [45], None),  # 3 x 5 = 15 tokens -> 17 x_pad_tokens
    "non_square_tall": (12, 4, [20, 33], None),
    "non_square_wide": (4, 16, [64], None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_fp32(pair, case):
    ref, ours = pair
    h, w, lens, T = CASES[case]
    inputs = make_inputs(h, w, lens, T)
    expected = run_reference(ref, inputs)
    out = run_ours(ours, inputs)
    assert out.shape == (len(lens), IN_CH, h, w) and out.dtype == torch.float32
    assert expected.norm() > 1.0  # a meaningful signal
    assert rel_err(out, expected) <= 1e-5, case


def test_bf16_not_worse_than_diffusers_bf16():
    """Both bf16 models judged against diffusers in fp32 on the same bf16-representable weights and inputs
    (timesteps 0.5 / 0.25: t * 1000 is exact in bf16, so only compute precision is measured)."""
    import copy

    ref = make_reference()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
    ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    ours = ours_from(ref, dtype=torch.bfloat16)
    worst_ratio = 0.0
    for h, w, lens in ((8, 12, [45, 20]), (6, 10, [45]), (8, 8, [32])):
        inputs = make_inputs(h, w, lens)
        inputs["timestep"] = torch.tensor([0.5, 0.25])[:len(lens)]
        inputs = {k: (v.bfloat16().float() if torch.is_tensor(v) else v) for k, v in inputs.items()}
        inputs_bf16 = {k: (v.bfloat16() if torch.is_tensor(v) else v) for k, v in inputs.items()}
        expected = run_reference(ref, inputs)
        err_diffusers = rel_err(run_reference(ref_bf16, inputs_bf16), expected)
        out = run_ours(ours, inputs_bf16)
        assert out.dtype == torch.bfloat16
        err_ours = rel_err(out, expected)
        assert err_ours < 3e-2, (lens, err_ours)
        worst_ratio = max(worst_ratio, err_ours / err_diffusers)
    assert worst_ratio <= 1.2, worst_ratio  # measured 0.86-1.07 on CPU


def test_parity_encoder_lens_none(pair):
    ref, ours = pair
    inputs = make_inputs(6, 8, None, T=37, B=2)
    assert rel_err(run_ours(ours, inputs), run_reference(ref, inputs)) <= 1e-5


def test_mask_only_for_batch_padding(pair):
    """No mask tensor when every item has the same padded caption length (then one shared RoPE table); a
    (B, 1, 1, S) key mask and per-item tables when they differ."""
    _, ours = pair
    with torch.no_grad():
        (x,), ctx = ours.prepare(**make_inputs(8, 12, [40, 60]))  # 24 image tokens -> 32; captions 64, 64
        assert x.shape == (2, 32 + 64, 64) and ctx.mask is None
        assert ctx.cos.shape == ctx.sin.shape == (96, 16) and ctx.image_tokens == 24
        (x,), ctx = ours.prepare(**make_inputs(8, 12, [45, 20]))  # captions 64, 32
        assert x.shape == (2, 96, 64) and ctx.cos.shape == (2, 96, 16)
        assert ctx.mask.shape == (2, 1, 1, 96) and ctx.mask.dtype == torch.bool
        assert ctx.mask[0].all() and ctx.mask[1, 0, 0, :64].all() and not ctx.mask[1, 0, 0, 64:].any()


def test_positions(pair):
    """RoPE positions, read back from the tables: caption token j at (j+1, 0, 0) for every j < P_i (pad tokens
    included), image token (r, c) at (P_i + 1, r, c), image pad tokens at (0, 0, 0)."""
    _, ours = pair
    axes = TINY["axes_dims"]
    with torch.no_grad():
        _, ctx = ours.prepare(**make_inputs(6, 10, [45, 20]))  # 15 image tokens -> 32; P_i 64, 32
    for i, P_i in enumerate((64, 32)):
        ids = torch.zeros(32 + P_i, 3, dtype=torch.int64)
        ids[:15, 0] = P_i + 1
        ids[:15, 1] = torch.arange(3).repeat_interleave(5)
        ids[:15, 2] = torch.arange(5).repeat(3)
        ids[32:, 0] = torch.arange(1, P_i + 1)
        cos, sin = rope_cos_sin(ids, axes, 256.0)
        assert torch.equal(ctx.cos[i, :32 + P_i], cos) and torch.equal(ctx.sin[i, :32 + P_i], sin)


def test_pad_tokens_and_timestep_matter():
    """Each learned pad token and the timestep change the output, in both models alike (guards against a parity
    test that passes because both ignore something)."""
    ref = make_reference()
    ours = ours_from(ref)
    base = make_inputs(6, 10, [45])  # image and caption both padded
    out0 = run_ours(ours, base)
    assert rel_err(run_ours(ours, dict(base, timestep=base["timestep"] * 0.5)), out0) > 1e-3
    for name in ("x_pad_token", "cap_pad_token"):
        with torch.no_grad():
            getattr(ref, name).add_(1.0)
            getattr(ours, name).add_(1.0)
        out = run_ours(ours, base)
        assert rel_err(out, out0) > 1e-3, name
        assert rel_err(out, run_reference(ref, base)) <= 1e-5, name
        out0 = out


def test_run_blocks_in_ranges_equals_forward(pair):
    """The block-cache interface: prepare -> run_blocks over any split of the main layers -> finish."""
    _, ours = pair
    inputs = make_inputs(8, 8, [45, 20])
    with torch.no_grad():
        full = ours(**inputs)
        state, ctx = ours.prepare(**inputs)
        state = ours.run_blocks(state, ctx, 0, 1)
        state = ours.run_blocks(state, ctx, 1, ours.num_blocks)
        assert torch.equal(ours.finish(state, ctx), full)
    assert ours.num_blocks == 2


def test_dummy_run_finish_is_a_zero_view(pair):
    from ditserve.dummy_run import dummy_run

    _, ours = pair
    with torch.no_grad(), dummy_run():
        out = ours(**make_inputs(6, 10, [20, 40]))
    assert out.shape == (2, IN_CH, 6, 10) and out.stride() == (0, 0, 0, 0) and not out.any()


def test_input_checks(pair):
    _, ours = pair
    good = make_inputs(8, 8, [20, 30])
    for bad, match in ((dict(encoder_lens=[20]), "encoder_lens"), (dict(encoder_lens=[0, 30]), "encoder_lens"),
                       (dict(encoder_lens=[20, 31]), "encoder_lens"),
                       (dict(hidden_states=torch.randn(2, IN_CH, 7, 8)), "multiples of the patch size"),
                       (dict(timestep=torch.rand(3)), "timestep"),
                       (dict(hidden_states=torch.randn(2, IN_CH, 8, 130)), "RoPE range")):
        with pytest.raises(ValueError, match=match):
            ours(**dict(good, **bad))
    with pytest.raises(ValueError, match="RoPE range"):  # 256 caption positions + the image's: past 256
        ours(**make_inputs(4, 4, [250]))


# ------------------------------------------------------------------------------------------ weights, config


def test_weight_map_covers_diffusers_and_every_param_once():
    sd = make_reference().state_dict()
    model = ZImageTransformer(ZImageConfig(**TINY), device="meta")
    wmap = model.weight_map()
    assert set(wmap) == set(sd)
    assert model.expected_diffusers_keys() == sorted(sd)
    params = dict(model.named_parameters())
    rows: dict[str, list[tuple[int, int]]] = {name: [] for name in params}
    for key, (name, start, stop) in wmap.items():
        n = params[name].shape[0]
        start, stop = (0, n) if start is None else (start, stop)
        assert tuple(sd[key].shape) == (stop - start, *params[name].shape[1:]), key
        rows[name].append((start, stop))
    for name, spans in rows.items():  # contiguous, no overlap, from 0 to the end
        spans.sort()
        covered = 0
        for start, stop in spans:
            assert start == covered, (name, spans)
            covered = stop
        assert covered == params[name].shape[0], (name, spans)
    assert list(model.buffers()) == []  # the loader refuses modules with buffers


def test_load_copies_every_value_and_casts(pair):
    ref, ours = pair
    sd = ref.state_dict()
    params = dict(ours.named_parameters())
    for key, (name, start, stop) in ours.weight_map().items():
        dst = params[name] if start is None else params[name][start:stop]
        assert torch.equal(dst, sd[key]), key
    bf16 = ours_from(ref, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert torch.equal(bf16.cap_pad_token, ref.cap_pad_token.bfloat16())


def test_load_rejects_missing_unexpected_and_misshapen_keys():
    ref = make_reference()
    model = ZImageTransformer(ZImageConfig(**TINY)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = ref.state_dict()

    missing = dict(sd)
    del missing["layers.1.feed_forward.w3.weight"]
    with pytest.raises(ValueError, match=r"layers\.1\.feed_forward\.w3\.weight.*layers\.1\.ffn_in"):
        model.load_diffusers_state_dict(missing)
    extra = dict(sd, **{"siglip_pad_token": torch.zeros(1, 64)})
    with pytest.raises(ValueError, match=r"unexpected keys \['siglip_pad_token'\]"):
        model.load_diffusers_state_dict(extra)
    bad_shape = dict(sd, **{"layers.0.attention.to_k.weight": torch.zeros(64, 63)})
    with pytest.raises(ValueError, match=r"shape mismatch for 'layers\.0\.attention\.to_k\.weight'"):
        model.load_diffusers_state_dict(bad_shape)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing written by a failed load


def test_config_from_diffusers():
    d = {"_class_name": "ZImageTransformer2DModel", "_diffusers_version": "0.36.0.dev0", **Z_IMAGE_TURBO_TRANSFORMER}
    c = ZImageConfig.from_diffusers(d)
    assert (c.patch_size, c.f_patch_size, c.in_channels, c.out_channels, c.patch_features) == (2, 1, 16, 16, 64)
    assert (c.dim, c.n_heads, c.head_dim, c.adaln_dim, c.ffn_hidden) == (3840, 30, 128, 256, 10240)
    assert c.axes_dims == (32, 48, 48) and c.axes_lens == (1536, 512, 512) and c.cap_feat_dim == 2560
    assert ZImageConfig() == dataclasses.replace(c, axes_lens=(1024, 512, 512))  # defaults: diffusers' class's


@pytest.mark.parametrize("bad, match", [
    ({"siglip_feat_dim": 1152}, "Z-Image-Omni is not supported"),
    ({"all_patch_size": [2, 4], "all_f_patch_size": [1, 1]}, "one patch size"),
    ({"all_f_patch_size": [2]}, "frame patch size"),
    ({"axes_dims": [32, 48, 40]}, "sum"),
    ({"axes_dims": [31, 49, 48]}, "even"),
    ({"n_heads": 7}, "divisible"),
    ({"qk_norm": False}, "qk_norm"),
    ({"ffn_multiplier": 3.0}, "unsupported ZImageTransformer2DModel config keys"),
])
def test_config_rejects_unsupported_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        ZImageConfig.from_diffusers({**Z_IMAGE_TURBO_TRANSFORMER, **bad})


def test_preset_sizes_match_released_checkpoints():
    """Parameter counts of the released Z-Image-Turbo (model-configs.md section 8): our transformer at the preset
    config, the VAE and text encoder built by their own libraries from the preset dicts (all on meta)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import Qwen3Config, Qwen3Model

    def count(m):
        return sum(p.numel() for p in m.parameters())

    model = ZImageTransformer(ZImageConfig.from_diffusers(Z_IMAGE_TURBO_TRANSFORMER), device="meta")
    assert count(model) == 6_154_908_736
    assert count(model.layers[0]) == 180_910_336 and count(model.context_refiner[0]) == 176_962_816
    with torch.device("meta"):
        assert count(AutoencoderKL(**Z_IMAGE_VAE)) == 83_819_683
        assert count(Qwen3Model(Qwen3Config(**QWEN3_4B_TEXT))) == 4_022_468_096
    sched = FlowMatchEulerDiscreteScheduler(**Z_IMAGE_TURBO_SCHEDULER)
    assert sched.config.shift == 3.0 and not sched.config.use_dynamic_shifting


def test_import_is_cheap():
    code = ("import sys, ditserve.models.z_image; "
            "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ----------------------------------------------------------------------------------------- op paths (seed 003)

@pytest.fixture
def fake_cuda(monkeypatch):
    """Make ops believe they are built for a CUDA device with Triton: the selection logic, no GPU needed (as
    tests/ops/test_ops.py does)."""
    import ditserve.ops.base as base
    from ditserve.platform import Platform

    fake = Platform("cuda", "fake GPU", (9, 0), supports_bf16=True, supports_amp=True, supports_fp8=True,
                    has_triton=True)
    monkeypatch.setattr(base, "platform_for", lambda device: fake)


def _norm_paths(model: ZImageTransformer) -> dict[str, set[str]]:
    rms = {m.path for m in model.modules() if isinstance(m, RMSNorm)}
    rotary = {m.path for m in model.modules() if isinstance(m, RMSNormRotary)}
    return {"RMSNorm": rms, "RMSNormRotary": rotary}


def test_rms_norm_paths_by_dtype(fake_cuda):
    """Seed 003: Z-Image's RMSNorms in fp32 stay on the native path (compiled, inductor's fused code); the Triton
    kernels are taken in bf16 only (eager: every applicable kernel; compiled: only where measured faster)."""
    cfg = ZImageConfig(**TINY)

    def build(dtype, compiled=False):
        ops = OpsConfig(device="cuda", dtype=dtype, kernels="auto", compiled=compiled)
        return _norm_paths(ZImageTransformer(cfg, ops=ops, device="meta", dtype=dtype))

    assert build(torch.float32) == {"RMSNorm": {"native"}, "RMSNormRotary": {"native"}}
    assert build(torch.float32, compiled=True) == {"RMSNorm": {"native"}, "RMSNormRotary": {"native"}}
    assert build(torch.bfloat16) == {"RMSNorm": {"cuda"}, "RMSNormRotary": {"cuda"}}
    # Compiled bf16: RMSNorm's kernel is not FAST_BY_DEFAULT (inductor fuses it with the scale multiply);
    # the q/k norm + RoPE kernel is.
    assert build(torch.bfloat16, compiled=True) == {"RMSNorm": {"native"}, "RMSNormRotary": {"cuda"}}


# ------------------------------------------------------------------------------------------------ compile


def test_blocks_compile_fullgraph_without_breaks_and_match_eager():
    """Every block (those of repeated_blocks, and the context refiner's, which a whole-model compile traces)
    compiles with fullgraph=True (a break would raise) and no graph-break event, for both the shared-table/no-mask
    and the per-item/masked variants; the forward equals eager."""
    ref = make_reference()
    model = ours_from(ref)
    cases = [make_inputs(6, 10, [45]), make_inputs(8, 8, [45, 20])]
    with torch.no_grad():
        eager = [model(**inputs) for inputs in cases]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounter()
    for list_name in (*ZImageTransformer.repeated_blocks, "context_refiner"):
        for block in getattr(model, list_name):
            block.compile(backend=counter, fullgraph=True)
    with torch.no_grad():
        for inputs, expected in zip(cases, eager):
            assert torch.equal(model(**inputs), expected)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    # One graph per block class and variant: (no mask, shared tables) and (mask, per-item tables) for the main
    # and noise-refiner blocks (the noise refiner's tables turn per-item too), and mask / no mask for the context
    # refiner: at most 2 + 2 + 2.
    assert 1 <= counter.frame_count <= 6


def test_engine_compile_is_one_symbolic_graph_for_every_size(_restore_compiler_flags):
    """The engine's compile (regional, dynamic shapes "auto"): the noise refiner and the main layers, one block
    class at two token counts per forward, compile once with symbolic token counts (`varying_shape_blocks`): one
    graph for the first forward, none more for another size; the context refiner is not a compiled region."""
    from ditserve.compile import CompileConfig, compile_model, compiled_modules

    model = ours_from(make_reference())
    compile_model(model, CompileConfig(dynamic=None, backend="eager", prewarm=False))
    assert not any(name.startswith("context_refiner") for name in compiled_modules(model))
    assert len(compiled_modules(model)) == len(model.noise_refiner) + len(model.layers)
    stats = torch._dynamo.utils.counters["stats"]
    before = stats["unique_graphs"]
    with torch.no_grad():
        model(**make_inputs(6, 10, [45]))  # 15 image tokens (padded to 32), 64 caption tokens
        assert stats["unique_graphs"] - before == 1
        with torch._dynamo.config.patch(error_on_recompile=True):
            model(**make_inputs(12, 12, [45]))  # 36 -> 64 image tokens
            model(**make_inputs(20, 20, [20]))  # 100 -> 128, 32 caption tokens
    assert stats["unique_graphs"] - before == 1


@pytest.fixture
def _restore_compiler_flags():
    """compile_model sets process-wide dynamo flags; keep other tests independent of them."""
    saved = torch.fx.experimental._config.use_duck_shape, torch._dynamo.config.specialize_float
    yield
    torch.fx.experimental._config.use_duck_shape, torch._dynamo.config.specialize_float = saved


def test_no_recompile_across_image_sizes(_restore_compiler_flags):
    """With dynamic=True (the engine's regional compile, backend eager) a second image size recompiles nothing
    and breaks no graph: the compile report over inputs from `example_inputs`."""
    from ditserve.compile import CompileConfig
    from ditserve.compile_report import compile_report

    torch.manual_seed(0)
    cfg = ZImageConfig(**TINY)
    model = ZImageTransformer(cfg).eval()
    with torch.no_grad():  # random pad tokens, so they are not zero
        model.x_pad_token.normal_()
        model.cap_pad_token.normal_()

    def make(h, w):
        return ZImageTransformer.example_inputs(cfg, h, w, text_len=45, device="cpu", dtype=torch.float32)

    inputs = make(48, 80)
    assert inputs["hidden_states"].shape == (1, IN_CH, 6, 10) and inputs["encoder_hidden_states"].shape == (1, 45, CAP)
    with torch.no_grad():
        eager = model(**inputs)
    # 48x80 px: 3x5 = 15 image tokens (-> 32); 96x160 px: 6x10 = 60 (-> 64). Captions 45 -> 64 tokens.
    report = compile_report(model, make, [(48, 80), (96, 160)], CompileConfig(backend="eager", dynamic=True),
                            steady_iters=1)
    assert report["graph_count"] == 1  # ZImageBlock's (the noise refiner and main layers; the context refiner
    # is not a compiled region)
    assert report["graph_breaks"] == 0 and report["break_reasons"] == []
    assert report["recompiles"] == 0 and report["recompile_reasons"] == []
    with torch.no_grad():
        assert torch.equal(model(**inputs), eager)
    with pytest.raises(ConfigError, match="multiple of 16"):
        make(40, 80)
