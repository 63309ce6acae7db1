"""Train a small FLUX.1-architecture model on this CPU, so DiT caching can be judged on learned dynamics.

A random-weight model has no denoising trajectory worth preserving: cached and uncached images of it are
both noise, and their PSNR says nothing about a trained FLUX. This script trains, in ~8 minutes on 2 CPU
cores (1500 steps), a FLUX-dev-like transformer (guidance embedder, dynamic-shift scheduler; 4 double + 8
single blocks, width 64) to draw procedurally generated pictures: a coloured shape (circle, square, triangle, star) on a
coloured background, described by prompts such as "a red circle on a blue background". The pictures are
made directly in the 16-channel latent space (each colour name is a fixed random 16-d latent colour), so no
VAE is trained; images are decoded by the tiny random VAE of `ditserve.testing`. Text conditioning comes from
that module's tiny random CLIP and T5 encoders: frozen, but they give each prompt a distinct embedding.

Training is rectified flow as FLUX: x_s = (1 - s) x0 + s noise, the model predicts noise - x0 at sigma s
(logit-normal sigmas, shifted as the scheduler shifts them at 64 image tokens), guidance drawn in [1, 5]
(it has nothing to learn from it, as the embedder is kept).

    python scripts/train_cache_testbed.py --out /tmp/ditserve-cache-testbed   # ~8 min on 2 cores

The result is a diffusers-format folder (model_index.json + components); nothing is written into the repo.
Fixed seeds throughout: a rerun on the same machine and torch gives the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

COLOURS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "black", "white", "gray", "brown")
SHAPES = ("circle", "square", "triangle", "star")
LATENT = 16  # latent height = width: 128x128 images through the 8x VAE, 8x8 = 64 packed image tokens
TEXT_LEN = 16  # T5 tokens used in training and in the quality bench (prompts are ~8 tokens)
ARCH = dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))


def all_prompts() -> list[str]:
    return [f"a {c} {s} on a {b} background" for c in COLOURS for s in SHAPES for b in COLOURS if b != c]


def latent_colours(seed: int = 1234) -> torch.Tensor:
    """(len(COLOURS), 16): a fixed random latent colour per name, unit variance per channel."""
    return torch.randn(len(COLOURS), 16, generator=torch.Generator().manual_seed(seed))


def _shape_mask(kind: int, cy: torch.Tensor, cx: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(B, LATENT, LATENT) soft masks in [0, 1] of shape `kind` centred at (cy, cx) with radius r (in latent
    pixels), anti-aliased over about one pixel."""
    ys = torch.arange(LATENT, dtype=torch.float32)[None, :, None] + 0.5
    xs = torch.arange(LATENT, dtype=torch.float32)[None, None, :] + 0.5
    dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
    r = r[:, None, None]
    if kind == 0:  # circle
        d = (dy**2 + dx**2).sqrt() - r
    elif kind == 1:  # square
        d = torch.maximum(dy.abs(), dx.abs()) - r * 0.85
    elif kind == 2:  # triangle, apex up
        d = torch.maximum(dy - r * 0.7, (dx.abs() * 1.7 - dy) * 0.5 - r * 0.55)
    else:  # star: radius modulated by the angle, 5 points
        ang = torch.atan2(dy, dx)
        d = (dy**2 + dx**2).sqrt() - r * (0.65 + 0.35 * torch.cos(5 * ang))
    return torch.sigmoid(-d * 2.5)


def make_batch(idx: torch.Tensor, prompts_meta: list[tuple[int, int, int]], colours: torch.Tensor,
               gen: torch.Generator) -> torch.Tensor:
    """Latent pictures (B, 16, LATENT, LATENT) for prompt indices `idx`: random position and size."""
    B = idx.numel()
    cy = LATENT * (0.3 + 0.4 * torch.rand(B, generator=gen))
    cx = LATENT * (0.3 + 0.4 * torch.rand(B, generator=gen))
    r = LATENT * (0.18 + 0.12 * torch.rand(B, generator=gen))
    out = torch.empty(B, 16, LATENT, LATENT)
    for kind in range(len(SHAPES)):
        rows = [i for i in range(B) if prompts_meta[int(idx[i])][1] == kind]
        if not rows:
            continue
        rows_t = torch.tensor(rows)
        mask = _shape_mask(kind, cy[rows_t], cx[rows_t], r[rows_t])[:, None]  # (b, 1, H, W)
        fg = colours[[prompts_meta[int(idx[i])][0] for i in rows]][:, :, None, None]  # (b, 16, 1, 1)
        bg = colours[[prompts_meta[int(idx[i])][2] for i in rows]][:, :, None, None]
        out[rows_t] = bg + (fg - bg) * mask
    return out


@torch.no_grad()
def encode_prompts(folder: Path, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, TEXT_LEN, 32) T5 states and (P, 32) CLIP pooled embeddings from the folder's tiny encoders."""
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    clip_tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    t5_tok = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder_2").eval()
    ids = clip_tok(prompts, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids
    pooled = clip(ids).pooler_output
    ids = t5_tok(prompts, padding="max_length", max_length=TEXT_LEN, truncation=True, return_tensors="pt").input_ids
    return t5(ids)[0], pooled


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, (h/2)(w/2), 4C), FLUX's 2x2 packing."""
    B, C, h, w = x.shape
    return x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) * (w // 2), 4 * C)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/tmp/ditserve-cache-testbed", help="output model folder")
    ap.add_argument("--steps", type=int, default=1500, help="optimiser steps")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from diffusers import FluxTransformer2DModel

    from ditserve.testing import build_tiny_flux_pipeline

    torch.manual_seed(args.seed)
    out = Path(args.out)
    build_tiny_flux_pipeline(out, guidance_embeds=True, seed=args.seed, sample_size=LATENT * 8)
    prompts = all_prompts()
    meta = [(COLOURS.index(p.split()[1]), SHAPES.index(p.split()[2]), COLOURS.index(p.split()[5])) for p in prompts]
    t5, pooled = encode_prompts(out, prompts)
    colours = latent_colours()

    torch.manual_seed(args.seed)
    model = FluxTransformer2DModel(**ARCH)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(i / args.steps, 1.0))))
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_tok = (LATENT // 2) ** 2
    rows, cols = torch.meshgrid(torch.arange(LATENT // 2), torch.arange(LATENT // 2), indexing="ij")
    img_ids = torch.stack((torch.zeros_like(rows), rows, cols), dim=-1).reshape(n_tok, 3).float()
    txt_ids = torch.zeros(TEXT_LEN, 3)
    # The scheduler's shift at 64 image tokens (dynamic shifting, FLUX-dev's constants): sigma -> shifted.
    m = (1.15 - 0.5) / (4096 - 256)
    shift = math.exp(n_tok * m + (0.5 - m * 256))

    start, ema = time.perf_counter(), None
    for step in range(args.steps):
        idx = torch.randint(len(prompts), (args.batch,), generator=gen)
        x0 = pack(make_batch(idx, meta, colours, gen))  # (B, 64, 64)
        noise = torch.randn(x0.shape, generator=gen)
        u = torch.sigmoid(torch.randn(args.batch, generator=gen))  # logit-normal
        s = shift * u / (1 + (shift - 1) * u)  # (B,) sigma in (0, 1)
        xs = (1 - s[:, None, None]) * x0 + s[:, None, None] * noise
        guidance = 1 + 4 * torch.rand(args.batch, generator=gen)
        pred = model(hidden_states=xs, encoder_hidden_states=t5[idx], pooled_projections=pooled[idx], timestep=s,
                     img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {ema:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)

    model.eval()
    model.save_pretrained(out / "transformer", safe_serialization=True)
    info = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "final_loss": ema,
            "train_seconds": round(time.perf_counter() - start, 1), "arch": ARCH, "text_len": TEXT_LEN,
            "image_size": LATENT * 8, "torch": torch.__version__}
    (out / "testbed.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info))


if __name__ == "__main__":
    main()
