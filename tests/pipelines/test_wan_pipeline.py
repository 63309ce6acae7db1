"""The Wan pipeline (`ditserve.pipelines.wan.WanPipeline`) against diffusers' own `WanPipeline` on tiny checkpoints
that diffusers' `save_pretrained` wrote (`ditserve.testing_wan`): Wan 2.1 (UniPC) and Wan 2.2 with two experts
(flow-match Euler), every frame >= 40 dB PSNR; the request rules of a video family; the expert switch; the DiT
cache per expert; the model_index pipeline options; the presets.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ditserve.config import EngineConfig, SamplingParams
from ditserve.engine.engine import Engine
from ditserve.errors import ConfigError
from ditserve.testing_wan import build_tiny_wan_pipeline, reference_wan

VIDEO = dict(height=64, width=80, num_frames=5, steps=3, seed=0)


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def frame_psnrs(a, b) -> list[float]:
    """PSNR of every frame of every video: (N, F, H, W, 3) each."""
    assert a.shape == b.shape and a.ndim == 5
    return [psnr(a[n, f], b[n, f]) for n in range(a.shape[0]) for f in range(a.shape[1])]


@pytest.fixture(scope="module")
def wan21(tmp_path_factory):
    return build_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny-wan21"), seed=0)


@pytest.fixture(scope="module")
def wan22(tmp_path_factory):
    return build_tiny_wan_pipeline(tmp_path_factory.mktemp("tiny-wan22"), seed=1, two_experts=True,
                                   boundary_ratio=0.6, scheduler="euler", flow_shift=5.0)


@pytest.fixture(scope="module")
def engine21(wan21):
    return Engine.load(str(wan21), EngineConfig(device="cpu"))


@pytest.fixture(scope="module")
def engine22(wan22):
    return Engine.load(str(wan22), EngineConfig(device="cpu"))


def generate(engine, **kw) -> np.ndarray:
    [out] = engine.generate([SamplingParams(**{**VIDEO, **kw})])
    assert out.kind == "video" and out.frames.dtype == np.uint8
    return out.frames


# ------------------------------------------------------------------------------------------------ layout

def test_checkpoints_are_diffusers_layouts(wan21, wan22):
    index = json.loads((wan21 / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    assert index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    assert index["transformer_2"] == [None, None] and index["boundary_ratio"] is None
    assert index["vae"] == ["diffusers", "AutoencoderKLWan"]
    assert index["text_encoder"] == ["transformers", "UMT5EncoderModel"]
    assert index["scheduler"] == ["diffusers", "UniPCMultistepScheduler"]
    index2 = json.loads((wan22 / "model_index.json").read_text())
    assert index2["transformer_2"] == ["diffusers", "WanTransformer3DModel"] and index2["boundary_ratio"] == 0.6
    assert index2["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]


# ------------------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("case", [
    dict(prompt="a photo of a cat", negative_prompt="blurry", guidance=4.0),  # CFG, both branches batched
    dict(prompt="a red house under the sky", guidance=1.0),  # no CFG: one branch
    dict(prompt=["a photo of a cat", "a red house"], negative_prompt="blurry", guidance=3.0, num_images=2,
         height=96, width=64, num_frames=9),  # 4 videos, tall, 3 latent frames
])
def test_wan21_matches_diffusers(wan21, engine21, case):
    kw = {**VIDEO, **case}
    ours = generate(engine21, **kw)
    n = len(kw["prompt"]) if isinstance(kw["prompt"], list) else 1
    ref = reference_wan(wan21, kw["prompt"], negative_prompt=kw.get("negative_prompt"), height=kw["height"],
                        width=kw["width"], num_frames=kw["num_frames"], steps=kw["steps"], guidance=kw["guidance"],
                        seed=kw["seed"], num_videos=kw.get("num_images", 1))
    assert ours.shape == ref.shape == (n * kw.get("num_images", 1), kw["num_frames"], kw["height"], kw["width"], 3)
    if n == 1:
        assert min(frame_psnrs(ours, ref)) >= 40
    else:  # our batch draws each request's noise alone; diffusers draws all videos from one generator
        assert min(frame_psnrs(ours[:1], ref[:1])) >= 40


def test_bf16_engine(wan21):
    """The DiT in bf16 (its fp32 tables and time embedder kept in fp32): runs, and stays near diffusers' fp32."""
    ours = generate(Engine.load(str(wan21), EngineConfig(device="cpu", dtype="bf16")), prompt="a cat",
                    negative_prompt="blurry", guidance=4.0)
    ref = reference_wan(wan21, "a cat", negative_prompt="blurry", guidance=4.0, **VIDEO)
    assert min(frame_psnrs(ours, ref)) >= 30


def test_ti2v_text_to_video_matches_diffusers(tmp_path):
    """An expand_timesteps checkpoint (Wan 2.2 TI2V-5B's option) without an input image: diffusers gives every
    token the step's timestep; ours gives it once per sample, the same result."""
    path = build_tiny_wan_pipeline(tmp_path / "ti2v", seed=4, expand_timesteps=True)
    engine = Engine.load(str(path), EngineConfig(device="cpu"))
    assert engine.pipeline.expand_timesteps and engine.capabilities.max_input_images == 1
    assert (engine.spec.default_num_frames, engine.spec.default_fps) == (121, 24.0)
    ours = generate(engine, prompt="a photo of a cat", negative_prompt="blurry", guidance=4.0)
    ref = reference_wan(path, "a photo of a cat", negative_prompt="blurry", guidance=4.0, **VIDEO)
    assert min(frame_psnrs(ours, ref)) >= 40


def test_split_cfg_matches_batched(wan21):
    batched = generate(Engine.load(str(wan21), EngineConfig(device="cpu", cfg_mode="split")), prompt="a cat",
                       negative_prompt="blurry", guidance=4.0)
    ref = reference_wan(wan21, "a cat", negative_prompt="blurry", guidance=4.0, **VIDEO)
    assert min(frame_psnrs(batched, ref)) >= 40


def test_wan22_two_experts_match_diffusers(wan22, engine22):
    """Both experts run (boundary 0.6 of 1000 splits the 3 steps), each with its own guidance scale."""
    pipe = engine22.pipeline
    for g, g2 in ((4.0, 2.0), (3.0, None)):
        ours = generate(engine22, prompt="a photo of a cat", negative_prompt="blurry", guidance=g,
                        guidance_2=g2)
        assert {e for e, _ in pipe._plan} == {0, 1}
        assert [s for _, s in pipe._plan if _ == 1] == [g if g2 is None else g2] * sum(e for e, _ in pipe._plan)
        ref = reference_wan(wan22, "a photo of a cat", negative_prompt="blurry", guidance=g, guidance_2=g2, **VIDEO)
        assert min(frame_psnrs(ours, ref)) >= 40
    # guidance_2 reaches the second expert: another value, another video
    other = generate(engine22, prompt="a photo of a cat", negative_prompt="blurry", guidance=4.0, guidance_2=8.0)
    assert psnr(other, ours) < 40


@pytest.mark.parametrize("num_frames", [5, 9])
def test_chunked_decode_is_the_whole_decode(engine21, num_frames):
    """The pipeline's decode (latent frame by latent frame, each chunk to uint8 on the host) gives bitwise the
    frames of diffusers' whole `AutoencoderKLWan.decode`."""
    import torch

    from ditserve.pipelines.base import to_uint8

    pipe = engine21.pipeline
    params = pipe.resolve(SamplingParams(prompt="x", **{**VIDEO, "num_frames": num_frames}))
    latents = torch.randn(pipe.latent_shape(2, params), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = to_uint8(pipe.decode_latents(latents, params))
        chunked = pipe.decode(latents, params)
    assert chunked.shape == whole.shape == (2, num_frames, 64, 80, 3)
    assert np.array_equal(chunked, whole)


# ------------------------------------------------------------------------------------------------ requests

def test_video_request_rules(engine21, engine22):
    spec = engine21.spec
    assert (spec.default_num_frames, spec.default_fps, spec.default_steps, spec.default_guidance) == (81, 16.0, 50, 5.0)
    [out] = engine21.generate([SamplingParams(prompt="x", **VIDEO)])
    assert out.fps == 16.0 and out.params.num_frames == 5
    with pytest.raises(ConfigError, match="num_frames must be 4n \\+ 1 for Wan"):
        engine21.generate([SamplingParams(prompt="x", **{**VIDEO, "num_frames": 6})])
    with pytest.raises(ConfigError, match="guidance_2 is not supported by Wan"):
        engine21.generate([SamplingParams(prompt="x", guidance_2=2.0, **VIDEO)])
    with pytest.raises(ConfigError, match="height must be a multiple of 16"):
        engine21.generate([SamplingParams(prompt="x", **{**VIDEO, "height": 72})])
    assert engine22.capabilities.two_experts and not engine21.capabilities.two_experts


def test_transformer_2_without_boundary_is_refused(wan22, tmp_path):
    import shutil

    folder = tmp_path / "no-boundary"
    shutil.copytree(wan22, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["boundary_ratio"] = None
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="boundary_ratio"):
        Engine.load(str(folder), EngineConfig(device="cpu"))


def test_cache_state_per_expert_and_branch(wan22):
    """--cache on a two-expert model: each expert has its own cache (its first step computes, whatever the other
    expert cached), and split CFG keeps a state per branch; the stats sum both experts."""
    cache = "fbcache:threshold=inf,warmup=1,max_consecutive=0"
    engine = Engine.load(str(wan22), EngineConfig(device="cpu", cache=cache, cfg_mode="split"))
    pipe = engine.pipeline
    a, b = pipe.transformer.block_cache, pipe.transformer_2.block_cache
    assert a is not None and b is not None and a is not b
    [out] = engine.generate([SamplingParams(prompt="a cat", negative_prompt="blurry", guidance=4.0,
                                            **{**VIDEO, "steps": 6})])
    first = [e for e, _ in pipe._plan].count(0)
    assert 0 < first < 6
    # per expert and branch: its first step computes (warmup 1), the others are cached (threshold inf, no limit)
    assert out.cache_stats["computed"] == 2 * 2 and out.cache_stats["cached"] == 2 * (6 - 2)
    assert set(a._branches) == set(b._branches) == {"cond", "uncond"}


def test_both_experts_graphs_are_reported_and_released(engine22):
    """With CUDA graphs each expert has its own graphed forward; the memory reported and the idle release cover
    both, whichever expert the last step ran (a stand-in for the graphs: this runs on the CPU)."""
    from ditserve.cuda_graphs import GraphedForward

    pipe = engine22.pipeline
    saved = pipe._forwards, pipe.forward
    try:
        pipe._forwards = [GraphedForward(lambda: None, memory_bytes=3), GraphedForward(lambda: None, memory_bytes=4)]
        for g in pipe._forwards:
            g.graphs[("key",)] = type("Graph", (), {"last_used": 0.0})()
        pipe.forward = pipe._forwards[1]
        assert pipe.graph_memory_bytes == 7
        assert pipe.release_idle_graphs(0.0) == 2 and pipe.graph_memory_bytes == 0
    finally:
        pipe._forwards, pipe.forward = saved


def test_presets_resolve():
    from ditserve.registry import PRESETS, pipeline_class, preset

    for name in ("wan2.1-t2v-1.3b", "wan2.1-t2v-14b", "wan2.2-t2v-a14b", "wan2.2-ti2v-5b"):
        assert name in PRESETS
        spec = preset(name)
        assert spec.pipeline == "WanPipeline" and pipeline_class(spec.pipeline).FAMILY == "Wan"
        assert spec.default_num_frames in (81, 121) and spec.default_fps in (16.0, 24.0)
        assert ("transformer_2" in spec.components) == (name == "wan2.2-t2v-a14b")
    assert preset("wan2.2-ti2v-5b").components["vae"][1]["z_dim"] == 48
    i2v = preset("wan2.1-i2v-14b-480p")
    assert i2v.pipeline == "WanImageToVideoPipeline" and pipeline_class(i2v.pipeline).FAMILY == "Wan"
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with torch.device("meta"):  # the dummy preset's image encoder builds from its config: ViT-H/14's tower
        clip = CLIPVisionModel(CLIPVisionConfig.from_dict(i2v.components["image_encoder"][1]))
    assert clip.config.hidden_size == i2v.components["transformer"][1]["image_dim"] == 1280
    from ditserve.registry import import_target

    processor = import_target(i2v.tokenizers["image_processor"])()
    assert processor.crop_size == {"height": 224, "width": 224}
    from ditserve.testing_wan import make_dummy_wan_tokenizer

    tok = make_dummy_wan_tokenizer()
    ids = tok(["a photo of a cat"], padding="max_length", max_length=512).input_ids[0]
    assert len(ids) == 512 and max(ids) < 256384


def test_chunked_decode_of_a_wan22_vae():
    """Wan2.2's VAE (TI2V-5B: residual, 2x2 pixel patches as channels, 16x spatial) decodes chunk by chunk to the
    same tensor as its whole decode."""
    import torch
    from diffusers import AutoencoderKLWan

    from ditserve.pipelines.wan import decode_chunks

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=16, decoder_base_dim=24, z_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True], is_residual=True, in_channels=12,
                           out_channels=12, patch_size=2, scale_factor_spatial=16, latents_mean=[0.0] * 8,
                           latents_std=[1.0] * 8).eval()
    z = torch.randn(1, 8, 3, 4, 5)
    with torch.no_grad():
        whole = vae.decode(z, return_dict=False)[0]
        chunks = list(decode_chunks(vae, z))
    assert [c.shape[2] for c in chunks] == [1, 4, 4]
    assert torch.equal(torch.cat(chunks, 2).clamp(-1, 1), whole) and whole.shape == (1, 3, 9, 64, 80)
