"""The Z-Image text-to-image pipeline (Z-Image-Turbo), on the shared `Pipeline` base.

    prompts -> encode_prompt (Qwen3) -> prepare_latents -> timesteps -> denoise (CFG) -> decode -> images

Numerically this is diffusers' `ZImagePipeline` (0.42.x): each prompt rendered through the tokenizer's chat
template (`[{"role": "user", ...}]`, generation prompt, thinking enabled), the penultimate hidden state of the
`Qwen3Model` text encoder for the prompt's valid tokens only (a variable length per prompt), the initial noise
drawn in fp32 from `torch.Generator(device).manual_seed(seed)` as (B, 16, h, w), sigmas linspace(1, 1/N, N)
with the checkpoint's shift, the model fed t' = (1000 - t) / 1000 and its output negated, FLUX.1's VAE.

Guidance is classifier-free with a negative prompt, on diffusers' Z-Image convention: the scale counts from 0
(guidance 0: one branch; guidance g > 0: pos + g * (pos - neg)), and both branches run as one batched forward
by default. Notation: B outputs, T text tokens, C latent channels (16), h, w latent height and width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ditserve.config import ModelSpec, SamplingParams
from ditserve.engine.request import Capabilities
from ditserve.logging import init_logger
from ditserve.pipelines.base import Pipeline, Timesteps, default_image_size
from ditserve.pipelines.sampling import calculate_shift

logger = init_logger(__name__)

DEFAULT_STEPS = 8  # Z-Image-Turbo's distilled schedule: 8 forwards (diffusers >= 0.39 schedules N steps as N forwards)
DEFAULT_GUIDANCE = 0.0  # Turbo runs without classifier-free guidance
MAX_SEQUENCE_LENGTH = 512  # diffusers' default text length for Z-Image


@dataclass
class ZImageText:
    """Text conditioning: Qwen3's penultimate hidden states of each prompt's valid tokens, right-padded."""

    embeds: torch.Tensor  # (P, T, cap_feat_dim) in the transformer's dtype; row p is valid up to lens[p]
    lens: list[int]  # valid tokens of each row


class ZImagePipeline(Pipeline):
    """Z-Image text-to-image (components: transformer, vae, text_encoder, tokenizer, scheduler). The
    transformer is our `ZImageTransformer`; the rest are diffusers' / transformers' classes."""

    FAMILY = "Z-Image"
    PIPELINE_CLASS, DIT_CLASS = "ZImagePipeline", "ZImageTransformer2DModel"
    REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    GRAPHED_TEXT_ENCODERS = ("text_encoder",)  # replayed from CUDA graphs on CUDA (see Pipeline)

    def setup(self, components: dict[str, Any]) -> None:
        self.transformer = components["transformer"]
        self.vae = components["vae"]
        self.text_encoder = components["text_encoder"]
        self.tokenizer = components["tokenizer"]
        self.scheduler = components["scheduler"]
        self.num_channels_latents = self.transformer.config.in_channels
        self._capabilities = Capabilities(family=self.FAMILY, guidance="cfg")

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @classmethod
    def checkpoint_spec(cls, name: str, components: dict[str, Any]) -> ModelSpec:
        """The ModelSpec of a loaded Z-Image checkpoint (not a preset): Turbo's defaults (8 steps, guidance 0,
        512 text tokens capped by the tokenizer's model_max_length) at the VAE's natural size."""
        size = default_image_size(components["vae"].config.get("sample_size"))
        limit = getattr(components["tokenizer"], "model_max_length", None)
        return ModelSpec(
            name=name, pipeline=cls.PIPELINE_CLASS, components=cls.component_configs(components),
            default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE, default_height=size, default_width=size,
            max_sequence_length=MAX_SEQUENCE_LENGTH if limit is None else min(MAX_SEQUENCE_LENGTH, int(limit)))

    # -------------------------------------------------------------------------------------------- stages

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> ZImageText:
        """P prompts -> their conditioning: each prompt's valid tokens (by the attention mask, as diffusers
        selects them), right-aligned into rows. With a right-padding tokenizer (Qwen's) the causal text encoder
        gives every valid token the same state whatever the padding, so prompts are padded to the longest one only;
        a left-padding tokenizer is padded to max_sequence_length, as diffusers does (its token positions depend on
        the padding)."""
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=True)
                 for p in prompts]
        full = max(len(ids) for ids in self.tokenizer(texts, truncation=False).input_ids)
        if full > params.max_sequence_length:
            logger.warning(f"a prompt was truncated to {params.max_sequence_length} tokens (it has {full})")
        padding = "longest" if self.tokenizer.padding_side == "right" else "max_length"
        tok = self.tokenizer(texts, padding=padding, max_length=params.max_sequence_length, truncation=True,
                             return_tensors="pt")
        mask = tok.attention_mask.to(self.device).bool()  # (P, T)
        states = self.text_encoder(input_ids=tok.input_ids.to(self.device), attention_mask=mask,
                                   output_hidden_states=True).hidden_states[-2]  # (P, T, D) penultimate layer
        valid = [row[m] for row, m in zip(states, mask)]  # P x (len_p, D)
        embeds = torch.nn.utils.rnn.pad_sequence(valid, batch_first=True)  # (P, max len, D), zero padded
        return ZImageText(embeds=embeds.to(self.dtype), lens=[len(v) for v in valid])

    def select_text(self, text: ZImageText, rows: list[int]) -> ZImageText:
        index = torch.tensor(rows, device=self.device)
        return ZImageText(embeds=text.embeds.index_select(0, index), lens=[text.lens[r] for r in rows])

    def prepare_latents(self, n: int, params: SamplingParams) -> torch.Tensor:
        """Initial noise for n images, identical to diffusers' for the same seed: (n, C, h, w) fp32 from
        `torch.Generator(device).manual_seed(seed)`."""
        h, w = self.latent_size(params.height, params.width)
        generator = torch.Generator(self.device).manual_seed(params.seed)
        return torch.randn((n, self.num_channels_latents, h, w), generator=generator, device=self.device,
                           dtype=torch.float32)

    def timesteps(self, params: SamplingParams, latents: torch.Tensor) -> Timesteps:
        """A fresh scheduler from the checkpoint's config set to sigmas linspace(1, 1/N, N) (diffusers'
        `get_default_z_image_sigmas`), with mu for checkpoints that shift dynamically."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        cfg = scheduler.config
        h, w = latents.shape[-2:]
        mu = calculate_shift((h // 2) * (w // 2), cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        sigmas = torch.linspace(1.0, 1 / params.steps, params.steps).tolist()
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)  # the step index is then known without a device->host lookup
        return Timesteps(timesteps=scheduler.timesteps, scheduler=scheduler)

    def predict(self, x: torch.Tensor, i: int, t: torch.Tensor, text: ZImageText, ctx: Any) -> torch.Tensor:
        """x (B, C, h, w) fp32 -> the scheduler's velocity (B, C, h, w) fp32: the model sees time running 0 -> 1
        and predicts the negated flow."""
        timestep = (1000 - t.expand(x.shape[0])) / 1000  # (B,)
        out = self.forward(hidden_states=x.to(self.dtype), timestep=timestep, encoder_hidden_states=text.embeds,
                           encoder_lens=text.lens)  # (B, C, h, w)
        return -out.float()

    def cfg_active(self, guidance: float) -> bool:
        return guidance > 0  # diffusers' Z-Image: CFG whenever the scale is positive

    def combine_cfg(self, cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
        return cond + guidance * (cond - uncond)  # diffusers' Z-Image convention (the scale counts from 0)

    def vae_latents(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        return latents / self.vae.config.scaling_factor + self.vae.config.shift_factor


def _z_image_turbo_spec() -> ModelSpec:
    from ditserve.models import z_image as m

    return ModelSpec(name="z-image-turbo", pipeline="ZImagePipeline", components={
        "transformer": ("ZImageTransformer2DModel", dict(m.Z_IMAGE_TURBO_TRANSFORMER)),
        "vae": ("AutoencoderKL", dict(m.Z_IMAGE_VAE)),
        "text_encoder": ("Qwen3Model", dict(m.QWEN3_4B_TEXT)),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", dict(m.Z_IMAGE_TURBO_SCHEDULER)),
    }, default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE, default_height=1024, default_width=1024,
        max_sequence_length=MAX_SEQUENCE_LENGTH,
        # --load-format dummy builds no tokenizer from a config: a tiny offline Qwen2 BPE tokenizer whose ids are
        # valid in Qwen3's vocabulary (whole words are one token each, as with the real one).
        tokenizers={"tokenizer": "ditserve.testing:make_tiny_qwen_tokenizer"})


# The `z-image-turbo` preset (--load-format dummy, `ditserve bench`): Tongyi-MAI/Z-Image-Turbo's configs.
Z_IMAGE_TURBO = _z_image_turbo_spec()
