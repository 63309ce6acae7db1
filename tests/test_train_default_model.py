"""scripts/train_default_model.py: a --quick CPU run end to end (stages, record, loss curve, sample grid), a
folder our loader and pipeline generate from, the refusal to overwrite, and --install."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ditserve.config import EngineConfig, SamplingParams
from ditserve.loader import load_model
from ditserve.registry import pipeline_class

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "train_default_model.py"
COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick") / "run"
    proc = run_script("--out", str(out), "--quick", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_quick_run_writes_the_model_and_its_record(quick_run):
    out, proc = quick_run
    for line in ("vae step 0/30", "vae step 29/30", "dit step 0/30", "dit step 29/30", "held-out accuracy"):
        assert line in proc.stdout
    assert (out / "model_index.json").is_file() and all((out / c).is_dir() for c in COMPONENTS)
    assert not (out / "_tokenizers").exists()
    weights = sorted(p.name for p in out.rglob("*.safetensors"))
    assert weights == ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors",
                       "model.safetensors", "model.safetensors"]
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".ckpt")]

    record = json.loads((out / "train.json").read_text())
    assert record["config"]["seed"] == 0 and record["config"]["dit_steps"] == 30
    assert set(record["seconds"]) == {"render", "vae", "dit", "eval", "total"}
    assert all(math.isfinite(v) and v > 0 for v in record["final_loss"].values())
    held = record["held_out"]
    assert held["prompts"] == 56 and held["seeds"] == 1 and 0 <= held["accuracy"] <= 1
    assert len(held["wrong"]) == round(56 * (1 - held["accuracy"]))
    on_disk = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()
                  and p.name not in ("loss.csv", "loss.png", "samples.png", "train.json"))
    assert record["bytes"]["total"] == on_disk
    assert record["versions"]["torch"] and record["device"] == "cpu"
    assert record["parameters"]["transformer"] > 0

    with open(out / "loss.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stage"] for r in rows] == ["vae"] * 30 + ["dit"] * 30
    with Image.open(out / "loss.png") as img:
        assert img.size[0] > 400 and img.size[1] > 400
    with Image.open(out / "samples.png") as img:
        assert img.size[0] >= 8 * 128 and img.size[1] >= 7 * 128  # 56 held-out prompts, 8 per row


@pytest.mark.slow
def test_quick_model_loads_and_generates_through_ditserve(quick_run):
    out, _ = quick_run
    engine = EngineConfig(device="cpu")
    loaded = load_model(str(out), engine)
    cls = pipeline_class(loaded.pipeline_class)
    spec = cls.spec_for(loaded.name, loaded.components)
    # A FLUX.1-dev-like model with a 3-level VAE: 28 steps, guidance 3.5, 64x64 images from 16x16 latents, and
    # by default as many T5 tokens as training used (the saved tokenizer's model_max_length caps the 512).
    assert (spec.default_steps, spec.default_guidance, spec.default_height, spec.default_width) == (28, 3.5, 64, 64)
    text_len = json.loads((out / "train.json").read_text())["config"]["text_len"]
    assert spec.max_sequence_length == text_len == 16
    pipe = cls(loaded.components, engine, spec)
    assert pipe.vae_scale_factor == 4 and pipe.latent_size(64, 64) == (16, 16)
    result = pipe.generate(SamplingParams(prompt="a red circle on a blue background", steps=2, seed=0),
                           progress=False)
    assert [img.size for img in result.images] == [(64, 64)]


@pytest.mark.slow
def test_refuses_to_overwrite(quick_run, tmp_path):
    out, _ = quick_run
    proc = run_script("--out", str(out), "--quick")
    assert proc.returncode != 0 and "is not empty" in proc.stderr and "--force" in proc.stderr
    other = tmp_path / "not-a-run"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    proc = run_script("--out", str(other), "--quick", "--force")
    assert proc.returncode != 0 and "holds no previous run" in proc.stderr
    assert (other / "notes.txt").read_text() == "keep me"


def load_script_module():
    spec = importlib.util.spec_from_file_location("train_default_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_install_copies_model_and_record(quick_run, tmp_path, monkeypatch):
    out, _ = quick_run
    script = load_script_module()
    monkeypatch.setattr(script, "INSTALL_DIR", tmp_path / "assets" / "default-model")
    monkeypatch.setattr(script, "DOCS_DIR", tmp_path / "docs")
    (tmp_path / "assets" / "default-model").mkdir(parents=True)
    (tmp_path / "assets" / "default-model" / "stale.json").write_text("{}")
    script.main(["--out", str(out), "--install"])
    installed = tmp_path / "assets" / "default-model"
    assert sorted(p.name for p in installed.iterdir()) == sorted(("model_index.json",) + COMPONENTS)
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == [
        "default-model-loss.png", "default-model-samples.png", "default-model-train.json"]
    with pytest.raises(SystemExit, match="no finished run"):
        script.main(["--out", str(tmp_path / "docs"), "--install"])


def test_flags_and_quick_defaults():
    script = load_script_module()
    _, cfg = script.parse_args(["--out", "x"])
    assert cfg.text_len <= 512 and cfg.latent_channels == 4 and len(cfg.vae_channels) == 3
    assert cfg.width % cfg.head_dim == 0
    _, quick = script.parse_args(["--out", "x", "--quick", "--dit-steps", "7", "--vae-channels", "8", "8", "8"])
    assert quick.device == "cpu" and quick.dit_steps == 7 and quick.vae_channels == (8, 8, 8)
    assert quick.vae_steps == script.QUICK["vae_steps"]
    with pytest.raises(SystemExit, match="not a multiple"):
        script.main(["--out", "x", "--width", "100", "--head-dim", "32"])


def test_tiny_tokenizers_give_every_word_one_token(tmp_path):
    """The script's tokenizers (ditserve.testing's, whole_words=True): each built-in word, the grammar's
    included, is one token in both, so the text encoders see words, not spellings."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    from ditserve import shapes
    from ditserve.testing import _WORDS, make_tiny_tokenizers

    clip_dir, t5_dir = make_tiny_tokenizers(tmp_path, whole_words=True)
    clip, t5 = CLIPTokenizer.from_pretrained(clip_dir), T5TokenizerFast.from_pretrained(t5_dir)
    assert set(shapes.COLOUR_NAMES) | set(shapes.SHAPES) | {"a", "on", "background"} <= set(_WORDS)
    for word in _WORDS:
        assert clip.convert_ids_to_tokens(clip(word, add_special_tokens=False).input_ids) == [word + "</w>"]
        assert t5.convert_ids_to_tokens(t5(word, add_special_tokens=False).input_ids) == ["▁" + word]
