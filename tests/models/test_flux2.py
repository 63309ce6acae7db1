"""FLUX.2 transformer: parity with diffusers' Flux2Transformer2DModel, weight mapping, config, presets, compile.

diffusers is the numerical reference; it is imported inside the tests only. Models are tiny: 2 heads x 16
(rope axes 4 x 4), 2 double + 2 single blocks, 16 latent channels, 48 text features.
"""

from __future__ import annotations

import pytest
import torch

from ditserve.config import ConfigError
from ditserve.models.flux2 import (
    FLUX_2_DEV_TRANSFORMER, FLUX_2_KLEIN_4B_TRANSFORMER, FLUX_2_KLEIN_9B_TRANSFORMER, FLUX_2_VAE, Flux2Config,
    Flux2Transformer, image_ids, text_ids,
)

IN_CH, JOINT = 16, 48
TINY = dict(patch_size=1, in_channels=IN_CH, out_channels=None, num_layers=2, num_single_layers=2,
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=JOINT, timestep_guidance_channels=32,
            mlp_ratio=3.0, axes_dims_rope=[4, 4, 4, 4], rope_theta=2000, eps=1e-6)


@torch.no_grad()
def make_reference(guidance_embeds: bool = True, seed: int = 0):
    """A diffusers Flux2Transformer2DModel, seeded, every parameter perturbed (norm weights are not ones)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    ref = Flux2Transformer2DModel(**TINY, guidance_embeds=guidance_embeds).eval()
    gen = torch.Generator().manual_seed(seed + 100)
    for p in ref.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return ref


def ours_from(ref, dtype=torch.float32, **kw) -> Flux2Transformer:
    model = Flux2Transformer(Flux2Config.from_diffusers(dict(ref.config)), dtype=dtype, **kw).eval()
    model.load_diffusers_state_dict(ref.state_dict())
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["dev", "klein"])
def pair(request):
    ref = make_reference(request.param)
    return ref, ours_from(ref)


def make_inputs(rows: int, cols: int, T: int, B: int = 1, guidance: bool = True, refs: tuple = (),
                seed: int = 1) -> dict:
    """Forward kwargs: latents of a rows x cols grid plus reference grids `refs` ((rows, cols) each, at t = 10,
    20, ...), T text tokens, ids as diffusers' pipeline builds them."""
    g = torch.Generator().manual_seed(seed)
    ids = [image_ids(rows, cols)] + [image_ids(r, c, t=10 * (i + 1)) for i, (r, c) in enumerate(refs)]
    L = sum(len(i) for i in ids)
    return dict(hidden_states=torch.randn(B, L, IN_CH, generator=g),
                encoder_hidden_states=torch.randn(B, T, JOINT, generator=g),
                timestep=torch.rand(B, generator=g), img_ids=torch.cat(ids), txt_ids=text_ids(T),
                guidance=torch.rand(B, generator=g) * 5 if guidance else None)


@torch.no_grad()
def run_reference(ref, inputs: dict) -> torch.Tensor:
    kw = dict(inputs)
    B = kw["hidden_states"].shape[0]
    kw["img_ids"] = kw["img_ids"].expand(B, -1, -1)  # diffusers' pipeline passes (B, N, 4)
    kw["txt_ids"] = kw["txt_ids"].expand(B, -1, -1)
    return ref(**kw, return_dict=False)[0]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


# ------------------------------------------------------------------------------------------------ parity

CASES = {  # (rows, cols, text tokens, batch, reference grids)
    "square": (4, 4, 12, 1, ()),
    "non_square_batch": (3, 6, 7, 2, ()),
    "one_reference": (4, 4, 8, 1, ((4, 4),)),
    "two_references_of_other_sizes": (2, 4, 8, 2, ((3, 3), (5, 2))),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_fp32(pair, case):
    ref, ours = pair
    rows, cols, T, B, refs = CASES[case]
    inputs = make_inputs(rows, cols, T, B, guidance=ours.config.guidance_embeds, refs=refs)
    expected = run_reference(ref, inputs)
    with torch.no_grad():
        out = ours(**inputs)
        # only the generated image's tokens through the output layer: the same rows
        head = ours(**inputs, out_tokens=rows * cols)
    assert out.shape == expected.shape and out.dtype == torch.float32
    assert expected.norm() > 1.0
    assert rel_err(out, expected) <= 1e-5, case
    assert head.shape == (B, rows * cols, IN_CH) and rel_err(head, expected[:, :rows * cols]) <= 1e-5


def test_guidance_and_timestep_matter():
    """The guidance embedding and the timestep change the output (guards parity against both ignoring them)."""
    ours = ours_from(make_reference(True))
    inputs = make_inputs(4, 4, 8)
    with torch.no_grad():
        out0 = ours(**inputs)
        assert rel_err(ours(**dict(inputs, guidance=inputs["guidance"] + 1)), out0) > 1e-3
        assert rel_err(ours(**dict(inputs, timestep=inputs["timestep"] * 0.5)), out0) > 1e-3


def test_input_checks(pair):
    _, ours = pair
    g = ours.config.guidance_embeds
    good = make_inputs(4, 4, 8, B=2, guidance=g)
    bad_cases = [(dict(hidden_states=torch.randn(2, 16, IN_CH + 1)), "hidden_states"),
                 (dict(encoder_hidden_states=torch.randn(2, 8, JOINT - 1)), "encoder_hidden_states"),
                 (dict(timestep=torch.rand(3)), "timestep"),
                 (dict(img_ids=image_ids(4, 3)), "img_ids"),
                 (dict(txt_ids=text_ids(7)), "txt_ids"),
                 (dict(out_tokens=17), "out_tokens")]
    bad_cases.append((dict(guidance=None), "guidance-distilled") if g else
                     (dict(guidance=torch.ones(2)), "no guidance embedder"))
    for bad, match in bad_cases:
        with pytest.raises(ValueError, match=match):
            ours(**dict(good, **bad))


def test_run_blocks_in_ranges_equals_forward(pair):
    """The block-cache interface: prepare -> run_blocks over any split (inside the double blocks, across the
    double/single boundary) -> finish."""
    _, ours = pair
    inputs = make_inputs(3, 5, 9, guidance=ours.config.guidance_embeds)
    with torch.no_grad():
        full = ours(**inputs)
        for cuts in ((1,), (2,), (3,), (1, 3)):
            state, ctx = ours.prepare(**inputs)
            edges = (0, *cuts, ours.num_blocks)
            for a, b in zip(edges, edges[1:]):
                state = ours.run_blocks(state, ctx, a, b)
            assert torch.equal(ours.finish(state, ctx), full), cuts
    assert ours.num_blocks == 4


def test_dummy_run_finish_is_a_zero_view(pair):
    from ditserve.dummy_run import dummy_run

    _, ours = pair
    with torch.no_grad(), dummy_run():
        out = ours(**make_inputs(3, 5, 9, B=2, guidance=ours.config.guidance_embeds), out_tokens=10)
    assert out.shape == (2, 10, IN_CH) and out.stride() == (0, 0, 0) and not out.any()


# ------------------------------------------------------------------------------------------ weights, config


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_weight_map_covers_diffusers_and_every_param_once(guidance_embeds):
    sd = make_reference(guidance_embeds).state_dict()
    model = Flux2Transformer(Flux2Config(**TINY, guidance_embeds=guidance_embeds), device="meta")
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
    assert list(model.buffers()) == [] and all(getattr(m, "bias", None) is None for m in model.modules())


def test_load_rejects_missing_and_misshapen_keys():
    ref = make_reference()
    model = Flux2Transformer(Flux2Config(**TINY)).eval()
    sd = ref.state_dict()
    missing = dict(sd)
    del missing["single_stream_modulation.linear.weight"]
    with pytest.raises(ValueError, match=r"single_stream_modulation\.linear\.weight"):
        model.load_diffusers_state_dict(missing)
    bad = dict(sd, **{"transformer_blocks.0.ff.linear_in.weight": torch.zeros(3, 32)})
    with pytest.raises(ValueError, match="shape mismatch"):
        model.load_diffusers_state_dict(bad)


@pytest.mark.parametrize("bad, match", [
    ({"patch_size": 2}, "patch_size must be 1"),
    ({"axes_dims_rope": [32, 32, 32, 30]}, "sum"),
    ({"axes_dims_rope": [33, 31, 32, 32]}, "even"),
    ({"num_layers": -1}, "num_layers"),
    ({"qk_norm": True}, "unsupported Flux2Transformer2DModel config keys"),
])
def test_config_rejects_unsupported_values(bad, match):
    with pytest.raises(ConfigError, match=match):
        Flux2Config.from_diffusers({**FLUX_2_DEV_TRANSFORMER, **bad})


def test_preset_sizes_match_released_checkpoints():
    """Parameter counts of the released checkpoints (model-configs.md sections 4 and 5), ours on meta, and the
    VAE built by diffusers from the preset dict."""
    from diffusers import AutoencoderKLFlux2

    def count(m):
        return sum(p.numel() for p in m.parameters())

    for config, n in ((FLUX_2_DEV_TRANSFORMER, 32_223_281_152), (FLUX_2_KLEIN_4B_TRANSFORMER, 3_875_544_576),
                      (FLUX_2_KLEIN_9B_TRANSFORMER, 9_078_581_248)):
        assert count(Flux2Transformer(Flux2Config.from_diffusers(config), device="meta")) == n
    dev = Flux2Transformer(Flux2Config.from_diffusers(FLUX_2_DEV_TRANSFORMER), device="meta")
    assert count(dev.double_blocks[0]) == 981_467_648 and count(dev.single_blocks[0]) == 490_733_824
    with torch.device("meta"):
        assert count(AutoencoderKLFlux2(**FLUX_2_VAE)) == 84_046_115


# ------------------------------------------------------------------------------------------------ compile


@pytest.fixture
def _restore_compiler_flags():
    """compile_model sets process-wide dynamo flags; keep other tests independent of them."""
    saved = torch.fx.experimental._config.use_duck_shape, torch._dynamo.config.specialize_float
    yield
    torch.fx.experimental._config.use_duck_shape, torch._dynamo.config.specialize_float = saved


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "klein"])
def test_compile_fullgraph_no_breaks_no_recompiles(_restore_compiler_flags, guidance_embeds):
    """The engine's regional compile (fullgraph, dynamic, backend eager): two image sizes, zero graph breaks,
    zero recompiles, and the compiled forward equals eager."""
    from ditserve.compile import CompileConfig
    from ditserve.compile_report import compile_report

    torch.manual_seed(0)
    cfg = Flux2Config(**TINY, guidance_embeds=guidance_embeds)
    model = ours_from(make_reference(guidance_embeds))

    def make(h, w):
        return Flux2Transformer.example_inputs(cfg, h, w, text_len=24)

    inputs = make(64, 96)
    assert inputs["hidden_states"].shape == (1, 24, IN_CH) and inputs["img_ids"].shape == (24, 4)
    with torch.no_grad():
        eager = model(**inputs)
    report = compile_report(model, make, [(64, 96), (128, 80)], CompileConfig(backend="eager", dynamic=True),
                            steady_iters=1)
    assert report["graph_count"] >= 2  # double and single blocks
    assert report["graph_breaks"] == 0 and report["break_reasons"] == []
    assert report["recompiles"] == 0 and report["recompile_reasons"] == []
    with torch.no_grad():
        assert torch.equal(model(**inputs), eager)
    with pytest.raises(ConfigError, match="multiple of 16"):
        make(40, 80)
