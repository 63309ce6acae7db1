"""Flux2Pipeline / Flux2KleinPipeline against diffusers' own pipelines on tiny checkpoints made by diffusers'
`save_pretrained` (a dev-like one, a klein base and a klein step-distilled one): text-to-image square and
non-square, and with one and two reference images; the loader's text-encoder and tokenizer handling; the
family's capabilities."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ditserve.config import ConfigError, EngineConfig, SamplingParams
from ditserve.engine import Engine
from ditserve.testing_flux2 import (
    build_tiny_flux2_klein_pipeline, build_tiny_flux2_pipeline, psnr, reference_flux2,
)

PROMPT = "a photo of a cat sitting on a red sofa"
OTHER = "an oil painting of a blue dog"


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    return build_tiny_flux2_pipeline(tmp_path_factory.mktemp("flux2") / "dev")


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    return build_tiny_flux2_klein_pipeline(tmp_path_factory.mktemp("flux2") / "klein-base", is_distilled=False)


@pytest.fixture(scope="module")
def dev(dev_folder):
    return Engine.load(str(dev_folder), EngineConfig(device="cpu"))


@pytest.fixture(scope="module")
def klein(klein_folder):
    return Engine.load(str(klein_folder), EngineConfig(device="cpu"))


def reference_images() -> list[Image.Image]:
    """Two reference images of different sizes (the second is non-square and not a multiple of 16: cropped)."""
    g = np.random.default_rng(0)
    a = (g.random((64, 64, 3)) * 255).astype(np.uint8)
    b = np.zeros((72, 100, 3), dtype=np.uint8)
    b[:, :50] = (200, 30, 30)
    b[:, 50:] = (g.random((72, 50, 3)) * 255).astype(np.uint8)
    return [Image.fromarray(a), Image.fromarray(b)]


def test_spec_capabilities_and_text_encoder(dev, klein):
    """dev: 50 steps, guidance 4 embedded; klein base: 50 steps, CFG 4. The text encoders are bare language
    models trimmed after the deepest layer read (dev's 31-layer Mistral -> 30, klein's 28-layer Qwen3 -> 27),
    with no LM head, vision tower or projector."""
    assert (dev.spec.default_steps, dev.spec.default_guidance, dev.spec.max_sequence_length) == (50, 4.0, 512)
    assert (dev.capabilities.guidance, dev.capabilities.max_input_images) == ("distilled", 10)
    assert (klein.spec.default_steps, klein.spec.default_guidance) == (50, 4.0)
    assert klein.capabilities.guidance == "cfg"
    from ditserve.pipelines.flux2 import trim_text_encoder
    from ditserve.registry import component_class

    for engine, layers, cls in ((dev, 30, "Mistral3TextModel"), (klein, 27, "Qwen3Model")):
        te = engine.pipeline.text_encoder
        assert type(te).__name__ == cls and len(te.layers) == layers and isinstance(te.norm, torch.nn.Identity)
        names = [n for n, _ in te.named_parameters()]
        assert not any(k in n for n in names for k in ("lm_head", "vision", "projector"))
        # the spec names a registry class that rebuilds this very encoder from the spec's config (the checkpoint's
        # layer count), cut as the pipeline cuts it
        class_name, config = engine.spec.components["text_encoder"]
        with torch.device("meta"):
            again = component_class(class_name)(component_class(class_name).config_class.from_dict(config))
        trim_text_encoder(again, layers)
        assert len(again.layers) == layers and type(again.norm) is type(te.norm)
    assert dev.spec.components["text_encoder"][0] == "Mistral3ForConditionalGeneration"


@pytest.mark.parametrize("kw", [
    dict(height=64, width=64, steps=2, guidance=4.0),
    dict(height=64, width=96, steps=3, guidance=2.5),  # non-square
])
def test_dev_matches_diffusers(dev, dev_folder, kw):
    ours = dev.generate(SamplingParams(prompt=PROMPT, seed=3, **kw)).frames
    ref = reference_flux2(dev_folder, PROMPT, seed=3, **kw)
    assert ours.shape == ref.shape == (1, kw["height"], kw["width"], 3)
    assert psnr(ours, ref) >= 40


@pytest.mark.parametrize("kw", [
    dict(height=64, width=64, steps=2, guidance=4.0),  # CFG with the empty negative prompt
    dict(height=96, width=64, steps=2, guidance=1.0),  # no CFG, non-square
])
def test_klein_base_matches_diffusers(klein, klein_folder, kw):
    ours = klein.generate(SamplingParams(prompt=PROMPT, seed=5, **kw)).frames
    assert psnr(ours, reference_flux2(klein_folder, PROMPT, seed=5, **kw)) >= 40


def test_klein_distilled_matches_diffusers(tmp_path):
    """A step-distilled klein: 4 steps and no guidance by default (diffusers ignores its guidance_scale), and a
    guidance value is refused."""
    folder = build_tiny_flux2_klein_pipeline(tmp_path / "klein", is_distilled=True, seed=1)
    engine = Engine.load(str(folder), EngineConfig(device="cpu"))
    assert (engine.spec.default_steps, engine.spec.default_guidance) == (4, 0.0)
    assert engine.capabilities.guidance == "none"
    ours = engine.generate(SamplingParams(prompt=PROMPT, seed=2, height=64, width=80)).frames
    assert psnr(ours, reference_flux2(folder, PROMPT, height=64, width=80, steps=4, guidance=4.0, seed=2)) >= 40
    with pytest.raises(ConfigError, match="guidance"):
        engine.generate(SamplingParams(prompt=PROMPT, guidance=3.0))


@pytest.mark.parametrize("n", [1, 2])
def test_reference_images_match_diffusers(dev, dev_folder, klein, klein_folder, n):
    images = reference_images()[:n]
    kw = dict(height=64, width=80, steps=2, guidance=3.0)
    for engine, folder in ((dev, dev_folder), (klein, klein_folder)):
        ours = engine.generate(SamplingParams(prompt=PROMPT, seed=4, images=images, **kw)).frames
        ref = reference_flux2(folder, PROMPT, seed=4, images=images, **kw)
        assert psnr(ours, ref) >= 40, folder.name
    plain = dev.generate(SamplingParams(prompt=PROMPT, seed=4, **kw)).frames
    with_refs = dev.generate(SamplingParams(prompt=PROMPT, seed=4, images=images, **kw)).frames
    assert psnr(plain, with_refs) < 35  # the reference images change the image


def test_size_defaults_to_the_first_reference_image(klein, klein_folder):
    """Without --height/--width a request with reference images takes the first one's size (cropped to multiples
    of 16: 100 x 72 -> 96 x 64), as diffusers does."""
    images = reference_images()[::-1]
    out = klein.generate(SamplingParams(prompt=PROMPT, seed=6, steps=2, guidance=2.0, images=images))
    assert (out.params.height, out.params.width) == (64, 96)
    ref = reference_flux2(klein_folder, PROMPT, height=None, width=None, steps=2, guidance=2.0, seed=6,
                          images=images)
    assert ref.shape == out.frames.shape and psnr(out.frames, ref) >= 40


def test_reference_image_paths_and_bad_images(dev, tmp_path):
    image = reference_images()[0]
    image.save(tmp_path / "ref.png")
    kw = dict(prompt=PROMPT, seed=4, height=64, width=64, steps=1)
    by_path = dev.generate(SamplingParams(images=[str(tmp_path / "ref.png")], **kw)).frames
    assert np.array_equal(by_path, dev.generate(SamplingParams(images=[image], **kw)).frames)
    with pytest.raises(ConfigError, match="images: cannot read"):
        dev.generate(SamplingParams(images=[str(tmp_path / "missing.png")], **kw))
    with pytest.raises(ConfigError, match="images: Image too small"):
        dev.generate(SamplingParams(images=[Image.new("RGB", (32, 64))], **kw))
    with pytest.raises(ConfigError, match="at most 10 input images"):
        dev.generate(SamplingParams(images=[image] * 11, **kw))


def test_prompt_and_guidance_matter(dev, klein):
    def image(engine, **kw):
        return engine.generate(SamplingParams(height=64, width=64, steps=2, seed=1, **kw)).frames

    for engine in (dev, klein):
        base = image(engine, prompt=PROMPT, guidance=4.0)
        assert psnr(base, image(engine, prompt=OTHER, guidance=4.0)) < 35
        assert psnr(base, image(engine, prompt=PROMPT, guidance=1.5)) < 35
    assert psnr(image(klein, prompt=PROMPT, guidance=4.0),
                image(klein, prompt=PROMPT, guidance=4.0, negative_prompt="a dark night")) < 35
    with pytest.raises(ConfigError, match="negative_prompt is not supported"):
        dev.generate(SamplingParams(prompt=PROMPT, negative_prompt="blurry"))


def test_batch_of_requests_each_alone(klein):
    """Two requests with the same reference image batched (CFG, two images each): each output equals what its
    request gives alone; requests with other reference images do not share a batch."""
    image = reference_images()[0]
    kw = dict(height=64, width=64, steps=2, guidance=4.0, num_images=2, images=[image])
    requests = [SamplingParams(prompt=PROMPT, seed=7, **kw), SamplingParams(prompt=OTHER, seed=8, **kw)]
    assert klein.batch_key(klein.resolve(requests[0])) == klein.batch_key(klein.resolve(requests[1]))
    batched = klein.pipeline.generate_batch(requests)
    for request, out in zip(requests, batched):
        alone = klein.generate(request).frames
        assert np.abs(out.frames.astype(int) - alone.astype(int)).max() <= 1
    other = SamplingParams(prompt=PROMPT, seed=7, **dict(kw, images=[reference_images()[1]]))
    assert klein.batch_key(klein.resolve(other)) != klein.batch_key(klein.resolve(requests[0]))


def test_processor_and_generic_tokenizer_classes(dev_folder, tmp_path):
    """The tokenizer as the real FLUX.2-dev names it (a PixtralProcessor folder: tokenizer files, a processor
    config and the chat template in chat_template.json) loads as its tokenizer alone and gives the same image as
    the generic-class tokenizer diffusers saved ("TokenizersBackend" in model_index.json)."""
    index = json.loads((dev_folder / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "TokenizersBackend"]
    assert index["text_encoder"] == ["transformers", "Mistral3ForConditionalGeneration"]
    folder = tmp_path / "processor"
    shutil.copytree(dev_folder, folder)
    tok = folder / "tokenizer"
    template = (tok / "chat_template.jinja").read_text()
    (tok / "chat_template.jinja").unlink()
    (tok / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    (tok / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor",
                                                            "patch_size": 16, "spatial_merge_size": 2}))
    (folder / "model_index.json").write_text(json.dumps(dict(index, tokenizer=["transformers", "PixtralProcessor"])))
    kw = dict(prompt=PROMPT, seed=3, height=64, width=64, steps=2, guidance=4.0)
    ours = Engine.load(str(folder), EngineConfig(device="cpu")).generate(SamplingParams(**kw)).frames
    generic = Engine.load(str(dev_folder), EngineConfig(device="cpu")).generate(SamplingParams(**kw)).frames
    assert np.array_equal(ours, generic)


def test_forward_tokens_count_the_reference_images(dev, tmp_path):
    """The CUDA-graph size rule's token count: the generated image's tokens plus each reference image's at the size
    it is encoded (scaled to at most 1024^2 pixels, cropped to multiples of 16), read from a path's header."""
    from ditserve.pipelines.flux2 import reference_size

    big = Image.new("RGB", (2048, 1024))
    big.save(tmp_path / "big.png")
    assert reference_size(big) == reference_size(str(tmp_path / "big.png")) == (1440, 720)  # 1448 x 724 cropped
    params = SamplingParams(prompt="a", height=128, width=64,
                            images=[Image.new("RGB", (72, 100)), str(tmp_path / "big.png")])
    assert dev.pipeline.forward_tokens(params) == 8 * 4 + 4 * 6 + 90 * 45


def test_mistral3_text_model_reads_both_key_layouts(dev_folder, tmp_path):
    """Mistral3ForConditionalGeneration weights saved as `language_model.model.*` (how transformers 5 writes them)
    or `model.language_model.*` (its module layout) load the same language model, layers 0-29 only."""
    from safetensors.torch import load_file, save_file

    from ditserve.pipelines.flux2 import Mistral3TextModel

    src = dev_folder / "text_encoder"
    sd = load_file(src / "model.safetensors")
    assert any(k.startswith("language_model.model.layers.30.") for k in sd)
    other = tmp_path / "text_encoder"
    other.mkdir()
    shutil.copy(src / "config.json", other / "config.json")
    save_file({k.replace("language_model.model.", "model.language_model.", 1): v for k, v in sd.items()},
              other / "model.safetensors")
    a, b = Mistral3TextModel.from_pretrained(src), Mistral3TextModel.from_pretrained(other)
    assert len(a.layers) == 30 and isinstance(a.norm, torch.nn.Identity)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(sa["layers.29.mlp.down_proj.weight"], sd["language_model.model.layers.29.mlp.down_proj.weight"])


def test_a_truncated_prompt_is_reported(dev, klein, caplog):
    """Prompts are cut at max_sequence_length tokens, chat template included, as diffusers cuts them: a warning
    says so (and nothing is said for prompts that fit)."""
    import logging

    long = " ".join(["a red cat"] * 60)
    kw = dict(height=64, width=64, steps=1, seed=0)
    for engine in (dev, klein):
        with caplog.at_level(logging.WARNING, logger="ditserve"):
            caplog.clear()
            engine.generate(SamplingParams(prompt=PROMPT, max_sequence_length=192, **kw))
            assert "truncated" not in caplog.text
            engine.generate(SamplingParams(prompt=long, max_sequence_length=192, **kw))
            assert "a prompt was truncated to 192 tokens" in caplog.text
