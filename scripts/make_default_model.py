"""Build the packaged default model: a tiny random-weight FLUX.1-schnell-like checkpoint (~1.3 MB).

    python scripts/make_default_model.py [--out ditserve/assets/default-model]

Deterministic (fixed seed): rerunning it with the same diffusers/transformers versions rewrites the same
files. The weights are random, so `ditserve generate` with no --model draws structured noise: the point is a
complete, offline, seconds-fast run of the whole pipeline (tokenise, encode, denoise, decode, save).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ditserve.testing import build_tiny_flux_pipeline

SEED = 0
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "ditserve" / "assets" / "default-model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.out.exists():
        shutil.rmtree(args.out)
    # Timestep-distilled layout (FLUX.1-schnell-like: no guidance embedder, so 4 steps by default: a CPU run
    # takes seconds even on a busy 2-core machine), natural size 256x256 (32x32 latents, 256 image tokens).
    build_tiny_flux_pipeline(args.out, guidance_embeds=False, seed=SEED, sample_size=256)
    files = sorted(p for p in args.out.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    for p in files:
        print(f"{p.stat().st_size:>9}  {p.relative_to(args.out)}")
    print(f"{total:>9}  total ({total / 2**20:.2f} MiB) in {args.out}")


if __name__ == "__main__":
    main()
