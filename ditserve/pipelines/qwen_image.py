"""The Qwen-Image pipelines (text-to-image; editing with one or several input images), on the shared `Pipeline` base.

    prompts (+ images) -> encode_prompt (Qwen2.5-VL) -> prepare_latents -> timesteps -> denoise (true CFG)
                       -> decode (the Qwen-Image VAE) -> images

Numerically these are diffusers' `QwenImagePipeline`, `QwenImageEditPipeline` and `QwenImageEditPlusPipeline`
(0.42.x):
- text: each prompt in the family's system template, tokenised (padded to the batch's longest, truncated at
  1024 + the template's drop), the final (normed) hidden state of `Qwen2_5_VLForConditionalGeneration`'s language
  model for the prompt's valid tokens only (by the attention mask), the template's first 34 tokens (64 for the
  edit templates) dropped, cut to max_sequence_length, right-padded with a mask (None when no row is padded). The
  text encoder is loaded as transformers' `Qwen2_5_VLModel`: no LM head; the text-to-image pipeline also drops the
  vision tower, which only an edit prompt needs;
- latents: noise drawn in fp32 from `torch.Generator(device).manual_seed(seed)` as (B, 1, C, h, w), packed into
  2x2 patches (B, h/2 * w/2, 4C); sigmas linspace(1, 1/N, N) with mu from the image's token count through the
  checkpoint's own flow-match scheduler (dynamic exponential shift, shift_terminal);
- the model sees t / 1000 computed in the model's dtype (as diffusers, whose latents have that dtype), with
  every step's AdaLN vectors computed once per request (`QwenImageTransformer.precompute_conditioning`);
- guidance is Qwen-Image's `true_cfg_scale` (ditserve's `guidance`): CFG runs when it is > 1 and a negative
  prompt is given (diffusers' rule; a request without a negative prompt runs one branch, at guidance 1), and the
  guided prediction's norm over each token's channels is rescaled to the conditional one's;
- decode: unpacked to (B, C, 1, h, w), latents * std + mean (the VAE's latents_mean / latents_std), the VAE's
  first frame;
- editing: the input image(s) are resized to the family's pixel areas (aspect kept, sides multiples of 32),
  shown to the vision-language encoder in the prompt (through the checkpoint's processor folder, read by
  `QwenVLProcessor`) and encoded by the VAE (its distribution's mode, normalised by mean / std, packed); their
  tokens follow the noise tokens in the DiT's sequence (RoPE frame k for image k) and the prediction keeps the
  noise tokens'. Without --height / --width the output takes the (last) input image's aspect at 1024 x 1024
  pixels.

Notation: B outputs, P prompts, T text tokens, C latent channels, h x w latent size, L = h/2 * w/2 tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ditserve.config import ConfigError, EngineConfig, ModelSpec, SamplingParams
from ditserve.engine.request import Capabilities
from ditserve.logging import init_logger
from ditserve.pipelines.base import Pipeline, Timesteps, config_dict, open_input_image
from ditserve.pipelines.sampling import calculate_shift

logger = init_logger(__name__)

DEFAULT_STEPS = 50  # QwenImagePipeline.__call__'s defaults
DEFAULT_GUIDANCE = 4.0  # true_cfg_scale
DEFAULT_SIZE = 1024  # default_sample_size 128 x the VAE's 8
MAX_SEQUENCE_LENGTH = 512  # __call__'s max_sequence_length (text tokens after the template's drop)
TOKENIZER_MAX_LENGTH = 1024  # the tokenizer truncates at this + the template's drop

T2I_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                "<|im_end|>\n<|im_start|>assistant\n")
T2I_DROP = 34  # the template's tokens before the prompt (diffusers' prompt_template_encode_start_idx)
_EDIT_SYSTEM = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                "objects, background), then explain how the user's text instruction should alter or modify the "
                "image. Generate a new image that meets the user's requirements while maintaining consistency with "
                "the original input where appropriate.<|im_end|>\n<|im_start|>user\n")
EDIT_TEMPLATE = _EDIT_SYSTEM + "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_PLUS_TEMPLATE = _EDIT_SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_PLUS_IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"  # one per input image
EDIT_DROP = 64

OUTPUT_AREA = 1024 * 1024  # an edit's default output size (and Edit's VAE/condition image): this area, the aspect kept
PLUS_CONDITION_AREA = 384 * 384  # Edit Plus: each image as the vision-language encoder sees it
PLUS_VAE_AREA = 1024 * 1024  # Edit Plus: each image as the VAE encodes it
MAX_EDIT_PLUS_IMAGES = 4
LANCZOS = Image.Resampling.LANCZOS  # diffusers' VaeImageProcessor resamples with Lanczos


def area_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of `area` pixels at aspect `ratio` = width / height, each rounded to a multiple of 32
    (diffusers' `calculate_dimensions`)."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def open_image(image: Any):
    """An input image (a PIL image, or a path to one) as an RGB PIL image; a ConfigError names what failed."""
    image = open_input_image(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def pack_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, C, 1, h, w) or (B, 1, C, h, w) latents -> (B, h/2 * w/2, 4C): 2x2 patches, features ordered (C, 2, 2)."""
    B, h, w = z.shape[0], z.shape[-2], z.shape[-1]
    C = z.shape[1] * z.shape[2]  # C x 1 frame, in either order
    z = z.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return z.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) -> (B, C, 1, h, w), the inverse of `pack_latents`."""
    B, _, F4 = x.shape
    x = x.view(B, h // 2, w // 2, F4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(B, F4 // 4, 1, h, w)


def to_vae_pixels(image, width: int, height: int) -> torch.Tensor:
    """A PIL image resized (Lanczos) to width x height -> (1, 3, 1, height, width) fp32 in [-1, 1] (diffusers'
    `VaeImageProcessor.preprocess`, with the frame axis the VAE takes)."""
    if image.size != (width, height):
        image = image.resize((width, height), resample=LANCZOS)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # (H, W, 3) in [0, 1]
    return (x.permute(2, 0, 1) * 2.0 - 1.0)[None, :, None]  # (1, 3, 1, H, W)


@functools.cache
def _processor_class() -> type:
    """`QwenVLProcessor`, defined on first use (it subclasses transformers' ProcessorMixin, so that the loader
    loads it from its folder as it loads processors; importing transformers for it up front would slow every
    import of this module)."""
    from transformers import BatchFeature, ProcessorMixin

    class QwenVLProcessor(ProcessorMixin):
        """A Qwen2-VL processor folder (`Qwen2VLProcessor`, Qwen-Image-Edit's `processor` component) loaded as what
        an edit prompt needs: its tokenizer and image processor, and transformers' image-token expansion (each
        <|image_pad|> becomes one token per merged patch of its image). transformers' own class also builds a
        video processor, which needs torchvision; this one needs only Pillow. Images only (no videos).

        processor(text=[...], images=[...]) -> {"input_ids", "attention_mask" (P, T), "pixel_values",
        "image_grid_thw"}: the k-th <|image_pad|> over all texts takes the k-th image, as transformers assigns them.
        """

        image_token = "<|image_pad|>"

        def __init__(self, tokenizer, image_processor):  # (not ProcessorMixin's: no video processor is built)
            self.tokenizer, self.image_processor = tokenizer, image_processor

        @classmethod
        def from_pretrained(cls, folder: str | Path, **kwargs) -> "QwenVLProcessor":
            from transformers import AutoImageProcessor, AutoTokenizer

            return cls(AutoTokenizer.from_pretrained(folder), AutoImageProcessor.from_pretrained(folder))

        def __call__(self, text: list[str], images: list | None = None, padding: bool = True,
                     return_tensors: str = "pt") -> Any:
            image_inputs = dict(self.image_processor(images=images, return_tensors="pt")) if images else {}
            grid = image_inputs.get("image_grid_thw")  # (n_images, 3): (t, h, w) patches of each image
            n_images = 0 if grid is None else len(grid)
            merge = self.image_processor.merge_size ** 2
            expanded, k = [], 0
            for t in text:
                pieces = t.split(self.image_token)
                if k + len(pieces) - 1 > n_images:
                    raise ConfigError(f"the prompts hold more {self.image_token} tokens than the {n_images} images "
                                      f"given")
                out = pieces[0]
                for piece in pieces[1:]:
                    out += self.image_token * (int(grid[k].prod()) // merge) + piece
                    k += 1
                expanded.append(out)
            tokens = self.tokenizer(expanded, padding=padding, return_tensors=return_tensors)
            return BatchFeature({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                                 **image_inputs})

    QwenVLProcessor.__module__ = __name__
    return QwenVLProcessor


def __getattr__(name: str) -> Any:
    if name == "QwenVLProcessor":  # the registry's "ditserve.pipelines.qwen_image:QwenVLProcessor"
        return _processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class QwenImageText:
    """Text conditioning: the prompts' valid hidden states (template dropped), right-padded."""

    embeds: torch.Tensor  # (P, T, D) in the transformer's dtype; row p is valid up to lens[p]
    lens: list[int]  # valid tokens of each row


@dataclass
class QwenImageStepContext:
    """Per-request constants of the model calls."""

    img_shapes: list[tuple[int, int, int]]  # (frames, h/2, w/2) of the noise, then of each input image
    mask: torch.Tensor | None  # (rows, T) bool text mask, None when no row is padded
    image_latents: torch.Tensor | None  # (1, L_in, 4C) the input images' packed latents (edit), model dtype
    conditioning: list[Any]  # per step: the DiT's timestep conditioning of `rows` rows (`precompute_conditioning`)


class QwenImagePipeline(Pipeline):
    """Qwen-Image text-to-image (components: transformer, vae, text_encoder, tokenizer, scheduler). The transformer
    is our `QwenImageTransformer`; the rest are diffusers' / transformers' classes."""

    FAMILY = "Qwen-Image"
    PIPELINE_CLASS, DIT_CLASS = "QwenImagePipeline", "QwenImageTransformer2DModel"
    REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
    TEMPLATE, DROP = T2I_TEMPLATE, T2I_DROP
    MAX_INPUT_IMAGES = 0

    def setup(self, components: dict[str, Any]) -> None:
        self.transformer = components["transformer"]
        self.vae = components["vae"]
        self.text_encoder = components["text_encoder"]
        self.tokenizer = components["tokenizer"]
        self.scheduler = components["scheduler"]
        if self.MAX_INPUT_IMAGES == 0 and getattr(self.text_encoder, "visual", None) is not None:
            self.text_encoder.visual = None  # text prompts never reach the vision tower: free it
        self.num_channels_latents = self.transformer.config.in_channels // 4
        self._capabilities = Capabilities(family=self.FAMILY, guidance="cfg", max_input_images=self.MAX_INPUT_IMAGES)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @classmethod
    def checkpoint_spec(cls, name: str, components: dict[str, Any]) -> ModelSpec:
        """The ModelSpec of a loaded checkpoint (not a preset): diffusers' defaults (50 steps, true_cfg_scale 4,
        1024 x 1024, 512 text tokens)."""
        return ModelSpec(name=name, pipeline=cls.PIPELINE_CLASS, components=cls.component_configs(components),
                         default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE, default_height=DEFAULT_SIZE,
                         default_width=DEFAULT_SIZE, max_sequence_length=MAX_SEQUENCE_LENGTH)

    def _setup_vae(self, engine: EngineConfig) -> None:
        """The Qwen-Image VAE (3-D causal convolutions, a frame axis): 8x per side (2^ its temporal downsamplings,
        as diffusers derives it), tiled decode by its own `tiled_decode` (its own tile geometry); the streamed and
        the compiled decode are AutoencoderKL-only paths."""
        self.vae_scale_factor = 2 ** len(self.vae.temperal_downsample)
        if engine.vae_streaming == "on":
            raise ConfigError(f"--vae-streaming on cannot apply: {type(self.vae).__name__} is not diffusers' "
                              f"AutoencoderKL")
        if engine.compile_vae:
            raise ConfigError(f"--compile-vae is not supported for {self.FAMILY}: its VAE "
                              f"({type(self.vae).__name__}) decodes with 3-D causal convolutions and a frame cache")
        self.vae_streaming = False
        self.vae_tiling = engine.vae_tiling

    # -------------------------------------------------------------------------------------------- stages

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """As the base, then diffusers' rule for true CFG: without a negative prompt a guidance > 1 runs one
        branch, so the request is recorded (and batched) at guidance 1. A shift_terminal schedule needs 2 steps (one
        step gives diffusers' scheduler NaN sigmas)."""
        p = super().resolve(params)
        if p.steps < 2 and self.scheduler.config.get("shift_terminal"):
            raise ConfigError(f"steps must be at least 2 for this checkpoint's schedule (its shift_terminal stretches "
                              f"the sigmas between the first and the last step), got {p.steps}")
        if p.guidance > 1 and p.negative_prompt is None:
            if params.guidance is not None:
                logger.warning(f"guidance {p.guidance} runs no classifier-free guidance without a negative prompt "
                               f"({self.FAMILY} guides only with one, as diffusers); pass --negative-prompt "
                               f"(\" \" is the model card's)")
            p.guidance = 1.0
        return p

    def _prompt_inputs(self, prompts: list[str], params: SamplingParams) -> dict[str, torch.Tensor]:
        """Tokenised prompts (the text encoder's keyword inputs) in the family's template."""
        texts = [self.TEMPLATE.format(p) for p in prompts]
        return dict(self.tokenizer(texts, max_length=TOKENIZER_MAX_LENGTH + self.DROP, padding=True,
                                   truncation=True, return_tensors="pt"))

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> QwenImageText:
        """P prompts -> their conditioning: the final hidden state of each prompt's valid tokens (by the attention
        mask), the template's first DROP tokens dropped, cut to max_sequence_length, right-padded."""
        inputs = {k: v.to(self.device) for k, v in self._prompt_inputs(prompts, params).items()}
        mask = inputs["attention_mask"].bool()  # (P, T_tok)
        states = self.text_encoder(**inputs, output_hidden_states=True).hidden_states[-1]  # (P, T_tok, D)
        valid = [row[m][self.DROP:] for row, m in zip(states, mask)]  # P x (len_p, D)
        longest = max(len(v) for v in valid)
        if longest > params.max_sequence_length:
            logger.warning(f"a prompt was truncated to {params.max_sequence_length} tokens (it has {longest})")
        valid = [v[:params.max_sequence_length] for v in valid]
        if min(len(v) for v in valid) == 0:
            raise ConfigError(f"a prompt has no tokens after {self.FAMILY}'s template (the tokenizer does not "
                              f"match the checkpoint's template)")
        embeds = torch.nn.utils.rnn.pad_sequence(valid, batch_first=True)  # (P, T, D), zero padded
        return QwenImageText(embeds=embeds.to(self.dtype), lens=[len(v) for v in valid])

    def select_text(self, text: QwenImageText, rows: list[int]) -> QwenImageText:
        index = torch.tensor(rows, device=self.device)
        return QwenImageText(embeds=text.embeds.index_select(0, index), lens=[text.lens[r] for r in rows])

    def prepare_latents(self, n: int, params: SamplingParams) -> torch.Tensor:
        """Initial noise for n images, identical to diffusers' for the same seed (drawn in fp32): (n, 1, C, h, w)
        from `torch.Generator(device).manual_seed(seed)`, packed to (n, L, 4C)."""
        h, w = self.latent_size(params.height, params.width)
        generator = torch.Generator(self.device).manual_seed(params.seed)
        noise = torch.randn((n, 1, self.num_channels_latents, h, w), generator=generator, device=self.device,
                            dtype=torch.float32)
        return pack_latents(noise)

    def timesteps(self, params: SamplingParams, latents: torch.Tensor) -> Timesteps:
        """A fresh scheduler from the checkpoint's config set to sigmas linspace(1, 1/N, N) (numpy, as diffusers)
        with mu from the image's token count."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        cfg = scheduler.config
        mu = calculate_shift(latents.shape[1], cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                             cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / params.steps, params.steps)
        scheduler.set_timesteps(sigmas=sigmas, device=self.device, mu=mu)
        scheduler.set_begin_index(0)  # the step index is then known without a device->host lookup
        return Timesteps(timesteps=scheduler.timesteps, scheduler=scheduler)

    def input_image_latents(self, params: SamplingParams) -> tuple[list[tuple[int, int, int]], torch.Tensor | None]:
        """The input images' token grids and packed latents (1, L_in, 4C) (none for text-to-image)."""
        return [], None

    def begin_denoise(self, latents: torch.Tensor, text: QwenImageText, schedule: Timesteps,
                      params: SamplingParams) -> QwenImageStepContext:
        h, w = self.latent_size(params.height, params.width)
        shapes, image_latents = self.input_image_latents(params)
        rows, T = text.embeds.shape[:2]
        mask = None
        if min(text.lens) < T:
            mask = torch.arange(T, device=self.device)[None] < torch.tensor(text.lens, device=self.device)[:, None]
        # Every step's AdaLN vectors at once: one pass over the blocks' modulation weights per request, not per step.
        # t / 1000 as diffusers computes it: t in the latents' dtype (there the prompt embeddings', i.e. the model's)
        # divided in that dtype; a bf16 model sees the same rounded timesteps as diffusers'.
        steps = (schedule.timesteps.to(self.dtype) / 1000)[:, None].expand(-1, rows)  # (N, rows)
        conditioning = self.transformer.precompute_conditioning(steps)
        return QwenImageStepContext(img_shapes=[(1, h // 2, w // 2), *shapes], mask=mask, image_latents=image_latents,
                                    conditioning=conditioning)

    def predict(self, x: torch.Tensor, i: int, t: torch.Tensor, text: QwenImageText,
                ctx: QwenImageStepContext) -> torch.Tensor:
        """x (B, L, 4C) fp32 -> the scheduler's velocity (B, L, 4C) fp32 (an edit: the input images' tokens
        ride along after the noise tokens and their prediction is dropped)."""
        B, L = x.shape[:2]
        hidden = x.to(self.dtype)
        if ctx.image_latents is not None:
            hidden = torch.cat((hidden, ctx.image_latents.expand(B, -1, -1)), dim=1)  # (B, L + L_in, 4C)
        timestep = t.expand(B).to(self.dtype) / 1000  # (B,) (the conditioning is precomputed from the same values)
        out = self.forward(hidden_states=hidden, encoder_hidden_states=text.embeds, timestep=timestep,
                           img_shapes=ctx.img_shapes, encoder_hidden_states_mask=ctx.mask,
                           conditioning=ctx.conditioning[i])  # (B, L (+ L_in), 4C)
        return out[:, :L].float()

    def combine_cfg(self, cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
        """uncond + g (cond - uncond), its norm over each token's channels rescaled to the conditional one's."""
        combined = uncond + guidance * (cond - uncond)  # (B, L, 4C)
        cond_norm = torch.norm(cond, dim=-1, keepdim=True)  # (B, L, 1)
        return combined * (cond_norm / torch.norm(combined, dim=-1, keepdim=True))

    def vae_latents(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """(B, L, 4C) -> (B, C, 1, h, w) in the VAE's dtype, x std + mean (as diffusers, in the VAE's dtype)."""
        h, w = self.latent_size(params.height, params.width)
        z = unpack_latents(latents, h, w).to(self.vae_dtype)
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        return z / inv_std + mean

    def decode_latents(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """Final latents -> images (B, 3, H, W) in [-1, 1] (unclamped), VAE dtype: the VAE's first (only) frame."""
        z = self.vae_latents(latents, params)  # (B, C, 1, h, w)
        decode = self.vae.tiled_decode if self.tiled_decode(params.height, params.width) else self.vae.decode
        return decode(z, return_dict=False)[0][:, :, 0]  # (B, 3, H, W)


class QwenImageEditPipeline(QwenImagePipeline):
    """Qwen-Image-Edit: one input image, shown to the vision-language encoder inside the prompt and encoded by the
    VAE (components: the text-to-image ones and a `Qwen2VLProcessor`)."""

    FAMILY = "Qwen-Image-Edit"
    PIPELINE_CLASS = "QwenImageEditPipeline"
    REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "processor", "scheduler")
    TEMPLATE, DROP = EDIT_TEMPLATE, EDIT_DROP
    MAX_INPUT_IMAGES = 1

    def setup(self, components: dict[str, Any]) -> None:
        super().setup(components)
        self.processor = components["processor"]

    @classmethod
    def component_configs(cls, components: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
        """As the base's, without the processor (a tokenizer and an image processor: no model config)."""
        return {k: (cls.DIT_CLASS if k == "transformer" else type(components[k]).__name__,
                    config_dict(components[k].config))
                for k in cls.REQUIRED_COMPONENTS if k not in ("tokenizer", "processor")}

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """The input images opened (RGB PIL); without a height / width, the output takes the (last) image's aspect
        at 1024 x 1024 pixels, each side a multiple of 32 (diffusers' default). An edit needs an image."""
        if not params.images:
            raise ConfigError(f"images: {self.FAMILY} edits an input image: pass one (--image PATH)")
        self.capabilities.check(params)  # (the image count, before opening any)
        images = [open_image(im) for im in params.images]
        width, height = area_dimensions(OUTPUT_AREA, images[-1].size[0] / images[-1].size[1])
        params = dataclasses.replace(params, images=images, height=params.height or height,
                                     width=params.width or width)
        return super().resolve(params)

    def warmup_request(self, params: SamplingParams) -> SamplingParams:
        """`Engine.warmup`'s request (a prompt only) with a stand-in input image: mid-grey, of the warmup's size
        (the model's default where none is given), so that the warmup runs an edit's path at that size."""
        if params.images:
            return params
        width, height = params.width or self.spec.default_width, params.height or self.spec.default_height
        return dataclasses.replace(params, images=[Image.new("RGB", (width, height), (128, 128, 128))],
                                   height=height, width=width)

    def batch_key(self, params: SamplingParams) -> tuple:
        """Requests batch only with the same input images (each request's images condition all of its rows)."""
        return super().batch_key(params) + (tuple(id(im) for im in params.images),)

    def condition_images(self, params: SamplingParams) -> list:
        """The images as the vision-language encoder sees them: Edit resizes to the output area's size."""
        image = params.images[0]
        width, height = area_dimensions(OUTPUT_AREA, image.size[0] / image.size[1])
        return [image.resize((width, height), resample=LANCZOS)]

    def vae_images(self, params: SamplingParams) -> list[torch.Tensor]:
        """The images as the VAE encodes them, (1, 3, 1, H_k, W_k) each in [-1, 1]."""
        image = params.images[0]
        width, height = area_dimensions(OUTPUT_AREA, image.size[0] / image.size[1])
        return [to_vae_pixels(image.resize((width, height), resample=LANCZOS), width, height)]

    def _prompt_inputs(self, prompts: list[str], params: SamplingParams) -> dict[str, torch.Tensor]:
        images = self.condition_images(params)
        texts = [self.TEMPLATE.format(self.image_prompt(len(images)) + p) for p in prompts]
        inputs = self.processor(text=texts, images=images * len(prompts), padding=True, return_tensors="pt")
        return {k: inputs[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}

    def image_prompt(self, n: int) -> str:
        """What goes before the prompt for n images (Edit: nothing; its template holds the image)."""
        return ""

    def input_image_latents(self, params: SamplingParams) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
        """Each image through the VAE encoder (its distribution's mode), normalised by the VAE's latents mean /
        std, packed: the token grids [(1, h_k/2, w_k/2), ...] and (1, sum L_k, 4C) in the model dtype."""
        cfg = self.vae.config
        shapes, packed = [], []
        for pixels in self.vae_images(params):
            z = self.vae.encode(pixels.to(self.device, self.vae_dtype)).latent_dist.mode()  # (1, C, 1, h, w)
            mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
            z = (z - mean) / std
            shapes.append((1, z.shape[-2] // 2, z.shape[-1] // 2))
            packed.append(pack_latents(z))  # (1, L_k, 4C)
        return shapes, torch.cat(packed, dim=1).to(self.dtype)


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    """Qwen-Image-Edit-2509 (diffusers' QwenImageEditPlusPipeline): up to MAX_EDIT_PLUS_IMAGES input images, each
    announced in the prompt ("Picture k: ..."), seen by the vision-language encoder at 384 x 384 pixels and encoded
    by the VAE at 1024 x 1024 (aspects kept)."""

    FAMILY = "Qwen-Image-Edit-Plus"
    PIPELINE_CLASS = "QwenImageEditPlusPipeline"
    TEMPLATE = EDIT_PLUS_TEMPLATE
    MAX_INPUT_IMAGES = MAX_EDIT_PLUS_IMAGES

    def image_prompt(self, n: int) -> str:
        return "".join(EDIT_PLUS_IMAGE_PROMPT.format(k + 1) for k in range(n))

    def condition_images(self, params: SamplingParams) -> list:
        out = []
        for image in params.images:
            width, height = area_dimensions(PLUS_CONDITION_AREA, image.size[0] / image.size[1])
            out.append(image.resize((width, height), resample=LANCZOS))
        return out

    def vae_images(self, params: SamplingParams) -> list[torch.Tensor]:
        out = []
        for image in params.images:
            width, height = area_dimensions(PLUS_VAE_AREA, image.size[0] / image.size[1])
            out.append(to_vae_pixels(image, width, height))
        return out


# --------------------------------------------------------------------------------------------------- presets


def _spec(name: str, pipeline: str) -> ModelSpec:
    from ditserve.models import qwen_image as m

    components = {
        "transformer": ("QwenImageTransformer2DModel", dict(m.QWEN_IMAGE_TRANSFORMER)),
        "vae": ("AutoencoderKLQwenImage", dict(m.QWEN_IMAGE_VAE)),
        "text_encoder": ("Qwen2_5_VLForConditionalGeneration", dict(m.QWEN2_5_VL_7B)),
        "scheduler": ("FlowMatchEulerDiscreteScheduler", dict(m.QWEN_IMAGE_SCHEDULER)),
    }
    # --load-format dummy builds no tokenizer / processor from a config: the tiny offline Qwen tokenizer (its ids
    # are valid in Qwen2.5-VL's vocabulary; the template's words are one token each, as with the real one).
    tokenizers = {"tokenizer": "ditserve.testing_qwen_image:make_tiny_qwen_image_tokenizer"}
    if pipeline != "QwenImagePipeline":
        tokenizers["processor"] = "ditserve.testing_qwen_image:make_tiny_qwen_image_processor"
    return ModelSpec(name=name, pipeline=pipeline, components=components, default_steps=DEFAULT_STEPS,
                     default_guidance=DEFAULT_GUIDANCE, default_height=DEFAULT_SIZE, default_width=DEFAULT_SIZE,
                     max_sequence_length=MAX_SEQUENCE_LENGTH, tokenizers=tokenizers)


# The `qwen-image` and `qwen-image-edit` presets (--load-format dummy, `ditserve bench`): Qwen/Qwen-Image's and
# Qwen/Qwen-Image-Edit's configs (the same transformer, VAE and text encoder).
QWEN_IMAGE = _spec("qwen-image", "QwenImagePipeline")
QWEN_IMAGE_EDIT = _spec("qwen-image-edit", "QwenImageEditPipeline")
