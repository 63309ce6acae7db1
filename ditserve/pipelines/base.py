"""What every family's pipeline shares: engine features, the denoise loop, batching, timings and VAE decode.

    requests -> resolve -> encode_prompt -> prepare_latents -> timesteps -> denoise (predict, CFG) -> decode -> Output

A family subclasses `Pipeline` and implements only what is its own (see docs/adding-a-family.md):

    FAMILY, PIPELINE_CLASS, DIT_CLASS, REQUIRED_COMPONENTS   its names and the components it needs
    checkpoint_spec(name, components) its ModelSpec: sampling defaults from the checkpoint (`spec_for` gives a
                                      preset's for a preset name)
    setup(components)                 bind its components; set `self.transformer` and `self.vae`
    capabilities                      what it accepts (guidance kind, sizes, inputs, ...), `engine.request`
    encode_prompt(prompts, params)    P prompts -> its text conditioning object with P rows
    select_text(text, rows)           the rows `rows` (a list of indices) of a text conditioning object
    prepare_latents(n, params)        the initial noise of n outputs for params.seed (diffusers' draw)
    timesteps(params, latents)        a `Timesteps` (the schedule and a fresh scheduler)
    begin_denoise(latents, text, schedule, params)   per-request constants of the model calls (any object)
    predict(x, i, t, text, ctx)       one model call on x (rows matching text) -> the scheduler's model output
    vae_latents(latents, params)      final latents -> the VAE's input (B, C, h, w), its normalisation undone

The base does the rest, the same way for every family:

- engine features, in the order that keeps them correct: the DiT cache is mounted, then the DiT compiled
  (regionally, so the cache's per-step decision runs between compiled blocks), then the VAE set up (tiling,
  streaming, compile), then the forward bound to CUDA graphs where the engine asks for them;
- the denoise loop: classifier-free guidance with both branches in one batched forward by default
  (EngineConfig.cfg_mode "batched"; "split" runs them one after the other, each with its own cache state),
  `model_for_step` as the hook where a two-expert family switches experts, a progress bar;
- batching of compatible requests (equal `batch_key`), per-request noise from each request's own seed, stage
  timings, peak memory, the dummy-run mode of warmups (no VAE decode, `ditserve.dummy_run`);
- the VAE decode paths: whole, tiled (`vae_tiling`), streamed in strips of rows (`vae_streaming`) and compiled
  (`compile_vae`), for any VAE they fit, and the conversion to uint8 as diffusers' image processor rounds.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ditserve.config import MIN_SIZE, SIZE_MULTIPLE, EngineConfig, ModelSpec, SamplingParams
from ditserve.cuda_graphs import (AUTO_MAX_TOKENS, GraphedBlocks, GraphedForward, GraphedModule,
                                  resolve_cuda_graphs)
from ditserve.dummy_run import in_dummy_run
from ditserve.engine.request import Capabilities, Output
from ditserve.errors import ConfigError
from ditserve.logging import init_logger
from ditserve.parallel.cfg import cfg_state, gather_branches, shared_seed
from ditserve.pipelines.vae_decode import streamed_decode, streamed_decode_unsupported

logger = init_logger(__name__)

# The torch.compile backend of EngineConfig.compile_vae (tests use "eager": inductor's CPU compile of a VAE is slow).
VAE_COMPILE_BACKEND = "inductor"
# Tiled VAE decode (EngineConfig.vae_tiling): tiles of VAE_TILE x VAE_TILE pixels (or the VAE's natural size if
# smaller) overlapping by a quarter and blended, diffusers' AutoencoderKL.tiled_decode. "auto" tiles images of
# more than VAE_AUTO_TILE_PIXELS: a model at its native 1024x1024 decodes whole, as in diffusers.
VAE_TILE = 512
VAE_AUTO_TILE_PIXELS = 1024 * 1024


@dataclass
class Timesteps:
    """The sampling schedule and the scheduler instance (stateful: one per request) that steps it."""

    timesteps: torch.Tensor  # (N,) float32 in [0, 1000], on the device
    scheduler: Any  # a diffusers scheduler with set_timesteps and set_begin_index(0) done


def open_input_image(image: Any) -> Any:
    """An input image (an entry of `SamplingParams.images`: a PIL image, or a path to one) as a loaded PIL image
    in its own mode; a ConfigError names what failed."""
    from pathlib import Path

    from PIL import Image, UnidentifiedImageError

    if isinstance(image, Image.Image):
        return image
    if not isinstance(image, (str, Path)):
        raise ConfigError(f"images: each input image must be a PIL image or a file path, got {type(image).__name__}")
    try:
        with Image.open(image) as img:
            img.load()
            return img
    except FileNotFoundError:
        raise ConfigError(f"images: cannot read {str(image)!r}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ConfigError(f"images: cannot read {str(image)!r}: not an image Pillow can read ({e})") from None


def default_image_size(vae_sample_size: int | None) -> int:
    """A checkpoint's default image side: its VAE's natural size (config sample_size; 1024 for FLUX.1's VAE,
    smaller for tiny test models), rounded down to a multiple of 16, at least 64."""
    size = int(vae_sample_size or 1024)
    return max(size - size % SIZE_MULTIPLE, MIN_SIZE)


def config_dict(config: Any) -> dict[str, Any]:
    """A component's config as a plain dict (diffusers/transformers configs, or our dataclass configs)."""
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


def _checkpoint_class(component: Any) -> str:
    """The model_index.json class name a component was loaded as (`ditserve.native`'s carry it)."""
    return getattr(component, "CHECKPOINT_CLASS", type(component).__name__)


def module_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def compile_vae_decoder(vae) -> None:
    """EngineConfig.compile_vae: the VAE's weights channels-last and its decoder compiled in place (compiling
    happens at the first decode). Measured by bench/flux_levers.py vae_channels_last_compiled."""
    from ditserve.compile import set_process_compiler_flags

    set_process_compiler_flags()
    vae.to(memory_format=torch.channels_last)
    vae.decoder.compile(backend=VAE_COMPILE_BACKEND)


def synchronizer(device: torch.device) -> Callable[[], None]:
    """The function that waits for `device`'s queued work (a no-op on CPU). Bound once, for stage timings."""
    module = getattr(torch, device.type, None)
    sync = getattr(module, "synchronize", None)
    if sync is None:
        return lambda: None
    if device.type == "cpu":
        return sync
    return lambda: sync(device)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images (B, 3, H, W), or videos (B, 3, F, H, W), in [-1, 1] -> (B, H, W, 3) or (B, F, H, W, 3) uint8,
    rounded as diffusers' `VaeImageProcessor.postprocess` does (denormalise and clamp in the tensor's dtype, then
    x255 in fp32; its `VideoProcessor` runs that on every frame)."""
    images = (images * 0.5 + 0.5).clamp(0, 1)  # (B, 3, [F,] H, W) in [0, 1]
    channels_last = (0, *range(2, images.ndim), 1)
    return images.permute(channels_last).float().mul(255).round().to(torch.uint8).cpu().numpy()


class Pipeline:
    """The base of every family's pipeline (see the module docstring). Built from loaded components (keys as
    in model_index.json), the engine settings and the model's spec: `Cls(components, engine, spec)`.

    After construction: `transformer` (the DiT, cache mounted and compiled as the engine asks), `forward` (what
    the denoise loop calls: the transformer, or its CUDA-graph replay), `cache` (the mounted DiT cache or
    None), `vae`, `device`, `dtype` (the DiT's compute dtype), `capabilities`, `spec`, `engine`.
    """

    #: model_index.json component names the family needs; a missing one is a ConfigError at construction.
    # Text encoders (attribute names) replayed from CUDA graphs on CUDA (`_graph_text_encoders`): a family
    # lists those whose forward has no host sync for the inputs it passes.
    GRAPHED_TEXT_ENCODERS: tuple[str, ...] = ()
    REQUIRED_COMPONENTS: tuple[str, ...] = ()
    #: the family's name, for messages.
    FAMILY = "?"
    #: the checkpoint's class names (model_index.json's `_class_name` and the DiT's), recorded in its ModelSpec.
    PIPELINE_CLASS = "?"
    DIT_CLASS = "?"

    transformer: torch.nn.Module
    vae: Any
    #: called as on_step(done, total) after each denoise step (a server's job progress); None: nothing is called.
    #: It may raise to stop the loop (a cancelled job): the exception leaves `generate_batch` as it is.
    on_step: Callable[[int, int], None] | None = None

    def __init__(self, components: dict[str, Any], engine: EngineConfig, spec: ModelSpec):
        missing = [k for k in self.REQUIRED_COMPONENTS if components.get(k) is None]
        if missing:
            raise ConfigError(f"{type(self).__name__}: missing components {missing}; needs "
                              f"{list(self.REQUIRED_COMPONENTS)}")
        self.engine = engine
        self.spec = spec
        self.device = engine.torch_device
        self.setup(components)
        self.lora = getattr(self.transformer, "lora", None)  # LoRA adapters (`ditserve.lora`), set by the loader
        for module in components.values():
            if isinstance(module, torch.nn.Module):
                module.to(self.device).eval()  # no-op where the loader already placed them
        self.dtype = module_dtype(self.transformer)
        self.vae_dtype = module_dtype(self.vae)
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
        self._setup_vae(engine)
        self._forward_tokens = 0  # the current denoise loop's forward size (`forward_tokens`), set by `denoise`
        self._block_graphs: dict[int, GraphedForward] = {}  # per transformer (id): its block ranges' graphs, if any
        self.bind_forward()
        self._graph_text_encoders()

    # ----------------------------------------------------------------------------------- family hooks

    @classmethod
    def spec_for(cls, name: str, components: dict[str, Any]) -> ModelSpec:
        """The ModelSpec of a loaded model: a preset name (e.g. "flux.1-dev") gives the preset, anything else
        the checkpoint's own defaults (`checkpoint_spec`)."""
        from ditserve.registry import PRESETS, preset

        if name in PRESETS:
            return preset(name)
        return cls.checkpoint_spec(name, components)

    @classmethod
    def checkpoint_spec(cls, name: str, components: dict[str, Any]) -> ModelSpec:
        raise NotImplementedError

    @classmethod
    def component_configs(cls, components: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
        """ModelSpec.components of a checkpoint: each required component but the tokenizers (diffusers names them
        tokenizer, tokenizer_2, ...) -> (its checkpoint class name: the DiT's diffusers name, not our module's; its
        config)."""
        return {k: (cls.DIT_CLASS if k == "transformer" else _checkpoint_class(components[k]),
                    config_dict(components[k].config))
                for k in cls.REQUIRED_COMPONENTS if not k.startswith("tokenizer")}

    def setup(self, components: dict[str, Any]) -> None:
        raise NotImplementedError

    @property
    def capabilities(self) -> Capabilities:
        raise NotImplementedError

    def encode_prompt(self, prompts: list[str], params: SamplingParams) -> Any:
        raise NotImplementedError

    def select_text(self, text: Any, rows: list[int]) -> Any:
        raise NotImplementedError

    def prepare_latents(self, n: int, params: SamplingParams) -> torch.Tensor:
        raise NotImplementedError

    def timesteps(self, params: SamplingParams, latents: torch.Tensor) -> Timesteps:
        raise NotImplementedError

    def begin_denoise(self, latents: torch.Tensor, text: Any, schedule: Timesteps, params: SamplingParams) -> Any:
        return None

    def predict(self, x: torch.Tensor, i: int, t: torch.Tensor, text: Any, ctx: Any) -> torch.Tensor:
        raise NotImplementedError

    def vae_latents(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        raise NotImplementedError

    def cfg_active(self, guidance: float) -> bool:
        """Whether a request with this guidance runs classifier-free guidance (two branches). Default: a
        "cfg" family with guidance > 1 (diffusers' convention); a family whose scale counts from 0 overrides."""
        return self.capabilities.guidance == "cfg" and guidance > 1

    def combine_cfg(self, cond: torch.Tensor, uncond: torch.Tensor, guidance: float) -> torch.Tensor:
        """The guided prediction from the two branches: uncond + guidance * (cond - uncond) by default."""
        return uncond + guidance * (cond - uncond)

    def model_for_step(self, i: int, t: torch.Tensor) -> None:
        """Called before step i's model calls: where a two-expert family switches `self.forward` to the expert
        of timestep t (a no-op by default)."""

    # --------------------------------------------------------------------------------- engine features

    def bind_forward(self) -> None:
        """Set `forward`, what `predict` calls: the transformer replayed from CUDA graphs
        (EngineConfig.cuda_graphs, `ditserve.cuda_graphs`) or the transformer itself. Call it again after
        changing the transformer in place (e.g. `apply_fp8`): captured graphs replay the old one."""
        graphs = resolve_cuda_graphs(self.engine.cuda_graphs, self.device,
                                     cache=None if self.cache is None else self.engine.cache_backend)
        # "auto" graphs the forwards small enough to be bound by the host's launch work (AUTO_MAX_TOKENS);
        # `denoise` records each loop's forward size in `_forward_tokens`.
        admit = (lambda: self._forward_tokens <= AUTO_MAX_TOKENS) if self.engine.cuda_graphs == "auto" else None
        # (dummy warmup runs skip the output projection: they must neither be captured nor replay a real graph)
        block_cache = getattr(self.transformer, "block_cache", None)
        if graphs and block_cache is not None:  # the cache picks block ranges per step: graph those, not the forward
            block_cache.runner = GraphedBlocks(self.transformer.run_blocks, bypass=in_dummy_run, admit=admit)
            self._block_graphs[id(self.transformer)] = block_cache.runner.graphed
        elif block_cache is not None:
            block_cache.runner = None
            self._block_graphs.pop(id(self.transformer), None)
        self.forward = (GraphedForward(self.transformer, bypass=in_dummy_run, admit=admit)
                        if graphs and block_cache is None else self.transformer)

    def _graph_text_encoders(self) -> None:
        """Replace each of GRAPHED_TEXT_ENCODERS by a CUDA-graph replay of it (`cuda_graphs` "auto" or "on", on
        CUDA; with or without a DiT cache): an eager text encoder is hundreds of small kernels launched from
        Python, so its time is the host's. One graph per (prompts, length) signature, captured at its first call
        (an encoder is not compiled: nothing to warm up first); a signature that cannot be captured (a host
        sync inside the encoder) runs as it is."""
        if self.engine.cuda_graphs == "off" or self.device.type != "cuda":
            return
        for name in self.GRAPHED_TEXT_ENCODERS:
            module = getattr(self, name, None)
            if module is not None and not isinstance(module, GraphedForward):
                setattr(self, name, GraphedModule(module, warmup=0))

    def _graphed(self) -> list[GraphedForward]:
        return [g for g in (self.forward, *self._block_graphs.values(),
                            *(getattr(self, n, None) for n in self.GRAPHED_TEXT_ENCODERS))
                if isinstance(g, GraphedForward)]

    @property
    def graph_memory_bytes(self) -> int:
        """Device memory the CUDA graphs (denoise forward, text encoders) reserve (0 without graphs)."""
        return sum(g.memory_bytes for g in self._graphed())

    def release_idle_graphs(self, seconds: float) -> int:
        """Drop CUDA graphs of shapes not run for `seconds` (a server calls this now and then); returns how many."""
        return sum(g.release_idle(seconds) for g in self._graphed())

    def forward_tokens(self, params: SamplingParams) -> int:
        """Image (or video) tokens of one output's forward, for the CUDA-graph size rule: (H/16) * (W/16) by
        default (an 8x VAE and 2x2 patches); a family with another geometry overrides it."""
        return (params.height // 16) * (params.width // 16)

    def _setup_vae(self, engine: EngineConfig) -> None:
        vae = self.vae
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vae_tiling = engine.vae_tiling
        if self.vae_tiling != "off":  # the tile geometry diffusers' tiled_decode reads (not its use_tiling switch)
            if not hasattr(vae, "tiled_decode"):
                if engine.vae_tiling == "on":
                    raise ConfigError(f"--vae-tiling on: {type(vae).__name__} has no tiled decode")
                self.vae_tiling = "off"
            else:
                tile = min(VAE_TILE, vae.config.sample_size)
                vae.tile_sample_min_size = tile
                vae.tile_latent_min_size = tile // self.vae_scale_factor
                vae.tile_overlap_factor = 0.25
        self.vae_streaming = self._resolve_vae_streaming(engine)  # before compile_vae (it checks the modules)
        if engine.compile_vae:
            compile_vae_decoder(vae)

    def _resolve_vae_streaming(self, engine: EngineConfig) -> bool:
        """EngineConfig.vae_streaming: "auto" streams on CUDA where it can, "on" wherever it can (else a
        ConfigError), "off" never."""
        if engine.vae_streaming == "off" or (engine.vae_streaming == "auto" and self.device.type != "cuda"):
            return False
        why = ("--compile-vae compiles diffusers' whole decoder instead" if engine.compile_vae
               else streamed_decode_unsupported(self.vae))
        if why and engine.vae_streaming == "on":
            raise ConfigError(f"--vae-streaming on cannot apply: {why}")
        return why is None

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """Latent (h, w) for an image size: the VAE's downsampling, rounded down to even for 2x2 patches."""
        patch = self.vae_scale_factor * 2
        return 2 * (height // patch), 2 * (width // patch)

    # ------------------------------------------------------------------------------------------ decode

    def tiled_decode(self, height: int, width: int) -> bool:
        """Whether an image of this size is decoded in tiles (EngineConfig.vae_tiling)."""
        if self.vae_tiling == "auto":
            return height * width > VAE_AUTO_TILE_PIXELS
        return self.vae_tiling == "on"

    def decode_latents(self, latents: torch.Tensor, params: SamplingParams) -> torch.Tensor:
        """Final latents -> images (B, 3, H, W) in [-1, 1] (unclamped), VAE dtype."""
        z = self.vae_latents(latents, params).to(self.vae_dtype)  # (B, C, h, w)
        if self.tiled_decode(params.height, params.width):
            return self.vae.tiled_decode(z, return_dict=False)[0]  # (B, 3, H, W)
        if self.vae_streaming:
            return streamed_decode(self.vae, z)  # (B, 3, H, W), the same, in strips of rows
        return self.vae.decode(z, return_dict=False)[0]  # (B, 3, H, W)

    def decode(self, latents: torch.Tensor, params: SamplingParams) -> np.ndarray:
        """Final latents -> (B, H, W, 3) uint8, or (B, F, H, W, 3) for a video family (whose `decode_latents`
        returns (B, 3, F, H, W))."""
        return to_uint8(self.decode_latents(latents, params))

    # ------------------------------------------------------------------------------------------ denoise

    def denoise(self, latents: torch.Tensor, text: Any, schedule: Timesteps, params: SamplingParams,
                cfg: bool, progress: bool = True) -> torch.Tensor:
        """The sampling loop over B = latents.shape[0] outputs; `text` has B rows, or 2B with `cfg` (the
        conditional rows first, then the unconditional ones). Returns the final latents. No host sync beyond
        the scheduler's and, with a cache, one per step for its decision. The cache state is reset here: one
        loop, one request (or batch)."""
        B = latents.shape[0]
        if self.cache is not None:
            self.cache.reset(len(schedule.timesteps))
        split = cfg and self.engine.cfg_mode == "split"
        # CFG parallelism (`ditserve.parallel.cfg`): this rank predicts one branch's rows, the other rank the other.
        par = cfg_state(cfg)
        self._forward_tokens = self.forward_tokens(params) * B * (2 if cfg and not split and par is None else 1)
        if par is not None:
            text = self.select_text(text, list(range(par.cfg_rank * B, (par.cfg_rank + 1) * B)))
            ctx = self.begin_denoise(latents, text, schedule, params)
        elif split:
            texts = (self.select_text(text, list(range(B))), self.select_text(text, list(range(B, 2 * B))))
            ctxs = [self.begin_denoise(latents, t, schedule, params) for t in texts]
        else:
            ctx = self.begin_denoise(latents, text, schedule, params)
        x = latents
        steps = tqdm(schedule.timesteps, desc="denoise", unit="step", disable=not progress)
        for i, t in enumerate(steps):
            self.model_for_step(i, t)
            if not cfg:
                v = self.predict(x, i, t, text, ctx)
            elif par is not None:  # this rank's branch; both gathered, every rank steps the same latents
                cond, uncond = gather_branches(self.predict(x, i, t, text, ctx), par)
                v = self.combine_cfg(cond, uncond, params.guidance)
            elif split:
                with self._branch("cond"):
                    cond = self.predict(x, i, t, texts[0], ctxs[0])
                with self._branch("uncond"):
                    uncond = self.predict(x, i, t, texts[1], ctxs[1])
                v = self.combine_cfg(cond, uncond, params.guidance)
            else:  # both branches in one forward of 2B rows
                cond, uncond = self.predict(torch.cat((x, x)), i, t, text, ctx).chunk(2)
                v = self.combine_cfg(cond, uncond, params.guidance)
            x = schedule.scheduler.step(v, t, x, return_dict=False)[0]
            if self.on_step is not None:
                self.on_step(i + 1, len(schedule.timesteps))
        return x

    def _stage_peak(self) -> int | None:
        """Peak device memory allocated since the last call (or the request's start), then the count restarts:
        one stage's peak (CUDA; None where torch does not track it)."""
        if not self._track_memory:
            return None
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return peak

    def _branch(self, key: str):
        import contextlib

        branch = getattr(self.cache, "branch", None)
        return branch(key) if branch is not None else contextlib.nullcontext()

    # ----------------------------------------------------------------------------------------- generate

    def resolve(self, params: SamplingParams) -> SamplingParams:
        """Defaults filled in, validated against the spec and the family's capabilities, and a seed drawn when
        none was given. Raises ConfigError."""
        self.capabilities.check(params)
        p = params.resolved(self.spec)
        self.capabilities.check(p)
        if p.seed is None:
            p.seed = shared_seed()  # in a parallel run, the same on every rank
        if self.lora is not None:
            p.extra["lora"] = self.lora.selection(p.extra)  # checked, normalised: ((name, weight), ...)
        elif p.extra.get("lora"):
            raise ConfigError("lora: this engine was started without LoRA adapters (--lora, --lora-mode)")
        return p

    def batch_key(self, params: SamplingParams) -> tuple:
        """What resolved requests must share to run in one denoise batch: the output size (latent shape and a
        resolution-dependent schedule), the step count, the guidance (one value per batch), whether they run
        classifier-free guidance, the text length, and the LoRA adapters selected. Prompts, negative prompts,
        seeds and num_images may differ."""
        lora = (self.lora.selection(params.extra),) if self.lora is not None else ()  # adapters never mix
        return (params.height, params.width, params.num_frames, params.fps, params.steps, params.guidance,
                params.guidance_2, params.max_sequence_length, *lora)

    @torch.inference_mode()
    def generate(self, params: SamplingParams, progress: bool = True) -> Output:
        """Run one request: len(params.prompts) * params.num_images outputs."""
        return self.generate_batch([params], progress=progress)[0]

    @torch.inference_mode()
    def generate_batch(self, requests: list[SamplingParams], progress: bool = False) -> list[Output]:
        """Run several compatible requests (equal `batch_key`) as one batch: one text-encoder call, one denoise
        loop over all their outputs, one VAE decode. Returns one Output per request, in order.

        Each request keeps the noise its seed gives alone: its rows are its own draw from its seed, and the
        draws are concatenated. Its outputs are therefore those of `generate(request)` up to the rounding of
        batched kernels. Timings and peak memory in each Output are the whole batch's. Raises ConfigError for
        an empty list or requests that differ in `batch_key`.
        """
        if not requests:
            raise ConfigError("generate_batch needs at least one request")
        ps = [self.resolve(r) for r in requests]
        keys = {self.batch_key(p) for p in ps}
        if len(keys) > 1:
            raise ConfigError(f"requests in one batch must share size, steps, guidance and text length; "
                              f"got {sorted(keys, key=repr)}")
        first = ps[0]
        if self.lora is not None:  # the batch's adapters, written into the slots in place (unfused mode)
            self.lora.activate(first.extra["lora"])
        cfg = self.cfg_active(first.guidance)
        counts = [len(p.prompts) * p.num_images for p in ps]  # outputs per request
        if self._track_memory:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._sync()
        t0 = time.perf_counter()

        # One text-encoder call for every prompt (and, with CFG, every negative prompt); then the rows of each
        # output: B conditional rows, and with CFG B unconditional ones after them.
        prompts = [s for p in ps for s in p.prompts]
        rows = [j for j, n in enumerate(p.num_images for p in ps for _ in p.prompts) for _ in range(n)]
        if cfg:
            negatives = [p.negative_prompt or "" for p in ps for _ in p.prompts]
            rows = rows + [len(prompts) + j for j in rows]
            prompts = prompts + negatives
        text = self.select_text(self.encode_prompt(prompts, first), rows)
        self._sync()
        t1 = time.perf_counter()
        peaks = {"text_encode": self._stage_peak()}

        latents = torch.cat([self.prepare_latents(n, p) for n, p in zip(counts, ps)])
        schedule = self.timesteps(first, latents)
        final = self.denoise(latents, text, schedule, first, cfg, progress=progress)
        self._sync()
        t2 = time.perf_counter()
        peaks["denoise"] = self._stage_peak()

        # A dummy run (warmup / autotune) skips the decode: its outputs are thrown away. With a compiled VAE
        # decoder it decodes once all the same (no outputs made), so that the decoder compiles in the warmup.
        if in_dummy_run():
            if self.engine.compile_vae:
                self.decode_latents(final, first)
            frame = (first.height, first.width, 3)
            if self.capabilities.output == "video":
                frame = (first.num_frames, *frame)
            frames = np.zeros((0, *frame), dtype=np.uint8)
        else:
            frames = self.decode(final, first)
        t3 = time.perf_counter()  # to_uint8 copied to the host: the device is idle
        cache_stats = None if self.cache is None else {"policy": self.cache.name, **self.cache.stats().as_dict()}

        peaks["decode"] = self._stage_peak()
        peak = max(peaks.values()) if self._track_memory else None
        timings = {"text_encode_s": t1 - t0, "denoise_s": t2 - t1, "decode_s": t3 - t2, "total_s": t3 - t0}
        outputs, start = [], 0
        for n, p in zip(counts, ps):
            outputs.append(Output(kind=self.capabilities.output, frames=frames[start:start + n],
                                  timings=dict(timings), peak_memory_bytes=peak, params=p,
                                  cache_stats=None if cache_stats is None else dict(cache_stats), fps=p.fps,
                                  stage_peak_memory_bytes=dict(peaks) if self._track_memory else None))
            start += n
        return outputs
