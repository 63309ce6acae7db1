"""Attention kernels at the families' shapes: which backend ditserve should call on this GPU.

GPU only. q, k, v: (1, L, H, 128) bf16, no mask; by default FLUX.1-dev's (1, 4608, 24, 128) (1024x1024: 4096
image + 512 text tokens), with --shapes any of SHAPES below (the families' self-attention at their bench sizes).
For each backend that imports here, times one call (CUDA events, median of 50 after warmup), reports TFLOP/s (4 * B * H * L^2 * D FLOPs), the first call's seconds (a JIT backend compiles there) and the
relative L2 error against an fp32 reference on the same inputs. Prints a table to stderr and one JSON line last.

Backends: `sdpa` (PyTorch picks; cuDNN on Hopper), `sdpa_flash` (SDPA forced to its built-in FlashAttention-2),
`fa3` (FlashAttention-3's SM90 kernels, flash_attn_interface or fa3_fwd_interface), `fa3_fp8` (the same
kernels with q, k, v in float8_e4m3 with one scale per tensor: lossy, for the fp8 tier), `fa4` (flash-attn-4's
CuTe-DSL kernels, `flash_attn.cute.flash_attn_func`), `sage` (sageattention).

    python bench/attention.py [--seq 4608] [--heads 24]
    python bench/attention.py --shapes all
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from benchutil import commit, cuda_median_ms, log
from torch.nn.attention import SDPBackend, sdpa_kernel


# name -> (L, H): one sequence of the family's joint (or video self-) attention at its bench size, head dim 128
SHAPES = {
    "flux.1-dev-1024": (4608, 24),  # 4096 image + 512 text tokens
    "z-image-1024": (4224, 30),  # 4096 image + 128 caption tokens
    "qwen-image-1024": (4224, 24),  # 4096 image + 128 text tokens
    "flux.2-dev-1024": (4608, 48),  # 4096 image + 512 text tokens
    "wan-1.3b-480p": (32760, 12),  # 81 frames at 480x832: 21 x 30 x 52 tokens
    "wan-14b-480p": (32760, 40),
    "wan-14b-720p": (75600, 40),  # 81 frames at 720x1280: 21 x 45 x 80 tokens
}


def fp8_inputs(q, k, v):
    """q, k, v quantised to float8_e4m3fn with one scale per tensor, and the (B, H) descales FA3 takes."""
    out = []
    for t in (q, k, v):
        amax = t.abs().amax().float().clamp(min=1e-12)
        scale = 448.0 / amax
        out.append((t.float() * scale).to(torch.float8_e4m3fn))
        out.append(torch.full((t.shape[0], t.shape[2]), 1.0, device=t.device) / scale)
    return out


def backends() -> dict:
    """Each backend as the engine calls it (`ditserve.ops.attention.Attention`: (B, L, H, D) in and out), and SDPA
    forced to its flash backend."""
    from ditserve.ops.attention import Attention, attention_backend_available

    sdpa = Attention("sdpa")

    def sdpa_flash(q, k, v):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return sdpa(q, k, v)

    out = {"sdpa": sdpa, "sdpa_flash": sdpa_flash}
    for name in ("fa3", "fa4", "sage"):  # fa3, fa4: the kernels as ditserve's custom ops
        if attention_backend_available(name):
            out[name] = Attention(name)
    if "fa3" in out:
        from ditserve.ops.attention import _fa3_module

        fa3 = _fa3_module().flash_attn_func

        def fa3_fp8(q, k, v):  # the quantisation inside the timed call (in a model, a fused pass of the q/k norm)
            q8, dq, k8, dk, v8, dv = fp8_inputs(q, k, v)
            o = fa3(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv)
            return o[0] if isinstance(o, tuple) else o

        out["fa3_fp8"] = fa3_fp8
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq", type=int, default=4608)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--shapes", default=None, help=f"'all' or a comma list of {', '.join(SHAPES)}")
    args = p.parse_args()
    if not torch.cuda.is_available():
        log("bench/attention.py needs a CUDA GPU")
        return 2
    if args.shapes:
        names = list(SHAPES) if args.shapes == "all" else args.shapes.split(",")
        results = {}
        for name in names:
            L, H = SHAPES[name]
            log(f"--- {name}: (1, {L}, {H}, 128)")
            results[name] = run_shape(1, L, H, 128, args.iters)
        print(json.dumps({"bench": "attention", "commit": commit(), "gpu": torch.cuda.get_device_name(),
                          "torch": torch.__version__, "shapes": {n: list(SHAPES[n]) for n in names},
                          "results": results}))
        return 0
    rows = run_shape(1, args.seq, args.heads, args.head_dim, args.iters)
    print(json.dumps({"bench": "attention", "commit": commit(), "gpu": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "shape_blhd": [1, args.seq, args.heads, args.head_dim],
                      "rows": rows}))
    return 0


def run_shape(B: int, L: int, H: int, D: int, iters: int) -> dict:
    """Every backend at one (B, L, H, D): {backend: {ms, tflops, first_call_s, rel_l2} or {error}}."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    impls = backends()
    ref = impls["sdpa"](q.float(), k.float(), v.float()) if L <= 8192 else None  # fp32 math: O(L^2) memory
    if ref is None:  # long sequences: the reference is SDPA's memory-efficient kernel in fp32
        with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
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
            ms = cuda_median_ms(lambda: fn(q, k, v), iters=iters, warmup=5)
            rows[name] = {"ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1), "first_call_s": round(first_s, 2),
                          "rel_l2": round(err, 5)}
            log(f"{name:12s} {ms:8.4f} ms  {flop / ms / 1e9:6.1f} TFLOP/s  first call {first_s:6.2f} s  "
                f"rel L2 {err:.2e}")
        except Exception as e:  # noqa: BLE001 - report why, keep measuring the others
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            log(f"{name:12s} failed: {rows[name]['error']}")

    for name, fn in impls.items():
        measure(name, fn)
    if "fa3_fp8" in impls:  # the fp8 kernel alone: inputs quantised once, outside the timed call
        from ditserve.ops.attention import _fa3_module

        fa3 = _fa3_module().flash_attn_func
        q8, dq, k8, dk, v8, dv = fp8_inputs(q, k, v)

        def fa3_fp8_kernel(*_):
            o = fa3(q8, k8, v8, q_descale=dq, k_descale=dk, v_descale=dv)
            return o[0] if isinstance(o, tuple) else o

        measure("fa3_fp8_kernel", fa3_fp8_kernel)
    return rows


if __name__ == "__main__":
    sys.exit(main())
