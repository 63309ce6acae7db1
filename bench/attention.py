"""Attention kernels at FLUX.1's shape: which backend ditserve should call on this GPU.

GPU only. q, k, v: (1, 4608, 24, 128) bf16 (FLUX.1-dev at 1024x1024: 4096 image + 512 text tokens, 24 heads of
128), no mask. For each backend that imports here, times one call (CUDA events, median of 50 after warmup),
reports TFLOP/s (4 * B * H * L^2 * D FLOPs), the first call's seconds (a JIT backend compiles there) and the
relative L2 error against an fp32 reference on the same inputs. Prints a table to stderr and one JSON line last.

Backends: `sdpa` (PyTorch picks; cuDNN on Hopper), `sdpa_flash` (SDPA forced to its built-in FlashAttention-2),
`fa4` (flash-attn-4's CuTe-DSL kernels, `flash_attn.cute.flash_attn_func`), `sdpa_fa4` (the same kernels
registered into SDPA's flash backend by `torch.nn.attention.activate_flash_attention_impl("FA4")`), `sage`
(sageattention).

    python bench/attention.py [--seq 4608] [--heads 24]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from benchutil import commit, cuda_median_ms, log
from torch.nn.attention import SDPBackend, sdpa_kernel


def backends() -> dict:
    """Each backend as the engine calls it (`ditserve.ops.attention.Attention`: (B, L, H, D) in and out), and SDPA
    forced to its flash backend."""
    from ditserve.ops.attention import Attention, attention_backend_available

    sdpa = Attention("sdpa")

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v)

    out = {"sdpa": sdpa, "sdpa_flash": sdpa_flash}
    for name in ("fa4", "sage"):  # fa4: flash_attn.cute.flash_attn_func as ditserve's custom op
        if attention_backend_available(name):
            out[name] = Attention(name)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=4608)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    if not torch.cuda.is_available():
        log("bench/attention.py needs a CUDA GPU")
        return 2
    B, L, H, D = 1, args.seq, args.heads, args.head_dim
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    impls = backends()
    ref = impls["sdpa"](q.float(), k.float(), v.float())
    flop = 4 * B * H * L * L * D
    rows = {}

    def measure(name, fn):
        try:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(q, k, v)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - t0
            err = ((out.float() - ref).norm() / ref.norm()).item()
            ms = cuda_median_ms(lambda: fn(q, k, v), iters=args.iters, warmup=5)
            rows[name] = {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1), "first_call_s": round(first_s, 2),
                          "rel_l2": round(err, 5)}
            log(f"{name:12s} {ms:8.4f} ms  {flop / ms / 1e9:6.1f} TFLOP/s  first call {first_s:6.2f} s  "
                f"rel L2 {err:.2e}")
        except Exception as e:  # noqa: BLE001 - report why, keep measuring the others
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            log(f"{name:12s} failed: {rows[name]['error']}")

    for name, fn in impls.items():
        measure(name, fn)
    if "fa4" in impls:  # last: from here on, in this process, SDPA's flash backend runs FA4's kernels
        try:
            from torch.nn.attention import activate_flash_attention_impl

            activate_flash_attention_impl("FA4")
            measure("sdpa_fa4", impls["sdpa_flash"])
        except Exception as e:  # noqa: BLE001
            rows["sdpa_fa4"] = {"error": f"{type(e).__name__}: {e}"[:300]}
            log(f"sdpa_fa4: {rows['sdpa_fa4']['error']}")
    print(json.dumps({"bench": "attention", "commit": commit(), "gpu": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "shape_blhd": [B, L, H, D], "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
