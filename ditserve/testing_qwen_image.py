"""Tiny, offline, random-weight Qwen-Image checkpoints for tests, and diffusers' own pipelines as their reference.

`build_tiny_qwen_image_pipeline(path)` writes a complete diffusers-format Qwen-Image folder (model_index.json plus
transformer / vae / text_encoder / tokenizer / scheduler) made by diffusers' and transformers' own classes and
saved with diffusers' own `save_pretrained`, so that diffusers' `QwenImagePipeline.from_pretrained` and our loader
read the very same files. `build_tiny_qwen_image_edit_pipeline(path)` writes a `QwenImageEditPipeline` (or
`QwenImageEditPlusPipeline`) folder: the same components plus a `Qwen2VLProcessor`.

Nothing here touches the network: the tokenizer is a tiny byte-level BPE built here (`make_tiny_qwen_image_tokenizer`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditserve.testing import _amplify_conditioning, _perturb_zeros

# Qwen2.5-VL's vision markers, added (as special tokens) after the tiny Qwen tokenizer's own: the edit prompt
# template holds <|vision_start|><|image_pad|><|vision_end|>, which the processor expands to the image's tokens.
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

# Qwen-Image's scheduler config (scheduler/scheduler_config.json): dynamic exponential shift, shift_terminal 0.02.
QWEN_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9,
    num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
    time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True, use_exponential_sigmas=False,
    use_karras_sigmas=False)

# The tiny VAE's 4 latent channels' normalisation (not 0 / 1, so a pipeline that skips it is caught).
TINY_LATENTS_MEAN = [0.3, -0.2, 0.1, -0.4]
TINY_LATENTS_STD = [1.6, 0.7, 1.2, 2.1]

# Gain on the transformer's conditioning path (the timestep embedder, every block's img/txt AdaLN modulation and
# the output norm's), as `ditserve.testing.CONDITIONING_GAIN` does for FLUX: at PyTorch's default init the prompt
# barely changes the image of a random tiny model.
QWEN_IMAGE_CONDITIONING_GAIN = 6.0
# Gain on the tiny VAE decoder's output convolution: at the default init its images have a std of ~0.12 in [-1, 1]
# (nearly uniform grey); x4 gives ~0.45 without clipping.
VAE_OUTPUT_GAIN = 4.0


# Words of the Qwen-Image prompt templates (system messages and turn headers), given whole-word tokens in the tiny
# tokenizer as Qwen's real vocabulary has them: the text-to-image template's prefix before the prompt is then 34
# tokens, as with the real tokenizer, so the 34 tokens the pipelines drop are exactly the system prefix.
_TEMPLATE_WORDS = (
    "system user assistant Describe describe image by detailing color shape size texture quantity text spatial "
    "relationships objects background key features input then explain how user's instruction should alter or "
    "modify Generate new meets requirements while maintaining consistency original where appropriate"
).split()


def make_tiny_qwen_image_tokenizer(dir: str | Path | None = None):
    """A tiny Qwen2 byte-level BPE tokenizer for Qwen-Image (transformers' `Qwen2Tokenizer`), saved to `dir` if
    given. Returns the tokenizer.

    Built as `ditserve.testing.make_tiny_qwen_tokenizer` (the 256 byte symbols, then merges that make each word
    one token, bare and with its leading space), over that tokenizer's words plus `_TEMPLATE_WORDS`; then Qwen's
    special tokens <|endoftext|>, <|im_start|>, <|im_end|> and Qwen2.5-VL's vision tokens `VISION_TOKENS`. Pad
    <|endoftext|>, eos <|im_end|>, right padding, model_max_length 2048. Anything else falls back to bytes.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    from ditserve.testing import _QWEN_SPECIAL_TOKENS, _WORDS, _bpe, _bytes_to_unicode

    byte_to_char = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in byte_to_char.values():
        vocab.setdefault(c, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in [*_WORDS, *_TEMPLATE_WORDS]:
        for form in (word, " " + word):
            symbols = [byte_to_char[b] for b in form.encode("utf-8")]
            while len(pieces := _bpe(symbols, ranks)) > 1:
                ranks.setdefault((pieces[0], pieces[1]), len(ranks))
                vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    for token in _QWEN_SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=list(ranks), unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=list(_QWEN_SPECIAL_TOKENS), model_max_length=2048,
        clean_up_tokenization_spaces=False)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in VISION_TOKENS],
                         special_tokens=True)
    if dir is not None:
        tokenizer.save_pretrained(dir)
    return tokenizer


def make_tiny_qwen_image_processor(dir: str | Path | None = None):
    """The edit pipelines' processor: the tiny tokenizer and a Qwen2-VL image processor (patch 14, merge 2; pixels
    bounded to 56^2..112^2 to keep the tiny vision tower's input small), as our `QwenVLProcessor`; saved to `dir` if
    given, laid out as a `Qwen2VLProcessor` folder (tokenizer files and preprocessor_config.json). Returns it.

    (transformers' own Qwen2VLProcessor cannot be built here: it also builds a video processor, which needs
    torchvision.)"""
    from transformers import Qwen2VLImageProcessorPil

    from ditserve.pipelines.qwen_image import QwenVLProcessor

    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112, patch_size=14,
                                               merge_size=2, temporal_patch_size=2)
    processor = QwenVLProcessor(make_tiny_qwen_image_tokenizer(), image_processor)
    if dir is not None:
        processor.tokenizer.save_pretrained(dir)
        image_processor.save_pretrained(dir)
    return processor


def _tiny_text_encoder(tokenizer, text_width: int):
    """A 2-layer Qwen2_5_VLForConditionalGeneration (hidden `text_width`, 2 query heads and 1 kv head of 16,
    M-RoPE sections 2+3+3) with a 1-block vision tower whose merger outputs `text_width`."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = dict(zip(VISION_TOKENS, tokenizer.convert_tokens_to_ids(list(VISION_TOKENS))))
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=2048, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                          "rope_theta": 1_000_000.0},
                         bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=text_width,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    return Qwen2_5_VLForConditionalGeneration(config)


def _tiny_components(seed: int, zero_cond_t: bool = False):
    """(transformer, vae, text_encoder, tokenizer, scheduler) of a tiny Qwen-Image, seeded, conditioning amplified;
    `zero_cond_t`: Edit-2511's transformer (input images' tokens modulated as at t = 0)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    tokenizer = make_tiny_qwen_image_tokenizer()
    text_width = 32
    torch.manual_seed(seed)  # every constructor below draws its init from the global generator
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_width, axes_dims_rope=(4, 6, 6), zero_cond_t=zero_cond_t)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], latents_mean=TINY_LATENTS_MEAN, latents_std=TINY_LATENTS_STD)
    text_encoder = _tiny_text_encoder(tokenizer, text_width)
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)

    _amplify_conditioning(transformer, lambda name, module: name in ("time_text_embed", "norm_out")
                          or name.endswith(("img_mod", "txt_mod")), QWEN_IMAGE_CONDITIONING_GAIN)
    with torch.no_grad():  # the decoder's output conv: images in [-1, 1] with contrast, not ~0 (grey)
        for p in vae.decoder.conv_out.parameters():
            p.mul_(VAE_OUTPUT_GAIN)
    gen = torch.Generator().manual_seed(seed + 1)
    for module in (transformer, vae, text_encoder):
        _perturb_zeros(module, gen)
        module.eval()
    return transformer, vae, text_encoder, tokenizer, scheduler


def build_tiny_qwen_image_pipeline(path: str | Path, *, seed: int = 0) -> Path:
    """Build a tiny random Qwen-Image text-to-image pipeline with diffusers' and transformers' classes and save it
    (safetensors) at `path` with `QwenImagePipeline.save_pretrained`.

    Architecture (Qwen-Image's layout at toy widths): a QwenImageTransformer2DModel with 2 blocks of 2 heads x 16
    (rope axes 4+6+6), in_channels 16 (4 latent channels packed 2x2), joint_attention_dim 32; an
    AutoencoderKLQwenImage (the Wan 2.1 VAE layout: 8x spatial downsampling, temporal downsampling on the last two
    levels) with 4 latent channels and a non-trivial `latents_mean` / `latents_std`; a 2-layer
    Qwen2_5_VLForConditionalGeneration (hidden 32, with a 1-block vision tower); the tiny offline tokenizer;
    Qwen-Image's scheduler config. Deterministic: the same `seed` gives byte-identical files. Returns `path`.
    """
    from diffusers import QwenImagePipeline

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    transformer, vae, text_encoder, tokenizer, scheduler = _tiny_components(seed)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def build_tiny_qwen_image_edit_pipeline(path: str | Path, *, seed: int = 0, plus: bool = False,
                                        zero_cond_t: bool = False) -> Path:
    """A tiny random `QwenImageEditPipeline` (`QwenImageEditPlusPipeline` with `plus`; with `zero_cond_t` too, the
    Edit-2511 layout) saved at `path`: the
    components of `build_tiny_qwen_image_pipeline` saved by the diffusers pipeline's `save_pretrained`, plus the
    processor folder of `make_tiny_qwen_image_processor`, which model_index.json names as the released checkpoints
    do: ["transformers", "Qwen2VLProcessor"]."""
    import json

    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    transformer, vae, text_encoder, tokenizer, scheduler = _tiny_components(seed, zero_cond_t)
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, processor=None,
               transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    make_tiny_qwen_image_processor(path / "processor")
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def _to_uint8(images) -> np.ndarray:
    return np.clip(np.round(np.asarray(images, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def reference_qwen_image(path: str | Path, prompt: str | list[str], *, height: int, width: int, steps: int,
                         guidance: float, seed: int, negative_prompt: str | None = None,
                         images: list | None = None) -> np.ndarray:
    """Images from diffusers' own pipeline of the folder `path` (model_index.json's class: QwenImagePipeline,
    QwenImageEditPipeline or QwenImageEditPlusPipeline), on CPU in fp32, as uint8 (N, H, W, 3): the reference
    our Qwen-Image pipelines are compared against. An edit pipeline's processor is `QwenVLProcessor` (transformers'
    Qwen2VLProcessor needs torchvision).

    Noise from `torch.Generator("cpu").manual_seed(seed)`; `guidance` is the pipeline's true_cfg_scale (CFG runs
    when it is > 1 and a negative prompt is given); `images`: the edit pipelines' input image(s) (PIL); output_type
    "np", then round(x * 255).
    """
    from diffusers import DiffusionPipeline

    extra = {}
    if (Path(path) / "processor").is_dir():  # an edit pipeline: its processor as `QwenVLProcessor` (no torchvision)
        from ditserve.pipelines.qwen_image import QwenVLProcessor

        extra["processor"] = QwenVLProcessor.from_pretrained(Path(path) / "processor")
    pipe = DiffusionPipeline.from_pretrained(path, dtype=torch.float32, **extra).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    kw = dict(height=height, width=width, num_inference_steps=steps, true_cfg_scale=guidance,
              negative_prompt=negative_prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np")
    if images is not None:
        kw["image"] = images[0] if type(pipe).__name__ == "QwenImageEditPipeline" else list(images)
    return _to_uint8(pipe(prompt=prompt, **kw).images)
