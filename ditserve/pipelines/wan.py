"""The Wan video pipelines (Wan 2.1, Wan 2.2 with two experts; text or image to video), on the shared `Pipeline` base.

    prompts -> encode_prompt (UMT5) -> prepare_latents -> timesteps -> denoise (CFG, expert switch) -> decode -> frames

Numerically this is diffusers' `WanPipeline` (0.42.x): each prompt cleaned (ftfy where installed, HTML entities,
whitespace), tokenized to `max_sequence_length` (512) tokens, UMT5's last hidden state with the attention mask,
rows past each prompt's length zeroed (the DiT attends to all of them); the initial noise drawn in fp32 from
`torch.Generator(device).manual_seed(seed)` as (B, C, (F - 1) / 4 + 1, H / 8, W / 8); the scheduler the checkpoint
names (UniPC with flow sigmas and its flow_shift, or flow-match Euler), stepped with the raw timestep (0-1000) as
the model's input; classifier-free guidance uncond + g (cond - uncond) when g > 1, both branches in one batched
forward by default; the VAE's per-channel latents_mean/std undone before `AutoencoderKLWan`'s decoder, which runs
latent frame by latent frame with a causal cache (here each chunk of frames goes to uint8 as it comes, `decode`).
With one input image (`WanImageToVideoPipeline`, and `expand_timesteps` checkpoints): diffusers'
`WanImageToVideoPipeline` conditioning, see `WanText`.

Wan 2.2 A14B: `transformer` runs the steps whose timestep is >= boundary_ratio * 1000 with `guidance`,
`transformer_2` the rest with `guidance_2` (default: `guidance`); each expert has its own DiT-cache state per CFG
branch. Wan 2.2 TI2V-5B (`expand_timesteps`): diffusers gives every token the step's timestep, which for text to
video is the same value on every token, so the model gets it per sample (the same result, without (B, L)
modulation tensors).

Notation: B outputs, T text tokens, C latent channels, F frames (F' = (F - 1) / 4 + 1 latent frames), H x W pixels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ditserve.config import ModelSpec, SamplingParams
from ditserve.cuda_graphs import GraphedForward
from ditserve.engine.request import Capabilities
from ditserve.errors import ConfigError
from ditserve.logging import init_logger
from ditserve.pipelines.base import Pipeline, Timesteps, open_input_image, to_uint8

logger = init_logger(__name__)

# diffusers' WanPipeline defaults (its __call__): 50 steps, guidance 5, 480x832, 81 frames, 512 text tokens, and
# 16 fps (the fps its examples export with; the models were trained on 16 fps video).
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 5.0
DEFAULT_HEIGHT, DEFAULT_WIDTH = 480, 832
DEFAULT_NUM_FRAMES = 81
DEFAULT_FPS = 16.0
MAX_SEQUENCE_LENGTH = 512
# Wan2.2 TI2V-5B's own defaults (upstream wan_ti2v_5B.py): 704x1280, 121 frames at 24 fps.
TI2V_HEIGHT, TI2V_WIDTH, TI2V_NUM_FRAMES, TI2V_FPS = 704, 1280, 121, 24.0


def prompt_clean(text: str) -> str:
    """diffusers' Wan prompt cleaning: ftfy's fix_text where ftfy is installed, HTML entities unescaped twice,
    runs of whitespace collapsed to one space, stripped."""
    try:
        import ftfy
    except ImportError:
        ftfy = None
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclass
class WanText:
    """Text conditioning: UMT5's last hidden states, zero past each prompt's tokens; with an input image, the
    image condition too (one image per batch, shared by every row and both CFG branches)."""

    embeds: torch.Tensor  # (P, T, text_dim) in the transformer's dtype
    # CLIP's penultimate hidden states of the image, (1, I, image_dim) in the transformer's dtype (checkpoints
    # with an image embedder, Wan2.1 I2V), else None.
    image_embeds: torch.Tensor | None = None
    # The encoded image, fp32, or None (text to video). Wan 2.1 I2V: (1, 4 + C, F', h, w), [first-frame mask (4
    # channels: the 4 frames of latent frame 0) | the normalised latents of the video [image, zeros, ...]],
    # concatenated to the noise's channels. expand_timesteps (Wan 2.2 TI2V-5B): (1, C, 1, h, w), the normalised
    # latents of the image alone, which replace latent frame 0 (its tokens at timestep 0).
    condition: torch.Tensor | None = None


class _ExpertCaches:
    """The DiT caches of two experts seen as one by the base's denoise loop: `reset` and `branch` apply to both
    (each expert keeps its own state per CFG branch), `stats` sums them."""

    def __init__(self, *caches):
        self.caches = caches

    @property
    def name(self) -> str:
        return self.caches[0].name

    def reset(self, num_steps: int | None = None) -> None:
        for cache in self.caches:
            cache.reset(num_steps)

    @contextlib.contextmanager
    def branch(self, key: str):
        with contextlib.ExitStack() as stack:
            for cache in self.caches:
                if hasattr(cache, "branch"):
                    stack.enter_context(cache.branch(key))
            yield

    def stats(self):
        first, *rest = [c.stats() for c in self.caches]
        total = first.as_dict()
        for s in rest:
            for k, v in s.as_dict().items():
                total[k] = total.get(k, 0) + v
        return type(first)(**total)


class WanPipeline(Pipeline):
    """Wan text-to-video (components: transformer, optional transformer_2, vae, text_encoder, tokenizer,
    scheduler; pipeline options boundary_ratio and expand_timesteps, from model_index.json or the preset). The
    transformers are our `WanTransformer`; the rest are diffusers' / transformers' classes."""

    FAMILY = "Wan"
    PIPELINE_CLASS, DIT_CLASS = "WanPipeline", "WanTransformer3DModel"
    REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")

    def setup(self, components: dict[str, Any]) -> None:
        self.transformer = components["transformer"]
        self.transformer_2 = components.get("transformer_2")
        self.vae = components["vae"]
        self.text_encoder = components["text_encoder"]
        self.tokenizer = components["tokenizer"]
        self.scheduler = components["scheduler"]
        options = {**PRESET_OPTIONS.get(self.spec.name, {}), **components}
        self.boundary_ratio = options.get("boundary_ratio")
        self.expand_timesteps = bool(options.get("expand_timesteps") or False)
        if self.transformer_2 is not None and self.boundary_ratio is None:
            raise ConfigError("Wan: this checkpoint has a transformer_2 but no boundary_ratio in model_index.json, "
                              "so the second expert would never run")
        if self.boundary_ratio is not None and not 0 < float(self.boundary_ratio) < 1:
            raise ConfigError(f"Wan: boundary_ratio must be between 0 and 1, got {self.boundary_ratio}")
        self.two_experts = self.transformer_2 is not None
        # The second expert gets what the base gives the first: its own DiT cache, then regional compile.
        self.cache_2 = None
        if self.two_experts:
            if self.engine.cache:
                from ditserve.cache import mount_engine_cache

                self.cache_2 = mount_engine_cache(self.transformer_2, self.engine)
            if self.engine.compile:
                from ditserve.compile import CompileConfig, compile_model

                self.transformer_2 = compile_model(self.transformer_2, CompileConfig.for_engine(self.engine))
        # An input image: Wan2.1 I2V checkpoints (an image embedder: CLIP features too) and expand_timesteps ones
        # (Wan 2.2 TI2V-5B, text or image to video).
        from diffusers.video_processor import VideoProcessor

        c = self.transformer.config
        self.image_encoder = components.get("image_encoder")
        self.image_processor = components.get("image_processor")
        if c.image_dim is not None and (self.image_encoder is None or self.image_processor is None):
            raise ConfigError("Wan: the transformer has an image embedder (image_dim) but the checkpoint has no "
                              "image_encoder / image_processor")
        self.video_processor = VideoProcessor(vae_scale_factor=self.vae.config.scale_factor_spatial)
        self.num_channels_latents = self.vae.config.z_dim
        self.patch_size = c.patch_size
        self._capabilities = Capabilities(
            family=self.FAMILY, guidance="cfg", output="video", two_experts=self.two_experts,
            max_input_images=1 if (c.image_dim is not None or self.expand_timesteps) else 0,
            size_multiple=self.vae.config.scale_factor_spatial * max(c.patch_size[1], c.patch_size[2]),
            frame_rule=(self.vae.config.scale_factor_temporal, 1))
        self._plan: list[tuple[int, float]] = []  # per step of the current loop: (expert index, guidance)

    def __init__(self, components: dict[str, Any], engine, spec: ModelSpec):
        super().__init__(components, engine, spec)
        if self.cache_2 is not None:  # the base mounted the first expert's cache as self.cache
            self.cache = _ExpertCaches(self.cache, self.cache_2)

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    @classmethod
    def checkpoint_spec(cls, name: str, components: dict[str, Any]) -> ModelSpec:
        """The ModelSpec of a loaded Wan checkpoint (not a preset): diffusers' WanPipeline defaults (50 steps,
        guidance 5, 480x832, 81 frames, 16 fps; TI2V-5B-like checkpoints, `expand_timesteps`: 704x1280, 121 frames,
        24 fps), 512 text tokens capped by the tokenizer's model_max_length."""
        limit = getattr(components["tokenizer"], "model_max_length", None)
        ti2v = bool(components.get("expand_timesteps"))
        return ModelSpec(
            name=name, pipeline=cls.PIPELINE_CLASS, components=cls.component_configs(components),
            default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE,
            default_height=TI2V_HEIGHT if ti2v else DEFAULT_HEIGHT, default_width=TI2V_WIDTH if ti2v else DEFAULT_WIDTH,
            max_sequence_length=MAX_SEQUENCE_LENGTH if limit is None else min(MAX_SEQUENCE_LENGTH, int(limit)),
            default_num_frames=TI2V_NUM_FRAMES if ti2v else DEFAULT_NUM_FRAMES,
            default_fps=TI2V_FPS if ti2v else DEFAULT_FPS)

    # --------------------------------------------------------------------------------- engine features

    def bind_forward(self) -> None:
        """The base's binding (CUDA graphs or the transformer itself) for each expert: `_forwards[k]` is expert
        k's; `model_for_step` picks one per step."""
        first = (self.transformer, self.cache)
        caches = [self.cache] if not isinstance(self.cache, _ExpertCaches) else list(self.cache.caches)
        super().bind_forward()
        self._forwards = [self.forward]
        if self.two_experts:
            self.transformer, self.cache = self.transformer_2, caches[-1]
            try:
                super().bind_forward()
                self._forwards.append(self.forward)
            finally:
                self.transformer, self.cache = first
            self.forward = self._forwards[0]

    def _setup_vae(self, engine) -> None:
        """Wan's VAE decodes frame chunk by frame chunk with a causal cache (its own memory bound over time);
        `vae_streaming` ("auto": on a CUDA GPU) decodes its high-resolution layers in strips of rows too
        (`decode_strips`: exact, memory-lean); `vae_tiling` ("auto": above 1024x1024 pixels a frame, as for
        images) uses the VAE's own blended tiles instead (lossy). The compiled 2D decoder is an image-VAE path."""
        vae = self.vae
        self.vae_scale_factor = vae.config.scale_factor_spatial
        if engine.compile_vae:
            raise ConfigError(f"--compile-vae is not supported for {self.FAMILY}'s video VAE ({type(vae).__name__})")
        self.vae_streaming = engine.vae_streaming == "on" or (engine.vae_streaming == "auto"
                                                              and self.device.type == "cuda")
        self.vae_tiling = engine.vae_tiling

    def forward_tokens(self, params: SamplingParams) -> int:
        pt, ph, pw = self.patch_size
        s = self.vae_scale_factor
        frames = (params.num_frames - 1) // self.capabilities.frame_rule[0] + 1
        return (frames // pt) * (params.height // (s * ph)) * (params.width // (s * pw))

    # -------------------------------------------------------------------------------------------- stages

    def batch_key(self, params: SamplingParams) -> tuple:
        """The base's key plus the input image, if any (requests in one batch share it)."""
        return (*super().batch_key(params), tuple(_image_key(im) for im in params.images))

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> WanText:
        """P prompts -> (P, T, text_dim), T = max_sequence_length: UMT5's last hidden state with the attention
        mask, rows past each prompt's tokens set to zero (as diffusers pads them back). With an input image, its
        CLIP features and VAE condition too (`WanText`)."""
        texts = [prompt_clean(p) for p in prompts]
        full = max(len(ids) for ids in self.tokenizer(texts, truncation=False).input_ids)
        if full > params.max_sequence_length:
            logger.warning(f"a prompt was truncated to {params.max_sequence_length} tokens (it has {full})")
        tok = self.tokenizer(texts, padding="max_length", max_length=params.max_sequence_length, truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        ids, mask = tok.input_ids.to(self.device), tok.attention_mask.to(self.device)
        states = self.text_encoder(ids, mask).last_hidden_state  # (P, T, text_dim)
        states = states * mask.bool().unsqueeze(-1)  # zero past each prompt (right padding)
        text = WanText(embeds=states.to(self.dtype))
        if params.images:
            image = self.load_image(params.images[0])
            if self.transformer.config.image_dim is not None:
                pixels = self.image_processor(images=image, return_tensors="pt").pixel_values
                pixels = pixels.to(self.device, next(self.image_encoder.parameters()).dtype)
                hidden = self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
                text.image_embeds = hidden.to(self.dtype)  # (1, I, image_dim)
            text.condition = self.encode_condition(image, params)
        return text

    def select_text(self, text: WanText, rows: list[int]) -> WanText:
        return dataclasses.replace(text, embeds=text.embeds.index_select(0, torch.tensor(rows, device=self.device)))

    def load_image(self, image: Any):
        """A path or PIL image -> an RGB PIL image."""
        return open_input_image(image).convert("RGB")

    def encode_condition(self, image, params: SamplingParams) -> torch.Tensor:
        """The VAE condition of the input image (`WanText.condition`), fp32: the image resized to the output size
        (diffusers' VideoProcessor), VAE-encoded (its latent distribution's mode), normalised."""
        pixels = self.video_processor.preprocess(image, height=params.height, width=params.width)  # (1, 3, H, W)
        video = pixels.to(self.device, torch.float32).unsqueeze(2)  # (1, 3, 1, H, W)
        if not self.expand_timesteps:  # the image, then num_frames - 1 black frames
            video = torch.cat((video, video.new_zeros(1, 3, params.num_frames - 1, params.height, params.width)), 2)
        z = self.vae.encode(video.to(self.vae_dtype)).latent_dist.mode().float()  # (1, C, F' or 1, h, w)
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=z.device).view(shape)
        inv_std = 1.0 / torch.tensor(cfg.latents_std, device=z.device).view(shape)
        z = (z - mean) * inv_std
        if self.expand_timesteps:
            return z
        mask = torch.zeros(1, self.capabilities.frame_rule[0], *z.shape[2:], device=z.device)  # (1, 4, F', h, w)
        mask[:, :, 0] = 1  # latent frame 0 holds the 4 frames of the given image
        return torch.cat((mask, z), dim=1)

    @staticmethod
    def _first_frame_mask(x: torch.Tensor) -> torch.Tensor:
        """(1, 1, F', h, w): 0 on latent frame 0 (the image's), 1 elsewhere (expand_timesteps)."""
        mask = torch.ones(1, 1, *x.shape[2:], device=x.device, dtype=x.dtype)
        mask[:, :, 0] = 0
        return mask

    def latent_shape(self, n: int, params: SamplingParams) -> tuple[int, ...]:
        """(n, C, F', H/s, W/s) of the latents, s the VAE's spatial factor."""
        k = self.capabilities.frame_rule[0]
        s = self.vae_scale_factor
        return (n, self.num_channels_latents, (params.num_frames - 1) // k + 1, params.height // s, params.width // s)

    def prepare_latents(self, n: int, params: SamplingParams) -> torch.Tensor:
        """Initial noise for n videos, identical to diffusers' for the same seed: (n, C, F', h, w) fp32 from
        `torch.Generator(device).manual_seed(seed)`."""
        generator = torch.Generator(self.device).manual_seed(params.seed)
        return torch.randn(self.latent_shape(n, params), generator=generator, device=self.device,
                           dtype=torch.float32)

    def timesteps(self, params: SamplingParams, latents: torch.Tensor) -> Timesteps:
        """A fresh scheduler from the checkpoint's config set to `steps` steps (diffusers' call), and the plan of
        the loop: which expert and which guidance scale each step uses (host values, no device sync later)."""
        scheduler = type(self.scheduler).from_config(self.scheduler.config)
        scheduler.set_timesteps(params.steps, device=self.device)
        scheduler.set_begin_index(0)  # the step index is then known without a device->host lookup
        timesteps = scheduler.timesteps
        if self.two_experts:
            boundary = float(self.boundary_ratio) * scheduler.config.num_train_timesteps
            g2 = params.guidance if params.guidance_2 is None else params.guidance_2
            self._plan = [(0, params.guidance) if t >= boundary else (1, g2) for t in timesteps.tolist()]
        else:
            self._plan = [(0, params.guidance)] * len(timesteps)
        return Timesteps(timesteps=timesteps, scheduler=scheduler)

    def model_for_step(self, i: int, t: torch.Tensor) -> None:
        expert, self._guidance = self._plan[i]
        self.forward = self._forwards[expert]

    def _graphed(self) -> list:
        """Both experts' CUDA graphs (the base sees only the current expert's `forward`): so both are reported
        and released."""
        current = super()._graphed()
        return current + [f for f in self._forwards if isinstance(f, GraphedForward) and f not in current]

    def combine_cfg(self, cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
        """uncond + g (cond - uncond), g the current expert's scale (`guidance` or `guidance_2`, set by
        `model_for_step`; the base passes the request's first scale)."""
        return uncond + self._guidance * (cond - uncond)

    def predict(self, x: torch.Tensor, i: int, t: torch.Tensor, text: WanText, ctx: Any) -> torch.Tensor:
        """x (B, C, F', h, w) fp32 -> the model's flow prediction (B, C, F', h, w) fp32 (the scheduler's input).
        The model sees the raw timestep, one per sample; with an input image, the condition (`WanText`) joins."""
        B = x.shape[0]
        timestep = t.expand(B)
        if text.condition is not None and self.expand_timesteps:  # latent frame 0 is the image's, at timestep 0
            m = self._first_frame_mask(x)
            x = (1 - m) * text.condition + m * x  # (B, C, F', h, w)
            pt, ph, pw = self.patch_size
            timestep = (m[0, 0, ::pt, ::ph, ::pw] * t).flatten().unsqueeze(0).expand(B, -1)  # (B, L)
        elif text.condition is not None:
            x = torch.cat((x, text.condition.expand(B, -1, -1, -1, -1)), dim=1)  # (B, 2C + 4, F', h, w)
        image = None if text.image_embeds is None else text.image_embeds.expand(B, -1, -1)
        out = self.forward(hidden_states=x.to(self.dtype), timestep=timestep, encoder_hidden_states=text.embeds,
                           encoder_hidden_states_image=image)
        return out.float()

    def denoise(self, latents, text, schedule, params, cfg, progress=True):
        """The base's loop; with expand_timesteps and an input image, the result's latent frame 0 is the image's."""
        x = super().denoise(latents, text, schedule, params, cfg, progress=progress)
        if text.condition is not None and self.expand_timesteps:
            m = self._first_frame_mask(x)
            x = (1 - m) * text.condition + m * x
        return x

    def vae_latents(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """latents * std + mean per channel, written as diffusers does it (latents / (1 / std) + mean)."""
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        inv_std = 1.0 / torch.tensor(cfg.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        return latents / inv_std + mean

    def decode_latents(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """Final latents -> videos (B, 3, F, H, W) in [-1, 1], VAE dtype: diffusers' `AutoencoderKLWan.decode`,
        spatially tiled where `tiled_decode` says so (the VAE's own tiles, blended: lossy)."""
        z = self.vae_latents(latents, params).to(self.vae_dtype)  # (B, C, F', h, w)
        self.vae.use_tiling = self.tiled_decode(params.height, params.width)
        try:
            return self.vae.decode(z, return_dict=False)[0]  # (B, 3, F, H, W)
        finally:  # the switch also tiles the encoder (an input image's condition): off again, as diffusers has it
            self.vae.use_tiling = False

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> np.ndarray:
        """Final latents -> (B, F, H, W, 3) uint8. Untiled, the VAE's decoder runs latent frame by latent frame
        with its causal cache, exactly as `AutoencoderKLWan.decode` does, but each chunk of output frames goes
        straight to uint8 on the host: the whole video never exists on the device (diffusers concatenates the
        chunks one by one, then clamps, and the float conversion adds more full-video copies), so the decode
        needs one chunk's activations only. Bitwise the same frames as the whole decode. Streamed
        (`vae_streaming`), the high-resolution layers also run in strips of rows (`decode_strips`)."""
        if self.tiled_decode(params.height, params.width):
            return to_uint8(self.decode_latents(latents, params))
        z = self.vae_latents(latents, params).to(self.vae_dtype)  # (B, C, F', h, w)
        frames = np.empty((z.shape[0], params.num_frames, params.height, params.width, 3), dtype=np.uint8)
        if self.vae_streaming:
            for start, row, piece in decode_strips(self.vae, z):  # (B, 3, n, rows, W)
                frames[:, start:start + piece.shape[2], row:row + piece.shape[3]] = to_uint8(piece.clamp(-1.0, 1.0))
            return frames
        start = 0
        for chunk in decode_chunks(self.vae, z):  # (B, 3, n, H, W)
            n = chunk.shape[2]
            frames[:, start:start + n] = to_uint8(chunk.clamp(-1.0, 1.0))
            start += n
        if start != params.num_frames:
            raise RuntimeError(f"the VAE decoded {start} frames, expected {params.num_frames}")
        return frames


# --------------------------------------------------------------------------------------------- image to video


class WanImageToVideoPipeline(WanPipeline):
    """Wan image-to-video: `WanPipeline` plus one input image (`SamplingParams.images`, the CLI's --image).
    Components as diffusers' `WanImageToVideoPipeline`: the T2V ones, `image_encoder` (CLIPVisionModel) and
    `image_processor` (CLIPImageProcessor) for checkpoints whose transformer has an image embedder (Wan2.1 I2V).

    As diffusers 0.42 conditions it: the image resized to the output size, VAE-encoded (the mode of its
    latent distribution) as the first frame of a video of zeros, normalised with latents_mean/std, and
    concatenated to the noise with a 4-channel first-frame mask; CLIP's penultimate hidden states of the image
    (through CLIP's own processor) feed the image cross-attention. With `expand_timesteps` (Wan 2.2 TI2V-5B) the
    image's latents replace latent frame 0 at every step instead, its tokens at timestep 0, and in the result.
    """

    PIPELINE_CLASS = "WanImageToVideoPipeline"

    def setup(self, components: dict[str, Any]) -> None:
        super().setup(components)
        self._capabilities = dataclasses.replace(self._capabilities, max_input_images=1)

    def resolve(self, params: SamplingParams) -> SamplingParams:
        if len(params.images) != 1:
            raise ConfigError(f"images: {self.FAMILY} image-to-video takes exactly one input image (--image), "
                              f"got {len(params.images)}")
        return super().resolve(params)


def _image_key(image: Any) -> Any:
    """What identifies an input image in a batch key: its path, or the PIL object itself."""
    from pathlib import Path

    return str(image) if isinstance(image, (str, Path)) else id(image)


def clip_image_processor():
    """The image processor of a `--load-format dummy` I2V preset (`ModelSpec.tokenizers`): CLIP's defaults, which
    are those of the released Wan2.1 I2V checkpoints (224 px, OpenAI's mean/std)."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor()


def decode_chunks(vae, z: torch.Tensor):
    """`AutoencoderKLWan`'s untiled decode of z (B, C, F', h, w), yielded chunk by chunk: latent frame 0 -> 1 frame,
    every later latent frame -> scale_factor_temporal frames, (B, 3, n, H, W) in the VAE's dtype, unclamped. The
    same decoder calls, in the same order, with the same causal cache as diffusers' `_decode`."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    vae.clear_cache()
    try:
        x = vae.post_quant_conv(z)
        for i in range(z.shape[2]):
            vae._conv_idx = [0]
            out = vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                              first_chunk=i == 0)
            if vae.config.patch_size is not None:  # the Wan2.2 VAE decodes 2x2 pixel patches as channels
                out = unpatchify(out, patch_size=vae.config.patch_size)
            yield out
    finally:
        vae.clear_cache()


# The largest feature map of one strip of `decode_strips`: the last up block's output for one latent frame's
# output frames. At 480x832 the Wan 2.1 VAE's is 96 channels x 4 frames x 480 x 832 in bf16 = 293 MiB a frame: in
# 3 strips, each holds about a third of what the whole frame would (see `decode_strips`).
STRIP_BYTES = 128 * 2**20


def decode_strips(vae, z: torch.Tensor, strip_bytes: int = STRIP_BYTES):
    """`AutoencoderKLWan`'s untiled decode of z (B, C, F', h, w) with the decoder's high-resolution layers run in
    horizontal strips of rows, yielded piece by piece: (first frame, first row, piece (B, 3, n, rows, W) in the
    VAE's dtype, unclamped). Exact, and why.

    Why. Decoding one latent frame at 480x832 holds several maps of 96 channels x 4 frames x 480 x 832 at once
    (each ResNet's input, its fp32 RMS-norm temporaries, the causal conv's padded copies), plus, for every conv,
    a cache of its input's last two frames (about 1.5 GiB at 480x832 for the Wan 2.1 VAE): without strips the
    decode of a 1.3B model's video needed more memory than its denoise.

    Method. The decoder is conv_in -> mid block (its attention is global over a frame, at the latent size) -> up
    blocks -> RMS norm -> SiLU -> conv_out. From the up block whose input has a quarter of the output's rows on
    (the "tail") every layer is local in space: RMS norm and SiLU act per pixel, a conv's output rows [a, b)
    need its input rows [a - k // 2, b + k // 2) (zeros beyond the border only), nearest 2x upsampling and the
    Wan 2.2 VAE's duplicating shortcut read input row r // 2, and the causal caches hold earlier frames of the
    same rows. So the tail's output rows of a strip of its input rows come out exactly when the strip enters
    with halo rows on each side (as many as the convs' zero padding at the strip's edges can reach, `need`),
    and after each stage only the rows the later stages still need are kept. The strips run one after another,
    each over every latent frame with its own causal caches, so the caches of one strip only are held; the
    head (to the tail's input, a few percent of the work) is recomputed per strip.

    Exactness. Every output value comes from the same operations on the same values as in the whole decode;
    only a conv's kernel may differ with the strip's shape (tests/pipelines/test_wan_strips.py: fp32
    differences ~1e-6 of the output's scale)."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    dec = vae.decoder
    split = _tail_start(dec)
    blocks = list(dec.up_blocks[split:])
    # Stages of the tail: its up blocks, then the output (RMS norm, SiLU, conv_out). ups[j]: stage j's output
    # rows per input row; need[j]: the halo rows stage j's input needs for the rest of the tail to be exact.
    ups = [2 ** _upsamples(block) for block in blocks] + [1]
    own = [_halo_rows(block, u) for block, u in zip(blocks, ups)] + [_halo_rows(dec.conv_out, 1)]
    need = [0] * (len(ups) + 1)
    for j in reversed(range(len(ups))):
        need[j] = -(-(need[j + 1] + own[j]) // ups[j])
    # The tail's input has `rows` rows. The strips are as many as keep the last up block's output for one
    # latent frame (C_out x 4 frames x rows x width) within strip_bytes, and at least a halo tall.
    rows = z.shape[3] * 2 ** sum(_upsamples(block) for block in dec.up_blocks[:split])
    width = z.shape[4] * 2 ** sum(_upsamples(block) for block in dec.up_blocks)
    scale = int(np.prod(ups))  # the decoder's output rows per tail-input row
    row_bytes = dec.up_blocks[-1].out_dim * vae.config.scale_factor_temporal * scale * width * z.element_size()
    num_strips = max(1, min(rows // max(need[0], 1), -(-rows * row_bytes // strip_bytes)))
    bounds = [rows * k // num_strips for k in range(num_strips + 1)]
    x = vae.post_quant_conv(z)  # (B, C, F', h, w)
    for a, b in zip(bounds[:-1], bounds[1:]):
        vae.clear_cache()
        tail_cache: list = [None] * len(vae._feat_map)  # the tail's causal caches (as many slots as the decoder's)
        start = 0
        try:
            for i in range(z.shape[2]):
                vae._conv_idx = [0]
                h = _decode_head(dec, x[:, :, i:i + 1], split, vae._feat_map, vae._conv_idx, first=i == 0)
                lo, hi, s = max(a - need[0], 0), min(b + need[0], rows), 1
                h = h[:, :, :, lo:hi]  # (B, C, n, hi - lo, w): the strip and its halo
                idx = [0]
                for j, up in enumerate(ups):
                    if j < len(blocks):
                        h = blocks[j](h, feat_cache=tail_cache, feat_idx=idx, first_chunk=i == 0)
                    else:
                        h = _causal_conv(dec.conv_out, dec.nonlinearity(dec.norm_out(h)), tail_cache, idx)
                    s, lo = s * up, lo * up  # h holds rows [lo, ...) of stage j's output; keep what is needed
                    keep_lo, keep_hi = max(a * s - need[j + 1], 0), min(b * s + need[j + 1], rows * s)
                    h, lo = h[:, :, :, keep_lo - lo:keep_hi - lo], keep_lo
                if vae.config.patch_size is not None:  # the Wan2.2 VAE decodes 2x2 pixel patches as channels
                    h = unpatchify(h, patch_size=vae.config.patch_size)
                yield start, a * h.shape[3] // (b - a), h  # (B, 3, n, rows of [a, b), W)
                start += h.shape[2]
        finally:
            vae.clear_cache()


def _upsamples(block) -> int:
    """1 if an up block of the Wan VAE's decoder doubles the height (WanUpBlock.upsamplers or
    WanResidualUpBlock.upsampler), else 0."""
    return int(getattr(block, "upsamplers", None) is not None or getattr(block, "upsampler", None) is not None)


def _tail_start(decoder) -> int:
    """Index of the first up block of `decode_strips`' tail: the first whose input has at least a quarter of
    the decoder's output rows (later up blocks upsample twice at most)."""
    ups = [_upsamples(b) for b in decoder.up_blocks]
    split = 0
    while sum(ups[split:]) > 2:
        split += 1
    return split


def _halo_rows(module, up: int) -> int:
    """Rows of a stage's output that its own zero padding can reach from a strip's edge: each conv with a k x k
    spatial kernel adds k // 2 rows of its own input, i.e. (k // 2) * up / s output rows where s is the upsampling
    before it (1 or up). Submodules in registration order, which is forward order in these blocks (a ResNet's
    convs, then its upsampler's nn.Upsample and conv; the Wan 2.2 shortcut has no conv)."""
    halo, s = 0, 1
    for m in module.modules():
        if isinstance(m, torch.nn.Upsample):
            s *= int(m.scale_factor[-1] if isinstance(m.scale_factor, tuple) else m.scale_factor)
        elif isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
            halo += (m.kernel_size[-2] // 2) * up // s
    return halo


def _causal_conv(conv, x: torch.Tensor, cache: list, idx: list) -> torch.Tensor:
    """One of the decoder's own causal convs (conv_in, conv_out) with its cache slot, as `WanDecoder3d.forward`
    runs it: the conv sees the cached last frames before x, and the slot keeps x's last two frames."""
    i = idx[0]
    cache_x = x[:, :, -2:].clone()
    if cache_x.shape[2] < 2 and cache[i] is not None:  # one frame: keep the previous chunk's last frame too
        cache_x = torch.cat([cache[i][:, :, -1:].to(cache_x.device), cache_x], dim=2)
    x = conv(x, cache[i])
    cache[i] = cache_x
    idx[0] += 1
    return x


def _decode_head(decoder, x: torch.Tensor, split: int, cache: list, idx: list, first: bool) -> torch.Tensor:
    """`WanDecoder3d.forward` up to (not including) up block `split`, for one latent frame x (B, C, 1, h, w)."""
    x = _causal_conv(decoder.conv_in, x, cache, idx)
    x = decoder.mid_block(x, feat_cache=cache, feat_idx=idx)
    for block in decoder.up_blocks[:split]:
        x = block(x, feat_cache=cache, feat_idx=idx, first_chunk=first)
    return x


# ------------------------------------------------------------------------------------------------ presets

# Pipeline options of the presets (a checkpoint has them in model_index.json).
PRESET_OPTIONS: dict[str, dict[str, Any]] = {
    "wan2.2-t2v-a14b": {"boundary_ratio": 0.875},
    "wan2.2-ti2v-5b": {"expand_timesteps": True},
}


def _wan_spec(name: str, transformer: dict, *, vae: dict | None = None, flow_shift: float = 3.0,
              transformer_2: dict | None = None, height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
              num_frames: int = DEFAULT_NUM_FRAMES, fps: float = DEFAULT_FPS) -> ModelSpec:
    from ditserve.models import wan as m

    components = {"transformer": ("WanTransformer3DModel", dict(transformer))}
    if transformer_2 is not None:
        components["transformer_2"] = ("WanTransformer3DModel", dict(transformer_2))
    components.update({
        "vae": ("AutoencoderKLWan", dict(vae or m.WAN21_VAE)),
        "text_encoder": ("UMT5EncoderModel", dict(m.UMT5_XXL_TEXT)),
        "scheduler": ("UniPCMultistepScheduler", m.wan_scheduler(flow_shift)),
    })
    return ModelSpec(name=name, pipeline="WanPipeline", components=components, default_steps=DEFAULT_STEPS,
                     default_guidance=DEFAULT_GUIDANCE, default_height=height, default_width=width,
                     max_sequence_length=MAX_SEQUENCE_LENGTH, default_num_frames=num_frames, default_fps=fps,
                     # --load-format dummy builds no tokenizer from a config: a tiny offline T5-style tokenizer
                     # whose ids are valid in umt5-xxl's vocabulary.
                     tokenizers={"tokenizer": "ditserve.testing_wan:make_dummy_wan_tokenizer"})


# openai/clip-vit-huge-patch14's vision tower (transformers CLIPVisionConfig), Wan2.1 I2V's image_encoder.
CLIP_VIT_H_14_VISION: dict[str, Any] = {
    "hidden_size": 1280, "intermediate_size": 5120, "projection_dim": 1024, "num_hidden_layers": 32,
    "num_attention_heads": 16, "num_channels": 3, "image_size": 224, "patch_size": 14, "hidden_act": "gelu",
    "layer_norm_eps": 1e-05, "attention_dropout": 0.0, "initializer_range": 0.02, "initializer_factor": 1.0,
}


def _presets() -> dict[str, ModelSpec]:
    from ditserve.models import wan as m

    i2v = _wan_spec("wan2.1-i2v-14b-480p", m.WAN21_I2V_14B_TRANSFORMER, flow_shift=3.0)
    i2v = dataclasses.replace(
        i2v, pipeline="WanImageToVideoPipeline",
        components={**i2v.components, "image_encoder": ("CLIPVisionModel", dict(CLIP_VIT_H_14_VISION))},
        tokenizers={**i2v.tokenizers, "image_processor": "ditserve.pipelines.wan:clip_image_processor"})
    return {
        "wan2.1-i2v-14b-480p": i2v,
        "wan2.1-t2v-1.3b": _wan_spec("wan2.1-t2v-1.3b", m.WAN21_T2V_1_3B_TRANSFORMER, flow_shift=3.0),
        "wan2.1-t2v-14b": _wan_spec("wan2.1-t2v-14b", m.WAN21_T2V_14B_TRANSFORMER, flow_shift=5.0,
                                    height=720, width=1280),
        "wan2.2-t2v-a14b": _wan_spec("wan2.2-t2v-a14b", m.WAN22_T2V_A14B_TRANSFORMER, flow_shift=3.0,
                                     transformer_2=m.WAN22_T2V_A14B_TRANSFORMER, height=720, width=1280),
        "wan2.2-ti2v-5b": _wan_spec("wan2.2-ti2v-5b", m.WAN22_TI2V_5B_TRANSFORMER, vae=m.WAN22_VAE, flow_shift=5.0,
                                    height=TI2V_HEIGHT, width=TI2V_WIDTH, num_frames=TI2V_NUM_FRAMES, fps=TI2V_FPS),
    }


_PRESETS = _presets()
# The presets for --load-format dummy and `ditserve bench`: the released checkpoints' configs.
WAN21_T2V_1_3B = _PRESETS["wan2.1-t2v-1.3b"]
WAN21_T2V_14B = _PRESETS["wan2.1-t2v-14b"]
WAN22_T2V_A14B = _PRESETS["wan2.2-t2v-a14b"]
WAN22_TI2V_5B = _PRESETS["wan2.2-ti2v-5b"]
WAN21_I2V_14B_480P = _PRESETS["wan2.1-i2v-14b-480p"]
