"""Qwen-Image transformer: parity with diffusers' QwenImageTransformer2DModel (masked and unmasked text, several
images as an edit model passes them), RoPE positions, weight mapping, config, presets, compile.

diffusers is the numerical reference; it is imported inside the tests only. Models are tiny: 2 heads x 16 (rope
axes 4+6+6), 2 blocks, joint_attention_dim 24, in_channels 16 (4 latent channels packed 2x2).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from ditserve.config import ConfigError
from ditserve.models.qwen_image import (
    QWEN_IMAGE_TRANSFORMER, QwenImageConfig, QwenImageTransformer, rope_positions,
)

TXT, IN_CH = 24, 16
TINY = dict(patch_size=2, in_channels=IN_CH, out_channels=4, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=TXT, axes_dims_rope=(4, 6, 6))


@torch.no_grad()
def make_reference(seed: int = 0, **config):
    """A diffusers QwenImageTransformer2DModel, seeded, every parameter perturbed (norm weights no longer ones,
    biases not zero)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    ref = QwenImageTransformer2DModel(**TINY, **config).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    for p in ref.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return ref


def ours_from(ref, dtype=torch.float32) -> QwenImageTransformer:
    model = QwenImageTransformer(QwenImageConfig.from_diffusers(dict(ref.config)), dtype=dtype).eval()
    model.load_diffusers_state_dict(ref.state_dict())
    return model


@pytest.fixture(scope="module")
def pair():
    ref = make_reference()
    return ref, ours_from(ref)


def make_inputs(shapes, lens: list[int], T: int | None = None, seed: int = 1) -> dict:
    """Our forward kwargs: images `shapes` [(f, h, w), ...] (tokens), B = len(lens) rows of text with lens[b] real
    tokens of T (mask None when every row is full)."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lens), T or max(lens)
    L = sum(f * h * w for f, h, w in shapes)
    mask = torch.arange(T)[None] < torch.tensor(lens)[:, None]  # (B, T) bool
    return dict(hidden_states=torch.randn(B, L, IN_CH, generator=g),
                encoder_hidden_states=torch.randn(B, T, TXT, generator=g),
                timestep=torch.rand(B, generator=g), img_shapes=list(shapes),
                encoder_hidden_states_mask=None if bool(mask.all()) else mask)


def run_reference(ref, inputs: dict) -> torch.Tensor:
    B = inputs["hidden_states"].shape[0]
    kw = dict(inputs, img_shapes=[list(inputs["img_shapes"])] * B)
    with torch.no_grad():
        return ref(**kw, return_dict=False)[0]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CASES = {
    "square, one prompt": ([(1, 4, 4)], [9]),
    "non-square, odd sides": ([(1, 5, 7)], [13]),
    "padded text (masked)": ([(1, 6, 4)], [11, 5]),
    "edit: two images": ([(1, 4, 6), (1, 5, 3)], [8, 3]),
    "edit: three images, no mask": ([(1, 4, 4), (1, 2, 6), (1, 3, 3)], [7, 7]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_fp32(pair, case):
    ref, ours = pair
    inputs = make_inputs(*CASES[case])
    with torch.no_grad():
        out = ours(**inputs)
    assert out.shape == (len(CASES[case][1]), inputs["hidden_states"].shape[1], 16)
    assert rel_err(out, run_reference(ref, inputs)) <= 1e-5


def test_bf16_not_worse_than_diffusers_bf16():
    """Both bf16 models judged against diffusers in fp32 on the same bf16-representable weights and inputs
    (timesteps 0.5 / 0.25: exact in bf16), masked and unmasked text."""
    import copy

    ref = make_reference()
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.bfloat16().float())
    ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    ours = ours_from(ref, dtype=torch.bfloat16)
    worst_ratio = 0.0
    for shapes, lens in (([(1, 6, 4)], [11, 5]), ([(1, 4, 6), (1, 2, 4)], [9, 9])):
        inputs = make_inputs(shapes, lens)
        inputs["timestep"] = torch.tensor([0.5, 0.25])
        inputs = {k: (v.bfloat16().float() if torch.is_floating_point(v) else v) if torch.is_tensor(v) else v
                  for k, v in inputs.items()}
        inputs_bf16 = {k: (v.bfloat16() if torch.is_floating_point(v) else v) if torch.is_tensor(v) else v
                       for k, v in inputs.items()}
        expected = run_reference(ref, inputs)
        err_diffusers = rel_err(run_reference(ref_bf16, inputs_bf16), expected)
        with torch.no_grad():
            out = ours(**inputs_bf16)
        assert out.dtype == torch.bfloat16
        err_ours = rel_err(out, expected)
        assert err_ours < 3e-2, (lens, err_ours)
        worst_ratio = max(worst_ratio, err_ours / err_diffusers)
    assert worst_ratio <= 1.2, worst_ratio


@pytest.mark.parametrize("lens", [[8, 3], [7, 7]])
def test_parity_zero_cond_t(lens):
    """Edit-2511's zero_cond_t: the input images' tokens modulated as at t = 0 (masked and unmasked text)."""
    ref = make_reference(zero_cond_t=True)
    ours = ours_from(ref)
    inputs = make_inputs([(1, 4, 6), (1, 5, 3), (1, 2, 2)], lens)
    with torch.no_grad():
        out = ours(**inputs)
    assert rel_err(out, run_reference(ref, inputs)) <= 1e-5
    # the reference images' tokens are modulated otherwise than without zero_cond_t
    plain = ours_from(make_reference())
    with torch.no_grad():
        assert rel_err(plain(**inputs)[:, 24:], out[:, 24:]) > 1e-2


def test_padding_is_masked_out(pair):
    """A prompt padded with garbage tokens (masked) gives the image of the prompt alone, as in diffusers; without
    the mask the padding would change it."""
    _, ours = pair
    short = make_inputs([(1, 4, 4)], [6])
    padded = dict(short, encoder_hidden_states=torch.cat((short["encoder_hidden_states"], torch.randn(1, 5, TXT)), 1),
                  encoder_hidden_states_mask=torch.tensor([[True] * 6 + [False] * 5]))
    with torch.no_grad():
        alone, masked = ours(**short), ours(**padded)
        unmasked = ours(**dict(padded, encoder_hidden_states_mask=None))
    assert rel_err(masked, alone) <= 1e-5  # text positions do not depend on the padding after the prompt
    assert rel_err(unmasked, alone) > 1e-2


def test_positions():
    """diffusers' QwenEmbedRope (scale_rope): rows/columns centred, the k-th image at frame k, text after."""
    txt, img = rope_positions([(1, 3, 4), (1, 2, 2)], text_len=2)
    assert img[:12, 0].tolist() == [0] * 12 and img[12:, 0].tolist() == [1] * 4
    assert img[:12, 1].tolist() == [-2] * 4 + [-1] * 4 + [0] * 4  # h = 3: -(3 - 1) .. 0
    assert img[:4, 2].tolist() == [-2, -1, 0, 1]  # w = 4: -2 .. 1
    assert img[12:, 1:].tolist() == [[-1, -1], [-1, 0], [0, -1], [0, 0]]
    assert txt.tolist() == [[2, 2, 2], [3, 3, 3]]  # m = max(3 // 2, 4 // 2, 2 // 2, 2 // 2) = 2


def test_timestep_and_text_matter(pair):
    _, ours = pair
    inputs = make_inputs([(1, 4, 4)], [9])
    with torch.no_grad():
        base = ours(**inputs)
        assert rel_err(ours(**dict(inputs, timestep=inputs["timestep"] + 0.3)), base) > 1e-2
        other = dict(inputs, encoder_hidden_states=torch.randn_like(inputs["encoder_hidden_states"]))
        assert rel_err(ours(**other), base) > 1e-2


def test_precomputed_conditioning_equals_per_step(pair):
    """precompute_conditioning for N steps at once (one pass over the modulation weights) gives each step's
    forward of the timestep alone."""
    _, ours = pair
    inputs = make_inputs([(1, 4, 6)], [8, 3])
    steps = torch.tensor([[0.9, 0.9], [0.5, 0.5], [0.1, 0.1]])  # (N, B)
    with torch.no_grad():
        conds = ours.precompute_conditioning(steps)
        for i in range(3):
            step = dict(inputs, timestep=steps[i])
            assert rel_err(ours(**step, conditioning=conds[i]), ours(**step)) <= 1e-6
        with pytest.raises(ValueError, match="conditioning was computed for a batch of 1"):
            ours(**inputs, conditioning=ours.precompute_conditioning(steps[:, :1])[0])


def test_run_blocks_in_ranges_equals_forward(pair):
    """The block-cache interface: prepare -> run_blocks over any split of the blocks -> finish."""
    _, ours = pair
    inputs = make_inputs([(1, 4, 6)], [8, 3])
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
        out = ours(**make_inputs([(1, 4, 6)], [8, 3]))
    assert out.shape == (2, 24, 16) and out.stride() == (0, 0, 0) and not out.any()


def test_input_checks(pair):
    _, ours = pair
    good = make_inputs([(1, 4, 4)], [9, 4])
    for bad, match in ((dict(img_shapes=[(1, 4, 5)]), "img_shapes"), (dict(img_shapes=[]), "img_shapes"),
                       (dict(hidden_states=torch.randn(2, 16, 12)), "hidden_states"),
                       (dict(encoder_hidden_states_mask=torch.ones(2, 5, dtype=torch.bool)), "mask"),
                       (dict(timestep=torch.rand(3)), "timestep"),
                       (dict(encoder_hidden_states=torch.randn(2, 9, 7)), "encoder_hidden_states")):
        with pytest.raises(ValueError, match=match):
            ours(**dict(good, **bad))
    with pytest.raises(ValueError, match="RoPE tables"):
        ours(**make_inputs([(1, 2, 2)], [1], T=4096))


# ------------------------------------------------------------------------------------------ weights, config


def test_weight_map_covers_diffusers_and_every_param_once():
    sd = make_reference().state_dict()
    model = QwenImageTransformer(QwenImageConfig(**TINY), device="meta")
    wmap = model.weight_map()
    assert set(wmap) == set(sd) and model.expected_diffusers_keys() == sorted(sd)
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


def test_load_rejects_missing_keys_and_writes_nothing():
    ref = make_reference()
    model = QwenImageTransformer(QwenImageConfig(**TINY)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = dict(ref.state_dict())
    del sd["transformer_blocks.1.attn.add_k_proj.bias"]
    with pytest.raises(ValueError, match=r"add_k_proj\.bias"):
        model.load_diffusers_state_dict(sd)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_from_diffusers_and_preset_size():
    d = {"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.35.0", **QWEN_IMAGE_TRANSFORMER}
    c = QwenImageConfig.from_diffusers(d)
    assert (c.inner_dim, c.out_features, c.axes_dims_rope) == (3072, 64, (16, 56, 56))
    assert QwenImageConfig() == c  # the class defaults are Qwen-Image's
    assert QwenImageConfig.from_diffusers(dict(QWEN_IMAGE_TRANSFORMER, out_channels=None)).out_channels == 64
    model = QwenImageTransformer(c, device="meta")
    assert sum(p.numel() for p in model.parameters()) == 20_430_401_088  # diffusers' class at this config


@pytest.mark.parametrize("bad, match", [
    ({"use_additional_t_cond": True}, "use_additional_t_cond=True"),
    ({"use_layer3d_rope": True}, "use_layer3d_rope=True"),
    ({"guidance_embeds": True}, "guidance_embeds"),
    ({"axes_dims_rope": [16, 56, 54]}, "sum"),
    ({"axes_dims_rope": [15, 57, 56]}, "even"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"rope_theta": 1000}, "unsupported QwenImageTransformer2DModel config keys"),
])
def test_config_rejects_unsupported_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        QwenImageConfig.from_diffusers(dict(QWEN_IMAGE_TRANSFORMER, **bad))


# ------------------------------------------------------------------------------------------------ compile


def test_blocks_compile_fullgraph_without_breaks_and_match_eager(pair):
    """The block compiles with fullgraph=True (a break would raise) and no graph-break event, with and without
    a text mask; the compiled forward equals eager."""
    ref = make_reference()
    model = ours_from(ref)
    cases = [make_inputs([(1, 4, 6)], [8]), make_inputs([(1, 4, 6), (1, 2, 2)], [8, 3])]
    with torch.no_grad():
        eager = [model(**inputs) for inputs in cases]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    counter = CompileCounter()
    for block in model.transformer_blocks:
        block.compile(backend=counter, fullgraph=True)
    with torch.no_grad():
        for inputs, expected in zip(cases, eager):
            assert torch.equal(model(**inputs), expected)
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
    # The unmasked variant, the masked one (other sizes too) and at most one automatic-dynamic recompile.
    assert 1 <= counter.frame_count <= 3


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
    cfg = QwenImageConfig(**TINY)
    model = QwenImageTransformer(cfg).eval()

    def make(h, w):
        return QwenImageTransformer.example_inputs(cfg, h, w, text_len=12, device="cpu", dtype=torch.float32)

    inputs = make(48, 80)
    assert inputs["hidden_states"].shape == (1, 15, IN_CH) and inputs["img_shapes"] == [(1, 3, 5)]
    with torch.no_grad():
        eager = model(**inputs)
    report = compile_report(model, make, [(48, 80), (96, 160)], CompileConfig(backend="eager", dynamic=True),
                            steady_iters=1)
    assert report["graph_count"] >= 1
    assert report["graph_breaks"] == 0 and report["break_reasons"] == []
    assert report["recompiles"] == 0 and report["recompile_reasons"] == []
    with torch.no_grad():
        assert torch.equal(model(**inputs), eager)
    with pytest.raises(ConfigError, match="multiple of 16"):
        make(40, 80)
