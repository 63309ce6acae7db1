"""The FLUX.1 text-to-image pipeline (dev and schnell), stage by stage.

    prompts -> encode_prompt -> prepare_latents -> timesteps -> denoise -> decode -> images

Numerically this is diffusers' `FluxPipeline` (0.42.x) without CFG or IP-adapters: the same tokenisation
(CLIP padded to 77 tokens and pooled; T5 padded to max_sequence_length, no attention mask), the same initial
noise for a seed (drawn on the execution device in the transformer's dtype, then packed 2x2), the same
sigmas (linspace(1, 1/N, N), resolution-dependent shift mu) and scheduler, the same VAE decode and rounding.
So a seed gives the image diffusers gives for `generator=torch.Generator(device).manual_seed(seed)`.

The stages are methods with typed inputs and outputs, so a server can run them separately (batch the
denoise loop, decode elsewhere). Notation: B = len(prompts) * num_images, T text tokens, L image tokens,
C latent channels (16), h, w latent height and width (image size / vae_scale_factor).
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ditserve.config import MIN_SIZE, SIZE_MULTIPLE, ConfigError, EngineConfig, ModelSpec, SamplingParams
from ditserve.cuda_graphs import GraphedForward, resolve_cuda_graphs
from ditserve.dummy_run import in_dummy_run
from ditserve.logging import init_logger
from ditserve.pipelines import GenerationResult, synchronizer, to_pil
from ditserve.pipelines.vae_decode import streamed_decode, streamed_decode_unsupported

logger = init_logger(__name__)

REQUIRED_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                       "scheduler")

# The torch.compile backend of EngineConfig.compile_vae (tests use "eager": inductor's CPU compile of a VAE is slow).
VAE_COMPILE_BACKEND = "inductor"
# Tiled VAE decode (EngineConfig.vae_tiling): tiles of VAE_TILE x VAE_TILE pixels (or the VAE's natural size if
# smaller) overlapping by a quarter and blended, diffusers' AutoencoderKL.tiled_decode. "auto" tiles images of
# more than VAE_AUTO_TILE_PIXELS: FLUX.1 at its native 1024x1024 decodes whole, as in diffusers.
VAE_TILE = 512
VAE_AUTO_TILE_PIXELS = 1024 * 1024


@dataclass
class PromptEmbeds:
    """Text conditioning, already repeated per image (row b belongs to prompt b // num_images)."""

    prompt_embeds: torch.Tensor  # (B, T, joint_attention_dim) T5 last hidden state, transformer dtype
    pooled_prompt_embeds: torch.Tensor  # (B, pooled_projection_dim) CLIP pooled output, transformer dtype
    text_ids: torch.Tensor  # (T, 3) RoPE positions of the text tokens: all zeros


@dataclass
class Latents:
    """Packed latents: each token is a 2x2 patch of the (C, h, w) latent image, channels-major."""

    latents: torch.Tensor  # (B, L, 4 * C), L = (h / 2) * (w / 2), transformer dtype
    img_ids: torch.Tensor  # (L, 3) RoPE positions: (0, row, col) of each patch
    height: int  # image height in pixels
    width: int  # image width in pixels


@dataclass
class Timesteps:
    """The sampling schedule and the scheduler instance (stateful: one per request) that steps it."""

    timesteps: torch.Tensor  # (N,) float32 in [0, 1000], on the device
    scheduler: Any  # a FlowMatchEulerDiscreteScheduler with set_timesteps and set_begin_index(0) done


def default_image_size(vae_sample_size: int | None) -> int:
    """A checkpoint's default image side: its VAE's natural size (config sample_size; 1024 for FLUX.1, smaller
    for tiny test models), rounded down to a multiple of 16, at least 64."""
    size = int(vae_sample_size or 1024)
    return max(size - size % SIZE_MULTIPLE, MIN_SIZE)


def default_max_sequence_length(guidance_embeds: bool, tokenizer_limit: int | None = None) -> int:
    """T5 tokens by default: 512 for guidance-distilled (FLUX.1-dev-like) models, 256 for schnell-like ones,
    never more than the T5 tokenizer's model_max_length (`tokenizer_limit`; small models may train on fewer)."""
    n = 512 if guidance_embeds else 256
    return n if tokenizer_limit is None else min(n, int(tokenizer_limit))


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent timestep shift mu: linear in the number of image tokens, base_shift at
    base_seq_len and max_shift at max_seq_len."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def _module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def _config_dict(config: Any) -> dict[str, Any]:
    """A component's config as a plain dict (diffusers/transformers configs, or our dataclass configs)."""
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


def compile_vae_decoder(vae) -> None:
    """EngineConfig.compile_vae: the VAE's weights channels-last and its decoder compiled in place (compiling
    happens at the first decode). Measured by bench/flux_levers.py vae_channels_last_compiled; the end to end
    run of bench/flux_step.py times this same function."""
    from ditserve.compile import set_process_compiler_flags

    set_process_compiler_flags()
    vae.to(memory_format=torch.channels_last)
    vae.decoder.compile(backend=VAE_COMPILE_BACKEND)


class FluxPipeline:
    """FLUX.1 text-to-image. Built from loaded components (keys as in model_index.json: transformer,
    vae, text_encoder, tokenizer, text_encoder_2, tokenizer_2, scheduler), the engine settings and the
    model's spec (sampling defaults). `generate(params)` runs a request; the stages can also be run one by one.

    The transformer is our `FluxTransformer` (or anything with its forward contract); the VAE, text encoders,
    tokenizers and scheduler are diffusers' / transformers' classes. Text-encoder outputs are cast to the
    transformer's dtype; the VAE decodes in its own dtype.
    """

    def __init__(self, components: dict[str, Any], engine: EngineConfig, spec: ModelSpec):
        missing = [k for k in REQUIRED_COMPONENTS if components.get(k) is None]
        if missing:
            raise ConfigError(f"FluxPipeline: missing components {missing}; needs {list(REQUIRED_COMPONENTS)}")
        self.engine = engine
        self.spec = spec
        self.device = engine.torch_device
        self.transformer = components["transformer"]
        self.vae = components["vae"]
        self.text_encoder = components["text_encoder"]
        self.tokenizer = components["tokenizer"]
        self.text_encoder_2 = components["text_encoder_2"]
        self.tokenizer_2 = components["tokenizer_2"]
        self.scheduler = components["scheduler"]
        for module in (self.transformer, self.vae, self.text_encoder, self.text_encoder_2):
            module.to(self.device).eval()  # no-op where the loader already placed them

        self.dtype = _module_dtype(self.transformer)  # latents and text conditioning
        self.vae_dtype = _module_dtype(self.vae)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.vae_tiling = engine.vae_tiling
        if self.vae_tiling != "off":  # the tile geometry diffusers' tiled_decode reads (not its use_tiling switch)
            tile = min(VAE_TILE, self.vae.config.sample_size)
            self.vae.tile_sample_min_size = tile
            self.vae.tile_latent_min_size = tile // self.vae_scale_factor
            self.vae.tile_overlap_factor = 0.25
        self.num_channels_latents = self.transformer.config.in_channels // 4
        self.guidance_embeds = bool(self.transformer.config.guidance_embeds)
        self.clip_max_length = self.tokenizer.model_max_length  # 77 for CLIP-L
        self._sync = synchronizer(self.device)
        self._track_memory = self.device.type == "cuda"

        # The cache is mounted before compiling (ditserve.cache): the compiled regions are then the blocks the
        # cached path calls, and a warmup with the cache on compiles exactly what requests run.
        self.cache = None
        if engine.cache:
            from ditserve.cache import mount_engine_cache

            self.cache = mount_engine_cache(self.transformer, engine)
        if engine.compile:  # regional, in place; compiling happens at the first denoise step
            from ditserve.compile import CompileConfig, compile_model

            self.transformer = compile_model(self.transformer, CompileConfig.for_engine(engine))
        self.vae_streaming = self._resolve_vae_streaming(engine)  # before compile_vae (it checks the modules)
        if engine.compile_vae:
            compile_vae_decoder(self.vae)
        self.bind_forward()

    def _resolve_vae_streaming(self, engine: EngineConfig) -> bool:
        """EngineConfig.vae_streaming: "auto" streams on CUDA where it can, "on" wherever it can (else a
        ConfigError), "off" never."""
        if engine.vae_streaming == "off":
            return False
        why = ("--compile-vae compiles diffusers' whole decoder instead" if engine.compile_vae
               else streamed_decode_unsupported(self.vae))
        if why and engine.vae_streaming == "on":
            raise ConfigError(f"--vae-streaming on cannot apply: {why}")
        return why is None and (engine.vae_streaming == "on" or self.device.type == "cuda")

    def bind_forward(self) -> None:
        """Set `forward`, what the denoise loop calls: the transformer replayed from CUDA graphs
        (EngineConfig.cuda_graphs, `ditserve.cuda_graphs`) or the transformer itself. Call it again after
        changing the transformer in place (e.g. `apply_fp8`): captured graphs replay the old one."""
        graphs = resolve_cuda_graphs(self.engine.cuda_graphs, self.device, cache=self.cache is not None,
                                     quantized=self.engine.quantization is not None)
        # (dummy warmup runs skip the output projection: they must neither be captured nor replay a real graph)
        self.forward = GraphedForward(self.transformer, bypass=in_dummy_run) if graphs else self.transformer

    # ---------------------------------------------------------------------------------------------- spec

    @staticmethod
    def spec_for(name: str, components: dict[str, Any]) -> ModelSpec:
        """The ModelSpec of a loaded FLUX.1 checkpoint.

        A preset name (e.g. "flux.1-dev") gives the preset. Otherwise defaults follow the transformer: with a
        guidance embedder (FLUX.1-dev-like) 28 steps, guidance 3.5, max_sequence_length 512; without
        (schnell-like) 4 steps, guidance 0, 256; the length is capped by the T5 tokenizer's model_max_length.
        The default size is the VAE's natural size (its config's sample_size: 1024 for FLUX.1, smaller for tiny
        test models).
        """
        from ditserve.registry import PRESETS, preset

        if name in PRESETS:
            return preset(name)
        transformer, vae = components["transformer"], components["vae"]
        guided = bool(transformer.config.guidance_embeds)
        size = default_image_size(vae.config.get("sample_size"))
        class_names = {"transformer": "FluxTransformer2DModel"}  # the checkpoint's class, not our module's
        return ModelSpec(
            name=name,
            pipeline="FluxPipeline",
            components={k: (class_names.get(k, type(components[k]).__name__), _config_dict(components[k].config))
                        for k in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler")},
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

    def encode_prompt(self, prompts: list[str], num_images: int, max_sequence_length: int) -> PromptEmbeds:
        """Prompts (P strings) -> text conditioning for B = P * num_images images."""
        clip_ids = self._tokenize(self.tokenizer, prompts, self.clip_max_length, "CLIP")  # (P, 77)
        pooled = self.text_encoder(clip_ids.to(self.device), output_hidden_states=False).pooler_output  # (P, Dp)
        t5_ids = self._tokenize(self.tokenizer_2, prompts, max_sequence_length, "T5")  # (P, T)
        embeds = self.text_encoder_2(t5_ids.to(self.device), output_hidden_states=False)[0]  # (P, T, Dj)
        return PromptEmbeds(
            prompt_embeds=embeds.to(self.dtype).repeat_interleave(num_images, dim=0),  # (B, T, Dj)
            pooled_prompt_embeds=pooled.to(self.dtype).repeat_interleave(num_images, dim=0),  # (B, Dp)
            text_ids=torch.zeros(embeds.shape[1], 3, device=self.device, dtype=self.dtype),  # (T, 3)
        )

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) for an image size: the VAE's downsampling, rounded down to even for 2x2 packing."""
        patch = self.vae_scale_factor * 2
        return 2 * (height // patch), 2 * (width // patch)

    def prepare_latents(self, batch_size: int, height: int, width: int, seed: int) -> Latents:
        """Initial noise for B images, identical to diffusers' for the same seed: one draw of shape
        (B, C, h, w) from `torch.Generator(device).manual_seed(seed)` in the transformer's dtype, then packed."""
        h, w = self.latent_size(height, width)
        C = self.num_channels_latents
        generator = torch.Generator(self.device).manual_seed(seed)
        noise = torch.randn((batch_size, C, h, w), generator=generator, device=self.device,
                            dtype=self.dtype)  # (B, C, h, w)
        return Latents(latents=pack_latents(noise), img_ids=self.latent_image_ids(h, w), height=height,
                       width=width)

    def latent_image_ids(self, h: int, w: int) -> torch.Tensor:
        """RoPE positions of the packed tokens: (L, 3) rows (0, i, j), i < h / 2, j < w / 2, row-major."""
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3).to(device=self.device, dtype=self.dtype)  # (L, 3)

    def timesteps(self, steps: int, image_seq_len: int) -> Timesteps:
        """A fresh scheduler from the checkpoint's config, set to FLUX's schedule for `steps` steps:
        sigmas linspace(1, 1/steps, steps), shifted by mu (dynamic shifting) or the configured shift."""
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

    def denoise(self, latents: Latents, text: PromptEmbeds, schedule: Timesteps, guidance: float,
                progress: bool = True) -> torch.Tensor:
        """The sampling loop: returns the final packed latents (B, L, 4C). No host sync beyond the scheduler's
        and, with a cache, one per step for its decision. The cache state is reset here: one loop, one request."""
        x = latents.latents  # (B, L, 4C)
        if self.cache is not None:
            self.cache.reset(len(schedule.timesteps))
        B = x.shape[0]
        g = torch.full((B,), guidance, device=self.device, dtype=torch.float32) if self.guidance_embeds else None
        # Every step's timestep is known now: the model's conditioning (its AdaLN modulation vectors) for all
        # steps at once, one pass over the modulation weights per request instead of one per step.
        # (steps, B): the model takes sigma in [0, 1], rounded to the latent dtype as diffusers does.
        sigmas = schedule.timesteps.to(x.dtype)[:, None].expand(-1, B) / 1000
        conditioning = self.transformer.precompute_conditioning(sigmas, text.pooled_prompt_embeds, g)
        steps = tqdm(schedule.timesteps, desc="denoise", unit="step", disable=not progress)
        for t, sigma, cond in zip(steps, sigmas, conditioning):
            velocity = self.forward(
                hidden_states=x,
                encoder_hidden_states=text.prompt_embeds,
                pooled_projections=text.pooled_prompt_embeds,
                timestep=sigma,  # (B,) in [0, 1], rounded to the latent dtype as diffusers
                img_ids=latents.img_ids,
                txt_ids=text.text_ids,
                guidance=g,
                conditioning=cond,
            )  # (B, L, 4C)
            x = schedule.scheduler.step(velocity, t, x, return_dict=False)[0]  # (B, L, 4C)
        return x

    def decode_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents (B, L, 4C) -> images (B, 3, height, width) in [-1, 1] (unclamped), VAE dtype."""
        h, w = self.latent_size(height, width)
        z = unpack_latents(latents, h, w)  # (B, C, h, w)
        z = z / self.vae.config.scaling_factor + self.vae.config.shift_factor  # undo the VAE's latent normalisation
        if self.tiled_decode(height, width):
            return self.vae.tiled_decode(z.to(self.vae_dtype), return_dict=False)[0]  # (B, 3, H, W)
        if self.vae_streaming:
            return streamed_decode(self.vae, z.to(self.vae_dtype))  # (B, 3, H, W), the same, in strips of rows
        return self.vae.decode(z.to(self.vae_dtype), return_dict=False)[0]  # (B, 3, H, W)

    def tiled_decode(self, height: int, width: int) -> bool:
        """Whether an image of this size is decoded in tiles (EngineConfig.vae_tiling)."""
        if self.vae_tiling == "auto":
            return height * width > VAE_AUTO_TILE_PIXELS
        return self.vae_tiling == "on"

    def decode(self, latents: torch.Tensor, height: int, width: int) -> list[Any]:
        """Packed latents (B, L, 4C) -> B PIL images of height x width."""
        return to_pil(self.decode_latents(latents, height, width))

    # ------------------------------------------------------------------------------------------ generate

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """Defaults filled in, validated, and a seed drawn when none was given. Raises ConfigError."""
        p = params.resolved(self.spec)
        if not self.guidance_embeds and p.guidance:
            raise ConfigError(f"{self.spec.name} has no guidance embedding (a schnell-like model): "
                              f"guidance must be 0 or unset, got {p.guidance}")
        if p.seed is None:
            p.seed = secrets.randbits(63)
        return p

    def batch_key(self, params: SamplingParams) -> tuple:
        """What resolved requests must share to run in one denoise batch: the image size (latent shape and
        the resolution-dependent schedule), the step count, the guidance (one value per batch in `denoise`) and
        the T5 length (text sequences are concatenated). Prompts, seeds and num_images may differ."""
        return (params.height, params.width, params.steps, params.guidance, params.max_sequence_length)

    @torch.inference_mode()
    def generate(self, params: SamplingParams, progress: bool = True) -> GenerationResult:
        """Run one request: len(params.prompts) * params.num_images images."""
        return self.generate_batch([params], progress=progress)[0]

    @torch.inference_mode()
    def generate_batch(self, requests: list[SamplingParams], progress: bool = False) -> list[GenerationResult]:
        """Run several compatible requests (equal `batch_key`) as one batch: one text-encoder call, one denoise
        loop over all their images, one VAE decode. Returns one result per request, in order.

        Each request keeps the noise its seed gives alone: its rows are its own (n_i, C, h, w) draw from
        `Generator(device).manual_seed(seed_i)`, and the draws are concatenated (B = sum of n_i). Its images
        are therefore those of `generate(request)` up to the rounding of batched kernels (in fp32 on CPU a rare
        pixel differs by 1/255). Timings and peak memory in each result are the whole batch's. Raises
        ConfigError for an empty list or requests that differ in `batch_key`.
        """
        if not requests:
            raise ConfigError("generate_batch needs at least one request")
        ps = [self.resolve(r) for r in requests]
        keys = {self.batch_key(p) for p in ps}
        if len(keys) > 1:
            raise ConfigError(f"requests in one batch must share size, steps, guidance and max_sequence_length; "
                              f"got {sorted(keys, key=repr)}")
        first = ps[0]
        counts = [len(p.prompts) * p.num_images for p in ps]  # images per request
        if self._track_memory:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        t0 = time.perf_counter()

        prompts = [s for p in ps for s in p.prompts]
        text = self.encode_prompt(prompts, 1, first.max_sequence_length)  # (len(prompts), ...)
        repeats = torch.tensor([p.num_images for p in ps for _ in p.prompts], device=self.device)
        text = PromptEmbeds(prompt_embeds=text.prompt_embeds.repeat_interleave(repeats, dim=0),  # (B, T, Dj)
                            pooled_prompt_embeds=text.pooled_prompt_embeds.repeat_interleave(repeats, dim=0),
                            text_ids=text.text_ids)
        self._sync()
        t1 = time.perf_counter()

        parts = [self.prepare_latents(n, first.height, first.width, p.seed) for n, p in zip(counts, ps)]
        latents = Latents(latents=torch.cat([part.latents for part in parts]),  # (B, L, 4C)
                          img_ids=parts[0].img_ids, height=first.height, width=first.width)
        schedule = self.timesteps(first.steps, latents.latents.shape[1])
        final = self.denoise(latents, text, schedule, first.guidance, progress=progress)
        self._sync()
        t2 = time.perf_counter()

        # A dummy run (warmup / autotune) skips the decode: its images are thrown away. With a compiled VAE
        # decoder it decodes once all the same (no images made), so that the decoder compiles in the warmup.
        if in_dummy_run():
            if self.engine.compile_vae:
                self.decode_latents(final, first.height, first.width)
            images = []
        else:
            images = self.decode(final, first.height, first.width)
        t3 = time.perf_counter()  # to_pil copied to the host: the device is idle
        cache_stats = None if self.cache is None else {"policy": self.cache.name, **self.cache.stats().as_dict()}

        peak = torch.cuda.max_memory_allocated(self.device) if self._track_memory else None
        timings = {"text_encode_s": t1 - t0, "denoise_s": t2 - t1, "decode_s": t3 - t2, "total_s": t3 - t0}
        results, start = [], 0
        for n, p in zip(counts, ps):
            results.append(GenerationResult(images=images[start:start + n], timings=dict(timings),
                                            peak_memory_bytes=peak, params=p,
                                            cache_stats=None if cache_stats is None else dict(cache_stats)))
            start += n
        return results


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
