"""LoRA adapters (`ditserve.lora`) against diffusers' own LoRA loading, on the tiny FLUX.1 and Z-Image checkpoints.

Adapters are made here with peft (`add_adapter` with random A and B, saved by diffusers' `save_lora_weights`,
metadata included) and by hand in kohya's key style; diffusers applies them with `load_lora_weights` +
`set_adapters`, ditserve through `EngineConfig.lora`. Images must agree (PSNR >= 40 dB) while the adapter changes
the image a lot (PSNR < 30 dB against no adapter), so the comparison can fail.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ditserve.config import ConfigError, EngineConfig, SamplingParams
from ditserve.engine import Engine
from ditserve.lora import LoRAConfig, LoRASpec
from ditserve.testing import build_tiny_flux_pipeline

CPU = EngineConfig(device="cpu", dtype="fp32")
PROMPT = "a red circle on a blue background"
REQ = dict(height=64, width=64, steps=2, guidance=3.5, seed=0)

# Adapter "a": every kind of layer: fused q/k/v pieces of both block kinds, a GELU projection, the AdaLN
# modulation, the single block's fused mlp piece and both output projections. "b": other pieces, rsLoRA scaling.
TARGETS_A = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_mlp", "proj_out", "ff.net.0.proj", "norm1.linear"]
TARGETS_B = ["to_k", "add_v_proj", "ff_context.net.2", "norm.linear", "norm1_context.linear"]


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def make_peft_adapter(pipe_cls, transformer, folder, name, targets, r, alpha, seed, gain=0.2, **extra):
    """A random LoRA made with peft on `transformer`, saved with `pipe_cls.save_lora_weights` (metadata
    included), then removed again. B is scaled by `gain` so the adapter changes the image without saturating."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **extra)
    torch.manual_seed(seed)
    transformer.add_adapter(config, adapter_name=name)
    sd = {k: (v * gain if "lora_B" in k else v).detach().clone()
          for k, v in get_peft_model_state_dict(transformer, adapter_name=name).items()}
    transformer.delete_adapters(name)
    pipe_cls.save_lora_weights(folder, transformer_lora_layers=sd, transformer_lora_adapter_metadata=config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def make_kohya_adapter(file, D, seed):
    """A kohya / sd-scripts FLUX.1 file by hand: original (BFL) module names, down/up/alpha; the image stream's
    fused qkv is one pair over all three projections."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    r = 4
    shapes = {"double_blocks_0_img_attn_qkv": (D, 3 * D), "double_blocks_1_txt_mlp_0": (D, 4 * D),
              "double_blocks_0_img_mod_lin": (D, 6 * D), "single_blocks_0_linear2": (5 * D, D),
              "single_blocks_1_modulation_lin": (D, 3 * D)}
    sd = {}
    for name, (n_in, n_out) in shapes.items():
        sd[f"lora_unet_{name}.lora_down.weight"] = torch.randn(r, n_in, generator=g) * 0.3
        sd[f"lora_unet_{name}.lora_up.weight"] = torch.randn(n_out, r, generator=g) * 0.1
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(file))
    return file


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(checkpoint path, adapter files, diffusers' pipeline with adapters a, b and k loaded)."""
    import diffusers

    root = tmp_path_factory.mktemp("lora")
    path = build_tiny_flux_pipeline(root / "tiny", guidance_embeds=True, seed=1, sample_size=128)
    ref = diffusers.FluxPipeline.from_pretrained(path)
    ref.set_progress_bar_config(disable=True)
    files = {
        "a": make_peft_adapter(diffusers.FluxPipeline, ref.transformer, root / "a", "a", TARGETS_A, 4, 8, seed=0),
        "b": make_peft_adapter(diffusers.FluxPipeline, ref.transformer, root / "b", "b", TARGETS_B, 2, 4, seed=1,
                               use_rslora=True),
        "k": make_kohya_adapter(root / "k.safetensors", ref.transformer.config.num_attention_heads
                                * ref.transformer.config.attention_head_dim, seed=2),
    }
    for name, file in files.items():
        ref.load_lora_weights(str(file), adapter_name=name)
    return path, files, ref


def reference(ref, adapters: dict[str, float]):
    """diffusers' image (uint8, (1, H, W, 3)) with `adapters` active at their weights (none: LoRA disabled)."""
    if adapters:
        ref.enable_lora()
        ref.set_adapters(list(adapters), list(adapters.values()))
    else:
        ref.disable_lora()
    out = ref(PROMPT, height=REQ["height"], width=REQ["width"], num_inference_steps=REQ["steps"],
              guidance_scale=REQ["guidance"], generator=torch.Generator("cpu").manual_seed(REQ["seed"]),
              output_type="np").images
    return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)


def engine(path, files, adapters: dict[str, float], mode="fuse", **kw) -> Engine:
    specs = tuple(LoRASpec(str(files[n]), w, name=n) for n, w in adapters.items())
    return Engine.load(str(path), dataclasses.replace(CPU, lora=LoRAConfig(specs, mode=mode, **kw)))


def image(eng: Engine, **extra) -> np.ndarray:
    return eng.generate(SamplingParams(prompt=PROMPT, **REQ, extra=extra)).frames


@pytest.fixture(scope="module")
def unfused(flux):
    """One unfused engine holding a (1.0) and b (0.6) at start, k loaded later (it touches layers a and b do
    not: targets "all"); requests pick among a, b and k. Slot rank: 4 + 2, a's and b's ranks."""
    path, files, _ = flux
    eng = engine(path, files, {"a": 1.0, "b": 0.6}, mode="unfused", targets="all")  # slots on every Linear
    eng.lora.load("k", str(files["k"]))
    return eng


@pytest.mark.parametrize("weight", [1.0, 0.6])
def test_one_adapter_fused_matches_diffusers(flux, weight):
    path, files, ref = flux
    ours = image(engine(path, files, {"a": weight}))
    expected = reference(ref, {"a": weight})
    assert psnr(ours, expected) >= 40
    assert psnr(expected, reference(ref, {})) < 30  # the adapter changes the image: the check can fail


def test_stacked_adapters_unfused_match_diffusers_and_fused(flux, unfused):
    path, files, ref = flux
    expected = reference(ref, {"a": 1.0, "b": 0.6})
    ours = image(unfused)  # the start adapters: a at 1.0, b at 0.6
    assert psnr(ours, expected) >= 40
    assert psnr(expected, reference(ref, {"a": 1.0})) < 35  # b matters
    fused = image(engine(path, files, {"a": 1.0, "b": 0.6}))
    assert psnr(fused, ours) >= 60  # the same math, merged or as side products


def test_unfused_layouts_agree(flux, unfused):
    """The "concat" layout gives the image the default "separate" side products give (stacked a and b)."""
    path, files, _ = flux
    concat = engine(path, files, {"a": 1.0, "b": 0.6}, mode="unfused", unfused_impl="concat")
    assert concat.lora.slots["double_blocks.0.img_qkv"].concat
    assert not unfused.lora.slots["double_blocks.0.img_qkv"].concat
    assert psnr(image(concat), image(unfused)) >= 60


def test_per_request_adapters_in_one_unfused_engine(flux, unfused):
    _, _, ref = flux
    assert psnr(image(unfused, lora=[("a", 0.6)]), reference(ref, {"a": 0.6})) >= 40
    assert psnr(image(unfused, lora=[{"name": "k", "weight": 1.0}]), reference(ref, {"k": 1.0})) >= 40
    assert psnr(image(unfused, lora=[]), reference(ref, {})) >= 40  # none: zero slots
    # A mixed list is split by adapters (never batched together) and each gets its own image.
    reqs = [SamplingParams(prompt=PROMPT, **REQ, extra={"lora": sel}) for sel in ([("a", 0.6)], [], [("a", 0.6)])]
    keys = [unfused.batch_key(unfused.resolve(r)) for r in reqs]
    assert keys[0] == keys[2] != keys[1]
    outs = unfused.generate(reqs)
    assert psnr(outs[0].frames, reference(ref, {"a": 0.6})) >= 40
    assert psnr(outs[1].frames, reference(ref, {})) >= 40
    info = {d["name"]: d for d in unfused.lora.info()}  # what a server lists
    assert (info["a"]["rank"], info["a"]["format"]) == (4, "diffusers")
    assert (info["k"]["rank"], info["k"]["format"]) == (4, "kohya")


def test_kohya_file_matches_diffusers(flux):
    path, files, ref = flux
    assert psnr(image(engine(path, files, {"k": 0.8})), reference(ref, {"k": 0.8})) >= 40


def test_kohya_fused_qkv_and_linear1_land_on_the_fused_rows(flux, tmp_path):
    """A kohya pair over a fused projection (the single block's linear1: q, k, v and the MLP input) adds
    up @ down * alpha / r to exactly that Linear's weight."""
    from safetensors.torch import save_file

    path, _, _ = flux
    base = Engine.load(str(path), CPU).pipeline.transformer
    D = base.config.inner_dim
    down, up = torch.randn(3, D), torch.randn(7 * D, 3)
    save_file({"lora_unet_single_blocks_1_linear1.lora_down.weight": down,
               "lora_unet_single_blocks_1_linear1.lora_up.weight": up,
               "lora_unet_single_blocks_1_linear1.alpha": torch.tensor(6.0)}, str(tmp_path / "l1.safetensors"))
    tuned = engine(path, {"l1": tmp_path / "l1.safetensors"}, {"l1": 0.5}).pipeline.transformer
    delta = tuned.single_blocks[1].qkv_mlp.weight - base.single_blocks[1].qkv_mlp.weight
    torch.testing.assert_close(delta, 0.5 * 2.0 * up @ down, rtol=1e-5, atol=1e-5)
    untouched = [n for n, p in tuned.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert untouched == ["single_blocks.1.qkv_mlp.weight"]


@pytest.mark.parametrize("quantization, impl", [(None, "concat"), (None, "separate"), ("fp8", "concat")])
def test_switching_adapters_recompiles_nothing(flux, quantization, impl):
    """Compiled (backend eager, regional, fullgraph), unfused, both layouts, bf16 and fp8 layers (fp8 ones take
    separate side products): changing the adapter or its weight between forwards changes the output and
    compiles no new graph."""
    from ditserve.compile import CompileConfig, compile_model
    from ditserve.loader import load_transformer
    from ditserve.models.flux import flux_example_inputs

    path, files, _ = flux
    specs = tuple(LoRASpec(str(files[n]), w, name=n) for n, w in (("a", 1.0), ("b", 0.6)))
    config = dataclasses.replace(CPU, dtype="bf16", quantization=quantization,
                                 lora=LoRAConfig(specs, mode="unfused", unfused_impl=impl))
    model, _ = load_transformer(str(path), config)
    torch._dynamo.reset()
    compile_model(model, CompileConfig(backend="eager"))
    x = flux_example_inputs(model.config, 64, 64, text_len=8, dtype=torch.bfloat16)
    stats = torch._dynamo.utils.counters["stats"]
    outs = []
    with torch.inference_mode():
        outs.append(model(**x))
        graphs = stats["unique_graphs"]
        assert graphs > 0
        with torch._dynamo.config.patch(error_on_recompile=True):
            for sel in ((("a", 0.3),), (("b", 1.0), ("a", 1.0)), ()):
                model.lora.activate(sel)
                outs.append(model(**x))
    assert stats["unique_graphs"] == graphs
    assert all((outs[i] - outs[i + 1]).abs().max() > 1e-2 for i in range(len(outs) - 1))


def _bad_file(tmp_path, flux, mutate):
    from safetensors.torch import load_file, save_file

    _, files, _ = flux
    sd = load_file(str(files["a"]))
    mutate(sd)
    file = tmp_path / "bad.safetensors"
    save_file(sd, str(file))
    return file


@pytest.mark.parametrize("mutate, match", [
    (lambda sd: sd.update({"transformer.transformer_blocks.0.attn.to_nope.lora_A.weight": torch.zeros(4, 32),
                           "transformer.transformer_blocks.0.attn.to_nope.lora_B.weight": torch.zeros(32, 4)}),
     "to_nope.*does not have"),
    (lambda sd: sd.update({"transformer.transformer_blocks.1.attn.to_q.lora_B.weight": torch.zeros(48, 4)}),
     r"transformer_blocks\.1\.attn\.to_q.*do not fit"),
    (lambda sd: sd.update({"text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(4, 32)}),
     "text-encoder"),
    (lambda sd: sd.update({"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.zeros(32)}),
     "DoRA"),
])
def test_bad_adapters_are_refused_and_nothing_is_applied(flux, tmp_path, mutate, match):
    path, _, _ = flux
    bad = _bad_file(tmp_path, flux, mutate)
    with pytest.raises(ConfigError, match=match):
        engine(path, {"bad": bad}, {"bad": 1.0})
    # The manager refuses it too and keeps working with what it had.
    eng = engine(path, {"bad": bad}, {}, mode="unfused", max_rank=8, targets="all")
    with pytest.raises(ConfigError, match=match):
        eng.lora.load("bad", str(bad))
    assert "bad" not in eng.lora.adapters
    assert not any(t.any() for s in eng.lora.slots.values() for t in (s.down, *s.ups))


def test_pickle_and_missing_files_are_refused(flux, tmp_path):
    path, _, _ = flux
    pt = tmp_path / "adapter.pt"
    pt.write_bytes(b"not opened")
    with pytest.raises(ConfigError, match="pickle"):
        engine(path, {"p": pt}, {"p": 1.0})
    with pytest.raises(ConfigError, match="no such file"):
        engine(path, {"m": tmp_path / "missing.safetensors"}, {"m": 1.0})


def test_requests_and_settings_are_checked(flux, unfused):
    path, files, _ = flux
    with pytest.raises(ConfigError, match="no adapter named 'zz'"):
        unfused.resolve(SamplingParams(prompt=PROMPT, extra={"lora": [("zz", 1.0)]}))
    with pytest.raises(ConfigError, match="given at start"):
        unfused.lora.unload("a")
    unfused.lora.load("k2", str(files["k"]))
    unfused.lora.activate((("k2", 1.0),))
    unfused.lora.unload("k2")  # active: the next batch rewrites the slots, even for a new "k2"
    assert "k2" not in unfused.lora.adapters and unfused.lora.active is None
    unfused.lora.load("k2", str(files["b"]))
    unfused.lora.activate((("k2", 1.0),))
    assert not unfused.lora.slots["double_blocks.0.img_qkv"].ups[0].any()  # b does not touch to_q
    unfused.lora.unload("k2")
    with pytest.raises(ConfigError, match="needs rank"):  # a + b + k stacked exceed the slots' rank (4 + 2)
        unfused.resolve(SamplingParams(prompt=PROMPT, extra={"lora": [("a", 1), ("b", 1), ("k", 1)]}))
    fused = engine(path, files, {"a": 1.0})
    with pytest.raises(ConfigError, match="--lora-mode unfused"):
        fused.resolve(SamplingParams(prompt=PROMPT, extra={"lora": [("a", 0.5)]}))
    plain = Engine.load(str(path), CPU)
    with pytest.raises(ConfigError, match="without LoRA"):
        plain.resolve(SamplingParams(prompt=PROMPT, extra={"lora": [("a", 1.0)]}))
    with pytest.raises(ConfigError, match="--lora-mode"):
        LoRAConfig(mode="merged")
    assert LoRASpec.parse("dir/a.safetensors:0.6") == LoRASpec("dir/a.safetensors", 0.6, "a")
    assert LoRASpec.parse("C:/x/b.safetensors").weight == 1.0


def test_cli_flags_build_the_lora_config(flux):
    import argparse

    from ditserve.engine_args import add_engine_flags, engine_from_args

    _, files, _ = flux
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    args = parser.parse_args(["--lora", f"{files['a']}:0.6", "--lora", str(files["k"]), "--lora-mode", "unfused"])
    lora = engine_from_args(args).lora
    assert lora.mode == "unfused"
    assert [(s.path, s.weight) for s in lora.adapters] == [(str(files["a"]), 0.6), (str(files["k"]), 1.0)]
    assert engine_from_args(parser.parse_args([])).lora is None
    assert engine_from_args(parser.parse_args(["--lora", str(files["a"])])).lora.mode == "fuse"
    with pytest.raises(ConfigError, match="--lora-mode.*--lora PATH"):
        engine_from_args(parser.parse_args(["--lora-mode", "unfused"]))


@pytest.fixture(scope="module")
def z_image(tmp_path_factory):
    from ditserve.testing import build_tiny_z_image_pipeline

    return build_tiny_z_image_pipeline(tmp_path_factory.mktemp("lora-z") / "z", seed=0)


def test_z_image_adapter_matches_diffusers(z_image, tmp_path):
    import diffusers

    path = z_image
    ref = diffusers.ZImagePipeline.from_pretrained(path, dtype=torch.float32)
    ref.set_progress_bar_config(disable=True)
    file = make_peft_adapter(diffusers.ZImagePipeline, ref.transformer, tmp_path / "za", "za",
                             r".*(to_q|to_v|to_out\.0|w1|w2|w3|(layers|noise_refiner)\.\d+\.adaLN_modulation\.0)",
                             4, 4, seed=3)
    common = dict(height=64, width=64, num_inference_steps=2, guidance_scale=0.0, output_type="np")

    def ref_image():
        out = ref("a photo of a cat", generator=torch.Generator("cpu").manual_seed(0), **common).images
        return np.clip(np.round(out * 255.0), 0, 255).astype(np.uint8)

    plain = ref_image()
    ref.load_lora_weights(str(file), adapter_name="za")
    ref.set_adapters(["za"], [0.8])
    expected = ref_image()
    assert psnr(plain, expected) < 30
    for mode in ("fuse", "unfused"):
        eng = Engine.load(str(path), dataclasses.replace(
            CPU, lora=LoRAConfig((LoRASpec(str(file), 0.8),), mode=mode)))
        ours = eng.generate(SamplingParams(prompt="a photo of a cat", height=64, width=64, steps=2, guidance=0.0,
                                           seed=0)).frames
        assert psnr(ours, expected) >= 40, mode


def test_fp8_takes_the_adapter_merged_before_quantisation(flux):
    """--quantization fp8 with --lora-mode fuse: the fp8 weights are the quantised merged weights (the CPU runs
    the tier's reference path)."""
    from ditserve.loader import load_transformer

    path, files, _ = flux
    bf16 = dataclasses.replace(CPU, dtype="bf16")
    lora = LoRAConfig((LoRASpec(str(files["a"]), 1.0),))
    base, _ = load_transformer(str(path), bf16)
    merged, _ = load_transformer(str(path), dataclasses.replace(bf16, lora=lora))
    fp8, _ = load_transformer(str(path), dataclasses.replace(bf16, lora=lora, quantization="fp8"))
    for name in ("double_blocks.0.img_qkv", "single_blocks.1.qkv_mlp", "double_blocks.1.img_mlp_in"):
        q = fp8.get_submodule(name).dequantized_weight()
        to_merged = (q - merged.get_submodule(name).weight.float()).norm()
        to_base = (q - base.get_submodule(name).weight.float()).norm()
        assert to_merged < 0.3 * to_base, name
    from ditserve.lora.adapters import LoRAManager

    with pytest.raises(ConfigError, match="before quantisation"):  # merging into fp8 weights is refused
        LoRAManager.attach(fp8, lora)


def test_generate_command_with_stacked_adapters_matches_diffusers(flux, tmp_path):
    """`ditserve generate --lora FILE:W --lora FILE2:W2` (the issue's acceptance check) against diffusers."""
    from PIL import Image

    from ditserve.cli import main

    path, files, ref = flux
    out = tmp_path / "out.png"
    assert main(["generate", "--model", str(path), "--prompt", PROMPT, "--height", "64", "--width", "64",
                 "--steps", "2", "--guidance", "3.5", "--seed", "0", "--device", "cpu", "--dtype", "fp32",
                 "--lora", f"{files['a']}:0.6", "--lora", f"{files['k']}:1.0", "--output", str(out),
                 "--no-progress", "--quiet"]) == 0
    ours = np.asarray(Image.open(out).convert("RGB"))[None]
    assert psnr(ours, reference(ref, {"a": 0.6, "k": 1.0})) >= 40
    assert main(["generate", "--model", str(path), "--prompt", PROMPT, "--lora", str(tmp_path / "x.ckpt"),
                 "--output", str(out), "--quiet"]) == 2  # a pickle file: one error line, exit code 2


def test_only_the_transformer_component_is_adapted(flux):
    """LoRA files adapt the component diffusers' load_lora_weights adapts, "transformer": a second DiT of a
    pipeline (a two-expert model's transformer_2) is built without adapters."""
    import json

    from ditserve.loader.components import dummy_component

    path, files, _ = flux
    config = json.loads((path / "transformer" / "config.json").read_text())
    engine_config = dataclasses.replace(CPU, lora=LoRAConfig((LoRASpec(str(files["a"])),), mode="unfused"))
    first = dummy_component("FluxTransformer2DModel", config, engine_config, "transformer")
    second = dummy_component("FluxTransformer2DModel", config, engine_config, "transformer_2")
    assert first.lora.slots and not hasattr(second, "lora")


def test_scales_from_alpha_keys_metadata_patterns_and_rslora(flux):
    """alpha / r from `.alpha` keys, from lora_adapter_metadata (lora_alpha, an alpha_pattern entry, rsLoRA's
    alpha / sqrt(r)); 1 with neither. Original-checkpoint prefixes are accepted."""
    import json

    from ditserve.loader import load_transformer
    from ditserve.lora.adapters import parse_adapter

    path, _, _ = flux
    model, _ = load_transformer(str(path), CPU)

    def pair(module, r, prefix="transformer."):
        return {f"{prefix}{module}.lora_A.weight": torch.ones(r, 32),
                f"{prefix}{module}.lora_B.weight": torch.ones(32, r)}

    def scales(sd, **meta):  # module's last name -> its scale
        packed = {f"transformer.{k}": v for k, v in meta.items()}
        metadata = {"lora_adapter_metadata": json.dumps(packed)} if meta else {}
        factors = parse_adapter(sd, metadata, model, "x").factors
        return {f.key.split(".lora_A")[0].split(".")[-1]: f.scale for f in factors}

    q, k = "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"
    assert scales({**pair(q, 2, "diffusion_model."), f"diffusion_model.{q}.alpha": torch.tensor(1.0)}) == {"to_q": 0.5}
    assert scales({**pair(q, 2), **pair(k, 2)}) == {"to_q": 1.0, "to_k": 1.0}
    assert scales({**pair(q, 2), **pair(k, 2)}, lora_alpha=8, alpha_pattern={"to_k": 2}) == {"to_q": 4.0, "to_k": 1.0}
    assert scales(pair(q, 4), lora_alpha=4, use_rslora=True) == {"to_q": 2.0}


def test_z_image_original_names_land_like_diffusers_names(z_image, tmp_path):
    """A Z-Image LoRA in the original checkpoint's names (fused attention.qkv, attention.out; dotted with
    diffusion_model., or kohya's lora_unet_ underscores) merges exactly as the same factors in diffusers' names."""
    from safetensors.torch import save_file

    from ditserve.loader import load_transformer

    base, _ = load_transformer(str(z_image), CPU)
    D = base.config.dim
    g = torch.Generator().manual_seed(0)
    down_qkv, up_qkv = torch.randn(2, D, generator=g), torch.randn(3 * D, 2, generator=g)
    down_out, up_out = torch.randn(2, D, generator=g), torch.randn(D, 2, generator=g)
    original = {"diffusion_model.layers.0.attention.qkv.lora_down.weight": down_qkv,
                "diffusion_model.layers.0.attention.qkv.lora_up.weight": up_qkv,
                "diffusion_model.layers.0.attention.qkv.alpha": torch.tensor(1.0),  # scale 1/2
                "lora_unet_noise_refiner_0_attention_out.lora_down.weight": down_out,
                "lora_unet_noise_refiner_0_attention_out.lora_up.weight": up_out}
    named = {"transformer.noise_refiner.0.attention.to_out.0.lora_A.weight": down_out,
             "transformer.noise_refiner.0.attention.to_out.0.lora_B.weight": up_out}
    for j, n in enumerate(("to_q", "to_k", "to_v")):
        named[f"transformer.layers.0.attention.{n}.lora_A.weight"] = down_qkv.clone()
        named[f"transformer.layers.0.attention.{n}.lora_B.weight"] = up_qkv[j * D:(j + 1) * D].clone() / 2
    models = []
    for name, sd in (("original", original), ("named", named)):
        save_file(sd, str(tmp_path / f"{name}.safetensors"))
        lora = LoRAConfig((LoRASpec(str(tmp_path / f"{name}.safetensors")),))
        models.append(load_transformer(str(z_image), dataclasses.replace(CPU, lora=lora))[0])
    changed = [n for n, p in models[0].named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert changed == ["noise_refiner.0.attn_out.weight", "layers.0.qkv.weight"]
    for (n, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=n)


def test_fp8_unfused_side_products_match_the_merged_adapter(flux):
    """--quantization fp8 with --lora-mode unfused: bf16 side products on the fp8 GEMMs' dequantised input (the
    CPU runs the tier's reference path). Against the adapter merged into the bf16 model, its forward is as close
    as the fp8 model with the adapter merged before quantisation, and much closer than the fp8 model without
    the adapter; switching the adapter off gives that plain fp8 model's output exactly."""
    from ditserve.loader import load_transformer
    from ditserve.models.flux import flux_example_inputs
    from ditserve.ops.fp8 import Fp8Linear

    path, files, _ = flux
    bf16 = dataclasses.replace(CPU, dtype="bf16")
    fp8 = dataclasses.replace(bf16, quantization="fp8")
    lora = LoRAConfig((LoRASpec(str(files["a"]), 1.0, name="a"),))
    reference, _ = load_transformer(str(path), dataclasses.replace(bf16, lora=lora))
    plain, _ = load_transformer(str(path), fp8)
    fused, _ = load_transformer(str(path), dataclasses.replace(fp8, lora=lora))
    unfused, _ = load_transformer(str(path), dataclasses.replace(fp8, lora=dataclasses.replace(lora, mode="unfused")))
    assert isinstance(unfused.double_blocks[0].img_qkv, Fp8Linear) and "double_blocks.0.img_qkv" in unfused.lora.slots
    x = flux_example_inputs(plain.config, 64, 64, text_len=8, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = reference(**x).float()
        err = {name: float((m(**x).float() - ref).norm() / ref.norm())
               for name, m in (("plain", plain), ("fused", fused), ("unfused", unfused))}
        unfused.lora.activate(())
        assert torch.equal(unfused(**x), plain(**x))
    assert err["unfused"] <= 1.5 * err["fused"] and err["unfused"] < 0.5 * err["plain"], err


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_gpu_compiled_unfused_matches_merged_and_recompiles_nothing(flux, quantization):
    """On CUDA in bf16, compiled with inductor (the engine's backend) on the CUDA paths (LinearGELU's epilogue on
    the widened GEMM, the fp8 GEMMs): both unfused layouts agree with the adapters merged into the bf16 weights
    (fp8: as closely as merging before quantisation does), and changing adapters compiles nothing."""
    from ditserve.compile import CompileConfig, compile_model
    from ditserve.loader import load_transformer
    from ditserve.models.flux import flux_example_inputs

    path, files, _ = flux
    gpu = EngineConfig(device="cuda", dtype="bf16")
    specs = (LoRASpec(str(files["a"]), 1.0, name="a"), LoRASpec(str(files["b"]), 0.6, name="b"))
    tier = dataclasses.replace(gpu, quantization=quantization)
    merged, _ = load_transformer(str(path), dataclasses.replace(gpu, lora=LoRAConfig(specs)))
    plain, _ = load_transformer(str(path), tier)
    fused, _ = load_transformer(str(path), dataclasses.replace(tier, lora=LoRAConfig(specs)))
    x = flux_example_inputs(merged.config, 128, 128, text_len=16, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = merged(**x).float()

        def err(model):
            return float((model(**x).float() - ref).norm() / ref.norm())

        e_plain, e_fused = err(plain), err(fused)
        stats = torch._dynamo.utils.counters["stats"]
        for impl in ("concat", "separate"):
            engine = dataclasses.replace(tier, compile=True, lora=LoRAConfig(specs, mode="unfused", unfused_impl=impl))
            model, _ = load_transformer(str(path), engine)
            compile_model(model, CompileConfig.for_engine(engine))
            e_unfused = err(model)
            graphs = stats["unique_graphs"]
            with torch._dynamo.config.patch(error_on_recompile=True):
                model.lora.activate((("a", 0.5),))
                model(**x)
                model.lora.activate((("a", 1.0), ("b", 0.6)))
                assert abs(err(model) - e_unfused) < 1e-3, impl
            assert stats["unique_graphs"] == graphs, impl
            bound = 0.1 * e_plain if quantization is None else min(1.5 * e_fused + 0.01, 0.5 * e_plain)
            assert e_unfused < bound, (impl, e_unfused, e_fused, e_plain)
