"""ditserve.config: SamplingParams validation and defaults, EngineConfig validation and resolution."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ditserve.config import ConfigError, EngineConfig, ModelSpec, SamplingParams

SPEC = ModelSpec(name="tiny-test", pipeline="FluxPipeline", components={}, default_steps=4, default_guidance=3.5,
                 default_height=256, default_width=512, max_sequence_length=128)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_resolved_fills_defaults_from_spec():
    p = SamplingParams(prompt="a cat", seed=7)
    r = p.resolved(SPEC)
    assert (r.height, r.width, r.steps, r.guidance, r.max_sequence_length) == (256, 512, 4, 3.5, 128)
    assert (r.prompt, r.seed, r.num_images) == ("a cat", 7, 1)
    assert p.height is None and p.steps is None  # the request itself is not modified


def test_resolved_keeps_explicit_values():
    p = SamplingParams(prompt=["a", "b"], height=64, width=4096, steps=1, guidance=0.0, seed=0, num_images=16,
                       max_sequence_length=128, extra={"k": 1})
    r = p.resolved(SPEC)
    assert (r.height, r.width, r.steps, r.guidance, r.seed, r.num_images, r.max_sequence_length) == (
        64, 4096, 1, 0.0, 0, 16, 128)
    assert r.prompts == ["a", "b"] and r.extra == {"k": 1} and r.extra is not p.extra


@pytest.mark.parametrize("field,value,match", [
    ("height", 500, "height must be a multiple of 16"),
    ("width", 520, "width must be a multiple of 16"),
    ("height", 48, "between 64 and 4096"),  # a multiple of 16, but too small
    ("width", 4112, "between 64 and 4096"),
    ("height", 0, "height"),
    ("height", -512, "height"),
    ("height", 512.0, "height must be an integer"),
    ("steps", 0, "steps must be between 1 and 1000"),
    ("steps", 1001, "steps must be between 1 and 1000"),
    ("steps", 2.5, "steps must be an integer"),
    ("num_images", 0, "num_images must be between 1 and 16"),
    ("num_images", 17, "num_images must be between 1 and 16"),
    ("num_images", True, "num_images must be an integer"),
    ("seed", -1, "seed must be between 0 and 9223372036854775807"),
    ("seed", 2**63, "seed must be between 0 and 9223372036854775807"),
    ("seed", "42", "seed must be an integer"),
    ("guidance", -1.0, "guidance must be between 0 and 50"),
    ("guidance", 50.5, "guidance must be between 0 and 50"),
    ("guidance", 3.41e38, "guidance must be between 0 and 50"),  # finite, and overflows float32
    ("guidance_2", 1e300, "guidance_2 must be between 0 and 50"),
    ("fps", 0.5, "fps must be between 1 and 120"),
    ("fps", float("nan"), "fps must be a finite number"),
    ("num_frames", 1025, "num_frames must be between 1 and 1024"),
    ("prompt", "\ud800", "prompt is not valid Unicode: a lone surrogate '\\\\ud800' at character 0"),
    ("prompt", ["ok", "a\udc00b"], "prompt is not valid Unicode"),
    ("negative_prompt", "x\ud800", "negative_prompt is not valid Unicode"),
    ("guidance", float("nan"), "guidance must be a finite number"),
    ("guidance", float("inf"), "guidance must be a finite number"),
    ("max_sequence_length", 129, "max_sequence_length must be between 1 and 128 for tiny-test"),
    ("max_sequence_length", 0, "max_sequence_length must be between 1 and 128"),
    ("prompt", [], "prompt"),
    ("prompt", ["ok", 3], "prompt"),
    ("prompt", None, "prompt"),
    ("prompt", 5, "prompt"),
])
def test_invalid_sampling_params(field, value, match):
    p = dataclasses.replace(SamplingParams(prompt="x"), **{field: value})
    with pytest.raises(ConfigError, match=match):
        p.resolved(SPEC)


@pytest.mark.parametrize("field,value", [("height", 64), ("height", 4096), ("steps", 1000), ("seed", 2**63 - 1),
                                         ("num_images", 16), ("guidance", 0), ("guidance", 50), ("max_sequence_length", 1)])
def test_boundary_values_accepted(field, value):
    dataclasses.replace(SamplingParams(prompt="x"), **{field: value}).resolved(SPEC)


def test_numpy_integers_accepted():
    np = pytest.importorskip("numpy")
    SamplingParams(prompt="x", height=np.int64(512), steps=np.int32(4), seed=np.uint32(3)).resolved(SPEC)


def test_validate_without_spec_skips_sequence_length_bound():
    SamplingParams(prompt="x", max_sequence_length=100000).validate()
    with pytest.raises(ConfigError, match="steps"):
        SamplingParams(prompt="x", steps=0).validate()


def test_engine_config_defaults():
    e = EngineConfig()
    assert (e.dtype, e.compile, e.kernels, e.attention, e.load_format) == (None, False, "auto", "auto", "auto")


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": "float8"}, r"unknown dtype 'float8'; valid: bf16, fp16, fp32"),
    ({"dtype": "bfloat16"}, "unknown dtype"),
    ({"load_format": "pickle"}, r"unknown load format 'pickle'; valid: auto, safetensors, dummy"),
    ({"load_format": "pt"}, "unknown load format"),
    ({"kernels": "cuda"}, r"unknown kernels choice 'cuda'; valid: auto, native, triton"),
])
def test_engine_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(**kwargs)


@pytest.mark.parametrize("device,dtype,expected", [
    ("cpu", None, torch.float32),
    ("cuda", None, torch.bfloat16),
    ("cuda:1", None, torch.bfloat16),
    ("cpu", "bf16", torch.bfloat16),
    ("cuda", "fp16", torch.float16),
    ("cuda", "fp32", torch.float32),
])
def test_engine_config_dtype_resolution(device, dtype, expected):
    e = EngineConfig(device=device, dtype=dtype)
    assert e.torch_dtype == expected
    assert e.torch_device == torch.device(device)


def test_engine_config_default_device_is_available_one():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert EngineConfig().torch_device.type == expected
    assert EngineConfig().torch_dtype == (torch.bfloat16 if expected == "cuda" else torch.float32)


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EngineConfig().dtype = "fp16"
    with pytest.raises(dataclasses.FrozenInstanceError):
        SPEC.default_steps = 8


def test_the_largest_guidance_survives_a_guidance_embedding_in_every_dtype():
    """A guidance embedding scales guidance by 1000 in the model's dtype: the documented bound stays finite."""
    import torch

    from ditserve.config import REQUEST_RANGES

    for name in ("guidance", "guidance_2"):
        high = REQUEST_RANGES[name][1]
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            assert torch.isfinite(torch.tensor([high], dtype=dtype) * 1000).all(), (name, dtype)
    assert not torch.isfinite(torch.tensor([66.0], dtype=torch.float16) * 1000).all()  # why the bound is not 100


@pytest.mark.parametrize("lora", [[("style", 1e300)], [{"name": "style", "weight": float("nan")}],
                                  [("a", 0.5), ("style", -10.5)]])
def test_lora_weights_have_a_finite_range(lora):
    with pytest.raises(ConfigError, match=r"lora: a weight must be a finite number between -10 and 10"):
        SamplingParams(prompt="x", extra={"lora": lora}).validate()
    SamplingParams(prompt="x", extra={"lora": [("style", 10.0), {"name": "b", "weight": -1}, "c"]}).validate()
