"""Loader tests: diffusers-format folders, sharded safetensors, pickle refusal, clear errors, dummy weights.

Every checkpoint is built here, tiny and random, with diffusers' / transformers' own classes and
`save_pretrained`, so the files are exactly what those libraries write.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import ditserve.models.flux as flux_module
from ditserve import registry
from ditserve.config import ConfigError, EngineConfig, ModelSpec
from ditserve.loader import (
    find_weight_files, load_component, load_model, load_transformer, read_model_index, resolve_model, stream_into,
)
from ditserve.loader import components as components_module
from ditserve.models.flux import FluxTransformer

CPU32 = EngineConfig(device="cpu", dtype="fp32")
TINY_DIT = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=20, guidance_embeds=True,
                axes_dims_rope=(4, 6, 6))


def _diffusers_dit(seed: int = 0, **overrides):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**{**TINY_DIT, **overrides}).eval()
    with torch.no_grad():  # no exact zeros anywhere: every weight must matter to the output
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _write_index(folder: Path, **components) -> None:
    index = {"_class_name": "FluxPipeline", "_diffusers_version": "0.42.1"}
    index.update({name: list(entry) for name, entry in components.items()})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def reference_dit():
    return _diffusers_dit()


@pytest.fixture
def dit_folder(tmp_path, reference_dit):
    """A model folder with only a transformer (other FLUX components declared null, as optional ones are)."""
    folder = tmp_path / "tiny-dit"
    reference_dit.save_pretrained(folder / "transformer", safe_serialization=True)
    _write_index(folder, transformer=("diffusers", "FluxTransformer2DModel"), vae=(None, None))
    return folder


def _inputs(config: dict, batch: int = 2, img_len: int = 12, txt_len: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(batch, img_len, config["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, txt_len, config["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, config["pooled_projection_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        img_ids=torch.randint(0, 8, (img_len, 3), generator=g).float(),
        txt_ids=torch.zeros(txt_len, 3),
        guidance=torch.full((batch,), 3.5),
    )


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ------------------------------------------------------------------------------------------- folders


def test_folder_load_matches_diffusers(dit_folder, reference_dit):
    loaded = load_model(str(dit_folder), CPU32)
    assert loaded.name == "tiny-dit" and loaded.path == dit_folder and loaded.pipeline_class == "FluxPipeline"
    assert list(loaded.components) == ["transformer"]  # the null "vae" entry is skipped
    model = loaded.components["transformer"]
    assert isinstance(model, FluxTransformer) and not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" and not p.requires_grad
               for p in model.parameters())

    inputs = _inputs(TINY_DIT)
    with torch.no_grad():
        ours = model(**inputs)
        ref = reference_dit(**inputs, return_dict=False)[0]
    assert ours.shape == ref.shape
    assert _rel_err(ours, ref) <= 1e-5


def test_sharded_checkpoint_loads_identically(tmp_path, dit_folder, reference_dit):
    sharded = tmp_path / "sharded"
    reference_dit.save_pretrained(sharded / "transformer", safe_serialization=True, max_shard_size="30KB")
    _write_index(sharded, transformer=("diffusers", "FluxTransformer2DModel"))
    files = find_weight_files(sharded / "transformer")
    assert len(files) > 2 and all(f.suffix == ".safetensors" for f in files)

    single = load_model(str(dit_folder), CPU32).components["transformer"].state_dict()
    shard = load_model(str(sharded), CPU32).components["transformer"].state_dict()
    assert single.keys() == shard.keys()
    for key in single:
        assert torch.equal(single[key], shard[key]), key


def test_load_in_bf16_casts_each_tensor(dit_folder, reference_dit):
    model = load_model(str(dit_folder), EngineConfig(device="cpu", dtype="bf16")).components["transformer"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    # The fused q/k/v of the first double block holds diffusers' to_q, to_k, to_v rows, rounded to bf16.
    attn = reference_dit.transformer_blocks[0].attn
    expected = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).to(torch.bfloat16)
    assert torch.equal(model.double_blocks[0].img_qkv.weight, expected)


def test_load_transformer_only(dit_folder):
    model, config = load_transformer(str(dit_folder), CPU32)
    assert isinstance(model, FluxTransformer)
    assert config["num_single_layers"] == TINY_DIT["num_single_layers"]
    with pytest.raises(ConfigError, match="no component 'vae'"):
        load_transformer(str(dit_folder), CPU32, component="vae")


def test_missing_component_folder(dit_folder):
    _write_index(dit_folder, transformer=("diffusers", "FluxTransformer2DModel"), vae=("diffusers", "AutoencoderKL"))
    with pytest.raises(ConfigError, match=r"component 'vae'.*folder .*vae is missing"):
        load_model(str(dit_folder), CPU32)


def test_missing_weight_file(dit_folder):
    (dit_folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"transformer has no safetensors weights"):
        load_model(str(dit_folder), CPU32)


def test_missing_shard_file(tmp_path, reference_dit):
    folder = tmp_path / "m"
    reference_dit.save_pretrained(folder / "transformer", safe_serialization=True, max_shard_size="30KB")
    shard = sorted((folder / "transformer").glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(ConfigError, match=f"missing: {shard.name}"):
        find_weight_files(folder / "transformer")


class _Trap:
    """Unpickling this creates the marker folder: proof that someone unpickled the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@pytest.mark.parametrize("weights_name", ["diffusion_pytorch_model.bin", "model.ckpt"])
def test_pickle_only_dit_refused_without_unpickling(dit_folder, tmp_path, weights_name):
    marker = tmp_path / "was-unpickled"
    folder = dit_folder / "transformer"
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / weights_name).write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(ConfigError, match=r"refuses pickle checkpoints.*convert them to safetensors"):
        load_model(str(dit_folder), CPU32)
    assert not marker.exists()


def test_pickle_only_text_encoder_refused_before_transformers_sees_it(tmp_path):
    from transformers import CLIPTextConfig

    marker = tmp_path / "was-unpickled"
    folder = tmp_path / "text_encoder"
    CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                   vocab_size=50).save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(marker)))
    with pytest.raises(ConfigError, match=r"pytorch_model\.bin.*refuses pickle checkpoints"):
        load_component(folder, "CLIPTextModel", CPU32)
    assert not marker.exists()


def test_garbage_bin_is_refused_by_name(dit_folder):
    folder = dit_folder / "transformer"
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"\x00not a pickle at all\xff")
    with pytest.raises(ConfigError, match="refuses pickle checkpoints"):
        load_model(str(dit_folder), CPU32)


def test_unknown_class_lists_known_ones(dit_folder):
    _write_index(dit_folder, transformer=("diffusers", "FluxTransformer2DModelV9"))
    with pytest.raises(ConfigError, match=r"'FluxTransformer2DModelV9'.*AutoencoderKL.*FluxTransformer2DModel"):
        load_model(str(dit_folder), CPU32)


def test_lm_head_class_is_not_a_known_component(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown component class 'T5ForConditionalGeneration'.*T5EncoderModel"):
        load_component(tmp_path, "T5ForConditionalGeneration", CPU32)


def test_config_shape_mismatch_names_key_and_shapes(dit_folder):
    config_file = dit_folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config["joint_attention_dim"] = 32  # the checkpoint was saved with 24
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"'context_embedder\.weight' has shape \(32, 24\).*expects \(32, 32\)"):
        load_model(str(dit_folder), CPU32)


def test_checkpoint_with_extra_and_missing_keys(dit_folder):
    file = dit_folder / "transformer" / "diffusion_pytorch_model.safetensors"
    sd = load_file(file)
    del sd["proj_out.bias"]
    sd["some_new_layer.weight"] = torch.zeros(3)
    save_file(sd, file)
    with pytest.raises(ConfigError, match=r"1 keys the model does not know: some_new_layer\.weight"):
        load_model(str(dit_folder), CPU32)
    del sd["some_new_layer.weight"]
    save_file(sd, file)
    with pytest.raises(ConfigError, match=r"missing 1 keys: proj_out\.bias.*left unset: proj_out\.bias"):
        load_model(str(dit_folder), CPU32)


def test_model_index_needs_class_name(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "FluxTransformer2DModel"]}))
    with pytest.raises(ConfigError, match="_class_name"):
        read_model_index(tmp_path)


# ------------------------------------------------------------------------------------------- streaming


class _Fused(nn.Module):
    """A toy model: one fused (6, 4) projection filled from two checkpoint tensors, plus a norm scale."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.qk = nn.Parameter(torch.full((6, 4), float("nan"), dtype=dtype))
        self.scale = nn.Parameter(torch.full((4,), float("nan"), dtype=dtype))

    @staticmethod
    def weight_map():
        return {"q.weight": ("qk", 0, 3), "k.weight": ("qk", 3, 6), "norm.scale": ("scale", None, None)}


def test_stream_into_fills_fused_slices_and_casts(tmp_path):
    q, k, scale = torch.randn(3, 4), torch.randn(3, 4), torch.randn(4)
    save_file({"q.weight": q, "norm.scale": scale}, tmp_path / "a.safetensors")
    save_file({"k.weight": k.to(torch.float16)}, tmp_path / "b.safetensors")
    model = _Fused(dtype=torch.bfloat16)
    stream_into(model, [tmp_path / "a.safetensors", tmp_path / "b.safetensors"], model.weight_map(), "cpu")
    assert torch.equal(model.qk, torch.cat([q, k.to(torch.float16)]).to(torch.bfloat16))
    assert torch.equal(model.scale, scale.to(torch.bfloat16))


def test_stream_into_partial_fused_param_is_missing(tmp_path):
    save_file({"q.weight": torch.randn(3, 4), "norm.scale": torch.randn(4)}, tmp_path / "a.safetensors")
    model = _Fused()
    with pytest.raises(ConfigError, match=r"missing 1 keys: k\.weight; 1 model parameters left unset: qk"):
        stream_into(model, [tmp_path / "a.safetensors"], model.weight_map(), "cpu")


def test_stream_into_shape_mismatch_reads_nothing(tmp_path):
    save_file({"q.weight": torch.randn(4, 4)}, tmp_path / "a.safetensors")
    model = _Fused()
    with pytest.raises(ConfigError, match=r"'q\.weight' has shape \(4, 4\).*expects \(3, 4\) for qk\[0:3\]"):
        stream_into(model, [tmp_path / "a.safetensors"], model.weight_map(), "cpu")
    assert model.qk.isnan().all()


def test_stream_into_lists_a_few_unexpected_keys(tmp_path):
    extra = {f"extra.{i}": torch.zeros(1) for i in range(8)}
    save_file({"q.weight": torch.randn(3, 4), "k.weight": torch.randn(3, 4), "norm.scale": torch.randn(4), **extra},
              tmp_path / "a.safetensors")
    model = _Fused()
    with pytest.raises(ConfigError, match=r"8 keys the model does not know: extra\.0, .*\(3 more\)"):
        stream_into(model, [tmp_path / "a.safetensors"], model.weight_map(), "cpu")


# ------------------------------------------------------------------------------------------- sources


def test_resolve_model_local_folder_needs_model_index(tmp_path, dit_folder):
    assert resolve_model(str(dit_folder)) == dit_folder
    with pytest.raises(ConfigError, match=r"no model_index\.json"):
        resolve_model(str(tmp_path / "tiny-dit" / "transformer"))
    with pytest.raises(ConfigError, match="no such folder"):
        resolve_model(str(tmp_path / "not" / "there"))


def test_hub_id_offline_names_the_id(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.chdir(tmp_path)  # "made-up-org/..." must not exist as a relative path
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(ConfigError, match=r"'made-up-org/no-such-model-1234'.*Hugging Face hub failed"):
        load_model("made-up-org/no-such-model-1234", CPU32)


# ------------------------------------------------------------------------------------------- dummy


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """A complete tiny FLUX.1 checkpoint (transformer, VAE, CLIP, T5, tokenizers, scheduler)."""
    from ditserve.testing import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny") / "tiny-flux")


def _check_dummy_module(module: nn.Module, device: str = "cpu") -> None:
    for name, p in module.named_parameters():
        assert p.device.type == device, name  # nothing left on meta
        assert torch.isfinite(p).all(), name
    for name, b in module.named_buffers():
        assert b.device.type == device, name


def test_dummy_folder_ignores_weights_and_builds_everything(tmp_path, tiny_pipeline):
    import shutil

    folder = tmp_path / "configs-only"
    shutil.copytree(tiny_pipeline, folder)
    for f in folder.rglob("*.safetensors"):
        f.unlink()
    loaded = load_model(str(folder), EngineConfig(device="cpu", dtype="bf16", load_format="dummy"))
    assert loaded.name == "configs-only" and loaded.pipeline_class == "FluxPipeline"
    assert set(loaded.components) == {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer",
                                      "tokenizer_2", "scheduler"}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        _check_dummy_module(loaded.components[name])

    dit = loaded.components["transformer"]
    assert all(p.dtype == torch.bfloat16 for p in dit.parameters())
    assert all(p.dtype == torch.float32 for p in loaded.components["vae"].parameters())  # fp32 on CPU
    w = dit.double_blocks[0].img_qkv.weight.float()
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert (dit.double_blocks[0].img_qkv.bias == 0).all() and (dit.double_blocks[0].img_q_norm.weight == 1).all()
    # transformers' own init restored the buffer a meta build leaves empty.
    clip = loaded.components["text_encoder"]
    assert torch.equal(clip.embeddings.position_ids[0], torch.arange(clip.config.max_position_embeddings))

    config = json.loads((folder / "transformer" / "config.json").read_text())
    with torch.no_grad():
        out = dit(**{k: v.to(torch.bfloat16) for k, v in _inputs(config).items()})
    assert torch.isfinite(out).all() and out.float().std() > 0


def test_dummy_preset_uses_packaged_tokenizers(tmp_path, monkeypatch, tiny_pipeline):
    """The preset path at toy size: a tiny spec registered as a preset, tokenizers from the default folder."""
    dit_config = json.loads((tiny_pipeline / "transformer" / "config.json").read_text())
    vae_config = json.loads((tiny_pipeline / "vae" / "config.json").read_text())
    spec = ModelSpec(
        name="tiny-preset", pipeline="FluxPipeline",
        components={"transformer": ("FluxTransformer2DModel", dit_config), "vae": ("AutoencoderKL", vae_config),
                    "scheduler": ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0, "use_dynamic_shifting": True})},
        default_steps=4, default_guidance=3.5, default_height=64, default_width=64, max_sequence_length=32)
    monkeypatch.setattr(flux_module, "TINY_TEST_SPEC", spec, raising=False)
    monkeypatch.setitem(registry.PRESETS, "tiny-preset", "ditserve.models.flux:TINY_TEST_SPEC")
    monkeypatch.setattr(components_module, "DEFAULT_MODEL_DIR", tiny_pipeline)

    loaded = load_model("tiny-preset", EngineConfig(device="cpu", dtype="fp32", load_format="dummy"))
    assert loaded.name == "tiny-preset" and loaded.path is None and loaded.pipeline_class == "FluxPipeline"
    assert set(loaded.components) == {"transformer", "vae", "scheduler", "tokenizer", "tokenizer_2"}
    assert loaded.components["scheduler"].config.shift == 3.0
    assert loaded.components["tokenizer_2"]("a red circle").input_ids[-1] == 1  # T5's </s>
    _check_dummy_module(loaded.components["transformer"])
    _check_dummy_module(loaded.components["vae"])

    dit, config = load_transformer("tiny-preset", EngineConfig(device="cpu", dtype="fp32", load_format="dummy"))
    assert isinstance(dit, FluxTransformer) and config == dit_config


def test_dummy_unknown_name_lists_presets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"no such folder.*preset: flux\.1-dev, flux\.1-schnell"):
        load_model("flux-1-dev", EngineConfig(device="cpu", load_format="dummy"))


# ------------------------------------------------------------------------------------------- full checkpoint


def test_full_tiny_checkpoint_matches_diffusers(tiny_pipeline):
    """Every component of a diffusers-made FLUX.1 checkpoint, loaded by us, against diffusers' own load."""
    from diffusers import FluxPipeline

    ref = FluxPipeline.from_pretrained(tiny_pipeline, dtype=torch.float32)
    loaded = load_model(str(tiny_pipeline), CPU32)
    assert set(loaded.components) == {name for name, c in ref.components.items() if c is not None}

    for name in ("vae", "text_encoder", "text_encoder_2"):
        ours, theirs = loaded.components[name].state_dict(), ref.components[name].state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name
    prompt = "a red circle on a blue background"
    assert loaded.components["tokenizer"](prompt).input_ids == ref.tokenizer(prompt).input_ids
    assert loaded.components["tokenizer_2"](prompt).input_ids == ref.tokenizer_2(prompt).input_ids
    assert loaded.components["scheduler"].config == ref.scheduler.config

    config = dict(ref.transformer.config)
    with torch.no_grad():
        inputs = _inputs(config)
        ours = loaded.components["transformer"](**inputs)
        theirs = ref.transformer(**inputs, return_dict=False)[0]
    assert _rel_err(ours, theirs) <= 1e-5


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_full_size_dummy_flux_dev_on_gpu():
    engine = EngineConfig(device="cuda", dtype="bf16", load_format="dummy")
    torch.cuda.reset_peak_memory_stats()
    loaded = load_model("flux.1-dev", engine)
    dit = loaded.components["transformer"]
    n = sum(p.numel() for p in dit.parameters())
    assert 11.8e9 < n < 12.0e9  # FLUX.1-dev's transformer: 11.9B parameters
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        _check_dummy_module(loaded.components[name], device="cuda")
    # Built in place: the peak is about the models' own size (bf16), not twice it.
    total = sum(p.numel() * p.element_size() for name in ("transformer", "vae", "text_encoder", "text_encoder_2")
                for p in loaded.components[name].parameters())
    assert torch.cuda.max_memory_allocated() < 1.1 * total
