"""ditserve.native: the packaged default model's library-free components against diffusers' and transformers'
own classes (fp32, the same files), the whole image against `native_components="off"`, when the loader uses
them, and the start-up they exist for (a `generate` that never imports diffusers, transformers or dynamo)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ditserve.config import ConfigError, EngineConfig, SamplingParams
from ditserve.loader.source import DEFAULT_MODEL_DIR as D
from ditserve.native import (NATIVE_CLASSES, NativeAutoencoderKL, NativeCLIPTextModel, NativeFlowMatchEulerScheduler,
                             NativeT5EncoderModel)
from ditserve.pipelines.sampling import calculate_shift

CPU, F32 = torch.device("cpu"), torch.float32
PROMPTS = ["a red circle on a blue background", "", "A  PHOTO of   a cat, wearing a hat! 123 émoji \U0001f431 " * 5,
           "x", "hello world sign\n\tnight"]


def _native(sub: str, cls: str):
    return NATIVE_CLASSES[cls].from_folder(D / sub, F32, CPU)


@pytest.mark.parametrize("sub, cls, length", [("tokenizer", "CLIPTokenizer", 77), ("tokenizer_2", "T5Tokenizer", 32)])
def test_tokenizers_give_transformers_ids(sub, cls, length):
    """Padded and truncated ids as the FLUX pipeline asks for them, and the untruncated lengths it warns with."""
    from transformers import AutoTokenizer

    ref, ours = AutoTokenizer.from_pretrained(D / sub), _native(sub, cls)
    kw = dict(padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    assert torch.equal(ref(PROMPTS, **kw).input_ids, ours(PROMPTS, **kw).input_ids)
    assert ref(PROMPTS, truncation=False).input_ids == ours(PROMPTS, truncation=False).input_ids
    assert ours.model_max_length == ref.model_max_length


def _ids(sub: str, length: int) -> torch.Tensor:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(D / sub)(PROMPTS, padding="max_length", max_length=length,
                                                  truncation=True, return_tensors="pt").input_ids


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-5 * a.abs().max())


def test_clip_matches_transformers():
    from transformers import CLIPTextModel

    ids = _ids("tokenizer", 77)
    ref = CLIPTextModel.from_pretrained(D / "text_encoder", dtype=F32).eval()
    with torch.no_grad():
        assert _close(ref(ids, output_hidden_states=False).pooler_output, _native("text_encoder", "CLIPTextModel")(
            ids, output_hidden_states=False).pooler_output)
        assert _close(ref(ids).last_hidden_state, _native("text_encoder", "CLIPTextModel")(ids).last_hidden_state)


def test_t5_matches_transformers():
    from transformers import T5EncoderModel

    ids = _ids("tokenizer_2", 32)
    ref = T5EncoderModel.from_pretrained(D / "text_encoder_2", dtype=F32).eval()
    with torch.no_grad():
        assert _close(ref(ids, output_hidden_states=False)[0], _native("text_encoder_2", "T5EncoderModel")(ids)[0])


def test_t5_position_buckets_beyond_max_distance():
    """Sequences longer than relative_attention_max_distance (the log-spaced and clamped buckets)."""
    from transformers import T5EncoderModel

    ids = torch.randint(3, 190, (2, 300), generator=torch.Generator().manual_seed(0))
    ref = T5EncoderModel.from_pretrained(D / "text_encoder_2", dtype=F32).eval()
    with torch.no_grad():
        assert _close(ref(ids)[0], _native("text_encoder_2", "T5EncoderModel")(ids)[0])


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (2, 4, 6, 10)])
def test_vae_decode_matches_diffusers(shape):
    from diffusers import AutoencoderKL

    z = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ref = AutoencoderKL.from_pretrained(D / "vae", torch_dtype=F32).eval()
    with torch.no_grad():
        assert _close(ref.decode(z, return_dict=False)[0], _native("vae", "AutoencoderKL").decode(z)[0])


@pytest.mark.parametrize("steps, seq_len", [(1, 256), (4, 1024), (28, 64)])
def test_scheduler_is_diffusers_exactly(steps, seq_len):
    from diffusers import FlowMatchEulerDiscreteScheduler

    ref = FlowMatchEulerDiscreteScheduler.from_pretrained(D / "scheduler")
    native = _native("scheduler", "FlowMatchEulerDiscreteScheduler")
    ours = type(native).from_config(native.config)
    sigmas, mu = np.linspace(1.0, 1 / steps, steps), calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(2))
    for s in (ref, ours):
        s.set_timesteps(sigmas=sigmas, mu=mu)
        s.set_begin_index(0)
    assert torch.equal(ref.timesteps, ours.timesteps) and torch.equal(ref.sigmas, ours.sigmas)
    a = b = x
    for i in range(steps):
        v = torch.randn(2, 5, generator=torch.Generator().manual_seed(10 + i))
        a = ref.step(v, ref.timesteps[i], a, return_dict=False)[0]
        b = ours.step(v, ours.timesteps[i], b, return_dict=False)[0]
    assert torch.equal(a, b)


def test_unsupported_configs_are_refused():
    cfg = json.loads((D / "vae" / "config.json").read_text())
    with pytest.raises(ConfigError, match="native VAE"):
        NativeAutoencoderKL(_cfg({**cfg, "use_post_quant_conv": True}))
    clip = json.loads((D / "text_encoder" / "config.json").read_text())
    with pytest.raises(ConfigError, match="quick_gelu"):
        NativeCLIPTextModel(_cfg({**clip, "hidden_act": "gelu"}))
    t5 = json.loads((D / "text_encoder_2" / "config.json").read_text())
    with pytest.raises(ConfigError, match="gated"):
        NativeT5EncoderModel(_cfg({**t5, "feed_forward_proj": "relu", "is_gated_act": False}))
    sched = json.loads((D / "scheduler" / "scheduler_config.json").read_text())
    with pytest.raises(ConfigError, match="dynamic exponential"):
        NativeFlowMatchEulerScheduler(_cfg({**sched, "use_karras_sigmas": True}))


def _cfg(d):
    from ditserve.native import Config

    return Config(d)


def _image(native: str, **engine) -> np.ndarray:
    from ditserve.engine.engine import Engine

    e = Engine.load(None, EngineConfig(device="cpu", native_components=native, **engine))
    return e.generate(SamplingParams(prompt="a red circle", seed=3, num_images=2)).frames, e


def test_default_model_image_matches_the_library_components():
    """The whole default model with native components: every pixel within one level of the library path's (T5's
    GELU formula differs at 1e-7)."""
    ours, engine = _image("auto")
    ref, engine_ref = _image("off")
    assert type(engine.pipeline.vae).__name__ == "NativeAutoencoderKL"
    assert type(engine_ref.pipeline.vae).__name__ == "AutoencoderKL"
    assert ours.shape == ref.shape == (2, 64, 64, 3)
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("engine, native", [
    ({}, True), ({"native_components": "off"}, False), ({"compile_vae": True}, False),
    ({"vae_tiling": "on"}, False), ({"vae_streaming": "on"}, False), ({"vae_tiling": "off"}, True),
])
def test_when_the_loader_uses_them(engine, native):
    from ditserve.loader.components import _use_native

    assert _use_native(D, EngineConfig(device="cpu", **engine)) is native


def test_other_models_and_devices_use_the_libraries(tmp_path):
    import shutil

    from ditserve.loader.components import _use_native

    copy = tmp_path / "copy"
    shutil.copytree(D, copy)
    assert not _use_native(copy, EngineConfig(device="cpu"))
    assert not _use_native(D, EngineConfig(device="meta"))


def test_bad_value_is_refused():
    with pytest.raises(ConfigError, match="native_components"):
        EngineConfig(native_components="on")


def test_generate_imports_no_library(tmp_path):
    """What the components are for: `ditserve generate` with the default model imports neither diffusers nor
    transformers nor torch._dynamo (seconds of a 2-core machine's start-up)."""
    out = tmp_path / "a.png"
    code = ("import sys; from ditserve.cli import main\n"
            f"try: rc = main(['generate', '--prompt', 'a red circle', '--output', {str(out)!r}, '--steps', '2'])\n"
            "except SystemExit as e: rc = e.code\n"
            "print(sorted(m for m in ('diffusers', 'transformers', 'torch._dynamo') if m in sys.modules), rc)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == "[] 0"
    assert out.is_file()
