"""Tiny random FLUX.2 checkpoints (dev-like and klein-like) built with diffusers' own classes and
`save_pretrained`, and diffusers' pipelines run on them: the references our FLUX.2 pipelines are compared with.

Nothing here touches the network: the tokenizers are made from the small built-in vocabulary of
`ditserve.testing` (the Qwen one as is; the Mistral-like one is the same vocabulary behind transformers'
generic tokenizer class, with Mistral's special tokens and a Mistral-style chat template).

Layer counts cover the text-encoder layers the pipelines read (dev: hidden_states 10, 20, 30 of a 31-layer
Mistral; klein: 9, 18, 27 of a 28-layer Qwen3): each read state is a decoder layer's output before the final
norm, as with the real 40- and 36-layer encoders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ditserve.testing import _amplify_conditioning, _perturb_zeros, make_tiny_qwen_tokenizer

TINY_TEXT_WIDTH = 16  # the tiny text encoders' hidden size; the transformer's joint_attention_dim is 3x this
TINY_LATENT_CHANNELS = 8  # the tiny VAE's latent channels; the transformer's in_channels is 4x this (2x2 patches)
DEV_TEXT_LAYERS = 31  # > 30, the deepest layer Flux2Pipeline reads
KLEIN_TEXT_LAYERS = 28  # > 27, the deepest layer Flux2KleinPipeline reads
TINY_MAX_LENGTH = 512  # the tokenizers' model_max_length (both pipelines pad every prompt to 512 by default)

# Gain on the transformer's conditioning path (timestep/guidance embedders and the global modulations), as
# `ditserve.testing.CONDITIONING_GAIN` for FLUX.1: at default init prompt and guidance barely move the image.
FLUX2_CONDITIONING_GAIN = 3.0

# On the q/k RMSNorm weights: attention logits x QK_NORM_GAIN^2. At 1 an image token's attention is spread nearly
# evenly over the hundreds of text tokens (dev's system prompt and padding among them), so the prompt barely
# moves the image; sharper attention lets the prompt's own tokens count.
QK_NORM_GAIN = 2.0
DEV_EMBED_GAIN = 25.0  # on the tiny Mistral's token embeddings (see build_tiny_flux2_pipeline)

# Mistral's special tokens as Mistral-Small-3.x's tokenizer spells them (the tiny vocabulary gives them ids).
_MISTRAL_SPECIAL = ("<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                    "[IMG]")

# A Mistral-style chat template: bos, [SYSTEM_PROMPT]...[/SYSTEM_PROMPT], [INST]...[/INST]; a message's content
# is a string or a list of parts whose text parts are joined (Flux2Pipeline sends lists of {"type": "text"}).
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)


def make_tiny_mistral_tokenizer(dir: str | Path | None = None):
    """A tiny tokenizer of transformers' generic class (`PreTrainedTokenizerFast`, saved as its class name) with
    the byte-level vocabulary of `make_tiny_qwen_tokenizer`, Mistral's special tokens (bos <s>, eos </s>, pad
    <pad>, [INST], [SYSTEM_PROMPT], ...), left padding and `MISTRAL_CHAT_TEMPLATE`; saved to `dir` if given."""
    from transformers import PreTrainedTokenizerFast

    qwen = make_tiny_qwen_tokenizer()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=qwen.backend_tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", additional_special_tokens=list(_MISTRAL_SPECIAL[4:]), padding_side="left",
        model_max_length=TINY_MAX_LENGTH, chat_template=MISTRAL_CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    if dir is not None:
        tokenizer.save_pretrained(dir)
    return tokenizer


def _tiny_vae(sample_size: int, generator: torch.Generator):
    """A tiny AutoencoderKLFlux2 (4 levels: 8x downsampling, `TINY_LATENT_CHANNELS` latent channels, quant
    convs, 2x2 patches) whose batch-norm latent statistics are random (mean ~N(0, 0.5), var in [0.5, 2]), so a
    pipeline that skips them is caught."""
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        latent_channels=TINY_LATENT_CHANNELS, norm_num_groups=4, sample_size=sample_size)
    n = vae.bn.num_features
    vae.bn.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
    vae.bn.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=generator))
    return vae


def _tiny_transformer(guidance_embeds: bool):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * TINY_LATENT_CHANNELS, num_layers=2, num_single_layers=2,
        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * TINY_TEXT_WIDTH,
        timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000,
        guidance_embeds=guidance_embeds)


def _finish(transformer, modules, seed: int) -> None:
    _amplify_conditioning(transformer, lambda name, module: name in (
        "time_guidance_embed", "double_stream_modulation_img", "double_stream_modulation_txt",
        "single_stream_modulation", "norm_out", "context_embedder"), FLUX2_CONDITIONING_GAIN)
    for name, p in transformer.named_parameters():  # sharper attention, see QK_NORM_GAIN
        if ".norm_" in name:
            p.mul_(QK_NORM_GAIN)
    gen = torch.Generator().manual_seed(seed + 1)
    for module in modules:
        _perturb_zeros(module, gen)
        module.eval()


@torch.no_grad()
def build_tiny_flux2_pipeline(path: str | Path, *, seed: int = 0, sample_size: int = 128) -> Path:
    """A tiny random FLUX.2-dev-like checkpoint saved with diffusers' `Flux2Pipeline.save_pretrained` at `path`.

    Architecture (FLUX.2-dev's layout at toy widths): a Flux2Transformer2DModel with 2 double and 2 single
    blocks, 2 heads of 16 (rope axes 4 x 4, theta 2000), in_channels 32 (8 latent channels x 2x2), guidance
    embedding, joint_attention_dim 48 = 3 stacked text layers of 16; the tiny AutoencoderKLFlux2 (`_tiny_vae`);
    a Mistral3ForConditionalGeneration (language model: 31 layers of width 16, 2 query heads and 1 kv head of 8;
    a 1-layer Pixtral vision tower and projector, which prompt encoding never runs) and the generic-class
    tokenizer of `make_tiny_mistral_tokenizer`; FLUX.2's scheduler config. Random weights (PyTorch's init, the
    conditioning path amplified, no all-zero matrix); deterministic for a `seed`. Returns `path`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import (
        Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig,
    )

    from ditserve.models.flux2 import FLUX_2_SCHEDULER

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_mistral_tokenizer()
    torch.manual_seed(seed)  # every constructor below draws its init from the global generator
    transformer = _tiny_transformer(guidance_embeds=True)
    vae = _tiny_vae(sample_size, torch.Generator().manual_seed(seed + 2))
    text_config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=TINY_TEXT_WIDTH, intermediate_size=32,
        num_hidden_layers=DEV_TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=TINY_MAX_LENGTH, rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    vision_config = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, head_dim=8, image_size=32, patch_size=8)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=text_config, vision_config=vision_config, spatial_merge_size=2,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), projector_hidden_act="gelu",
        multimodal_projector_bias=False, tie_word_embeddings=False))
    # Mistral's init (std 0.02) leaves the states of this narrow model ~0.2 in norm: prompts would barely move
    # the image. Larger token embeddings make them O(1), as the klein-like model's are.
    text_encoder.model.language_model.embed_tokens.weight.mul_(DEV_EMBED_GAIN)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_2_SCHEDULER)
    _finish(transformer, (transformer, vae, text_encoder), seed)
    pipe = Flux2Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                         transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


@torch.no_grad()
def build_tiny_flux2_klein_pipeline(path: str | Path, *, is_distilled: bool = False, seed: int = 0,
                                    sample_size: int = 128) -> Path:
    """A tiny random FLUX.2-klein-like checkpoint saved with diffusers' `Flux2KleinPipeline.save_pretrained`.

    As `build_tiny_flux2_pipeline` but: no guidance embedding; a Qwen3ForCausalLM text encoder (28 layers of
    width 16, 2 query heads and 1 kv head of 8) with `make_tiny_qwen_tokenizer` (Qwen3's chat template);
    `is_distilled` in model_index.json (True: a step-distilled checkpoint, no CFG; False: a base checkpoint,
    real CFG with a negative prompt).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ditserve.models.flux2 import FLUX_2_SCHEDULER

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_qwen_tokenizer()
    torch.manual_seed(seed)
    transformer = _tiny_transformer(guidance_embeds=False)
    vae = _tiny_vae(sample_size, torch.Generator().manual_seed(seed + 2))
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=TINY_TEXT_WIDTH, intermediate_size=32,
        num_hidden_layers=KLEIN_TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
        max_position_embeddings=TINY_MAX_LENGTH, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        tie_word_embeddings=True, use_cache=False, bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_2_SCHEDULER)
    _finish(transformer, (transformer, vae, text_encoder), seed)
    pipe = Flux2KleinPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=is_distilled)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def reference_flux2(path: str | Path, prompt: str | list[str], *, height: int | None, width: int | None,
                    steps: int, guidance: float, seed: int, images: list[Any] | None = None, num_images: int = 1,
                    max_sequence_length: int = TINY_MAX_LENGTH) -> np.ndarray:
    """Images from diffusers' own pipeline (`Flux2Pipeline` or `Flux2KleinPipeline`, as model_index.json names
    it) loaded from `path`, on CPU in fp32, as uint8 (N, H, W, 3): the reference ours is compared against.

    Noise from `torch.Generator("cpu").manual_seed(seed)`; `guidance` is the pipeline's guidance_scale (dev: the
    embedded guidance; klein base: CFG with the empty negative prompt when > 1); `images` the reference images
    (PIL), passed as diffusers' `image=`; height/width None: diffusers' default (the first reference image's
    size); output_type="np", then round(x * 255).
    """
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(path, dtype=torch.float32).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=prompt, image=images or None, height=height, width=width, num_inference_steps=steps,
               guidance_scale=guidance, num_images_per_prompt=num_images,
               generator=torch.Generator("cpu").manual_seed(seed), max_sequence_length=max_sequence_length,
               output_type="np").images
    return np.clip(np.round(np.asarray(out, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two uint8 images (arrays of equal shape), in dB (inf when equal)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))
