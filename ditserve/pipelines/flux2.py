"""The FLUX.2 pipelines (dev and klein), text-to-image and reference-image conditioned, on the shared `Pipeline`.

    prompts -> encode_prompt -> prepare_latents -> timesteps -> [reference images -> VAE] -> denoise -> decode

Numerically these are diffusers' `Flux2Pipeline` and `Flux2KleinPipeline` (0.42.x):

- text: every prompt is rendered through the tokenizer's chat template (dev: the BFL system message and the
  prompt as a user turn, content lists as diffusers builds them; klein: a user turn with the generation prompt,
  thinking off), padded to max_sequence_length (512) tokens, and run through the text encoder's language model;
  the hidden states of three layers (dev's Mistral: 10, 20, 30; klein's Qwen3: 9, 18, 27), stacked per token,
  are the DiT's text features (T = max_sequence_length rows, padding included: the DiT sees every row);
- latents: noise (B, 4C, h/2, w/2) in the DiT's dtype from `torch.Generator(device).manual_seed(seed)`, packed
  to (B, L, 4C) tokens in raster order; the VAE's 2x2 patchified latents normalised by its batch-norm
  statistics (`AutoencoderKLFlux2.bn`);
- schedule: diffusers' FlowMatchEulerDiscreteScheduler with sigmas linspace(1, 1/N, N) and FLUX.2's empirical mu
  (`empirical_mu`, a function of the image's token count and the step count);
- guidance: dev embeds it (one forward a step); klein base checkpoints run real classifier-free guidance with a
  negative prompt ("" by default) when guidance > 1; step-distilled klein checkpoints (model_index.json
  `is_distilled`) take no guidance (4 steps);
- reference images (`SamplingParams.images`, diffusers' `image=`): each is checked, scaled to at most 1024^2
  pixels, cropped to a multiple of 16 (diffusers' `Flux2ImageProcessor`), VAE-encoded (the distribution's mode),
  normalised, and its tokens appended after the noisy ones with RoPE time coordinate 10 (i + 1); the DiT's
  output layer projects the noisy tokens only.

The text encoder is loaded as its bare language model: no LM head and, for dev, no vision tower or projector;
layers past the deepest one read are never loaded (dev, `Mistral3TextModel`) or dropped at setup (klein,
`trim_text_encoder`). With EngineConfig.offload_text_encoder it lives in host memory between prompts
(`OffloadedTextEncoder`).
Notation: B outputs, T text tokens, C latent channels (VAE), h x w latent size, L = (h/2)(w/2) image tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ditserve.config import ModelSpec, SamplingParams
from ditserve.engine.request import Capabilities
from ditserve.errors import ConfigError
from ditserve.logging import init_logger
from ditserve.pipelines.base import Pipeline, Timesteps, default_image_size, open_input_image

logger = init_logger(__name__)

MAX_SEQUENCE_LENGTH = 512  # both pipelines pad every prompt to this many tokens
DEV_TEXT_LAYERS = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers (hidden_states indices)
KLEIN_TEXT_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's
REFERENCE_T_STEP = 10  # RoPE time coordinate of reference image i: REFERENCE_T_STEP * (i + 1)
REFERENCE_MAX_PIXELS = 1024 * 1024  # larger reference images are scaled down to this area first
MAX_REFERENCE_IMAGES = 10  # the most reference images a request may carry (BFL's documented limit for dev)

# BFL's system message for FLUX.2-dev prompts (black-forest-labs/flux2 src/flux2/system_messages.py).
SYSTEM_MESSAGE = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
                  "object relationships, object\nattribution and actions without speculation.")


def empirical_mu(image_tokens: int, steps: int) -> float:
    """FLUX.2's schedule shift mu for an image of `image_tokens` tokens sampled in `steps` steps: linear in the
    token count for large images (> 4300 tokens), otherwise interpolated linearly in the step count between the
    fits BFL made at 10 and 200 steps (black-forest-labs/flux2 sampling.py)."""
    at_200 = 0.00016927 * image_tokens + 0.45666666
    if image_tokens > 4300:
        return float(at_200)
    at_10 = 8.73809524e-05 * image_tokens + 1.89833333
    slope = (at_200 - at_10) / 190.0
    return float(at_200 + slope * (steps - 200.0))


# ------------------------------------------------------------------------------------------- text encoders


def _mistral3_text_classes():
    from transformers import MistralConfig, MistralModel

    deepest = max(DEV_TEXT_LAYERS)

    class Mistral3TextConfig(MistralConfig):
        """The language model's MistralConfig, from a Mistral3ForConditionalGeneration config (its `text_config`)
        or a plain one."""

        @classmethod
        def from_dict(cls, config_dict, **kwargs):
            return MistralConfig.from_dict(config_dict.get("text_config", config_dict), **kwargs)

    class Mistral3TextModel(MistralModel):
        """The language model of a `Mistral3ForConditionalGeneration` checkpoint alone (a `MistralModel`), up to
        the deepest layer FLUX.2-dev's prompt encoding reads: the vision tower, the projector, the LM head and the
        layers past it are never built, and their weights are skipped at load (10 of Mistral Small's 40 layers).
        The config keeps the checkpoint's layer count (so a model rebuilt from it is cut the same way); with
        layers cut, the final norm is an identity (see `trim_text_encoder`)."""

        config_class = Mistral3TextConfig

        def __init__(self, config):
            super().__init__(config)
            if len(self.layers) > deepest:
                del self.layers[deepest:]  # (forward runs layers[:num_hidden_layers]: these 30)
                self.norm = nn.Identity()

        @classmethod
        def from_pretrained(cls, folder, *args, **kwargs):
            import json

            config = cls.config_class.from_dict(json.loads((Path(folder) / "config.json").read_text()))
            # The language model's weights under both layouts transformers has saved this class in.
            mapping = {r"^model\.language_model\.": "", r"^language_model\.model\.": ""}
            return super().from_pretrained(folder, *args, config=config, key_mapping=mapping, **kwargs)

    return Mistral3TextModel


def __getattr__(name: str):  # Mistral3TextModel is built on first use: importing this module imports no transformers
    if name == "Mistral3TextModel":
        cls = _mistral3_text_classes()
        globals()[name] = cls
        return cls
    raise AttributeError(name)


def trim_text_encoder(encoder: nn.Module, deepest: int) -> None:
    """Drop the layers of a transformers decoder-only language model (`.layers`, `.norm`) that hidden state
    `deepest` does not depend on. hidden_states[k] is decoder layer k-1's output, except the last entry, which
    the model returns after its final norm: with more than `deepest` layers, keeping `deepest` and replacing the
    norm by an identity leaves every state up to `deepest` as it was. Raises ConfigError when the encoder is too
    shallow."""
    n = len(encoder.layers)
    if n < deepest:
        raise ConfigError(f"text encoder has {n} layers; FLUX.2 reads hidden state {deepest}")
    if n > deepest:  # (a Mistral3TextModel arrives cut already, its norm an identity)
        del encoder.layers[deepest:]
        encoder.norm = nn.Identity()
        encoder.config.num_hidden_layers = deepest
        if getattr(encoder.config, "layer_types", None):
            encoder.config.layer_types = encoder.config.layer_types[:deepest]


class OffloadedTextEncoder:
    """A text encoder kept in host memory between prompts (EngineConfig.offload_text_encoder): each call copies
    its weights to `device` (from pinned memory where the device is a GPU), runs it, and drops the device copies,
    so the device holds the encoder only while it encodes. Not an nn.Module: the pipeline base leaves it where it
    is."""

    def __init__(self, module: nn.Module, device: torch.device):
        self.module, self.device = module, device
        pin = device.type == "cuda"
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter or buffer, its host data)
        for t in [*module.parameters(), *module.buffers()]:
            host = t.data.pin_memory() if pin else t.data
            t.data = host
            self.tensors.append((t, host))

    def __call__(self, **kwargs):
        try:
            for t, host in self.tensors:
                t.data = host.to(self.device, non_blocking=True)
            return self.module(**kwargs)
        finally:
            for t, host in self.tensors:
                t.data = host

    def __getattr__(self, name: str):  # layers, norm, config, ...: the module's
        return getattr(self.module, name)


# ------------------------------------------------------------------------------------------------ pipeline


@dataclass
class Flux2Text:
    """Text conditioning: the stacked hidden states of every prompt's max_sequence_length tokens."""

    embeds: torch.Tensor  # (P, T, joint_attention_dim) in the transformer's dtype


@dataclass
class Flux2Context:
    """Per-request constants of the model calls."""

    img_ids: torch.Tensor  # (L + Lr, 4) int64: the noisy tokens', then every reference image's
    txt_ids: torch.Tensor  # (T, 4) int64
    refs: torch.Tensor | None  # (1, Lr, 4C) the reference images' normalised tokens, or None
    guidance: torch.Tensor | None  # (1,) fp32 distilled guidance (dev), or None
    tokens: int  # L, the noisy image's tokens


class Flux2Pipeline(Pipeline):
    """FLUX.2-dev (components: transformer, vae, text_encoder, tokenizer, scheduler): a guidance-distilled DiT
    conditioned by three layers of Mistral Small 3.x's language model. The transformer is our
    `Flux2Transformer`; the rest are diffusers' / transformers' classes."""

    FAMILY = "FLUX.2"
    PIPELINE_CLASS, DIT_CLASS = "Flux2Pipeline", "Flux2Transformer2DModel"
    REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    TEXT_LAYERS = DEV_TEXT_LAYERS
    DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 4.0
    OFFLOADS_TEXT_ENCODER = True  # EngineConfig.offload_text_encoder: see OffloadedTextEncoder
    GRAPHED_TEXT_ENCODERS = ("text_encoder",)  # replayed from CUDA graphs on CUDA (see Pipeline; not offloaded)

    def setup(self, components: dict[str, Any]) -> None:
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        self.transformer = components["transformer"]
        self.vae = components["vae"]
        self.text_encoder = components["text_encoder"]
        self.tokenizer = components["tokenizer"]
        self.scheduler = components["scheduler"]
        trim_text_encoder(self.text_encoder, max(self.TEXT_LAYERS))
        if self.engine.offload_text_encoder:  # host memory between prompts (the loader placed it on the host);
            # replaced in `components` too, where the base would move every nn.Module to the device
            self.text_encoder = components["text_encoder"] = OffloadedTextEncoder(self.text_encoder, self.device)
            self.GRAPHED_TEXT_ENCODERS = ()  # a graph would replay device copies the offload has dropped
        self.latent_channels = self.transformer.config.in_channels  # 4x the VAE's (2x2 patches)
        self.image_processor = Flux2ImageProcessor(vae_scale_factor=16)
        self._capabilities = self.make_capabilities(components)

    def make_capabilities(self, components: dict[str, Any]) -> Capabilities:
        return Capabilities(family=self.FAMILY, guidance="distilled", max_input_images=MAX_REFERENCE_IMAGES)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @classmethod
    def checkpoint_spec(cls, name: str, components: dict[str, Any]) -> ModelSpec:
        """A loaded checkpoint's defaults: diffusers' steps and guidance, 512 text tokens, the VAE's natural size."""
        size = default_image_size(components["vae"].config.get("sample_size"))
        steps, guidance = cls.sampling_defaults(components)
        return ModelSpec(name=name, pipeline=cls.PIPELINE_CLASS, components=cls.component_configs(components),
                         default_steps=steps, default_guidance=guidance, default_height=size, default_width=size,
                         max_sequence_length=MAX_SEQUENCE_LENGTH)

    @classmethod
    def sampling_defaults(cls, components: dict[str, Any]) -> tuple[int, float]:
        return cls.DEFAULT_STEPS, cls.DEFAULT_GUIDANCE

    @classmethod
    def component_configs(cls, components: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
        """The base's, with dev's text encoder under its checkpoint class name (the registry builds our
        `Mistral3TextModel` from it; its config is the cut language model's)."""
        configs = super().component_configs(components)
        name, config = configs["text_encoder"]
        if name == "Mistral3TextModel":
            configs["text_encoder"] = ("Mistral3ForConditionalGeneration", config)
        return configs

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """As the base, except that with reference images an unset height or width is the first reference
        image's (as it is encoded), as diffusers does."""
        if params.images and (params.height is None or params.width is None):
            w, h = reference_size(params.images[0])
            if w and h:  # (an unreadable image keeps the defaults; loading it reports the error)
                params = dataclasses.replace(params, height=params.height or h, width=params.width or w)
        return super().resolve(params)

    def batch_key(self, params: SamplingParams) -> tuple:
        """The base's key plus the reference images (requests in one batch share them)."""
        return (*super().batch_key(params), tuple(_image_key(im) for im in params.images))

    def forward_tokens(self, params: SamplingParams) -> int:
        """Image tokens of one output's forward (the CUDA-graph size rule): the generated image's and every
        reference image's."""
        return (params.height // 16) * (params.width // 16) + sum(
            (w // 16) * (h // 16) for w, h in (reference_size(im) for im in params.images))

    # -------------------------------------------------------------------------------------------- stages

    def tokenize(self, prompts: list[str], max_length: int | None) -> Any:
        """Prompts -> the tokenizer's batch (input_ids, attention_mask: (P, max_length) tensors) as diffusers
        renders them: the system message and the prompt ("[IMG]" removed) as content lists, no generation prompt.
        max_length None: the whole prompts, unpadded (lists of ids)."""
        messages = [[{"role": "system", "content": [{"type": "text", "text": SYSTEM_MESSAGE}]},
                     {"role": "user", "content": [{"type": "text", "text": p.replace("[IMG]", "")}]}]
                    for p in prompts]
        if max_length is None:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True,
                                                      return_dict=True)
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=True,
                                                  return_dict=True, return_tensors="pt", padding="max_length",
                                                  truncation=True, max_length=max_length)

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> Flux2Text:
        """P prompts -> (P, T, 3 x text hidden): the text encoder's hidden states TEXT_LAYERS, stacked per token
        (layer-major within a token's features, as diffusers' permute + reshape)."""
        tok = self.tokenize(prompts, params.max_sequence_length)
        if int(tok["attention_mask"].sum(1).max()) == params.max_sequence_length:  # full: maybe cut (rare)
            longest = max(len(ids) for ids in self.tokenize(prompts, None)["input_ids"])
            if longest > params.max_sequence_length:
                logger.warning(f"a prompt was truncated to {params.max_sequence_length} tokens (it has {longest}, "
                               f"chat template included)")
        out = self.text_encoder(input_ids=tok["input_ids"].to(self.device),
                                attention_mask=tok["attention_mask"].to(self.device), output_hidden_states=True,
                                use_cache=False)
        states = torch.stack([out.hidden_states[k] for k in self.TEXT_LAYERS], dim=2)  # (P, T, 3, H)
        return Flux2Text(embeds=states.flatten(2).to(self.dtype))  # (P, T, 3H)

    def select_text(self, text: Flux2Text, rows: list[int]) -> Flux2Text:
        return Flux2Text(embeds=text.embeds.index_select(0, torch.tensor(rows, device=self.device)))

    def prepare_latents(self, n: int, params: SamplingParams) -> torch.Tensor:
        """Initial noise for n images, as diffusers draws it for the same seed: (n, 4C, h/2, w/2) in the DiT's
        dtype from `torch.Generator(device).manual_seed(seed)`, packed to (n, L, 4C)."""
        h, w = self.latent_size(params.height, params.width)
        generator = torch.Generator(self.device).manual_seed(params.seed)
        noise = torch.randn((n, self.latent_channels, h // 2, w // 2), generator=generator, device=self.device,
                            dtype=self.dtype)
        return noise.flatten(2).transpose(1, 2)  # (n, L, 4C), raster order

    def timesteps(self, params: SamplingParams, latents: torch.Tensor) -> Timesteps:
        """A fresh scheduler from the checkpoint's config, set to sigmas linspace(1, 1/N, N) (or the scheduler's
        own flow sigmas where its config asks for them) with FLUX.2's empirical mu."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        mu = empirical_mu(latents.shape[1], params.steps)
        if scheduler.config.get("use_flow_sigmas", False):
            scheduler.set_timesteps(params.steps, device=self.device, mu=mu)
        else:
            sigmas = np.linspace(1.0, 1 / params.steps, params.steps)
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)
        return Timesteps(timesteps=scheduler.timesteps, scheduler=scheduler)

    def begin_denoise(self, latents: torch.Tensor, text: Flux2Text, schedule: Timesteps,
                      params: SamplingParams) -> Flux2Context:
        """Positions, the distilled guidance and the reference images' tokens (VAE-encoded here, once per
        request; twice with split CFG, one per branch)."""
        from ditserve.models.flux2 import image_ids, text_ids

        h, w = self.latent_size(params.height, params.width)
        ids = [image_ids(h // 2, w // 2)]
        refs = None
        if params.images:
            tokens = []
            for i, image in enumerate(params.images):
                z = self.encode_reference(image)  # (1, 4C, h_i, w_i)
                ids.append(image_ids(z.shape[2], z.shape[3], t=REFERENCE_T_STEP * (i + 1)))
                tokens.append(z.flatten(2).transpose(1, 2))  # (1, L_i, 4C)
            refs = torch.cat(tokens, dim=1)  # (1, Lr, 4C) in the VAE's dtype
        guidance = None
        if self.capabilities.guidance == "distilled":
            guidance = torch.full((1,), params.guidance, device=self.device, dtype=torch.float32)
        return Flux2Context(img_ids=torch.cat(ids).to(self.device), txt_ids=text_ids(text.embeds.shape[1]).to(
            self.device), refs=refs, guidance=guidance, tokens=latents.shape[1])

    def predict(self, x: torch.Tensor, i: int, t: torch.Tensor, text: Flux2Text, ctx: Flux2Context) -> torch.Tensor:
        """x (B, L, 4C) -> the scheduler's velocity (B, L, 4C) in the DiT's dtype."""
        B = x.shape[0]
        timestep = t.expand(B).to(x.dtype) / 1000  # (B,)
        hidden = x if ctx.refs is None else torch.cat((x, ctx.refs.expand(B, -1, -1).to(x.dtype)), dim=1)
        return self.forward(hidden_states=hidden.to(self.dtype), encoder_hidden_states=text.embeds,
                            timestep=timestep, img_ids=ctx.img_ids, txt_ids=ctx.txt_ids,
                            guidance=None if ctx.guidance is None else ctx.guidance.expand(B),
                            out_tokens=ctx.tokens)  # (B, L, 4C)

    def vae_latents(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """(B, L, 4C) tokens -> the VAE's input (B, C, h, w): unpacked, batch-norm statistics undone, 2x2 patches
        unfolded."""
        h, w = self.latent_size(params.height, params.width)
        B, _, C4 = latents.shape
        z = latents.transpose(1, 2).reshape(B, C4, h // 2, w // 2)  # (B, 4C, h/2, w/2)
        mean, std = self.bn_stats(z.dtype)
        z = z * std + mean
        z = z.view(B, C4 // 4, 2, 2, h // 2, w // 2).permute(0, 1, 4, 2, 5, 3)  # (B, C, h/2, 2, w/2, 2)
        return z.reshape(B, C4 // 4, h, w)

    # ------------------------------------------------------------------------------------ reference images

    def bn_stats(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent statistics, (1, 4C, 1, 1) each: running mean and sqrt(running var + eps)."""
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(self.device, dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(self.device, dtype)
        return mean, std

    def load_reference(self, image: Any) -> torch.Tensor:
        """A reference image (path or PIL image) -> (1, 3, H', W') in [-1, 1]: checked (at least 64 px a side,
        aspect at most 8:1), scaled to at most 1024^2 pixels, cropped to multiples of 16 (diffusers' rules)."""
        image = open_input_image(image)
        try:
            self.image_processor.check_image_input(image)
        except ValueError as e:
            raise ConfigError(f"images: {e}") from e
        if image.width * image.height > REFERENCE_MAX_PIXELS:
            image = self.image_processor._resize_to_target_area(image, REFERENCE_MAX_PIXELS)
        w, h = reference_size(image)
        return self.image_processor.preprocess(image, height=h, width=w, resize_mode="crop")

    def encode_reference(self, image: Any) -> torch.Tensor:
        """A reference image -> its normalised patchified latents (1, 4C, H'/16, W'/16) in the VAE's dtype."""
        pixels = self.load_reference(image).to(self.device, self.vae_dtype)
        z = self.vae.encode(pixels).latent_dist.mode()  # (1, C, H'/8, W'/8)
        _, C, h, w = z.shape
        z = z.view(1, C, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(1, 4 * C, h // 2, w // 2)
        mean, std = self.bn_stats(z.dtype)
        return (z - mean) / std


def reference_size(image: Any) -> tuple[int, int]:
    """The (width, height) in pixels a reference image (path or PIL image) is encoded at: scaled to at most
    REFERENCE_MAX_PIXELS (as diffusers' `_resize_to_target_area` rounds), then cropped to multiples of 16. A path
    is opened for its size only (0 x 0 if it cannot be read: `load_reference` reports that)."""
    import math

    from PIL import Image

    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as im:
                w, h = im.size
        except (OSError, ValueError):
            return 0, 0
    else:
        w, h = image.size
    if w * h > REFERENCE_MAX_PIXELS:
        scale = math.sqrt(REFERENCE_MAX_PIXELS / (w * h))
        w, h = int(w * scale), int(h * scale)
    return w // 16 * 16, h // 16 * 16


def _image_key(image: Any) -> Any:
    """What identifies a reference image in a batch key: its path, or the PIL object itself."""
    return str(image) if isinstance(image, (str, Path)) else id(image)


class Flux2KleinPipeline(Flux2Pipeline):
    """FLUX.2-klein (components as dev's; text encoder Qwen3, loaded as its bare `Qwen3Model`): no guidance
    embedding. Step-distilled checkpoints (model_index.json `is_distilled`: the released klein-4B / -9B) take no
    guidance and 4 steps; base checkpoints run real classifier-free guidance with a negative prompt (default "")
    when guidance > 1, 50 steps at guidance 4 by default."""

    PIPELINE_CLASS = "Flux2KleinPipeline"
    TEXT_LAYERS = KLEIN_TEXT_LAYERS
    DISTILLED_STEPS, DISTILLED_GUIDANCE = 4, 0.0

    @classmethod
    def is_distilled(cls, components: dict[str, Any], spec_name: str | None = None) -> bool:
        if "is_distilled" in components:
            return bool(components["is_distilled"])
        return spec_name in DISTILLED_PRESETS

    @classmethod
    def sampling_defaults(cls, components: dict[str, Any]) -> tuple[int, float]:
        if cls.is_distilled(components):
            return cls.DISTILLED_STEPS, cls.DISTILLED_GUIDANCE
        return cls.DEFAULT_STEPS, cls.DEFAULT_GUIDANCE

    def make_capabilities(self, components: dict[str, Any]) -> Capabilities:
        guidance = "none" if self.is_distilled(components, self.spec.name) else "cfg"
        return Capabilities(family=f"{self.FAMILY} klein", guidance=guidance, max_input_images=MAX_REFERENCE_IMAGES)

    def tokenize(self, prompts: list[str], max_length: int | None) -> Any:
        """Each prompt as a user turn of the chat template, generation prompt on, thinking off; padded to
        max_length (None: the whole prompts, unpadded)."""
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=False)
                 for p in prompts]
        if max_length is None:
            return self.tokenizer(texts)
        return self.tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                              max_length=max_length)


# ------------------------------------------------------------------------------------------------- presets


def _spec(name: str, pipeline: str, transformer: dict[str, Any], text: tuple[str, dict[str, Any]], steps: int,
          guidance: float, tokenizer: str) -> ModelSpec:
    from ditserve.models import flux2 as m

    return ModelSpec(name=name, pipeline=pipeline, components={
        "transformer": ("Flux2Transformer2DModel", dict(transformer)),
        "vae": ("AutoencoderKLFlux2", dict(m.FLUX_2_VAE)),
        "text_encoder": text,
        "scheduler": ("FlowMatchEulerDiscreteScheduler", dict(m.FLUX_2_SCHEDULER)),
    }, default_steps=steps, default_guidance=guidance, default_height=1024, default_width=1024,
        max_sequence_length=MAX_SEQUENCE_LENGTH, tokenizers={"tokenizer": tokenizer})


# Mistral-Small-3.2-24B's language model (the vision tower is never built), as FLUX.2-dev's text_encoder config.
MISTRAL_SMALL_TEXT: dict[str, Any] = {
    "vocab_size": 131072, "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-05, "rope_theta": 1000000000.0, "sliding_window": None,
    "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
}


def _qwen3(hidden: int, ffn: int, tied: bool) -> dict[str, Any]:
    return {"vocab_size": 151936, "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
            "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
            "attention_bias": False, "tie_word_embeddings": tied, "bos_token_id": 151643, "eos_token_id": 151645}


def _presets() -> dict[str, ModelSpec]:
    from ditserve.models import flux2 as m

    qwen_tok, mistral_tok = ("ditserve.testing:make_tiny_qwen_tokenizer",
                             "ditserve.testing_flux2:make_tiny_mistral_tokenizer")
    return {
        "flux.2-dev": _spec("flux.2-dev", "Flux2Pipeline", m.FLUX_2_DEV_TRANSFORMER,
                            ("Mistral3ForConditionalGeneration", dict(MISTRAL_SMALL_TEXT)), 50, 4.0, mistral_tok),
        "flux.2-klein-4b": _spec("flux.2-klein-4b", "Flux2KleinPipeline", m.FLUX_2_KLEIN_4B_TRANSFORMER,
                                 ("Qwen3ForCausalLM", _qwen3(2560, 9728, True)), 4, 0.0, qwen_tok),
        "flux.2-klein-9b": _spec("flux.2-klein-9b", "Flux2KleinPipeline", m.FLUX_2_KLEIN_9B_TRANSFORMER,
                                 ("Qwen3ForCausalLM", _qwen3(4096, 12288, False)), 4, 0.0, qwen_tok),
    }


# --load-format dummy presets: the released checkpoints' configs (the klein presets are the step-distilled
# FLUX.2-klein-4B / -9B). A dummy build has no tokenizer files: tiny offline tokenizers whose ids are valid in the
# real vocabularies stand in.
DISTILLED_PRESETS = frozenset({"flux.2-klein-4b", "flux.2-klein-9b"})
_PRESETS = _presets()
FLUX_2_DEV, FLUX_2_KLEIN_4B, FLUX_2_KLEIN_9B = (_PRESETS[k] for k in ("flux.2-dev", "flux.2-klein-4b",
                                                                       "flux.2-klein-9b"))
