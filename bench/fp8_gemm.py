"""fp8 GEMM rates at FLUX.1's shapes: why the fp8 tier's GEMMs are not 2x faster than bf16.

GPU only. For each (M, K, N) of FLUX.1-dev's block GEMMs at 1024x1024 (M = 4608 joint tokens or 4096 image /
512 text tokens), times (CUDA events, median of 50 after warmup): bf16 `x @ w.t()` with bias, and
`torch._scaled_mm` in fp8 e4m3 with row-wise scales (as `ditserve.ops.fp8`) with and without bias, and with one
tensor-wise scale. Prints a table to stderr and one JSON line last.

    python bench/fp8_gemm.py
"""

from __future__ import annotations

import json
import sys

import torch
from benchutil import commit, cuda_median_ms

SHAPES = {  # name: (M, K, N)
    "double img qkv": (4096, 3072, 9216),
    "double txt qkv": (512, 3072, 9216),
    "double img mlp_in": (4096, 3072, 12288),
    "double img mlp_out": (4096, 12288, 3072),
    "single qkv_mlp": (4608, 3072, 21504),
    "single out": (4608, 15360, 3072),
}


def ms(fn) -> float:
    return cuda_median_ms(fn, iters=50, warmup=5)


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/fp8_gemm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    f8 = torch.float8_e4m3fn
    rows = {}
    for name, (M, K, N) in SHAPES.items():
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(N, device="cuda", dtype=torch.bfloat16)
        xq, wq = x.to(f8), w.to(f8)
        sa, sb = torch.ones(M, 1, device="cuda"), torch.ones(1, N, device="cuda")
        one = torch.ones((), device="cuda")
        flop = 2 * M * K * N
        r = {
            "bf16_bias": ms(lambda: torch.nn.functional.linear(x, w, b)),
            "fp8_rowwise_bias": ms(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, bias=b,
                                                            out_dtype=torch.bfloat16)),
            "fp8_rowwise": ms(lambda: torch._scaled_mm(xq, wq.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)),
            "fp8_tensorwise": ms(lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one,
                                                          out_dtype=torch.bfloat16)),
            "fp8_tensorwise_fast_accum": ms(lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one,
                                                                     out_dtype=torch.bfloat16, use_fast_accum=True)),
        }
        rows[name] = {"mkn": [M, K, N], **{k: {"ms": round(v, 4), "tflops": round(flop / v / 1e9, 1)}
                                           for k, v in r.items()}}
        print(f"{name:20s} " + "  ".join(f"{k} {flop / v / 1e9:6.0f}" for k, v in r.items()), file=sys.stderr)
    print(json.dumps({"bench": "fp8_gemm", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "commit": commit(), "tflops_by_shape": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
