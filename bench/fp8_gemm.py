"""fp8 GEMM rates at FLUX.1's shapes: why the fp8 tier's GEMMs are not 2x faster than bf16.

GPU only. For each (M, K, N) of FLUX.1-dev's block GEMMs at 1024x1024 (M = 4608 joint tokens or 4096 image /
512 text tokens), times (CUDA events, median of 50 after warmup): bf16 `x @ w.t()` with bias, and
`torch._scaled_mm` in fp8 e4m3 with row-wise scales (as `ditserve.ops.fp8`) with and without bias, and with one
tensor-wise scale. Prints a table to stderr and one JSON line last.

`--grouped`: the double block's text (M=512) and image (M=4096) projections share K and N, so each pair can run
as one grouped GEMM over the joint [txt; img] rows (`torch._grouped_mm`, `torch._scaled_grouped_mm` with
row-wise scales, offsets [512, 4608]) instead of two launches; times both ways, bf16 and fp8, with and without
fast accumulation, and checks that the grouped output equals the two separate ones.

    python bench/fp8_gemm.py [--grouped]
"""

from __future__ import annotations

import json
import sys

import torch
from benchutil import commit, cuda_median_ms, log

SHAPES = {  # name: (M, K, N)
    "double img qkv": (4096, 3072, 9216),
    "double txt qkv": (512, 3072, 9216),
    "double img mlp_in": (4096, 3072, 12288),
    "double img mlp_out": (4096, 12288, 3072),
    "single qkv_mlp": (4608, 3072, 21504),
    "single out": (4608, 15360, 3072),
}


# The double block's four projection shapes (K, N), each run once per stream: txt M=512, img M=4096.
DOUBLE_KN = {"qkv": (3072, 9216), "attn_out": (3072, 3072), "mlp_in": (3072, 12288), "mlp_out": (12288, 3072)}
TXT, IMG = 512, 4096


def ms(fn) -> float:
    return cuda_median_ms(fn, iters=50, warmup=5)


def grouped_rows() -> dict:
    """{shape: {variant: {ms, tflops}}, max relative difference}: separate txt + img GEMMs against one grouped
    launch over [txt; img], bf16 and fp8 row-wise."""
    f8 = torch.float8_e4m3fn
    out = {}
    offs = torch.tensor([TXT, TXT + IMG], device="cuda", dtype=torch.int32)
    for name, (K, N) in DOUBLE_KN.items():
        x = torch.randn(TXT + IMG, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(2, N, K, device="cuda", dtype=torch.bfloat16) / K ** 0.5  # [txt, img] weights, (N, K) each
        wt = w.transpose(1, 2)  # (2, K, N) column-major: what the grouped kernels want
        xq, wq = x.to(f8), w.to(f8)
        wqt = wq.transpose(1, 2)
        sa = torch.rand(TXT + IMG, device="cuda") + 0.5  # row-wise scales, (M,) for the grouped call
        sb = torch.rand(2, N, device="cuda") + 0.5
        xt, xi, qt, qi = x[:TXT], x[TXT:], xq[:TXT], xq[TXT:]

        def sep_fp8(fast=False):
            return (torch._scaled_mm(qt, wq[0].t(), scale_a=sa[:TXT, None], scale_b=sb[0:1], out_dtype=torch.bfloat16,
                                     use_fast_accum=fast),
                    torch._scaled_mm(qi, wq[1].t(), scale_a=sa[TXT:, None], scale_b=sb[1:2], out_dtype=torch.bfloat16,
                                     use_fast_accum=fast))

        def grp_fp8(fast=False):
            return torch._scaled_grouped_mm(xq, wqt, sa, sb, offs=offs, out_dtype=torch.bfloat16, use_fast_accum=fast)

        flop = 2 * (TXT + IMG) * K * N
        r = {"bf16_separate": lambda: (xt @ w[0].t(), xi @ w[1].t()),
             "bf16_img_alone": lambda: xi @ w[1].t(),
             "bf16_grouped": lambda: torch._grouped_mm(x, wt, offs=offs),
             "fp8_separate": sep_fp8,
             "fp8_separate_fast_accum": lambda: sep_fp8(True),
             "fp8_img_alone": lambda: torch._scaled_mm(qi, wq[1].t(), scale_a=sa[TXT:, None], scale_b=sb[1:2],
                                                       out_dtype=torch.bfloat16),
             "fp8_grouped": grp_fp8,
             "fp8_grouped_fast_accum": lambda: grp_fp8(True)}
        row = {}
        for k, fn in r.items():
            try:
                t = ms(fn)
                row[k] = {"ms": round(t, 4), "tflops": round(flop / t / 1e9, 1)}
            except RuntimeError as e:  # a variant this torch/GPU refuses: recorded, not fatal
                row[k] = {"error": str(e).splitlines()[0][:200]}
        try:
            ref_b, got_b = torch.cat(r["bf16_separate"]()), r["bf16_grouped"]()
            ref_f, got_f = torch.cat(sep_fp8()), grp_fp8()
            row["max_rel_diff"] = {k: round(float((a.float() - b.float()).abs().max() / b.float().abs().max()), 6)
                                   for k, a, b in (("bf16", got_b, ref_b), ("fp8", got_f, ref_f))}
        except RuntimeError as e:
            row["max_rel_diff"] = {"error": str(e).splitlines()[0][:200]}
        out[name] = row
        log(f"grouped {name:9s} " + "  ".join(f"{k} {v.get('ms', float('nan')) * 1e3:6.1f}us" for k, v in row.items()
                                             if isinstance(v, dict) and "ms" in v) + f"  diff {row['max_rel_diff']}")
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/fp8_gemm.py needs a CUDA GPU", file=sys.stderr)
        return 2
    if "--grouped" in sys.argv[1:]:
        print(json.dumps({"bench": "fp8_gemm_grouped", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                          "commit": commit(), "double_block": grouped_rows()}))
        return 0
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
