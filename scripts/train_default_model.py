"""Train the packaged default model: a small FLUX.1-dev-architecture model that draws coloured shapes.

    python scripts/train_default_model.py --out /tmp/default-model            # one H100: <= 10 min
    python scripts/train_default_model.py --out /tmp/default-model --install  # after checking: package it
    python scripts/train_default_model.py --out /tmp/smoke --quick --device cpu  # smoke run: < 1 min on CPU

Prompts follow `ditserve.shapes` ("a red circle on a blue background": 8 colours, 4 shapes, 224 prompts);
the 56 held-out prompts (`ditserve.shapes.is_held_out`) are never rendered for training. Stages:

1. data: a bank of pictures of the 168 training prompts, rendered once (random position and size per picture).
2. VAE: a diffusers `AutoencoderKL` with 3 levels (64x64 RGB -> 16x16 x 4 latents), trained on the bank with
   MSE + a tiny KL term; its scaling_factor / shift_factor are then set from the bank's latent statistics
   (FLUX's convention: the DiT sees (z - shift) * scale).
3. text + DiT: a small CLIP and T5 (tokenizers from `ditserve.testing`, whole-word tokens for the grammar)
   and a FLUX.1-dev-like `FluxTransformer2DModel` (guidance embedder), trained together in one optimiser with
   rectified flow as FLUX samples it: x_s = (1 - s) x0 + s noise, target noise - x0, s logit-normal, shifted
   as the scheduler shifts it at 64 image tokens; guidance drawn at random. The text encoders are trained
   because FLUX gives text tokens no position (txt_ids are zeros): a frozen random T5 barely tells "a red
   circle on a blue background" from "a blue circle on a red background". EMA weights are saved.
4. save: a diffusers-format folder (`FluxPipeline.save_pretrained`, safetensors, weights stored in fp16 to stay
   small), read by ditserve's loader like any FLUX.1 checkpoint.
5. eval: every held-out prompt generated on CPU through ditserve's own loader and pipeline with the model's
   defaults (28 steps, guidance 3.5, 64x64; one batch per seed: seed 0 is exactly the acceptance test
   `tests/test_default_model.py`), judged by `ditserve.shapes.judge`; also the judge on VAE reconstructions
   of held-out renders, which bounds what the DiT can reach.

Writes into --out: the model folder, loss.csv + loss.png (VAE and DiT loss curves), samples.png (the held-out
prompts' images, a green frame where the judge agrees), train.json (settings, seconds per stage, final losses,
held-out accuracy, sizes, versions). Fixed seeds: a rerun gives the same data and initialisation (GPU kernels
are not bitwise deterministic, so weights agree closely, not exactly).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runs from a checkout without `pip install -e .`

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from ditserve import shapes  # noqa: E402

INSTALL_DIR = REPO / "ditserve" / "assets" / "default-model"
DOCS_DIR = REPO / "docs"
MODEL_FILES = ("model_index.json", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
               "transformer", "vae")
MAX_MODEL_BYTES = 15 * 10**6
IMAGE_SIZE = 64
LOG_EVERY = 100


@dataclass
class TrainConfig:
    """Every setting of a run (train.json records them). Defaults: the H100 run; `QUICK`: the CPU smoke run."""

    seed: int = 0
    device: str = "cuda"
    bank_size: int = 60_000  # pictures rendered for training (each of the 168 training prompts ~360 times)
    # VAE
    vae_channels: tuple[int, ...] = (32, 64, 64)  # 3 levels: 4x downsampling
    latent_channels: int = 4
    vae_steps: int = 2500
    vae_batch: int = 128
    vae_lr: float = 1e-3
    vae_kl: float = 1e-7  # weight of the KL term (summed over latent elements) against the per-pixel MSE
    # text encoders
    clip_width: int = 64  # = the DiT's pooled_projection_dim
    t5_width: int = 128  # = the DiT's joint_attention_dim
    text_layers: int = 2
    text_len: int = 32  # T5 tokens (prompts have ~10): saved as tokenizer_2's model_max_length, which caps the
    # pipeline's default (512 for FLUX.1-dev), so inference pads to what training saw at 1/16 of the cost
    # DiT
    width: int = 128  # heads x head dim
    head_dim: int = 32
    double_blocks: int = 3
    single_blocks: int = 6
    dit_steps: int = 4500
    dit_batch: int = 1024  # the step is CPU-bound (Python/launch overhead) at 256: 1024 costs +14% time per step
    dit_lr: float = 1e-3
    text_lr: float = 3e-4
    warmup: int = 300
    ema: float = 0.999
    guidance_range: tuple[float, float] = (1.0, 5.0)
    # eval
    eval_seeds: int = 2  # batches of the 56 held-out prompts (seeds 0, 1, ...), generated on CPU


QUICK = dict(device="cpu", eval_seeds=1, bank_size=1500, vae_channels=(8, 16, 16), vae_steps=30, vae_batch=16,
             clip_width=32, t5_width=32, width=64, head_dim=16, double_blocks=1, single_blocks=1, text_len=16,
             dit_steps=30, dit_batch=16, warmup=5, ema=0.9)


# ------------------------------------------------------------------------------------------------ helpers


class LossLog:
    """Loss values per stage and step; prints a progress line every LOG_EVERY steps. Losses stay on the device
    until then (reading one back every step would stall a GPU on each step)."""

    def __init__(self):
        self.rows: list[tuple[str, int, float]] = []
        self.pending: list[tuple[str, int, torch.Tensor]] = []
        self.start = time.perf_counter()
        self.stage_start: dict[str, float] = {}

    def add(self, stage: str, step: int, total: int, loss: torch.Tensor) -> None:
        now = time.perf_counter()
        self.stage_start.setdefault(stage, now)
        self.pending.append((stage, step, loss.detach().float()))
        if step % LOG_EVERY == 0 or step == total - 1:
            values = torch.stack([p[2] for p in self.pending]).tolist()
            self.rows += [(st, i, v) for (st, i, _), v in zip(self.pending, values)]
            self.pending.clear()
            recent = [r[2] for r in self.rows[-LOG_EVERY:] if r[0] == stage]
            speed = ""
            if step:
                per_step = (now - self.stage_start[stage]) / step
                speed = f" | {per_step * 1e3:.0f} ms/step, stage ends in ~{per_step * (total - 1 - step):.0f} s"
            print(f"{stage} step {step}/{total} loss {sum(recent) / len(recent):.5f}{speed} | "
                  f"{now - self.start:.0f} s", flush=True)

    def final(self, stage: str, last: int = 100) -> float:
        """Mean loss of the stage's last `last` steps."""
        values = [r[2] for r in self.rows if r[0] == stage][-last:]
        return sum(values) / len(values)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


# SDPA backends for training. cuDNN attention is left out: on the H100 (torch 2.11+cu130) the first DiT backward
# with it failed with CUBLAS_STATUS_EXECUTION_FAILED (an asynchronous fault surfacing at the next GEMM).
TRAIN_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    torch._foreach_lerp_(ema, params, 1 - decay)


# -------------------------------------------------------------------------------------------------- stages


def render_bank(cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 64, 64) uint8 images and (N,) indices into `shapes.all_specs()` (training specs only)."""
    specs = shapes.all_specs()
    train = [i for i, s in enumerate(specs) if not shapes.is_held_out(s)]
    rng = np.random.default_rng(cfg.seed)
    idx = rng.choice(train, size=cfg.bank_size)
    pixels = shapes.render_batch([specs[i] for i in idx], IMAGE_SIZE, seed=cfg.seed + 1)  # (N, 64, 64, 3) uint8
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(idx)  # (N, 3, 64, 64)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [-1, 1], as the VAE sees them."""
    return images.float() / 127.5 - 1


def build_vae(cfg: TrainConfig):
    from diffusers import AutoencoderKL

    levels = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=cfg.vae_channels, layers_per_block=1,
        latent_channels=cfg.latent_channels, norm_num_groups=8, sample_size=IMAGE_SIZE,
        use_quant_conv=False, use_post_quant_conv=False)


def train_vae(cfg: TrainConfig, images: torch.Tensor, log: LossLog, device: torch.device):
    """Train the VAE on the bank (MSE + cfg.vae_kl * KL); returns it in eval mode."""
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, cfg.vae_steps, cfg.warmup))
    gen = torch.Generator(device).manual_seed(cfg.seed + 2)
    for step in range(cfg.vae_steps):
        rows = torch.randint(len(images), (cfg.vae_batch,), generator=gen, device=device)
        x = to_unit(images[rows])  # (B, 3, 64, 64)
        with autocast(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample  # (B, 3, 64, 64)
        mse = torch.nn.functional.mse_loss(recon.float(), x)
        mean, logvar = posterior.mean.float(), posterior.logvar.float()  # (B, C, 16, 16) each
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()  # KL to N(0, 1) per image
        loss = mse + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        log.add("vae", step, cfg.vae_steps, mse)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_bank(vae, images: torch.Tensor, device: torch.device, batch: int = 1024) -> torch.Tensor:
    """Posterior means of the bank, normalised as FLUX's DiT sees them: (N, C, 16, 16), (z - shift) * scale.
    Sets the VAE config's shift_factor (mean) and scaling_factor (1 / std) from these latents."""
    z = torch.cat([vae.encode(to_unit(images[i:i + batch])).latent_dist.mode().float()
                   for i in range(0, len(images), batch)])  # (N, C, 16, 16)
    shift, scale = z.mean().item(), 1.0 / z.std().item()
    vae.register_to_config(shift_factor=round(shift, 4), scaling_factor=round(scale, 4))
    return (z - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()
def vae_reconstruction_accuracy(vae, device: torch.device, seed: int, copies: int = 2) -> float:
    """The judge's accuracy on VAE reconstructions of fresh held-out renders (prompts the VAE never saw): a
    ceiling for the whole model's accuracy, telling a VAE failure from a DiT failure."""
    specs = shapes.held_out_specs() * copies
    pixels = torch.from_numpy(shapes.render_batch(specs, IMAGE_SIZE, seed=seed)).permute(0, 3, 1, 2)
    recon = vae.decode(vae.encode(to_unit(pixels.to(device))).latent_dist.mode()).sample  # (N, 3, 64, 64)
    recon = ((recon.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return sum(shapes.judge(img).matches(s) for img, s in zip(recon, specs)) / len(specs)


def build_text_encoders(cfg: TrainConfig, tokenizer, tokenizer_2):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.clip_width, intermediate_size=4 * cfg.clip_width,
        num_hidden_layers=cfg.text_layers, num_attention_heads=max(cfg.clip_width // 32, 1),
        max_position_embeddings=tokenizer.model_max_length, hidden_act="quick_gelu", projection_dim=cfg.clip_width,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=cfg.t5_width, d_kv=32, d_ff=2 * cfg.t5_width,
        num_layers=cfg.text_layers, num_heads=max(cfg.t5_width // 32, 1), feed_forward_proj="gated-gelu",
        dropout_rate=0.0, tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0))
    return clip, t5


def build_dit(cfg: TrainConfig):
    from diffusers import FluxTransformer2DModel

    third = cfg.head_dim // 4  # RoPE axes (index, row, col) sum to the head dim, as FLUX's 16 + 56 + 56
    axes = (third, (cfg.head_dim - third) // 2, cfg.head_dim - third - (cfg.head_dim - third) // 2)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=4 * cfg.latent_channels, num_layers=cfg.double_blocks,
        num_single_layers=cfg.single_blocks, attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.width // cfg.head_dim, joint_attention_dim=cfg.t5_width,
        pooled_projection_dim=cfg.clip_width, guidance_embeds=True, axes_dims_rope=axes)


def sigma_shift(image_tokens: int) -> float:
    """exp(mu) of FLUX-dev's dynamic shifting at this many image tokens: sigma -> shift s / (1 + (shift - 1) s)."""
    from ditserve.pipelines.flux import calculate_shift
    from ditserve.testing import FLUX_DEV_SCHEDULER as S

    return math.exp(calculate_shift(image_tokens, S["base_image_seq_len"], S["max_image_seq_len"],
                                    S["base_shift"], S["max_shift"]))


def train_dit(cfg: TrainConfig, latents: torch.Tensor, spec_idx: torch.Tensor, tokenizer, tokenizer_2,
              log: LossLog, device: torch.device):
    """Train CLIP, T5 and the DiT together on the bank's latents; returns the three with their EMA weights."""
    from ditserve.pipelines.flux import pack_latents

    prompts = [s.prompt for s in shapes.all_specs()]
    clip_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids.to(device)  # (224, 77)
    t5_ids = tokenizer_2(prompts, padding="max_length", max_length=cfg.text_len, truncation=True,
                         return_tensors="pt").input_ids.to(device)  # (224, T)

    torch.manual_seed(cfg.seed + 3)
    clip, t5 = build_text_encoders(cfg, tokenizer, tokenizer_2)
    dit = build_dit(cfg)
    modules = [m.to(device).train() for m in (clip, t5, dit)]
    text_params = [p for m in (clip, t5) for p in m.parameters()]
    opt = torch.optim.AdamW([{"params": dit.parameters(), "lr": cfg.dit_lr},
                             {"params": text_params, "lr": cfg.text_lr}],
                            betas=(0.9, 0.99), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, cfg.dit_steps, cfg.warmup))
    params = [p for m in modules for p in m.parameters()]
    ema = [p.detach().clone() for p in params]

    x_all = pack_latents(latents).to(device)  # (N, 64, 4C)
    n_tok = x_all.shape[1]
    h = w = int(math.isqrt(n_tok))
    grid_y, grid_x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    img_ids = torch.stack((torch.zeros_like(grid_y), grid_y, grid_x), -1).reshape(n_tok, 3).float().to(device)  # (L, 3)
    txt_ids = torch.zeros(cfg.text_len, 3, device=device)  # (T, 3)
    shift = sigma_shift(n_tok)
    spec_idx = spec_idx.to(device)
    gen = torch.Generator(device).manual_seed(cfg.seed + 4)
    lo, hi = cfg.guidance_range
    B = cfg.dit_batch
    for step in range(cfg.dit_steps):
        rows = torch.randint(len(x_all), (B,), generator=gen, device=device)
        x0 = x_all[rows]  # (B, 64, 4C)
        prompt = spec_idx[rows]  # (B,) index into all_specs()
        noise = torch.randn(x0.shape, generator=gen, device=device)
        u = torch.sigmoid(torch.randn(B, generator=gen, device=device))  # logit-normal in (0, 1)
        s = shift * u / (1 + (shift - 1) * u)  # (B,) sigma, shifted as the scheduler shifts it
        xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
        guidance = lo + (hi - lo) * torch.rand(B, generator=gen, device=device)
        with autocast(device), sdpa_kernel(TRAIN_SDPA_BACKENDS):
            pooled = clip(clip_ids[prompt]).pooler_output  # (B, Dp)
            text = t5(t5_ids[prompt])[0]  # (B, T, Dj)
            pred = dit(hidden_states=xs, encoder_hidden_states=text, pooled_projections=pooled, timestep=s,
                       img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema_update(ema, params, min(cfg.ema, (1 + step) / (10 + step)))
        log.add("dit", step, cfg.dit_steps, loss)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return [m.eval().requires_grad_(False) for m in modules]


def save_model(out: Path, vae, clip, t5, dit, tokenizer, tokenizer_2) -> None:
    """The diffusers-format folder, every weight stored in fp16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from ditserve.testing import FLUX_DEV_SCHEDULER

    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER),
                        vae=vae.to("cpu", torch.float16), text_encoder=clip.to("cpu", torch.float16),
                        tokenizer=tokenizer, text_encoder_2=t5.to("cpu", torch.float16), tokenizer_2=tokenizer_2,
                        transformer=dit.to("cpu", torch.float16))
    pipe.save_pretrained(out, safe_serialization=True)


def evaluate(out: Path, seeds: int, text_len: int) -> tuple[list, list[list], list[list]]:
    """Generate every held-out prompt with the saved model through ditserve's loader and pipeline on CPU (what
    the acceptance test runs: the model's defaults, fp32, one batch per seed), with `text_len` T5 tokens as in
    training. Returns (specs, images per seed, judgements per seed)."""
    from ditserve.config import EngineConfig
    from ditserve.loader import load_model
    from ditserve.registry import pipeline_class

    engine = EngineConfig(device="cpu")
    loaded = load_model(str(out), engine)
    cls = pipeline_class(loaded.pipeline_class)
    pipe = cls(loaded.components, engine, cls.spec_for(loaded.name, loaded.components))
    specs = shapes.held_out_specs()
    runs = [shapes.generate_and_judge(pipe, specs, seed=seed, max_sequence_length=text_len) for seed in range(seeds)]
    return specs, [r[0] for r in runs], [r[1] for r in runs]


def held_out_record(specs: list, judgements: list[list], vae_accuracy: float) -> dict:
    """Accuracy of seed 0 (the acceptance test's batch) and of all seeds, per attribute, and seed 0's misses."""
    first = list(zip(specs, judgements[0]))
    every = [(s, j) for js in judgements for s, j in zip(specs, js)]

    def share(pairs, ok) -> float:
        return sum(ok(s, j) for s, j in pairs) / len(pairs)

    return {
        "prompts": len(specs),
        "seeds": len(judgements),
        "accuracy": share(first, lambda s, j: j.matches(s)),
        "accuracy_all_seeds": share(every, lambda s, j: j.matches(s)),
        "background_accuracy": share(every, lambda s, j: j.background == s.background),
        "colour_accuracy": share(every, lambda s, j: j.colour == s.colour),
        "shape_accuracy": share(every, lambda s, j: j.shape == s.shape),
        "vae_reconstruction_accuracy": vae_accuracy,
        "wrong": [s.prompt for s, j in first if not j.matches(s)],
    }


# ------------------------------------------------------------------------------------------------ pictures


def sample_grid(specs, images, judgements, columns: int = 8, scale: int = 2) -> Image.Image:
    """Each image (scaled up) with its prompt below it; a green frame where the judge agrees, red where not."""
    side = IMAGE_SIZE * scale
    cell_w, cell_h = side + 16, side + 40
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    for k, (spec, image, j) in enumerate(zip(specs, images, judgements)):
        x, y = (k % columns) * cell_w + 8, (k // columns) * cell_h + 4
        ok = j.matches(spec)
        draw.rectangle((x - 3, y - 3, x + side + 2, y + side + 2), fill=(40, 170, 60) if ok else (220, 40, 40))
        grid.paste(image.resize((side, side), Image.Resampling.NEAREST), (x, y))
        draw.text((x, y + side + 5), f"{spec.colour} {spec.shape}", fill="black")
        draw.text((x, y + side + 19), f"on {spec.background}", fill="black")
    return grid


def loss_plot(log: LossLog, width: int = 900, height: int = 320) -> Image.Image:
    """One panel per stage: log10(loss) against the step, with the raw values in grey and a running mean."""
    stages = sorted({r[0] for r in log.rows}, key=[r[0] for r in log.rows].index)
    img = Image.new("RGB", (width, height * len(stages)), "white")
    draw = ImageDraw.Draw(img)
    for k, stage in enumerate(stages):
        values = np.log10(np.maximum([r[2] for r in log.rows if r[0] == stage], 1e-12))
        window = max(1, min(50, len(values) // 10))  # running mean over ~a tenth of the run
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        top = k * height
        x0, y0, x1, y1 = 70, top + 30, width - 20, top + height - 40
        lo, hi = float(values.min()), float(values.max())
        hi = hi if hi > lo else lo + 1

        def xy(i, v):
            return x0 + (x1 - x0) * i / max(len(values) - 1, 1), y1 - (y1 - y0) * (v - lo) / (hi - lo)

        draw.rectangle((x0, y0, x1, y1), outline="black")
        draw.line([xy(i, v) for i, v in enumerate(values)], fill=(190, 190, 190))
        off = len(values) - len(smooth)
        draw.line([xy(i + off, v) for i, v in enumerate(smooth)], fill=(30, 70, 230), width=2)
        draw.text((x0, top + 8), f"{stage} loss (log10), {len(values)} steps, last mean {10 ** smooth[-1]:.5f}",
                  fill="black")
        for v in (lo, hi):
            draw.text((5, xy(0, v)[1] - 6), f"{10 ** v:.2e}", fill="black")
        draw.text((x0, y1 + 8), "0", fill="black")
        draw.text((x1 - 40, y1 + 8), str(len(values)), fill="black")
    return img


# -------------------------------------------------------------------------------------------------- main


def entry_bytes(path: Path) -> int:
    """A file's size, or the total size of a folder's files."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_bytes(out: Path) -> int:
    return sum(entry_bytes(out / name) for name in MODEL_FILES)


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty", "--abbrev=12"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def prepare_out(out: Path, force: bool) -> None:
    """Refuse a non-empty --out unless --force; with --force, only a previous run's folder is cleared."""
    if out.exists() and any(out.iterdir()):
        if not force:
            sys.exit(f"error: {out} is not empty (pass --force to replace a previous run there)")
        if not (out / "train.json").exists() and not (out / "model_index.json").exists():
            sys.exit(f"error: {out} holds no previous run (no train.json or model_index.json); not deleting it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def train(cfg: TrainConfig, out: Path) -> dict:
    from transformers import CLIPTokenizer, T5TokenizerFast

    from ditserve.testing import make_tiny_tokenizers

    device = torch.device(cfg.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    log, seconds = LossLog(), {}

    t = time.perf_counter()
    images, spec_idx = render_bank(cfg)
    images = images.to(device)
    seconds["render"] = time.perf_counter() - t
    print(f"rendered {len(images)} pictures of {len(set(spec_idx.tolist()))} training prompts "
          f"({seconds['render']:.1f} s)", flush=True)

    t = time.perf_counter()
    vae = train_vae(cfg, images, log, device)
    latents = encode_bank(vae, images, device)
    seconds["vae"] = time.perf_counter() - t
    vae_accuracy = vae_reconstruction_accuracy(vae, device, cfg.seed + 5)
    print(f"VAE: shift_factor {vae.config.shift_factor}, scaling_factor {vae.config.scaling_factor}, judge on "
          f"reconstructed held-out renders {vae_accuracy:.1%} ({seconds['vae']:.1f} s)", flush=True)

    make_tiny_tokenizers(out / "_tokenizers", whole_words=True, t5_max_length=cfg.text_len)
    tokenizer = CLIPTokenizer.from_pretrained(out / "_tokenizers" / "tokenizer")
    tokenizer_2 = T5TokenizerFast.from_pretrained(out / "_tokenizers" / "tokenizer_2")
    shutil.rmtree(out / "_tokenizers")
    t = time.perf_counter()
    clip, t5, dit = train_dit(cfg, latents, spec_idx, tokenizer, tokenizer_2, log, device)
    seconds["dit"] = time.perf_counter() - t

    t = time.perf_counter()
    save_model(out, vae, clip, t5, dit, tokenizer, tokenizer_2)
    specs, samples, judgements = evaluate(out, cfg.eval_seeds, cfg.text_len)
    seconds["eval"] = time.perf_counter() - t
    held_out = held_out_record(specs, judgements, vae_accuracy)
    print(f"held-out accuracy {held_out['accuracy']:.1%} (seed 0), {held_out['accuracy_all_seeds']:.1%} "
          f"({len(judgements)} seeds) ({seconds['eval']:.1f} s)", flush=True)

    with open(out / "loss.csv", "w", newline="") as f:
        csv.writer(f).writerows([("stage", "step", "loss"), *log.rows])
    loss_plot(log).save(out / "loss.png")
    sample_grid(specs, samples[0], judgements[0]).save(out / "samples.png", optimize=True)
    import diffusers
    import transformers

    return {
        "config": dataclasses.asdict(cfg),
        "seconds": {k: round(v, 1) for k, v in seconds.items()} | {"total": round(time.perf_counter() - log.start, 1)},
        "final_loss": {"vae_mse": log.final("vae"), "dit": log.final("dit")},
        "held_out": held_out,
        "bytes": {name: entry_bytes(out / name) for name in MODEL_FILES} | {"total": model_bytes(out)},
        "parameters": {name: sum(p.numel() for p in m.parameters())
                       for name, m in (("transformer", dit), ("vae", vae), ("text_encoder", clip),
                                       ("text_encoder_2", t5))},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": sys.version.split()[0]},
        "commit": git_commit(),
    }


def install(out: Path) -> None:
    """Copy a finished run's model into ditserve/assets/default-model and its record into docs/."""
    record = out / "train.json"
    if not record.is_file():
        sys.exit(f"error: {out} holds no finished run (no train.json)")
    size = model_bytes(out)
    if size > MAX_MODEL_BYTES:
        sys.exit(f"error: the model is {size} bytes, over the {MAX_MODEL_BYTES}-byte budget")
    if INSTALL_DIR.exists():
        shutil.rmtree(INSTALL_DIR)
    INSTALL_DIR.mkdir(parents=True)
    for name in MODEL_FILES:
        src = out / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, INSTALL_DIR / name)
    DOCS_DIR.mkdir(exist_ok=True)
    for name in ("loss.png", "samples.png", "train.json"):
        shutil.copy2(out / name, DOCS_DIR / f"default-model-{name}")
    print(f"installed {size} bytes into {INSTALL_DIR}; loss, samples and record into {DOCS_DIR}")


def parse_args(argv=None) -> tuple[argparse.Namespace, TrainConfig]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the model and the run's record")
    p.add_argument("--force", action="store_true", help="replace a previous run in --out")
    p.add_argument("--install", action="store_true",
                   help="train nothing: copy the finished run in --out into ditserve/assets/default-model "
                        "(and its loss, samples and train.json into docs/)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run (< 1 min)")
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "device":
            p.add_argument(flag, default=None, help="default: cuda if available, else cpu")
        elif isinstance(value, tuple):
            p.add_argument(flag, type=type(value[0]), nargs=len(value) if f.name == "guidance_range" else "+",
                           default=None, help=f"default {' '.join(map(str, value))}")
        else:
            p.add_argument(flag, type=type(value), default=None, help=f"default {value}")
    args = p.parse_args(argv)
    values = dict(QUICK) if args.quick else {}
    values.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = tuple(given) if isinstance(given, list) else given
    return args, TrainConfig(**values)


def main(argv=None) -> None:
    args, cfg = parse_args(argv)
    if args.install:
        install(args.out)
        return
    if cfg.width % cfg.head_dim:
        sys.exit(f"error: --width {cfg.width} is not a multiple of --head-dim {cfg.head_dim}")
    if cfg.eval_seeds < 1:
        sys.exit(f"error: --eval-seeds must be at least 1, got {cfg.eval_seeds}")
    prepare_out(args.out, args.force)
    print(f"training into {args.out}: {json.dumps(dataclasses.asdict(cfg))}", flush=True)
    record = train(cfg, args.out)
    (args.out / "train.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("seconds", "final_loss", "held_out", "bytes")}))


if __name__ == "__main__":
    main()
