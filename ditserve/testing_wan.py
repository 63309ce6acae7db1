"""Tiny random Wan checkpoints built with diffusers' and transformers' own classes, and diffusers' reference runs.

`build_tiny_wan_pipeline` writes a diffusers-format folder with `WanPipeline.save_pretrained` (Wan 2.1, or Wan 2.2
with two experts and a `boundary_ratio`), so diffusers' `WanPipeline.from_pretrained` and our loader read the very
same files; `reference_wan` runs diffusers' pipeline on it and returns uint8 frames, the reference the tests
compare our pipeline against.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ditserve.testing import _perturb_zeros, _write_t5_tokenizer

TINY_TEXT_WIDTH = 32
TINY_Z_DIM = 8
TINY_MAX_LENGTH = 512  # the tokenizer's model_max_length: diffusers' WanPipeline pads every prompt to 512
# The Wan transformer's conditioning path: x3 on the time projection (the blocks' modulation) and on the text
# embedder's output, and x4 on the cross-attention's q/k RMSNorm weights (x16 on its logits). The DiT attends to
# all 512 text rows, most of them the same zero padding, so at PyTorch's default init a tiny random model's
# cross-attention is nearly uniform and two prompts give videos 46 dB apart (a parity test could not tell a
# pipeline that drops the prompt); with these gains two prompts, and CFG vs none, are ~21-23 dB apart (2 steps,
# 5 frames of 32x48, measured at build seed 0), about as far as two seeds (~18 dB), with < 0.1% of pixels clipped.
WAN_CONDITIONING_GAIN = 3.0
WAN_CROSS_ATTENTION_GAIN = 4.0


def tiny_wan_transformer(seed: int, in_channels: int = TINY_Z_DIM, out_channels: int = TINY_Z_DIM):
    """A tiny WanTransformer3DModel: 2 blocks, 2 heads of 12 (RoPE axes 4 + 4 + 4), FFN 48, text_dim 32, patch
    (1, 2, 2), its conditioning path amplified (`WAN_CONDITIONING_GAIN`, `WAN_CROSS_ATTENTION_GAIN`)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=out_channels, text_dim=TINY_TEXT_WIDTH, freq_dim=32, ffn_dim=48, num_layers=2,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name in ("condition_embedder.time_proj", "condition_embedder.text_embedder.linear_2"):
                module.weight.mul_(WAN_CONDITIONING_GAIN)
        for block in model.blocks:
            block.attn2.norm_q.weight.mul_(WAN_CROSS_ATTENTION_GAIN)
            block.attn2.norm_k.weight.mul_(WAN_CROSS_ATTENTION_GAIN)
    return model


def tiny_wan_vae(seed: int):
    """A tiny AutoencoderKLWan with the Wan2.1 VAE's layout (4 levels: 8x spatial, 4x temporal downsampling,
    causal 3D convs) at base width 8, 8 latent channels, per-channel latents_mean/std of its own."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed + 7)
    mean = (torch.randn(TINY_Z_DIM, generator=gen) * 0.5).round(decimals=4).tolist()
    std = (torch.rand(TINY_Z_DIM, generator=gen) * 1.5 + 0.5).round(decimals=4).tolist()
    return AutoencoderKLWan(base_dim=8, z_dim=TINY_Z_DIM, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                            temperal_downsample=[False, True, True], latents_mean=mean, latents_std=std)


def tiny_umt5(seed: int, vocab_size: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    config = UMT5Config(vocab_size=vocab_size, d_model=TINY_TEXT_WIDTH, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                        relative_attention_num_buckets=8, relative_attention_max_distance=32,
                        feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                        decoder_start_token_id=0, is_encoder_decoder=True)
    return UMT5EncoderModel(config)


def tiny_wan_tokenizer(dir: str | Path):
    """The tiny offline T5-style tokenizer of `ditserve.testing` (one token per built-in word), model_max_length
    512 as umt5-xxl's, loaded as transformers' fast T5 tokenizer."""
    from transformers import AutoTokenizer

    dir = Path(dir)
    _write_t5_tokenizer(dir, model_max_length=TINY_MAX_LENGTH)
    return AutoTokenizer.from_pretrained(dir)


def build_tiny_wan_pipeline(path: str | Path, *, seed: int = 0, two_experts: bool = False,
                            boundary_ratio: float = 0.6, scheduler: str = "unipc", flow_shift: float = 3.0,
                            expand_timesteps: bool = False) -> Path:
    """Build a tiny random Wan pipeline and save it with `WanPipeline.save_pretrained` at `path`.

    Wan 2.1 layout (transformer, vae, text_encoder, tokenizer, scheduler), or with `two_experts` Wan 2.2 A14B's
    (a second transformer of another seed as `transformer_2`, and `boundary_ratio` in model_index.json).
    `scheduler`: "unipc" (the released checkpoints' UniPCMultistepScheduler, flow prediction, `flow_shift`) or
    "euler" (FlowMatchEulerDiscreteScheduler with shift `flow_shift`, the pipeline's type hint). `expand_timesteps`:
    Wan 2.2 TI2V-5B's option in model_index.json (per-token timesteps in diffusers' loop). Deterministic:
    the same arguments give byte-identical files. Returns `path`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_wan_tokenizer(path / "_tokenizer_src")
    transformer = tiny_wan_transformer(seed)
    transformer_2 = tiny_wan_transformer(seed + 1000) if two_experts else None
    vae = tiny_wan_vae(seed + 1)
    text_encoder = tiny_umt5(seed + 2, len(tokenizer))
    if scheduler == "unipc":
        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=flow_shift)
    elif scheduler == "euler":
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=flow_shift)
    else:
        raise ValueError(f"scheduler must be 'unipc' or 'euler', got {scheduler!r}")
    gen = torch.Generator().manual_seed(seed + 3)
    for module in (transformer, transformer_2, vae, text_encoder):
        if module is not None:
            _perturb_zeros(module, gen)
            module.eval()
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=sched,
                       transformer=transformer, transformer_2=transformer_2,
                       boundary_ratio=boundary_ratio if two_experts else None, expand_timesteps=expand_timesteps)
    pipe.save_pretrained(path, safe_serialization=True)
    import shutil

    shutil.rmtree(path / "_tokenizer_src")
    return path


TINY_IMAGE_DIM = 20  # the tiny CLIP vision tower's width (Wan2.1 I2V: 1280)


def build_tiny_wan_i2v_pipeline(path: str | Path, *, seed: int = 0, expand_timesteps: bool = False) -> Path:
    """Build a tiny random Wan image-to-video pipeline and save it with `WanImageToVideoPipeline.save_pretrained`.

    Wan2.1 I2V's layout (default): the transformer takes 2C + 4 channels (noise, first-frame mask, encoded
    condition) and has an image embedder (image_dim 20) fed by a 2-layer CLIPVisionModel (width 20, 32 px images
    in 8 px patches: 17 tokens) through a CLIPImageProcessor at 32 px. With `expand_timesteps`, Wan 2.2 TI2V-5B's:
    a C-channel transformer without image embedder, no CLIP, `expand_timesteps` in model_index.json.
    Otherwise as `build_tiny_wan_pipeline` (UniPC). Returns `path`."""
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_wan_tokenizer(path / "_tokenizer_src")
    if expand_timesteps:
        transformer = tiny_wan_transformer(seed)
        image_encoder = image_processor = None
    else:
        from diffusers import WanTransformer3DModel

        base = tiny_wan_transformer(seed, in_channels=2 * TINY_Z_DIM + 4)
        config = dict(base.config)
        config.update(image_dim=TINY_IMAGE_DIM, added_kv_proj_dim=24)
        torch.manual_seed(seed + 5)
        transformer = WanTransformer3DModel.from_config(config)
        transformer.load_state_dict(base.state_dict(), strict=False)  # the conditioning gains; new image layers
        torch.manual_seed(seed + 4)
        image_encoder = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=TINY_IMAGE_DIM, intermediate_size=40, projection_dim=16, num_hidden_layers=2,
            num_attention_heads=2, image_size=32, patch_size=8))
        image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    vae = tiny_wan_vae(seed + 1)
    text_encoder = tiny_umt5(seed + 2, len(tokenizer))
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=3.0)
    gen = torch.Generator().manual_seed(seed + 3)
    for module in (transformer, vae, text_encoder, image_encoder):
        if module is not None:
            _perturb_zeros(module, gen)
            module.eval()
    pipe = WanImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                   image_processor=image_processor, image_encoder=image_encoder,
                                   transformer=transformer, expand_timesteps=expand_timesteps)
    pipe.save_pretrained(path, safe_serialization=True)
    import shutil

    shutil.rmtree(path / "_tokenizer_src")
    return path


def reference_wan_i2v(path: str | Path, image, prompt: str, *, height: int, width: int, num_frames: int,
                      steps: int, guidance: float, seed: int, negative_prompt: str | None = None) -> np.ndarray:
    """Videos from diffusers' own `WanImageToVideoPipeline` loaded from `path` (CPU, fp32), uint8 (1, F, H, W, 3),
    as `reference_wan`."""
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline.from_pretrained(path, dtype=torch.float32).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(image=image, prompt=prompt, negative_prompt=negative_prompt, height=height, width=width,
                  num_frames=num_frames, num_inference_steps=steps, guidance_scale=guidance,
                  generator=torch.Generator("cpu").manual_seed(seed), output_type="np").frames
    return np.clip(np.round(np.asarray(frames, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def reference_wan(path: str | Path, prompt: str | list[str], *, height: int, width: int, num_frames: int,
                  steps: int, guidance: float, seed: int, negative_prompt: str | list[str] | None = None,
                  guidance_2: float | None = None, num_videos: int = 1) -> np.ndarray:
    """Videos from diffusers' own `WanPipeline` loaded from `path`, on CPU in fp32, as uint8 (N, F, H, W, 3).

    Noise from `torch.Generator("cpu").manual_seed(seed)`; CFG runs for guidance > 1 with `negative_prompt` (or
    ""); output_type="np", then round(x * 255)."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(path, dtype=torch.float32).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    frames = pipe(prompt, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
                  num_inference_steps=steps, guidance_scale=guidance, guidance_scale_2=guidance_2,
                  num_videos_per_prompt=num_videos, generator=torch.Generator("cpu").manual_seed(seed),
                  output_type="np").frames
    return np.clip(np.round(np.asarray(frames, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def make_dummy_wan_tokenizer():
    """The tokenizer of a `--load-format dummy` Wan preset (`ModelSpec.tokenizers`): the tiny offline T5-style
    tokenizer (`tiny_wan_tokenizer`), written to a temporary folder; its ids are valid in umt5-xxl's vocabulary."""
    import tempfile

    with tempfile.TemporaryDirectory() as dir:
        return tiny_wan_tokenizer(dir)
