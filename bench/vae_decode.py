"""FLUX.1's VAE decode at 1024x1024: diffusers' whole decode, ditserve's streamed decode and diffusers' tiled decode.

GPU only. diffusers' AutoencoderKL with FLUX.1's architecture (block_out_channels 128-512, 2 layers per block,
16 latent channels, 32 groups; random weights at full size), bf16, one (1, 16, 128, 128) latent. For each decode:
GPU time (CUDA events, median of 10 after warmup), the activation memory (peak allocation during the decode minus
what was allocated before it and its output: cuDNN workspaces included) and the PSNR of its image against the whole decode's.
One JSON line last.

    python bench/vae_decode.py
"""

from __future__ import annotations

import json
import math
import sys

import torch
from benchutil import commit, cuda_median_ms, log


def main() -> int:
    if not torch.cuda.is_available():
        log("bench/vae_decode.py needs a CUDA GPU")
        return 2
    from diffusers import AutoencoderKL

    from ditserve.pipelines.vae_decode import streamed_decode

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                        layers_per_block=2, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False).to("cuda", torch.bfloat16).eval()
    z = torch.randn(1, 16, 128, 128, device="cuda", dtype=torch.bfloat16, generator=torch.Generator("cuda"))
    decodes = {
        "whole": lambda: vae.decode(z, return_dict=False)[0],
        "streamed": lambda: streamed_decode(vae, z),
        "tiled": lambda: vae.tiled_decode(z, return_dict=False)[0],
    }
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 512, 64, 0.25  # as the engine
    rows, images = {}, {}
    with torch.inference_mode():
        for name, fn in decodes.items():
            ms = cuda_median_ms(fn, iters=10, warmup=2)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            out = fn()  # (1, 3, 1024, 1024) bf16
            torch.cuda.synchronize()
            activation_mib = (torch.cuda.max_memory_allocated() - before - out.nbytes) / 2**20  # beyond its output
            images[name] = out.float().clamp(-1, 1)
            del out
            rows[name] = {"ms": round(ms, 2), "activation_mib": round(activation_mib, 1)}
        for name, img in images.items():  # pixels in [-1, 1]: peak-to-peak 2
            mse = (img - images["whole"]).square().mean().item()
            rows[name]["psnr_vs_whole_db"] = None if mse == 0 else round(10 * math.log10(4 / mse), 2)
            log(f"{name:9s} {rows[name]['ms']:8.2f} ms  {rows[name]['activation_mib']:8.1f} MiB of activations  "
                f"PSNR vs whole {rows[name]['psnr_vs_whole_db']}")
    print(json.dumps({"bench": "vae_decode", "commit": commit(), "gpu": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "size": 1024, "dtype": "bf16", "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
