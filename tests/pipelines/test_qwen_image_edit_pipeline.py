"""QwenImageEditPipeline and QwenImageEditPlusPipeline against diffusers' on tiny save_pretrained checkpoints: the
input image(s) through the vision-language encoder (the processor) and the VAE; the CLI's --image; input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ditserve.cli import main
from ditserve.config import ConfigError, EngineConfig, SamplingParams
from ditserve.engine import Engine
from ditserve.testing_qwen_image import build_tiny_qwen_image_edit_pipeline, reference_qwen_image

PROMPT = "make it a red house"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def picture(width: int, height: int, seed: int):
    """A smooth random RGB picture (a blurred upsampled grid), so resizing it is not all aliasing."""
    from PIL import Image

    grid = np.random.default_rng(seed).integers(0, 255, (4, 5, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((width, height), resample=Image.BILINEAR)


@pytest.fixture(scope="module")
def edit_folder(tmp_path_factory):
    return build_tiny_qwen_image_edit_pipeline(tmp_path_factory.mktemp("qwen-image-edit") / "tiny")


@pytest.fixture(scope="module")
def edit(edit_folder):
    return Engine.load(str(edit_folder), EngineConfig(device="cpu"))


def test_layout_spec_and_capabilities(edit_folder, edit):
    index = json.loads((edit_folder / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline"
    assert index["processor"] == ["transformers", "Qwen2VLProcessor"]  # as the released checkpoints name it
    caps = edit.capabilities
    assert (caps.family, caps.guidance, caps.max_input_images) == ("Qwen-Image-Edit", "cfg", 1)
    assert edit.pipeline.text_encoder.visual is not None  # an edit prompt shows the image to the vision tower


def test_edit_matches_diffusers(edit, edit_folder):
    """True CFG, non-square output. Another input image changes the image by more than the parity margin, so a
    pipeline that lost the image would fail the parity check."""
    kw = dict(height=64, width=96, steps=2, guidance=4.0, negative_prompt="blurry", seed=3)
    image = picture(56, 40, seed=0)
    ours = edit.generate(SamplingParams(prompt=PROMPT, images=[image], **kw)).frames
    ref = reference_qwen_image(edit_folder, PROMPT, images=[image], **kw)
    assert ours.shape == ref.shape == (1, 64, 96, 3)
    assert psnr(ours, ref) >= 40
    other = edit.generate(SamplingParams(prompt=PROMPT, images=[picture(56, 40, seed=1)], **kw)).frames
    assert psnr(other, ref) < 38


def test_default_size_follows_the_image(edit):
    """Without --height / --width the output has the image's aspect at ~1024 x 1024 pixels (sides multiples of 32),
    as diffusers' default."""
    p = edit.resolve(SamplingParams(prompt=PROMPT, images=[picture(56, 40, seed=0)]))
    assert (p.width, p.height) == (1216, 864)
    p = edit.resolve(SamplingParams(prompt=PROMPT, images=[picture(40, 40, seed=0)], height=128))
    assert (p.width, p.height) == (1024, 128)


def test_a_path_is_opened_as_rgb(edit, tmp_path):
    image = picture(48, 40, seed=2)
    image.convert("RGBA").save(tmp_path / "in.png")
    p = edit.resolve(SamplingParams(prompt=PROMPT, images=[str(tmp_path / "in.png")]))
    assert p.images[0].mode == "RGB" and np.array_equal(np.asarray(p.images[0]), np.asarray(image))


def test_input_errors_name_the_option(edit, tmp_path):
    with pytest.raises(ConfigError, match="images: Qwen-Image-Edit edits an input image"):
        edit.resolve(SamplingParams(prompt=PROMPT))
    with pytest.raises(ConfigError, match="images: Qwen-Image-Edit takes at most 1 input images, got 2"):
        edit.resolve(SamplingParams(prompt=PROMPT, images=[picture(8, 8, 0), picture(8, 8, 1)]))
    with pytest.raises(ConfigError, match="no such file"):
        edit.resolve(SamplingParams(prompt=PROMPT, images=[str(tmp_path / "missing.png")]))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ConfigError, match="not an image Pillow can read"):
        edit.resolve(SamplingParams(prompt=PROMPT, images=[str(tmp_path / "text.png")]))


def test_engine_warmup_runs_with_a_stand_in_image(edit):
    """Engine.warmup (the server's, bench's) sends a prompt only: the edit pipeline completes it with an image."""
    assert edit.warmup(64, 64, steps=2) > 0


def test_requests_with_other_images_do_not_batch(edit):
    a = edit.resolve(SamplingParams(prompt=PROMPT, images=[picture(8, 8, 0)], height=64, width=64))
    b = edit.resolve(SamplingParams(prompt=PROMPT, images=[picture(8, 8, 1)], height=64, width=64))
    assert edit.pipeline.batch_key(a) != edit.pipeline.batch_key(b)


def test_processor_expands_each_image_to_its_tokens(edit):
    processor = edit.pipeline.processor
    images = [picture(56, 40, seed=0), picture(100, 100, seed=1)]
    out = processor(text=["x <|image_pad|> y <|image_pad|>"], images=images)
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    merged = out["image_grid_thw"].prod(-1) // processor.image_processor.merge_size ** 2  # tokens per image
    assert int((out["input_ids"] == pad).sum()) == int(merged.sum())
    assert out["pixel_values"].shape[0] == int(out["image_grid_thw"].prod(-1).sum())
    with pytest.raises(ConfigError, match="more <\\|image_pad\\|> tokens than the 1 images"):
        processor(text=["<|image_pad|><|image_pad|>"], images=images[:1])


def test_processor_equals_transformers_qwen2vl_processor(edit):
    """QwenVLProcessor gives transformers' Qwen2VLProcessor's inputs (same tokenizer and image processor). Skipped
    without torchvision, which transformers' class needs for its video processor."""
    pytest.importorskip("torchvision")
    import torch
    from transformers import Qwen2VLProcessor, Qwen2VLVideoProcessor

    ours = edit.pipeline.processor
    theirs = Qwen2VLProcessor(image_processor=ours.image_processor, tokenizer=ours.tokenizer,
                              video_processor=Qwen2VLVideoProcessor())
    images = [picture(56, 40, seed=0), picture(100, 100, seed=1)]
    texts = ["x <|vision_start|><|image_pad|><|vision_end|> y", "z <|image_pad|> w a long one"]
    a = ours(text=texts, images=images, padding=True, return_tensors="pt")
    b = theirs(text=texts, images=images, padding=True, return_tensors="pt")
    for key in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw"):
        assert torch.equal(a[key], b[key]), key


def test_edit_plus_with_two_images_matches_diffusers(tmp_path):
    """QwenImageEditPlusPipeline with Edit-2511's transformer (zero_cond_t; -2509's is the Edit one's)."""
    folder = build_tiny_qwen_image_edit_pipeline(tmp_path / "plus", plus=True, seed=1, zero_cond_t=True)
    engine = Engine.load(str(folder), EngineConfig(device="cpu"))
    assert engine.capabilities.max_input_images == 4 and engine.capabilities.family == "Qwen-Image-Edit-Plus"
    images = [picture(56, 40, seed=0), picture(40, 64, seed=3)]
    kw = dict(height=64, width=80, steps=2, guidance=3.0, negative_prompt="blurry")
    ours = engine.generate(SamplingParams(prompt=PROMPT, images=images, seed=5, **kw)).frames
    assert psnr(ours, reference_qwen_image(folder, PROMPT, images=images, seed=5, **kw)) >= 40
    # the default size follows the last image
    p = engine.resolve(SamplingParams(prompt=PROMPT, images=images))
    assert (p.width, p.height) == (800, 1280)


def test_cli_generate_with_an_image(edit_folder, tmp_path):
    """`ditserve generate --model DIR --image PATH ...` against diffusers' QwenImageEditPipeline."""
    from PIL import Image

    image = picture(64, 48, seed=4)
    image.save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    argv = ["generate", "--model", str(edit_folder), "--prompt", PROMPT, "--image", str(tmp_path / "in.png"),
            "--negative-prompt", " ", "--guidance", "4", "--seed", "9", "--height", "64", "--width", "64",
            "--steps", "2", "--output", str(out), "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    ours = np.asarray(Image.open(out).convert("RGB"))[None]
    ref = reference_qwen_image(edit_folder, PROMPT, images=[Image.open(tmp_path / "in.png").convert("RGB")],
                               height=64, width=64, steps=2, guidance=4.0, seed=9, negative_prompt=" ")
    assert psnr(ours, ref) >= 40
