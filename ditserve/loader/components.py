"""Load a whole model (every component of a diffusers-format folder, or a preset with dummy weights).

Each component of model_index.json is loaded by its exact class name through `ditserve.registry`:

- our DiTs (FluxTransformer2DModel -> `ditserve.models.flux.FluxTransformer`): built on the meta device,
  materialised empty on the target device in the engine dtype, then filled by streaming safetensors
  (`loader.weights.stream_into`) through the model's `weight_map()`;
- diffusers models (AutoencoderKL) and transformers text encoders (CLIPTextModel, T5EncoderModel: encoder
  classes only, never one with an LM head): their own `from_pretrained`, safetensors only, after our own
  weight-file check (so a pickle-only folder is refused before any library could unpickle it);
- tokenizers and schedulers: their own `from_pretrained`.

Text encoders and the VAE run in the engine dtype on accelerators and in fp32 on CPU; the DiT always runs in
the engine dtype.

`--load-format dummy` builds every component at full size with random weights directly on the target device
(meta -> to_empty -> in-place init): no download, no host copy. Tokenizers come from the model folder, or for
a preset from the packaged default model (its token ids are valid in the full-size vocabularies).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ditserve import registry
from ditserve.config import ConfigError, EngineConfig, ModelSpec
from ditserve.loader.source import DEFAULT_MODEL_DIR, read_model_index, resolve_model
from ditserve.loader.weights import find_weight_files, stream_into
from ditserve.lora import LORA_COMPONENT
from ditserve.logging import init_logger
from ditserve.ops import OpsConfig, apply_fp8
from ditserve.ops.attention import resolve_backend

logger = init_logger(__name__)

DUMMY_STD = 0.02  # std of dummy weight matrices: activations keep a sane scale through deep stacks in bf16
DUMMY_SEED = 0  # dummy weights are reproducible (same device, same seed)


@dataclass
class LoadedModel:
    """A loaded model: every component, ready on its device.

    name: the preset name, hub id or folder name. path: the local folder (None for a dummy preset).
    pipeline_class: model_index.json's `_class_name` (e.g. "FluxPipeline"). components: component name ->
    object (nn.Module in eval mode with requires_grad False, tokenizer or scheduler), in model_index order.
    """

    name: str
    path: Path | None
    pipeline_class: str
    components: dict[str, Any]


def load_model(model: str | None, engine: EngineConfig) -> LoadedModel:
    """Load `model` (None: the packaged default; a folder; a hub id; with load_format "dummy" also a preset
    name such as "flux.1-dev") for `engine`. Raises ConfigError on any user-facing problem."""
    if engine.load_format == "dummy":
        return _load_dummy(model, engine)
    path = resolve_model(model)
    index = read_model_index(path)
    load = _load_native if _use_native(path, engine) else load_component
    components = {name: _timed(name, class_name, load, _subfolder(path, name), class_name, engine)
                  for name, (_, class_name) in index.components.items()}
    return LoadedModel(_model_name(model, path), path, index.pipeline_class, components)


def _use_native(path: Path, engine: EngineConfig) -> bool:
    """EngineConfig.native_components: the packaged default model on the CPU, unless a setting needs the library
    classes (see `ditserve.native`)."""
    return (engine.native_components == "auto" and path.resolve() == DEFAULT_MODEL_DIR.resolve()
            and engine.torch_device.type == "cpu" and not engine.compile_vae
            and engine.vae_tiling != "on" and engine.vae_streaming != "on")


def _load_native(folder: Path, class_name: str, engine: EngineConfig) -> Any:
    """A component of the packaged default model through `ditserve.native` (the DiT as always: ours)."""
    from ditserve.native import NATIVE_CLASSES

    if class_name not in NATIVE_CLASSES:
        return load_component(folder, class_name, engine)
    return NATIVE_CLASSES[class_name].from_folder(folder, _encoder_dtype(engine), engine.torch_device)


def load_transformer(model: str | None, engine: EngineConfig,
                     component: str = "transformer") -> tuple[nn.Module, dict[str, Any]]:
    """Load only the DiT of `model` (for compile reports and benchmarks): (our transformer, its diffusers
    config dict). With load_format "dummy", `model` may be a preset name and the weights are random."""
    dummy = engine.load_format == "dummy"
    source = _dummy_source(model) if dummy else resolve_model(model)
    if isinstance(source, ModelSpec):
        if component not in source.components:
            raise ConfigError(f"preset {source.name} has no component {component!r}; "
                              f"it has {', '.join(source.components)}")
        class_name, config = source.components[component]
        return build_dit(class_name, config, engine, files=None, component=component), dict(config)
    index = read_model_index(source)
    if component not in index.components:
        raise ConfigError(f"{source / 'model_index.json'} has no component {component!r}; "
                          f"it has {', '.join(index.components)}")
    class_name = index.components[component][1]
    folder = _subfolder(source, component)
    config = _read_json(folder / "config.json")
    files = None if dummy else find_weight_files(folder)
    return build_dit(class_name, config, engine, files, component=component), config


# ----------------------------------------------------------------------------------------- one component


def load_component(folder: Path, class_name: str, engine: EngineConfig) -> Any:
    """Load one component from its subfolder by its exact model_index.json class name."""
    kind, cls = _kind(class_name)
    device = engine.torch_device
    if kind == "dit":
        config = _read_json(folder / "config.json")
        return build_dit(class_name, config, engine, find_weight_files(folder), component=folder.name)
    if kind == "diffusers":
        _read_json(folder / "config.json")
        find_weight_files(folder)  # refuses pickle-only folders before diffusers sees them
        # `torch_dtype` (not `dtype`): every diffusers release we support takes it; `dtype` is 0.42+ only.
        model = cls.from_pretrained(folder, torch_dtype=_encoder_dtype(engine), use_safetensors=True)
        return _frozen(model.to(device))
    if kind == "transformers":
        _read_json(folder / "config.json")
        find_weight_files(folder)
        # Loaded on the host, then moved: transformers' direct-to-device loading (device_map) needs accelerate.
        model = cls.from_pretrained(folder, dtype=_encoder_dtype(engine), use_safetensors=True)
        return _frozen(model.to(_text_encoder_device(engine)))
    return cls.from_pretrained(folder)  # tokenizer or scheduler


def dummy_component(class_name: str, config: dict[str, Any], engine: EngineConfig,
                    component: str = "transformer") -> Any:
    """Build a model or scheduler from its config dict; models get random weights at full size, allocated
    directly on the engine's device (nothing is materialised on the host)."""
    kind, cls = _kind(class_name)
    device, dtype = engine.torch_device, _encoder_dtype(engine)
    if kind == "dit":
        return build_dit(class_name, config, engine, files=None, component=component)
    if kind == "diffusers":
        with torch.device("meta"):
            model = cls.from_config(config)
        nn.Module.to(model, dtype)  # (diffusers' own `to` warns about fp32 modules on every dtype cast)
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        if norms:  # batch-norm statistics (a VAE's latent normalisation): allocated, then reset to mean 0, var 1
            model.to_empty(device=device)
            for m in norms:
                m.reset_running_stats()
        else:
            _materialize(model, device)
        random_init_(model)
        return _frozen(model)
    if kind == "transformers":
        with torch.device("meta"):  # transformers skips weight init on meta
            model = cls(cls.config_class.from_dict(config)).to(dtype)
        model.to_empty(device=_text_encoder_device(engine))
        model.init_weights()  # the model's own init, which also restores buffers (CLIP's position_ids)
        return _frozen(model)
    if kind == "scheduler":
        return cls.from_config(config)
    raise ConfigError(f"{class_name} cannot be built from a config alone: load it from a model folder")


def build_dit(class_name: str, config: dict[str, Any], engine: EngineConfig, files: list[Path] | None,
              component: str = "transformer") -> nn.Module:
    """Build our DiT for diffusers class `class_name` from its config.json dict, in the engine's dtype on its
    device: on meta first, then materialised empty, then filled from `files` (safetensors, streamed) or, when
    `files` is None, with random weights. With engine.quantization "fp8", the layers the model declares
    eligible are then quantised in place, one at a time (`ditserve.ops.fp8.apply_fp8`). LoRA adapters
    (engine.lora, `ditserve.lora`; the model's `lora` attribute) are merged before that (fuse) or given their
    slots after it (unfused), when `component` (the model_index.json name) is the one LoRA files adapt,
    "transformer" (as diffusers' `load_lora_weights`; a second expert gets none)."""
    cls, config_cls = registry.component_class(class_name), registry.dit_config_class(class_name)
    cfg = config_cls.from_diffusers(config)
    device, dtype = engine.torch_device, engine.torch_dtype
    ops = OpsConfig(device=device.type, dtype=dtype, kernels=engine.kernels, compiled=engine.compile)
    attention = resolve_backend(engine.attention, device, getattr(cls, "LONG_SEQUENCES", False),
                                getattr(cfg, "attention_head_dim", None))
    if attention != engine.attention:
        logger.info(f"--attention {engine.attention}: {class_name} runs {attention}")
    with torch.device("meta"):
        model = cls(cfg, ops=ops, attention=attention, device="meta", dtype=dtype)
    _materialize(model, device)
    if files is None:
        random_init_(model)
    else:
        stream_into(model, files, model.weight_map(), device)
    lora = engine.lora if component == LORA_COMPONENT else None
    if lora is not None and lora.mode == "fuse":  # merged before quantisation
        from ditserve.lora.adapters import attach

        attach(model, lora)
    if engine.quantization == "fp8":
        apply_fp8(model, fast_accum=engine.fp8_fast_accum_on)
    if engine.fp8_attention:
        if not hasattr(model, "use_fp8_attention"):
            raise ConfigError(f"--fp8-attention: {type(model).__name__} has no fp8 attention")
        model.use_fp8_attention(ops)
    if lora is not None and lora.mode == "unfused":  # side products on the layers that run (fp8 ones too)
        from ditserve.lora.adapters import attach

        attach(model, lora)
    return _frozen(model)


@torch.no_grad()
def random_init_(model: nn.Module, std: float = DUMMY_STD, seed: int = DUMMY_SEED) -> None:
    """Dummy weights in place: biases 0, other 1-D parameters (norm scales) 1, the rest N(0, std)."""
    params = list(model.named_parameters())
    if not params:
        return
    gen = torch.Generator(device=params[0][1].device).manual_seed(seed)
    for name, p in params:
        if name.endswith("bias"):
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std, generator=gen)


class ProcessorTokenizer:
    """Loads a multimodal processor's folder (e.g. a PixtralProcessor's) as what prompt encoding needs: its
    tokenizer, with the processor's chat template. The image processor is never built (it needs vision libraries
    and nothing a text prompt uses). For a text-only conversation whose template starts with the bos token the
    tokenizer's `apply_chat_template` gives the processor's token ids (both tokenize the rendered text without
    adding special tokens)."""

    @classmethod
    def from_pretrained(cls, folder: Path) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        template = folder / "chat_template.json"  # the older processor layout; chat_template.jinja loads itself
        if not tokenizer.chat_template and template.is_file():
            tokenizer.chat_template = _read_json(template).get("chat_template")
        if not tokenizer.chat_template:
            raise ConfigError(f"{folder}: the processor has no chat template (chat_template.jinja or .json)")
        return tokenizer


# ---------------------------------------------------------------------------------------------- helpers


def _kind(class_name: str) -> tuple[str, type]:
    """("dit" | "diffusers" | "transformers" | "tokenizer" | "scheduler", class) of a registry class name. Our
    DiTs are told apart before diffusers and transformers are imported (`ditserve.native` loads models without
    them)."""
    cls = registry.component_class(class_name)
    if class_name in registry.DIT_CONFIGS:
        return "dit", cls
    import diffusers
    import transformers

    if cls is ProcessorTokenizer:
        return "tokenizer", cls
    for kind, base in (("diffusers", diffusers.ModelMixin), ("transformers", transformers.PreTrainedModel),
                       ("tokenizer", transformers.PreTrainedTokenizerBase), ("scheduler", diffusers.SchedulerMixin),
                       ("tokenizer", transformers.ProcessorMixin),  # a processor: loaded from its folder as one
                       ("tokenizer", transformers.ImageProcessingMixin)):  # an image processor, likewise
        if issubclass(cls, base):
            return kind, cls
    raise RuntimeError(f"registry class {class_name} ({cls}) is of no kind the loader knows how to load")


def _text_encoder_device(engine: EngineConfig) -> torch.device:
    """Where a text encoder (a transformers model) is placed: the engine's device, or the host with
    EngineConfig.offload_text_encoder (the pipeline brings it to the device to encode)."""
    return torch.device("cpu") if engine.offload_text_encoder else engine.torch_device


def _encoder_dtype(engine: EngineConfig) -> torch.dtype:
    """Text encoders and the VAE: the engine dtype on accelerators, fp32 on CPU."""
    return engine.torch_dtype if engine.torch_device.type != "cpu" else torch.float32


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate a meta-built model's parameters, uninitialised, on `device`."""
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:  # to_empty would leave them as garbage: such a model needs its own buffer init
        raise RuntimeError(f"{type(model).__name__} has buffers ({', '.join(buffers[:5])}) that a meta-device "
                           f"build cannot restore")
    model.to_empty(device=device)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def _timed(name: str, class_name: str, fn, *args) -> Any:
    start = time.perf_counter()
    out = fn(*args)
    logger.info(f"loaded {name} ({class_name}) in {time.perf_counter() - start:.2f} s")
    return out


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise ConfigError(f"{file} is missing")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from e


def _subfolder(path: Path, name: str) -> Path:
    folder = path / name
    if not folder.is_dir():
        raise ConfigError(f"{path / 'model_index.json'} lists component {name!r}, but its folder {folder} is "
                          f"missing")
    return folder


def _model_name(model: str | None, path: Path) -> str:
    """The hub id for hub models, else the folder's name."""
    if model is not None and not Path(model).expanduser().exists():
        return model
    return path.name


def _dummy_source(model: str | None) -> ModelSpec | Path:
    """A preset's spec, or the folder whose configs a dummy model is built from."""
    if model in registry.PRESETS:
        return registry.preset(model)
    try:
        return resolve_model(model, weights=False)
    except ConfigError as e:
        raise ConfigError(f"{e}; with --load-format dummy, --model may also be a preset: "
                          f"{', '.join(sorted(registry.PRESETS))}") from e


def _load_dummy(model: str | None, engine: EngineConfig) -> LoadedModel:
    source = _dummy_source(model)
    if isinstance(source, ModelSpec):
        return _load_dummy_preset(source, engine)
    index = read_model_index(source)
    components = {}
    for name, (_, class_name) in index.components.items():
        folder = _subfolder(source, name)
        kind, _ = _kind(class_name)
        if kind == "tokenizer":
            components[name] = _timed(name, class_name, load_component, folder, class_name, engine)
        else:
            config_file = folder / ("scheduler_config.json" if kind == "scheduler" else "config.json")
            config = _read_json(config_file)
            components[name] = _timed(name, class_name, dummy_component, class_name, config, engine, name)
    return LoadedModel(_model_name(model, source), source, index.pipeline_class, components)


def _load_dummy_preset(spec: ModelSpec, engine: EngineConfig) -> LoadedModel:
    components = {name: _timed(name, class_name, dummy_component, class_name, config, engine, name)
                  for name, (class_name, config) in spec.components.items()}
    if spec.tokenizers:  # the preset names its own tokenizer builders
        for name, target in spec.tokenizers.items():
            components[name] = registry.import_target(target)()
        return LoadedModel(spec.name, None, spec.pipeline, components)
    # Tokenizers have no config-only form: take the packaged default model's (same pipeline family).
    default = read_model_index(DEFAULT_MODEL_DIR)
    if default.pipeline_class != spec.pipeline:
        raise ConfigError(f"preset {spec.name} ({spec.pipeline}) has no packaged tokenizers: the default model "
                          f"is a {default.pipeline_class}; use a model folder with --load-format dummy")
    for name, (_, class_name) in default.components.items():
        if name not in components and _kind(class_name)[0] == "tokenizer":
            components[name] = load_component(_subfolder(DEFAULT_MODEL_DIR, name), class_name, engine)
    return LoadedModel(spec.name, None, spec.pipeline, components)
