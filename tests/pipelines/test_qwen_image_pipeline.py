"""QwenImagePipeline against diffusers' on a tiny checkpoint made by diffusers' own save_pretrained (true CFG with a
negative prompt, square and non-square), and the engine features on the Qwen-Image family (the CLI, compile-report,
the block cache per CFG branch, CFG modes, fp8, presets, the family's capabilities)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditserve.cli import main
from ditserve.config import ConfigError, EngineConfig, SamplingParams
from ditserve.engine import Engine
from ditserve.testing_qwen_image import build_tiny_qwen_image_pipeline, reference_qwen_image

PROMPT = "a photo of a cat"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_qwen_image_pipeline(tmp_path_factory.mktemp("qwen-image") / "tiny")


@pytest.fixture(scope="module")
def engine(folder):
    return Engine.load(str(folder), EngineConfig(device="cpu"))


def test_checkpoint_layout_and_spec(folder, engine):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
    spec = engine.spec
    assert (spec.default_steps, spec.default_guidance, spec.max_sequence_length) == (50, 4.0, 512)
    assert (spec.default_height, spec.default_width) == (1024, 1024)
    caps = engine.capabilities
    assert (caps.family, caps.guidance, caps.output, caps.max_input_images) == ("Qwen-Image", "cfg", "image", 0)
    pipe = engine.pipeline
    # Prompt encoding loads no LM head, and text-to-image keeps no vision tower.
    assert not hasattr(pipe.text_encoder, "lm_head") and pipe.text_encoder.visual is None


@pytest.mark.parametrize("kw", [
    dict(height=64, width=64, steps=3, guidance=1.0),  # one branch
    dict(height=64, width=96, steps=3, guidance=4.0, negative_prompt="blurry"),  # true CFG, non-square
    dict(height=96, width=64, steps=2, guidance=2.5, negative_prompt=""),  # an empty negative prompt still guides
])
def test_matches_diffusers(engine, folder, kw):
    ours = engine.generate(SamplingParams(prompt=PROMPT, seed=3, **kw)).frames
    ref = reference_qwen_image(folder, PROMPT, seed=3, **kw)
    assert ours.shape == ref.shape == (1, kw["height"], kw["width"], 3)
    assert psnr(ours, ref) >= 40


def test_bf16_is_as_close_to_fp32_as_diffusers_bf16(folder, engine):
    """The DiT in bf16 (CPU): as far from the fp32 image as diffusers' bf16 pipeline is (it rounds the timesteps
    the same way; the tiny model's timestep embedding is hypersensitive, so any other rounding shows)."""
    from diffusers import DiffusionPipeline

    kw = dict(height=64, width=96, steps=4, guidance=4.0, negative_prompt="blurry", seed=2)
    ref = engine.generate(SamplingParams(prompt=PROMPT, **kw)).frames  # fp32 (= diffusers' fp32, tested above)
    ours = Engine.load(str(folder), EngineConfig(device="cpu", dtype="bf16")).generate(
        SamplingParams(prompt=PROMPT, **kw)).frames
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, height=64, width=96, num_inference_steps=4, true_cfg_scale=4.0, negative_prompt="blurry",
                  generator=torch.Generator("cpu").manual_seed(2), output_type="np").images
    theirs = np.clip(np.round(np.asarray(theirs, dtype=np.float64) * 255), 0, 255).astype(np.uint8)
    assert psnr(ours, ref) >= psnr(theirs, ref) - 0.5


def test_guidance_without_a_negative_prompt_runs_one_branch(engine, folder):
    """diffusers' rule: true CFG needs a negative prompt; without one the request runs at guidance 1."""
    kw = dict(height=64, width=80, steps=2, seed=5)
    out = engine.generate(SamplingParams(prompt=PROMPT, guidance=4.0, **kw))
    assert out.params.guidance == 1.0
    assert np.array_equal(out.frames, engine.generate(SamplingParams(prompt=PROMPT, guidance=1.0, **kw)).frames)
    assert psnr(out.frames, reference_qwen_image(folder, PROMPT, guidance=4.0, **kw)) >= 40
    # the model's default (4.0) with a negative prompt guides
    guided = engine.generate(SamplingParams(prompt=PROMPT, negative_prompt="blurry", **kw))
    assert guided.params.guidance == 4.0 and psnr(guided.frames, out.frames) < 35


def test_a_left_padding_tokenizer_matches_diffusers(folder, tmp_path):
    """Prompt and negative prompt of different lengths padded on the left in one text-encoder call (diffusers
    encodes them apart): Qwen2.5-VL places each prompt's tokens by the attention mask, so the image is the same."""
    import shutil

    left = tmp_path / "left"
    shutil.copytree(folder, left)
    config_file = left / "tokenizer" / "tokenizer_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), padding_side="left")))
    engine = Engine.load(str(left), EngineConfig(device="cpu"))
    assert engine.pipeline.tokenizer.padding_side == "left"
    kw = dict(height=64, width=80, steps=2, guidance=3.0, negative_prompt="a dark night over the sea and a red sun")
    ours = engine.generate(SamplingParams(prompt=PROMPT, seed=11, **kw)).frames
    assert psnr(ours, reference_qwen_image(left, PROMPT, seed=11, **kw)) >= 40


def test_the_prompt_and_the_negative_prompt_matter(engine):
    def image(**kw):
        return engine.generate(SamplingParams(height=64, width=64, steps=2, seed=1, **kw)).frames

    base = image(prompt=PROMPT, guidance=3.0, negative_prompt="blurry")
    assert psnr(base, image(prompt="a red house under the sky", guidance=3.0, negative_prompt="blurry")) < 35
    assert psnr(base, image(prompt=PROMPT, guidance=3.0, negative_prompt="a dark night over the sea")) < 35


def test_batch_of_prompts_of_different_lengths_is_each_alone(engine):
    """Two requests whose prompts (and negative prompts) differ in length in one batch (the masked path), with CFG:
    each output is the output of its request alone."""
    long = PROMPT + " " + " ".join(["on a red sky with a yellow sun"] * 4)
    reqs = [SamplingParams(prompt=PROMPT, height=64, width=64, steps=2, guidance=2.0, seed=5, negative_prompt="x"),
            SamplingParams(prompt=long, height=64, width=64, steps=2, guidance=2.0, seed=6,
                           negative_prompt="a dark night")]
    batched = engine.generate_batch(reqs)
    for b, r in zip(batched, reqs):
        assert psnr(b.frames, engine.generate(r).frames) >= 40


def test_split_cfg_equals_batched(folder, engine):
    split = Engine.load(str(folder), EngineConfig(device="cpu", cfg_mode="split"))
    req = SamplingParams(prompt=PROMPT, height=64, width=64, steps=2, guidance=3.0, seed=2, negative_prompt="dark")
    assert psnr(split.generate(req).frames, engine.generate(req).frames) >= 40


@pytest.mark.parametrize("cfg_mode", ["batched", "split"])
def test_block_cache_per_cfg_branch(folder, engine, cfg_mode):
    """fbcache with true CFG (batched: one state over both branches; split: one per branch): steps are cached,
    and with a threshold of 0 (never cache) the image is the uncached one."""
    req = SamplingParams(prompt=PROMPT, height=64, width=64, steps=6, seed=4, guidance=3.0, negative_prompt="dark")
    cached = Engine.load(str(folder), EngineConfig(device="cpu", cache="fbcache:threshold=5,warmup=1",
                                                    cfg_mode=cfg_mode))
    out = cached.generate(req)
    forwards = 6 * (2 if cfg_mode == "split" else 1)  # split: each branch's forward is counted (and cached) alone
    assert out.cache_stats["cached"] > 0 and out.cache_stats["computed"] + out.cache_stats["cached"] == forwards
    never = Engine.load(str(folder), EngineConfig(device="cpu", cache="fbcache:threshold=0", cfg_mode=cfg_mode))
    assert psnr(never.generate(req).frames, engine.generate(req).frames) >= 40


def test_fp8_tier_runs_and_stays_close(folder, engine, monkeypatch):
    """--quantization fp8 with the device check bypassed (the CPU runs torch._scaled_mm): the blocks' token-wise
    Linears and modulations are fp8 (the modulations are a third of the real model's weights: the tier halves the
    DiT's memory only with them) and the image is close to, but not exactly, the unquantised one."""
    import ditserve.ops.fp8 as fp8_mod
    from ditserve.ops import Fp8Linear

    monkeypatch.setattr(fp8_mod, "check_fp8_device", lambda device, dtype: None)
    fp8 = Engine.load(str(folder), EngineConfig(device="cpu", quantization="fp8"))
    block = fp8.pipeline.transformer.transformer_blocks[0]
    assert isinstance(block.img_qkv, Fp8Linear) and isinstance(block.txt_mlp_out, Fp8Linear)
    assert isinstance(block.mod, Fp8Linear) and not isinstance(fp8.pipeline.transformer.norm_out_mod, Fp8Linear)
    req = SamplingParams(prompt=PROMPT, height=64, width=64, steps=2, seed=1, guidance=3.0, negative_prompt="dark")
    got, ref = fp8.generate(req).frames, engine.generate(req).frames
    assert not np.array_equal(got, ref) and psnr(got, ref) > 25


def test_engine_flags_that_do_not_apply_are_clear_errors(folder, monkeypatch):
    import ditserve.ops.fp8 as fp8_mod

    monkeypatch.setattr(fp8_mod, "check_fp8_device", lambda device, dtype: None)
    with pytest.raises(ConfigError, match="fp8-attention.*QwenImageTransformer has no fp8 attention"):
        Engine.load(str(folder), EngineConfig(device="cpu", quantization="fp8", fp8_attention=True))
    with pytest.raises(ConfigError, match="--compile-vae is not supported for Qwen-Image"):
        Engine.load(str(folder), EngineConfig(device="cpu", compile_vae=True))
    with pytest.raises(ConfigError, match="--vae-streaming on cannot apply"):
        Engine.load(str(folder), EngineConfig(device="cpu", vae_streaming="on"))
    with pytest.raises(ConfigError, match="cuda-graphs on cannot apply"):
        Engine.load(str(folder), EngineConfig(device="cpu", cuda_graphs="on"))


def test_tiled_decode_is_close_to_whole(folder, engine):
    tiled = Engine.load(str(folder), EngineConfig(device="cpu", vae_tiling="on"))
    req = SamplingParams(prompt=PROMPT, height=320, width=320, steps=2, seed=1, guidance=1.0)
    assert psnr(tiled.generate(req).frames, engine.generate(req).frames) >= 30


def test_unsupported_options_name_the_option_and_family(engine):
    from PIL import Image

    with pytest.raises(ConfigError, match="images: Qwen-Image takes no input images"):
        engine.resolve(SamplingParams(prompt="a", images=[Image.new("RGB", (8, 8))]))
    with pytest.raises(ConfigError, match="num_frames is not supported by Qwen-Image"):
        engine.resolve(SamplingParams(prompt="a", num_frames=5))
    with pytest.raises(ConfigError, match="steps must be at least 2 for this checkpoint's schedule"):
        engine.resolve(SamplingParams(prompt="a", steps=1))
    with pytest.raises(ConfigError, match="max_sequence_length must be between 1 and 512"):
        engine.resolve(SamplingParams(prompt="a", max_sequence_length=1024))


def test_max_sequence_length_truncates_the_prompt(engine):
    long = " ".join(["a red house under the sky"] * 10)
    short = engine.pipeline.encode_prompt([long], engine.resolve(SamplingParams(prompt=long, max_sequence_length=8)))
    assert short.lens == [8] and short.embeds.shape[1] == 8


def test_presets():
    from ditserve.registry import preset

    for name, pipeline in (("qwen-image", "QwenImagePipeline"), ("qwen-image-edit", "QwenImageEditPipeline")):
        spec = preset(name)
        assert spec.pipeline == pipeline and (spec.default_steps, spec.default_guidance) == (50, 4.0)
        assert spec.components["transformer"][0] == "QwenImageTransformer2DModel"
        assert spec.components["text_encoder"][0] == "Qwen2_5_VLForConditionalGeneration"
        assert ("processor" in spec.tokenizers) == (name == "qwen-image-edit")


def test_cli_generate_against_diffusers(folder, tmp_path):
    """The issue's check: `ditserve generate --model DIR ...` on a save_pretrained checkpoint, vs diffusers."""
    from PIL import Image

    out = tmp_path / "out.png"
    argv = ["generate", "--model", str(folder), "--prompt", PROMPT, "--negative-prompt", "blurry", "--guidance",
            "3.5", "--seed", "7", "--height", "64", "--width", "96", "--steps", "3", "--output", str(out),
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    ours = np.asarray(Image.open(out).convert("RGB"))[None]
    ref = reference_qwen_image(folder, PROMPT, height=64, width=96, steps=3, guidance=3.5, seed=7,
                               negative_prompt="blurry")
    assert psnr(ours, ref) >= 40


def test_compile_report_is_clean(folder, capsys):
    argv = ["compile-report", "--model", str(folder), "--backend", "eager", "--device", "cpu", "--height", "64",
            "--width", "64"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["graph_breaks"] == 0 and report["recompiles"] == 0


@pytest.mark.slow
def test_compiled_engine_matches_eager(folder, engine):
    """--compile (inductor, regional, dynamic shapes) on CPU: the same image as eager, at two sizes."""
    torch._dynamo.reset()
    compiled = Engine.load(str(folder), EngineConfig(device="cpu", compile=True, dynamic_shapes="on"))
    for h, w in ((64, 64), (64, 96)):
        req = SamplingParams(prompt=PROMPT, height=h, width=w, steps=2, guidance=2.0, seed=1, negative_prompt="x")
        assert psnr(compiled.generate(req).frames, engine.generate(req).frames) >= 40


def test_preset_components_build_at_full_size_on_meta():
    """The presets' VAE and text encoder configs build the released architectures (parameter counts of
    AutoencoderKLQwenImage and of Qwen2.5-VL-7B without its LM head)."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLModel

    from ditserve.registry import preset

    spec = preset("qwen-image")
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage.from_config(spec.components["vae"][1])
        text = Qwen2_5_VLModel(Qwen2_5_VLModel.config_class.from_dict(spec.components["text_encoder"][1]))
    assert sum(p.numel() for p in vae.parameters()) == 126_892_531
    assert sum(p.numel() for p in text.parameters()) == 7_747_169_280


def test_tiny_tokenizer_gives_the_template_prefix_its_real_length():
    """The tiny tokenizer has the template's words as whole tokens, so the 34 tokens the pipeline drops are exactly
    the system prefix (as with Qwen's tokenizer) and the prompt's tokens follow."""
    from ditserve.pipelines.qwen_image import T2I_DROP, T2I_TEMPLATE
    from ditserve.testing_qwen_image import make_tiny_qwen_image_tokenizer

    tok = make_tiny_qwen_image_tokenizer()
    ids = tok(T2I_TEMPLATE.format(PROMPT)).input_ids
    assert len(tok(T2I_TEMPLATE.split("{}")[0]).input_ids) == T2I_DROP == 34
    assert tok.convert_ids_to_tokens(ids[T2I_DROP:T2I_DROP + 5]) == ["a", "Ġphoto", "Ġof", "Ġa", "Ġcat"]
    assert tok.decode(tok("zebra! 123").input_ids) == "zebra! 123"  # anything else falls back to bytes


def test_build_is_deterministic(folder, tmp_path):
    again = build_tiny_qwen_image_pipeline(tmp_path / "again")
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (folder / rel).read_bytes() == (again / rel).read_bytes(), rel
