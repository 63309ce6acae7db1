"""The tiny random Z-Image checkpoint (`ditserve.testing.build_tiny_z_image_pipeline`) against diffusers itself.

diffusers' `ZImagePipeline.from_pretrained` must load the folder and draw images with and without CFG; the
prompt and the guidance must visibly change the image (so a parity test can tell a pipeline that drops them);
the tokenizer must load through transformers' Auto/Qwen2 classes and render Qwen3's chat template; and the
build must be deterministic.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ditserve.testing import build_tiny_z_image_pipeline, reference_z_image

SIZE = dict(height=64, width=64, steps=2, seed=0)


def psnr(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def tiny_z_image(tmp_path_factory):
    return build_tiny_z_image_pipeline(tmp_path_factory.mktemp("tiny-z-image"), seed=0)


def test_layout_matches_z_image_turbo(tiny_z_image):
    index = json.loads((tiny_z_image / "model_index.json").read_text())
    assert index["_class_name"] == "ZImagePipeline"
    assert index["transformer"] == ["diffusers", "ZImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "Qwen3Model"]
    assert index["tokenizer"] == ["transformers", "Qwen2Tokenizer"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    scheduler = json.loads((tiny_z_image / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["shift"], scheduler["use_dynamic_shifting"]) == (3.0, False)
    vae = json.loads((tiny_z_image / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], len(vae["block_out_channels"]), vae["sample_size"]) == (16, 4, 128)
    assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
    for sub in ("transformer", "vae", "text_encoder"):
        assert list((tiny_z_image / sub).glob("*.safetensors")), sub


def test_diffusers_loads_and_generates(tiny_z_image):
    import diffusers

    pipe = diffusers.ZImagePipeline.from_pretrained(tiny_z_image)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.cap_feat_dim == pipe.text_encoder.config.hidden_size == 32
    assert not any(not p.any() for p in pipe.transformer.parameters())  # pad tokens are not zero
    common = dict(height=64, width=64, num_inference_steps=2, output_type="np")
    plain = pipe("a photo of a cat", guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(0),
                 **common).images
    cfg = pipe("a photo of a cat", guidance_scale=2.0, negative_prompt="blurry",
               generator=torch.Generator("cpu").manual_seed(0), **common).images
    for images in (plain, cfg):
        assert images.shape == (1, 64, 64, 3)
        assert np.isfinite(images).all() and images.std() > 0.05  # an image, not a constant
    assert psnr(np.round(plain * 255), np.round(cfg * 255)) < 30


def test_prompt_changes_the_image(tiny_z_image):
    cat = reference_z_image(tiny_z_image, "a photo of a cat", guidance=0.0, **SIZE)
    house = reference_z_image(tiny_z_image, "a red house under the sky", guidance=0.0, **SIZE)
    assert cat.dtype == np.uint8 and cat.shape == (1, 64, 64, 3)
    assert psnr(cat, house) < 30
    assert np.array_equal(cat, reference_z_image(tiny_z_image, "a photo of a cat", guidance=0.0, **SIZE))


def test_tokenizer_loads_and_renders_qwen3_chat_template(tiny_z_image):
    from transformers import AutoTokenizer, Qwen2Tokenizer, Qwen2TokenizerFast

    messages = [{"role": "user", "content": "a photo of a cat"}]
    for cls in (AutoTokenizer, Qwen2Tokenizer, Qwen2TokenizerFast):
        tok = cls.from_pretrained(tiny_z_image / "tokenizer")
        assert tok.model_max_length == 512
        assert (tok.pad_token, tok.eos_token) == ("<|endoftext|>", "<|im_end|>")
        ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
        assert ids == sorted(ids) and len(set(ids)) == 3 and max(ids) < len(tok)
        thinking = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                           enable_thinking=True)
        assert thinking == "<|im_start|>user\na photo of a cat<|im_end|>\n<|im_start|>assistant\n"
        no_thinking = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                              enable_thinking=False)
        assert no_thinking == thinking + "<think>\n\n</think>\n\n"
        # Special tokens stay whole, built-in words are single tokens, unknown text falls back to bytes.
        pieces = tok.convert_ids_to_tokens(tok(thinking).input_ids)
        assert pieces[0] == "<|im_start|>" and "<|im_end|>" in pieces and "Ġcat" in pieces
        assert tok.decode(tok("zebra! 123").input_ids) == "zebra! 123"


def test_build_is_deterministic(tiny_z_image, tmp_path):
    again = build_tiny_z_image_pipeline(tmp_path / "again", seed=0)
    files = sorted(p.relative_to(tiny_z_image) for p in tiny_z_image.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (tiny_z_image / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = build_tiny_z_image_pipeline(tmp_path / "other", seed=1)
    name = "transformer/diffusion_pytorch_model.safetensors"
    assert (other / name).read_bytes() != (tiny_z_image / name).read_bytes()
