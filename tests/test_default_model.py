"""The packaged default model (ditserve/assets/default-model): what it is, and that it draws what the prompt says.

The acceptance check of issue 5: every held-out prompt of `ditserve.shapes` (56 colour / shape / background
combinations never seen in training), generated through the normal loader and pipeline with the model's
defaults on CPU, is judged by `ditserve.shapes.judge`; at least 90% must agree with the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from ditserve import shapes
from ditserve.config import EngineConfig
from ditserve.loader import load_model
from ditserve.loader.source import DEFAULT_MODEL_DIR
from ditserve.registry import pipeline_class

MAX_BYTES = 15 * 10**6


@pytest.fixture(scope="module")
def default_pipe():
    engine = EngineConfig(device="cpu")
    loaded = load_model(None, engine)
    cls = pipeline_class(loaded.pipeline_class)
    return cls(loaded.components, engine, cls.spec_for(loaded.name, loaded.components))


def test_default_model_is_small_and_safetensors_only():
    files = [p for p in DEFAULT_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_BYTES
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"transformer", "vae", "text_encoder", "text_encoder_2"}
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pth")]
    for p in weights:  # stored in fp16 to fit the budget
        with safe_open(str(p), framework="pt") as f:
            assert {str(f.get_slice(k).get_dtype()) for k in f.keys()} == {"F16"}, p


def test_default_model_architecture_and_defaults(default_pipe):
    spec = default_pipe.spec
    assert spec.name == "default-model"
    assert (spec.default_steps, spec.default_guidance, spec.default_height, spec.default_width) == (28, 3.5, 64, 64)
    # T5 length: what training used (docs/default-model-train.json), the tokenizer's cap on FLUX.1-dev's 512.
    record = json.loads((Path(__file__).resolve().parents[1] / "docs" / "default-model-train.json").read_text())
    assert spec.max_sequence_length == record["config"]["text_len"] == default_pipe.tokenizer_2.model_max_length
    assert default_pipe.vae_scale_factor == 4 and default_pipe.num_channels_latents == 4
    index = json.loads((DEFAULT_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    scheduler = json.loads((DEFAULT_MODEL_DIR / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["use_dynamic_shifting"] is True
    dit_params = sum(p.numel() for p in default_pipe.transformer.parameters())
    assert 1e6 < dit_params < 10e6


@pytest.mark.slow
def test_held_out_prompts_are_drawn_correctly(default_pipe):
    specs = shapes.held_out_specs()
    assert len(specs) >= 50
    images, judgements = shapes.generate_and_judge(default_pipe, specs, seed=0)
    assert all(img.size == (64, 64) for img in images)
    wrong = [(s.prompt, j) for s, j in zip(specs, judgements) if not j.matches(s)]
    accuracy = 1 - len(wrong) / len(specs)
    assert accuracy >= 0.9, f"{accuracy:.1%} correct; wrong: {wrong}"


def test_prompt_roles_matter(default_pipe):
    """Swapping the shape and background colours swaps them in the picture (the text encoders learned word
    roles, although FLUX gives text tokens no positions)."""
    a = shapes.ShapeSpec("red", "circle", "blue")
    b = shapes.ShapeSpec("blue", "circle", "red")
    _, (ja, jb) = shapes.generate_and_judge(default_pipe, [a, b], seed=1)
    assert ja.matches(a) and jb.matches(b)


def test_grammar_words_are_single_tokens():
    """The packaged tokenizers (also lent to dummy full-size presets) load offline and give every word of the
    grammar one token of its own."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    clip = CLIPTokenizer.from_pretrained(DEFAULT_MODEL_DIR / "tokenizer")
    t5 = T5TokenizerFast.from_pretrained(DEFAULT_MODEL_DIR / "tokenizer_2")
    words = set(shapes.COLOUR_NAMES) | set(shapes.SHAPES) | {"a", "on", "background"}
    for word in sorted(words):
        assert len(clip(word, add_special_tokens=False).input_ids) == 1, word
        assert len(t5(word, add_special_tokens=False).input_ids) == 1, word
