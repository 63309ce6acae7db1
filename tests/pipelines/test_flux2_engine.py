"""Engine features on the FLUX.2 family (tiny checkpoints from `ditserve.testing_flux2`): the block cache, the
fp8 tier and fp8 attention, compile (report and compiled engine), CFG modes, dummy loads and presets, and the
CLI end to end against diffusers' image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ditserve.cli import main
from ditserve.config import ConfigError, EngineConfig, SamplingParams
from ditserve.engine import Engine
from ditserve.testing_flux2 import (
    build_tiny_flux2_klein_pipeline, build_tiny_flux2_pipeline, psnr, reference_flux2,
)

PROMPT = "a photo of a cat sitting on a red sofa"


@pytest.fixture(scope="module")
def dev_folder(tmp_path_factory):
    return build_tiny_flux2_pipeline(tmp_path_factory.mktemp("flux2") / "dev", seed=3)


@pytest.fixture(scope="module")
def klein_folder(tmp_path_factory):
    return build_tiny_flux2_klein_pipeline(tmp_path_factory.mktemp("flux2") / "klein", seed=4)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def test_block_cache(dev_folder):
    """fbcache over FLUX.2's double + single blocks: steps are cached; a threshold of 0 (never cache) gives the
    uncached image."""
    req = SamplingParams(prompt=PROMPT, height=64, width=64, steps=6, seed=4)
    out = Engine.load(str(dev_folder), EngineConfig(device="cpu", cache="fbcache:threshold=5,warmup=1")).generate(req)
    assert out.cache_stats["cached"] > 0 and out.cache_stats["computed"] + out.cache_stats["cached"] == 6
    never = Engine.load(str(dev_folder), EngineConfig(device="cpu", cache="fbcache:threshold=0"))
    plain = Engine.load(str(dev_folder), EngineConfig(device="cpu"))
    assert np.array_equal(never.generate(req).frames, plain.generate(req).frames)


def test_fp8_tier_quantises_the_declared_layers(dev_folder):
    """--quantization fp8 (loader path, CPU): exactly the declared token-wise layers become Fp8Linear, and the
    forward stays close to the unquantised one (and is not identical: the layers count)."""
    from ditserve.loader import load_transformer
    from ditserve.models.flux2 import Flux2Transformer
    from ditserve.ops import Fp8Linear

    ref, _ = load_transformer(str(dev_folder), EngineConfig(device="cpu"))
    model, _ = load_transformer(str(dev_folder), EngineConfig(device="cpu", quantization="fp8"))
    swapped = {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    expected = {f"{lst}.{i}.{name}" for lst, names in model.fp8_linears
                for i in range(len(getattr(model, lst))) for name in names}
    assert swapped == expected and len(expected) == 2 * 8 + 2 * 2
    inputs = Flux2Transformer.example_inputs(model.config, 64, 64, text_len=16, batch=2)
    with torch.inference_mode():
        err = rel_err(model(**inputs), ref(**inputs))
    assert 1e-3 < err < 0.08


def test_fp8_attention(dev_folder, _restore_compiler_flags):
    """--fp8-attention (with the fp8 tier, native reference path on CPU): every block runs Fp8Attention, the
    output stays close to the fp8 tier's without it (and differs: it really ran), the blocks compile with zero
    graph breaks and zero recompiles over two sizes; without the fp8 tier it is refused."""
    from ditserve.compile import CompileConfig
    from ditserve.compile_report import compile_report
    from ditserve.loader import load_transformer
    from ditserve.models.flux2 import Flux2Transformer
    from ditserve.ops import Fp8Attention, OpsConfig

    fp8, _ = load_transformer(str(dev_folder), EngineConfig(device="cpu", quantization="fp8"))
    model, _ = load_transformer(str(dev_folder), EngineConfig(device="cpu", quantization="fp8", fp8_attention=True))
    assert all(isinstance(b.fp8_attn, Fp8Attention) for b in (*model.double_blocks, *model.single_blocks))

    def make(h, w):
        return Flux2Transformer.example_inputs(model.config, h, w, text_len=16, batch=2)

    with torch.inference_mode():
        out, ref = model(**make(64, 64)), fp8(**make(64, 64))
    assert torch.isfinite(out).all() and 0 < rel_err(out, ref) < 0.1
    report = compile_report(model, make, [(64, 64), (64, 96)], CompileConfig(backend="aot_eager", dynamic=True),
                            steady_iters=1)
    assert report["graph_breaks"] == 0 and report["recompiles"] == 0
    plain, _ = load_transformer(str(dev_folder), EngineConfig(device="cpu"))
    with pytest.raises(ConfigError, match="apply_fp8"):
        plain.use_fp8_attention(OpsConfig(kernels="native"))


@pytest.fixture
def _restore_compiler_flags():
    """compile_model sets process-wide dynamo flags; keep other tests independent of them."""
    saved = torch.fx.experimental._config.use_duck_shape, torch._dynamo.config.specialize_float
    yield
    torch.fx.experimental._config.use_duck_shape, torch._dynamo.config.specialize_float = saved


def test_split_cfg_equals_batched(klein_folder):
    req = SamplingParams(prompt=PROMPT, height=64, width=64, steps=2, guidance=3.0, seed=2, negative_prompt="dark")
    split = Engine.load(str(klein_folder), EngineConfig(device="cpu", cfg_mode="split")).generate(req).frames
    batched = Engine.load(str(klein_folder), EngineConfig(device="cpu")).generate(req).frames
    assert psnr(split, batched) >= 40


def test_compile_report_is_clean(dev_folder, capsys):
    argv = ["compile-report", "--model", str(dev_folder), "--backend", "eager", "--device", "cpu", "--height", "64",
            "--width", "64"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["graph_breaks"] == 0 and report["recompiles"] == 0 and report["text_len"] == 512


@pytest.mark.slow
def test_compiled_engine_matches_eager(klein_folder):
    """--compile (inductor, regional, dynamic shapes) on CPU, with a reference image: the image eager gives, at
    two sizes."""
    torch._dynamo.reset()
    compiled = Engine.load(str(klein_folder), EngineConfig(device="cpu", compile=True, dynamic_shapes="on"))
    plain = Engine.load(str(klein_folder), EngineConfig(device="cpu"))
    image = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
    for h, w in ((64, 64), (64, 96)):
        req = SamplingParams(prompt=PROMPT, height=h, width=w, steps=2, guidance=2.0, seed=1, images=[image])
        assert psnr(compiled.generate(req).frames, plain.generate(req).frames) >= 40


def test_dummy_load_of_a_folder(dev_folder, klein_folder):
    """--load-format dummy from a checkpoint folder: every component built from its config (the Mistral3 config's
    language model cut to 30 layers), random weights, an image of the asked size."""
    for folder in (dev_folder, klein_folder):
        engine = Engine.load(str(folder), EngineConfig(device="cpu", load_format="dummy"))
        assert len(engine.pipeline.text_encoder.layers) in (30, 27)
        out = engine.generate(SamplingParams(prompt=PROMPT, height=64, width=80, steps=1, seed=0))
        assert out.frames.shape == (1, 64, 80, 3)


def test_presets():
    """The presets' sampling defaults, components and tokenizers (ids inside the real vocabularies)."""
    from ditserve.registry import import_target, preset

    dev, k4, k9 = preset("flux.2-dev"), preset("flux.2-klein-4b"), preset("flux.2-klein-9b")
    assert (dev.pipeline, dev.default_steps, dev.default_guidance, dev.max_sequence_length) == (
        "Flux2Pipeline", 50, 4.0, 512)
    assert (k4.pipeline, k4.default_steps, k4.default_guidance) == ("Flux2KleinPipeline", 4, 0.0)
    assert dev.components["text_encoder"][0] == "Mistral3ForConditionalGeneration"
    assert k9.components["transformer"][1]["joint_attention_dim"] == 3 * k9.components["text_encoder"][1]["hidden_size"]
    for spec in (dev, k4, k9):
        tokenizer = import_target(spec.tokenizers["tokenizer"])()
        ids = tokenizer("a photo of a cat").input_ids
        assert ids and max(ids) < spec.components["text_encoder"][1]["vocab_size"]


def test_preset_text_encoders_match_released_sizes():
    """The presets' text encoders built on meta as the loader builds them: Qwen3-4B (4,022,468,096 parameters)
    and Qwen3-8B without its LM head, Mistral Small's language model cut to its first 30 layers (no final norm;
    the released 40-layer model has 22.9 B parameters without the LM head)."""
    from ditserve.registry import component_class, preset

    def count(m):
        return sum(p.numel() for p in m.parameters())

    sizes = {}
    for name in ("flux.2-dev", "flux.2-klein-4b", "flux.2-klein-9b"):
        class_name, config = preset(name).components["text_encoder"]
        cls = component_class(class_name)
        with torch.device("meta"):
            sizes[name] = model = cls(cls.config_class.from_dict(config))
        assert len(model.layers) == (30 if name == "flux.2-dev" else 36)
    assert isinstance(sizes["flux.2-dev"].norm, torch.nn.Identity)
    assert [count(sizes[n]) for n in sizes] == [17_343_754_240, 4_022_468_096, 8_190_735_360 - 151936 * 4096]


def test_cli_generate_matches_diffusers(dev_folder, tmp_path):
    """The issue's check: `ditserve generate --model DIR --prompt P --guidance G --seed S --height H --width W
    --steps N --output out.png` against diffusers' image, then with two --image reference images."""
    out = tmp_path / "out.png"
    argv = ["generate", "--model", str(dev_folder), "--prompt", PROMPT, "--guidance", "3.5", "--seed", "7",
            "--height", "64", "--width", "96", "--steps", "3", "--output", str(out), "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 0
    ours = np.asarray(Image.open(out).convert("RGB"))[None]
    ref = reference_flux2(dev_folder, PROMPT, height=64, width=96, steps=3, guidance=3.5, seed=7)
    assert psnr(ours, ref) >= 40

    g = np.random.default_rng(2)
    images = [Image.fromarray((g.random((64, 80, 3)) * 255).astype(np.uint8)) for _ in range(2)]
    paths = [tmp_path / f"ref{i}.png" for i in range(2)]
    for image, path in zip(images, paths):
        image.save(path)
    edited = tmp_path / "edited.png"
    argv = [*argv[:-5], "--image", str(paths[0]), "--image", str(paths[1]), "--output", str(edited), "--device",
            "cpu", "--no-progress"]
    assert main(argv) == 0
    ours = np.asarray(Image.open(edited).convert("RGB"))[None]
    ref = reference_flux2(dev_folder, PROMPT, height=64, width=96, steps=3, guidance=3.5, seed=7,
                          images=[Image.open(p) for p in paths])
    assert psnr(ours, ref) >= 40


def test_offload_text_encoder(dev_folder, capsys):
    """--offload-text-encoder: the text encoder stays in host memory (its weights are the host tensors again
    after every call) and the image is the one without offloading; families without it refuse the flag."""
    from ditserve.pipelines.flux2 import OffloadedTextEncoder

    req = SamplingParams(prompt=PROMPT, height=64, width=64, steps=2, seed=9)
    engine = Engine.load(str(dev_folder), EngineConfig(device="cpu", offload_text_encoder=True))
    te = engine.pipeline.text_encoder
    assert isinstance(te, OffloadedTextEncoder) and len(te.layers) == 30
    hosts = [(t, host.data_ptr()) for t, host in te.tensors]
    assert len(hosts) == len(list(te.module.parameters())) + len(list(te.module.buffers()))
    out = engine.generate(req).frames
    assert all(t.device.type == "cpu" and t.data_ptr() == ptr for t, ptr in hosts)
    assert np.array_equal(out, Engine.load(str(dev_folder), EngineConfig(device="cpu")).generate(req).frames)
    with pytest.raises(ConfigError, match="--offload-text-encoder is not supported by FLUX.1"):
        Engine.load(None, EngineConfig(device="cpu", offload_text_encoder=True))
    assert main(["generate", "--prompt", "a", "--offload-text-encoder", "--device", "cpu", "--output",
                 "/tmp/never.png"]) == 2
    assert "--offload-text-encoder is not supported by FLUX.1" in capsys.readouterr().err
