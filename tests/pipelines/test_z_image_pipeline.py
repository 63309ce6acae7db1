"""ZImagePipeline against diffusers' on a tiny checkpoint made by diffusers' own save_pretrained, and the engine
features on the Z-Image family (the CLI, compile-report, the block cache on a single-stream model, CFG modes,
the family's capabilities)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditserve.cli import main
from ditserve.config import ConfigError, EngineConfig, SamplingParams
from ditserve.engine import Engine
from ditserve.testing import build_tiny_z_image_pipeline, reference_z_image

PROMPT = "a photo of a cat"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_z_image_pipeline(tmp_path_factory.mktemp("z-image") / "tiny")


@pytest.fixture(scope="module")
def engine(folder):
    return Engine.load(str(folder), EngineConfig(device="cpu"))


def test_spec_and_capabilities(engine):
    spec = engine.spec
    assert (spec.default_steps, spec.default_guidance, spec.max_sequence_length) == (8, 0.0, 512)
    assert (spec.default_height, spec.default_width) == (128, 128)  # the tiny VAE's natural size
    caps = engine.capabilities
    assert (caps.family, caps.guidance, caps.output) == ("Z-Image", "cfg", "image")


@pytest.mark.parametrize("kw", [
    dict(height=64, width=64, steps=3, guidance=0.0),  # Turbo: one branch
    dict(height=64, width=96, steps=3, guidance=2.0, negative_prompt="blurry"),  # CFG, non-square
    dict(height=96, width=64, steps=2, guidance=1.5),  # CFG with the default (empty) negative prompt
])
def test_matches_diffusers(engine, folder, kw):
    ours = engine.generate(SamplingParams(prompt=PROMPT, seed=3, **kw)).frames
    ref = reference_z_image(folder, PROMPT, seed=3, **kw)
    assert ours.shape == ref.shape == (1, kw["height"], kw["width"], 3)
    assert psnr(ours, ref) >= 40


def test_a_left_padding_tokenizer_matches_diffusers(tmp_path):
    """A checkpoint whose tokenizer pads on the left (another seed and natural size too): the valid tokens are
    taken by the attention mask and padded as diffusers pads, so a prompt batched with a longer negative prompt
    still gives diffusers' image."""
    folder = build_tiny_z_image_pipeline(tmp_path / "left", seed=7, sample_size=256)
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config_file.write_text(json.dumps(dict(json.loads(config_file.read_text()), padding_side="left")))
    engine = Engine.load(str(folder), EngineConfig(device="cpu"))
    assert engine.pipeline.tokenizer.padding_side == "left" and engine.spec.default_height == 256
    kw = dict(height=64, width=80, steps=2, guidance=3.0, negative_prompt="a dark night over the sea")
    ours = engine.generate(SamplingParams(prompt=PROMPT, seed=11, **kw)).frames
    assert psnr(ours, reference_z_image(folder, PROMPT, seed=11, **kw)) >= 40


def test_the_prompt_and_the_negative_prompt_matter(engine):
    def image(**kw):
        return engine.generate(SamplingParams(height=64, width=64, steps=2, seed=1, **kw)).frames

    base = image(prompt=PROMPT, guidance=2.0)
    assert psnr(base, image(prompt="a red house under the sky", guidance=2.0)) < 35
    assert psnr(base, image(prompt=PROMPT, guidance=2.0, negative_prompt="blurry")) < 35


def test_batch_of_prompts_of_different_lengths_is_each_alone(engine):
    """Two prompts whose padded caption lengths differ in one batch (the masked path), with CFG: each output
    is the output of its request alone."""
    long = PROMPT + " " + " ".join(["on a red sky with a yellow sun"] * 4)
    reqs = [SamplingParams(prompt=PROMPT, height=64, width=64, steps=2, guidance=2.0, seed=5),
            SamplingParams(prompt=long, height=64, width=64, steps=2, guidance=2.0, seed=6, negative_prompt="dark")]
    batched = engine.generate_batch(reqs)
    for b, r in zip(batched, reqs):
        assert psnr(b.frames, engine.generate(r).frames) >= 40


def test_split_cfg_equals_batched(folder, engine):
    split = Engine.load(str(folder), EngineConfig(device="cpu", cfg_mode="split"))
    req = SamplingParams(prompt=PROMPT, height=64, width=64, steps=2, guidance=2.0, seed=2, negative_prompt="x")
    assert psnr(split.generate(req).frames, engine.generate(req).frames) >= 40


def test_unsupported_options_name_the_option_and_family(engine):
    with pytest.raises(ConfigError, match="num_frames is not supported by Z-Image"):
        engine.resolve(SamplingParams(prompt="a", num_frames=5))
    with pytest.raises(ConfigError, match="guidance_2 is not supported by Z-Image"):
        engine.resolve(SamplingParams(prompt="a", guidance_2=1.0))


def test_block_cache_on_a_single_stream_model(folder):
    """fbcache on Z-Image's main layers: steps are cached, and with a threshold of 0 (never cache) the image
    is the uncached one."""
    cached = Engine.load(str(folder), EngineConfig(device="cpu", cache="fbcache:threshold=5,warmup=1"))
    req = SamplingParams(prompt=PROMPT, height=64, width=64, steps=6, seed=4)
    out = cached.generate(req)
    assert out.cache_stats["cached"] > 0 and out.cache_stats["computed"] + out.cache_stats["cached"] == 6
    never = Engine.load(str(folder), EngineConfig(device="cpu", cache="fbcache:threshold=0"))
    plain = Engine.load(str(folder), EngineConfig(device="cpu"))
    assert np.array_equal(never.generate(req).frames, plain.generate(req).frames)


def test_cli_generate_with_the_issue_flags(folder, tmp_path, capsys):
    out = tmp_path / "out.png"
    argv = ["generate", "--model", str(folder), "--prompt", PROMPT, "--seed", "7", "--height", "64", "--width",
            "96", "--steps", "3", "--guidance", "2.5", "--negative-prompt", "blurry", "--output", str(out),
            "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    from PIL import Image

    ours = np.asarray(Image.open(out).convert("RGB"))[None]
    ref = reference_z_image(folder, PROMPT, height=64, width=96, steps=3, guidance=2.5, seed=7,
                            negative_prompt="blurry")
    assert psnr(ours, ref) >= 40


def test_cli_refuses_a_negative_prompt_for_flux(capsys):
    assert main(["generate", "--prompt", "a", "--negative-prompt", "b", "--device", "cpu", "--output",
                 "/tmp/never.png"]) == 2
    assert "negative_prompt is not supported by FLUX.1" in capsys.readouterr().err


def test_compile_report_is_clean(folder, capsys):
    argv = ["compile-report", "--model", str(folder), "--backend", "eager", "--device", "cpu", "--height", "64",
            "--width", "64"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["graph_breaks"] == 0 and report["recompiles"] == 0
    assert report["text_len"] == 512 and report["model"] == str(folder)


@pytest.mark.slow
def test_compiled_engine_matches_eager(folder):
    """--compile (inductor, regional, dynamic shapes) on CPU: the same image as eager, at two sizes."""
    torch._dynamo.reset()
    compiled = Engine.load(str(folder), EngineConfig(device="cpu", compile=True, dynamic_shapes="on"))
    plain = Engine.load(str(folder), EngineConfig(device="cpu"))
    for h, w in ((64, 64), (64, 96)):
        req = SamplingParams(prompt=PROMPT, height=h, width=w, steps=2, guidance=2.0, seed=1)
        assert psnr(compiled.generate(req).frames, plain.generate(req).frames) >= 40
