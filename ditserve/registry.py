"""Exact-name tables: diffusers/transformers class names and preset names -> implementations.

Entries are "module:attribute" strings imported on first use, so importing the registry imports no model
code. Lookups are exact: an unknown name raises `ConfigError` listing the valid names (no substring matching,
no silent default).
"""

from __future__ import annotations

import importlib
from typing import Any

from ditserve.errors import ConfigError

# model_index.json component class name -> the class that loads it.
COMPONENT_CLASSES: dict[str, str] = {
    "FluxTransformer2DModel": "ditserve.models.flux:FluxTransformer",
    "AutoencoderKL": "diffusers:AutoencoderKL",
    "FlowMatchEulerDiscreteScheduler": "diffusers:FlowMatchEulerDiscreteScheduler",
    "CLIPTextModel": "transformers:CLIPTextModel",
    "T5EncoderModel": "transformers:T5EncoderModel",
    "CLIPTokenizer": "transformers:CLIPTokenizer",
    "CLIPTokenizerFast": "transformers:CLIPTokenizerFast",
    "T5Tokenizer": "transformers:T5Tokenizer",
    "T5TokenizerFast": "transformers:T5TokenizerFast",
    "ZImageTransformer2DModel": "ditserve.models.z_image:ZImageTransformer",
    "Qwen3Model": "transformers:Qwen3Model",
    "Qwen2Tokenizer": "transformers:Qwen2Tokenizer",
    "Qwen2TokenizerFast": "transformers:Qwen2TokenizerFast",
    "QwenImageTransformer2DModel": "ditserve.models.qwen_image:QwenImageTransformer",
    "AutoencoderKLQwenImage": "diffusers:AutoencoderKLQwenImage",
    "Qwen2_5_VLForConditionalGeneration": "transformers:Qwen2_5_VLModel",  # without the LM head
    "Qwen2VLProcessor": "ditserve.pipelines.qwen_image:QwenVLProcessor",  # its tokenizer and image processor
    "WanTransformer3DModel": "ditserve.models.wan:WanTransformer",
    "AutoencoderKLWan": "diffusers:AutoencoderKLWan",
    "UMT5EncoderModel": "transformers:UMT5EncoderModel",
    "UniPCMultistepScheduler": "diffusers:UniPCMultistepScheduler",
    "CLIPVisionModel": "transformers:CLIPVisionModel",
    "CLIPImageProcessor": "transformers:CLIPImageProcessor",
    "CLIPImageProcessorPil": "transformers:CLIPImageProcessorPil",  # transformers 5's name without torchvision
    "Flux2Transformer2DModel": "ditserve.models.flux2:Flux2Transformer",
    "AutoencoderKLFlux2": "diffusers:AutoencoderKLFlux2",
    "Mistral3ForConditionalGeneration": "ditserve.pipelines.flux2:Mistral3TextModel",  # its language model only
    "Qwen3ForCausalLM": "transformers:Qwen3Model",  # without the LM head
    "PixtralProcessor": "ditserve.loader.components:ProcessorTokenizer",  # its tokenizer only
    "PreTrainedTokenizerFast": "transformers:PreTrainedTokenizerFast",
    "TokenizersBackend": "transformers:PreTrainedTokenizerFast",  # transformers 5's name of the generic class
}

# Our DiT classes (values of COMPONENT_CLASSES under ditserve.models) -> their config class, which has
# `from_diffusers(config.json dict)`. The loader builds these itself (meta device, then safetensors streaming).
DIT_CONFIGS: dict[str, str] = {
    "FluxTransformer2DModel": "ditserve.models.flux:FluxConfig",
    "ZImageTransformer2DModel": "ditserve.models.z_image:ZImageConfig",
    "QwenImageTransformer2DModel": "ditserve.models.qwen_image:QwenImageConfig",
    "WanTransformer3DModel": "ditserve.models.wan:WanConfig",
    "Flux2Transformer2DModel": "ditserve.models.flux2:Flux2Config",
}

# model_index.json `_class_name` -> our pipeline.
PIPELINES: dict[str, str] = {
    "FluxPipeline": "ditserve.pipelines.flux:FluxPipeline",
    "ZImagePipeline": "ditserve.pipelines.z_image:ZImagePipeline",
    "QwenImagePipeline": "ditserve.pipelines.qwen_image:QwenImagePipeline",
    "QwenImageEditPipeline": "ditserve.pipelines.qwen_image:QwenImageEditPipeline",
    "QwenImageEditPlusPipeline": "ditserve.pipelines.qwen_image:QwenImageEditPlusPipeline",
    "WanPipeline": "ditserve.pipelines.wan:WanPipeline",
    "WanImageToVideoPipeline": "ditserve.pipelines.wan:WanImageToVideoPipeline",
    "Flux2Pipeline": "ditserve.pipelines.flux2:Flux2Pipeline",
    "Flux2KleinPipeline": "ditserve.pipelines.flux2:Flux2KleinPipeline",
}

# Preset names (for --load-format dummy and `ditserve bench`) -> ModelSpec.
PRESETS: dict[str, str] = {
    "flux.1-dev": "ditserve.models.flux:FLUX_1_DEV",
    "flux.1-schnell": "ditserve.models.flux:FLUX_1_SCHNELL",
    "z-image-turbo": "ditserve.pipelines.z_image:Z_IMAGE_TURBO",
    "qwen-image": "ditserve.pipelines.qwen_image:QWEN_IMAGE",
    "qwen-image-edit": "ditserve.pipelines.qwen_image:QWEN_IMAGE_EDIT",
    "wan2.1-t2v-1.3b": "ditserve.pipelines.wan:WAN21_T2V_1_3B",
    "wan2.1-t2v-14b": "ditserve.pipelines.wan:WAN21_T2V_14B",
    "wan2.2-t2v-a14b": "ditserve.pipelines.wan:WAN22_T2V_A14B",
    "wan2.2-ti2v-5b": "ditserve.pipelines.wan:WAN22_TI2V_5B",
    "wan2.1-i2v-14b-480p": "ditserve.pipelines.wan:WAN21_I2V_14B_480P",
    "flux.2-dev": "ditserve.pipelines.flux2:FLUX_2_DEV",
    "flux.2-klein-4b": "ditserve.pipelines.flux2:FLUX_2_KLEIN_4B",
    "flux.2-klein-9b": "ditserve.pipelines.flux2:FLUX_2_KLEIN_9B",
}


def import_target(target: str) -> Any:
    """The object a "module:attribute" string names, imported now."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def lookup(table: dict[str, str], name: str, what: str) -> Any:
    """Import and return `table[name]`; an unknown name raises ConfigError listing the known ones."""
    if name not in table:
        raise ConfigError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}")
    return import_target(table[name])


def component_class(class_name: str) -> Any:
    return lookup(COMPONENT_CLASSES, class_name, "component class")


def dit_config_class(class_name: str) -> Any:
    return lookup(DIT_CONFIGS, class_name, "DiT class")


def pipeline_class(class_name: str) -> Any:
    return lookup(PIPELINES, class_name, "pipeline class")


def preset(name: str):
    return lookup(PRESETS, name, "model preset")
