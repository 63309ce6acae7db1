"""FLUX.1's q/k RMSNorm + RoPE: ditserve's Triton kernel against inductor's fusion of the native ops.

GPU only. At FLUX.1-dev's 1024x1024 shapes (bf16, 24 heads of 128): the single block's q, a strided view of the
fused (1, 4608, 21504) projection; the double block's [txt 512 | img 4096] q, views of two (1, L, 9216)
projections. Times (CUDA-graph replays via triton.testing.do_bench_cudagraph: GPU time alone) the kernel
(`ditserve::rms_norm_rotary`) and `torch.compile` of the native composition (RMSNorm per part, cat, RoPE), and
reports GB/s (bytes of q read + written once) against a device-to-device copy of the same bytes; then the kernel
at other launch shapes (heads per program, warps).

    python bench/norm_rotary.py
"""

from __future__ import annotations

import json
import sys

import torch
from benchutil import bandwidth_rows, commit, log


def main() -> int:
    if not torch.cuda.is_available():
        log("bench/norm_rotary.py needs a CUDA GPU")
        return 2
    import triton.testing

    from ditserve.kernels import rotary as K
    from ditserve.kernels import triton_rotary as TK
    from ditserve.ops import functional as Fn

    H, D, eps = 24, 128, 1e-6
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

    single = rnd(1, 4608, 7 * H * D)
    txt, img = rnd(1, 512, 3 * H * D), rnd(1, 4096, 3 * H * D)
    cases = {
        "single_block_q": ([single[..., :H * D].unflatten(-1, (H, D))], 4608),
        "double_block_q": ([txt[..., :H * D].unflatten(-1, (H, D)), img[..., :H * D].unflatten(-1, (H, D))], 4608),
    }
    native = torch.compile(lambda xs, ws, c, s: Fn.rms_norm_rotary(xs, ws, c, s, eps, True), fullgraph=True)
    rows = {}
    for name, (xs, S) in cases.items():
        ws = [rnd(D) for _ in xs]
        ang = torch.randn(S, D // 2, generator=g, device="cuda")
        cos, sin = ang.cos(), ang.sin()
        nbytes = 2 * S * H * D * 2  # read once, written once
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        t = {
            "kernel": triton.testing.do_bench_cudagraph(lambda: K.rms_norm_rotary(xs, ws, cos, sin, eps, True)),
            "compiled_native": triton.testing.do_bench_cudagraph(lambda: native(xs, ws, cos, sin)),
            "copy_same_bytes": triton.testing.do_bench_cudagraph(lambda: dst.copy_(src)),
        }
        for heads, warps in ((1, 1), (2, 1), (4, 1), (2, 2), (4, 2), (8, 1), (8, 2), (16, 4)):  # default: 4, 1
            t[f"kernel_h{heads}_w{warps}"] = triton.testing.do_bench_cudagraph(
                lambda: TK.rms_norm_rotary(xs, ws, cos, sin, eps, True, heads=heads, num_warps=warps))
        mismatch = (K.rms_norm_rotary(xs, ws, cos, sin, eps, True) != native(xs, ws, cos, sin)).float().mean().item()
        log(f"{name:16s} mismatch vs compiled native {mismatch:.4f}")
        rows[name] = bandwidth_rows(t, nbytes)
        rows[name]["mismatch_vs_native"] = round(mismatch, 5)
    print(json.dumps({"bench": "norm_rotary", "commit": commit(), "gpu": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
