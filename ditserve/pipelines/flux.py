"""The FLUX.1 text-to-image pipeline (dev and schnell), on the shared `Pipeline` base.

    prompts -> encode_prompt -> prepare_latents -> timesteps -> denoise -> decode -> images

Numerically this is diffusers' `FluxPipeline` (0.42.x) without CFG or IP-adapters: the same tokenisation
(CLIP padded to 77 tokens and pooled; T5 padded to max_sequence_length, no attention mask), the same initial
noise for a seed (drawn on the execution device in the transformer's dtype, then packed 2x2), the same
sigmas (linspace(1, 1/N, N), resolution-dependent shift mu) and scheduler, the same VAE decode and rounding.
So a seed gives the image diffusers gives for `generator=torch.Generator(device).manual_seed(seed)`.

Notation: B outputs, T text tokens, L image tokens, C latent channels (16), h, w latent height and width
(image size / vae_scale_factor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ditserve.config import ModelSpec, SamplingParams
from ditserve.engine.request import Capabilities
from ditserve.logging import init_logger
from ditserve.pipelines.base import Pipeline, Timesteps, default_image_size
from ditserve.pipelines.sampling import calculate_shift

logger = init_logger(__name__)

@dataclass
class PromptEmbeds:
    """Text conditioning: one row per prompt, or per output once `select_text` picked the rows."""

    prompt_embeds: torch.Tensor  # (B, T, joint_attention_dim) T5 last hidden state, transformer dtype
    pooled_prompt_embeds: torch.Tensor  # (B, pooled_projection_dim) CLIP pooled output, transformer dtype
    text_ids: torch.Tensor  # (T, 3) RoPE positions of the text tokens: all zeros


def default_max_sequence_length(guidance_embeds: bool, tokenizer_limit: int | None = None) -> int:
    """T5 tokens by default: 512 for guidance-distilled (FLUX.1-dev-like) models, 256 for schnell-like ones,
    never more than the T5 tokenizer's model_max_length (`tokenizer_limit`; small models may train on fewer)."""
    n = 512 if guidance_embeds else 256
    return n if tokenizer_limit is None else min(n, int(tokenizer_limit))


class FluxPipeline(Pipeline):
    """FLUX.1 text-to-image (components: transformer, vae, text_encoder, tokenizer, text_encoder_2,
    tokenizer_2, scheduler). The transformer is our `FluxTransformer`; the VAE, text encoders, tokenizers and
    scheduler are diffusers' / transformers' classes. Text-encoder outputs are cast to the transformer's dtype;
    the VAE decodes in its own dtype. Guidance is FLUX.1-dev's distilled guidance embedding (no negative prompt);
    schnell-like checkpoints have none."""

    FAMILY = "FLUX.1"
    PIPELINE_CLASS, DIT_CLASS = "FluxPipeline", "FluxTransformer2DModel"
    REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                           "scheduler")
    # T5 replayed from CUDA graphs on CUDA (see Pipeline); CLIP's capture fails (a host sync in transformers'
    # mask code, H200 run of 293b6ac), and its 12 layers cost little.
    GRAPHED_TEXT_ENCODERS = ("text_encoder_2",)

    def setup(self, components: dict[str, Any]) -> None:
        self.transformer = components["transformer"]
        self.vae = components["vae"]
        self.text_encoder = components["text_encoder"]
        self.tokenizer = components["tokenizer"]
        self.text_encoder_2 = components["text_encoder_2"]
        self.tokenizer_2 = components["tokenizer_2"]
        self.scheduler = components["scheduler"]
        self.num_channels_latents = self.transformer.config.in_channels // 4
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        self.clip_max_length = self.tokenizer.model_max_length  # 77 for CLIP-L
        self._capabilities = Capabilities(family=self.FAMILY, guidance="distilled" if self.guidance_embeds else "none")

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    # ---------------------------------------------------------------------------------------------- spec

    @classmethod
    def checkpoint_spec(cls, name: str, components: dict[str, Any]) -> ModelSpec:
        """The ModelSpec of a loaded FLUX.1 checkpoint (not a preset).

        Defaults follow the transformer: with a guidance embedder (FLUX.1-dev-like) 28 steps, guidance 3.5,
        max_sequence_length 512; without (schnell-like) 4 steps, guidance 0, 256; the length is capped by the T5
        tokenizer's model_max_length.
        The default size is the VAE's natural size (its config's sample_size: 1024 for FLUX.1, smaller for tiny
        test models).
        """
        guided = bool(components["transformer"].config.guidance_embeds)
        size = default_image_size(components["vae"].config.get("sample_size"))
        return ModelSpec(
            name=name,
            pipeline=cls.PIPELINE_CLASS,
            components=cls.component_configs(components),
            default_steps=28 if guided else 4,
            default_guidance=3.5 if guided else 0.0,
            default_height=size,
            default_width=size,
            max_sequence_length=default_max_sequence_length(
                guided, getattr(components["tokenizer_2"], "model_max_length", None)),
        )

    # -------------------------------------------------------------------------------------------- stages

    def _tokenize(self, tokenizer, prompts: list[str], max_length: int, what: str) -> torch.Tensor:
        """(len(prompts), max_length) int64 ids, padded and truncated as diffusers does (with a warning)."""
        ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                        return_tensors="pt").input_ids
        full_lengths = [len(x) for x in tokenizer(prompts, truncation=False).input_ids]
        if max(full_lengths) > max_length:
            logger.warning(f"a prompt was truncated to {max_length} {what} tokens "
                           f"(it has {max(full_lengths)})")
        return ids

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> PromptEmbeds:
        """Prompts (P strings) -> text conditioning with P rows."""
        clip_ids = self._tokenize(self.tokenizer, prompts, self.clip_max_length, "CLIP")  # (P, 77)
        pooled = self.text_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output  # (P, Dp)
        t5_ids = self._tokenize(self.tokenizer_2, prompts, params.max_sequence_length, "T5")  # (P, T)
        embeds = self.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0]  # (P, T, Dj)
        return PromptEmbeds(
            prompt_embeds=embeds.to(self.dtype),  # (P, T, Dj)
            pooled_prompt_embeds=pooled.to(self.dtype),  # (P, Dp)
            text_ids=torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype),  # (T, 3)
        )

    def select_text(self, text: PromptEmbeds, rows: list[int]) -> PromptEmbeds:
        index = torch.tensor(rows, device=self.device)
        return PromptEmbeds(prompt_embeds=text.prompt_embeds.index_select(0, index),
                            pooled_prompt_embeds=text.pooled_prompt_embeds.index_select(0, index),
                            text_ids=text.text_ids)

    def prepare_latents(self, n: int, params: SamplingParams) -> torch.Tensor:
        """Initial noise for n images, identical to diffusers' for the same seed: one draw of shape
        (n, C, h, w) from `torch.Generator(device).manual_seed(seed)` in the transformer's dtype, then packed
        -> (n, L, 4C)."""
        h, w = self.latent_size(params.height, params.width)
        generator = torch.Generator(self.device).manual_seed(params.seed)
        noise = torch.randn((n, self.num_channels_latents, h, w), generator=generator, device=self.device,
                            dtype=self.dtype)  # (n, C, h, w)
        return pack_latents(noise)

    def latent_image_ids(self, h: int, w: int) -> torch.Tensor:
        """RoPE positions of the packed tokens: (L, 3) rows (0, i, j), i < h / 2, j < w / 2, row-major."""
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3).to(device=self.device, dtype=self.dtype)  # (L, 3)

    def timesteps(self, params: SamplingParams, latents: torch.Tensor) -> Timesteps:
        """A fresh scheduler from the checkpoint's config, set to FLUX's schedule for `steps` steps:
        sigmas linspace(1, 1/steps, steps), shifted by mu (dynamic shifting) or the configured shift."""
        steps, image_seq_len = params.steps, latents.shape[1]
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        cfg = scheduler.config
        sigmas = None if cfg.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        if sigmas is None:
            scheduler.set_timesteps(steps, device=self.device, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)  # the step index is then known without a device->host lookup
        return Timesteps(timesteps=scheduler.timesteps, scheduler=scheduler)

    def begin_denoise(self, latents: torch.Tensor, text: PromptEmbeds, schedule: Timesteps,
                      params: SamplingParams) -> dict[str, Any]:
        """The model's conditioning (its AdaLN modulation vectors) for every step at once: every step's
        timestep is known now, so one pass over the modulation weights per request instead of one per step."""
        B = latents.shape[0]
        g = (torch.full((B,), params.guidance, device=self.device, dtype=torch.float32) if self.guidance_embeds
             else None)
        # (steps, B): the model takes sigma in [0, 1], rounded to the latent dtype as diffusers does.
        sigmas = schedule.timesteps.to(latents.dtype)[:, None].expand(-1, B) / 1000
        h, w = self.latent_size(params.height, params.width)
        return {"guidance": g, "sigmas": sigmas, "img_ids": self.latent_image_ids(h, w),
                "conditioning": self.transformer.precompute_conditioning(sigmas, text.pooled_prompt_embeds, g)}

    def predict(self, x: torch.Tensor, i: int, t: torch.Tensor, text: PromptEmbeds, ctx: dict[str, Any]
                ) -> torch.Tensor:
        return self.forward(
            hidden_states=x,  # (B, L, 4C)
            encoder_hidden_states=text.prompt_embeds,
            pooled_projections=text.pooled_prompt_embeds,
            timestep=ctx["sigmas"][i],  # (B,) in [0, 1], rounded to the latent dtype as diffusers
            img_ids=ctx["img_ids"],
            txt_ids=text.text_ids,
            guidance=ctx["guidance"],
            conditioning=ctx["conditioning"][i],
        )  # (B, L, 4C)

    def vae_latents(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """Packed latents (B, L, 4C) -> the VAE's input (B, C, h, w), its latent normalisation undone."""
        h, w = self.latent_size(params.height, params.width)
        z = unpack_latents(latents, h, w)  # (B, C, h, w)
        return z / self.vae.config.scaling_factor + self.vae.config.shift_factor


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C): each 2x2 patch becomes one token, features ordered (C, 2, 2)."""
    B, C, h, w = latents.shape
    x = latents.view(B, C, h // 2, 2, w // 2, 2)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(latents: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of `pack_latents`: (B, (h/2)(w/2), 4C) -> (B, C, h, w)."""
    B, L, D = latents.shape
    x = latents.view(B, h // 2, w // 2, D // 4, 2, 2)
    x = x.permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(B, D // 4, h, w)
