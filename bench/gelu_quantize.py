"""The fp8 tier's GELU + per-row fp8 quantisation: ditserve's Triton kernel against inductor's fusion of the ops.

GPU only. At FLUX.1-dev's 1024x1024 shapes (bf16): the single block's [attention (4608, 3072) | gelu(mlp)], the
MLP part a strided (4608, 12288) view of the fused (4608, 21504) projection; the double block's image MLP,
gelu((4096, 12288) + bias). Times (CUDA-graph replays via triton.testing.do_bench_cudagraph: GPU time alone) the
kernel (`ditserve::gelu_quantize_rows`) and `torch.compile` of the native ops (bias add, GELU, concatenation,
`quantize_rows`), and reports GB/s (bf16 inputs read once, fp8 output written once) against a device-to-device
copy of the same bytes; then the kernel at other warp counts.

    python bench/gelu_quantize.py
"""

from __future__ import annotations

import json
import sys

import torch
from benchutil import bandwidth_rows, commit, log


def main() -> int:
    if not torch.cuda.is_available():
        log("bench/gelu_quantize.py needs a CUDA GPU")
        return 2
    import triton.testing

    from ditserve.kernels import quant as K
    from ditserve.kernels import triton_quant as TK
    from ditserve.ops import functional as Fn

    D = 3072
    g = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)

    fused = rnd(4608, 7 * D)
    cases = {
        "single_block": (rnd(4608, D), fused[:, 3 * D:], None),
        "double_block_img": (None, rnd(4096, 4 * D), rnd(4 * D)),
    }
    native = torch.compile(Fn.gelu_quantize_rows, fullgraph=True)
    rows = {}
    for name, (plain, pre, bias) in cases.items():
        R, G = pre.shape
        width = G + (0 if plain is None else plain.shape[1])
        nbytes = R * width * 2 + R * width  # bf16 read once, fp8 written once
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        t = {
            "kernel": triton.testing.do_bench_cudagraph(lambda: K.gelu_quantize_rows(plain, pre, bias)),
            "compiled_native": triton.testing.do_bench_cudagraph(lambda: native(plain, pre, bias)),
            "copy_same_bytes": triton.testing.do_bench_cudagraph(lambda: dst.copy_(src)),
        }
        for warps in (4, 8, 16, 32):
            t[f"kernel_w{warps}"] = triton.testing.do_bench_cudagraph(
                lambda: TK.gelu_quantize_rows(plain, pre, bias, num_warps=warps))
        q, s = K.gelu_quantize_rows(plain, pre, bias)
        q_ref, s_ref = native(plain, pre, bias)
        mismatch = (q.view(torch.uint8) != q_ref.view(torch.uint8)).float().mean().item()
        log(f"{name:16s} fp8 values differing from compiled native: {mismatch:.2e}")
        rows[name] = bandwidth_rows(t, nbytes)
        rows[name]["fp8_mismatch_vs_compiled_native"] = mismatch
    print(json.dumps({"bench": "gelu_quantize", "commit": commit(), "gpu": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
