"""An fp8 attention kernel (ditserve/kernels/triton_fp8_attention.py, experimental) against cuDNN's bf16 SDPA.

GPU only. FLUX.1's attention at 1024x1024: q, k, v (1, 4608, 24, 128) bf16. Times (CUDA-graph replays, GPU time
alone) SDPA (cuDNN), the fp8 kernel on already quantised inputs at several launch shapes, and the quantisation of
q, k, v (compiled torch ops); reports TFLOP/s (4 B H L^2 D) and each output's relative L2 error against an fp32
reference. One JSON line last.

    python bench/fp8_attention.py
"""

from __future__ import annotations

import json
import sys

import torch
from benchutil import commit, log


def main() -> int:
    if not torch.cuda.is_available():
        log("bench/fp8_attention.py needs a CUDA GPU")
        return 2
    import triton.testing

    from ditserve.kernels import triton_fp8_attention as T
    from ditserve.ops.attention import Attention

    B, L, H, D = 1, 4608, 24, 128
    flops = 4 * B * H * L * L * D
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, L, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    sdpa = Attention("sdpa")
    ref = sdpa(q.float(), k.float(), v.float())

    def err(out):
        return round(((out.float() - ref).norm() / ref.norm()).item(), 5)

    rows = {}

    def record(name, fn, out=None):
        ms = triton.testing.do_bench_cudagraph(fn)
        rows[name] = {"ms": round(ms, 4), "tflops": round(flops / ms / 1e9, 1)}
        if out is not None:
            rows[name]["rel_l2_vs_fp32"] = err(out)
        log(f"{name:34s} {ms * 1e3:8.1f} us  {flops / ms / 1e9:7.1f} TFLOP/s  {rows[name].get('rel_l2_vs_fp32', '')}")

    record("sdpa_bf16", lambda: sdpa(q, k, v), sdpa(q, k, v))
    quant = torch.compile(T.quantize_qkv, fullgraph=True)
    packed = quant(q, k, v)
    record("quantize_qkv (compiled)", lambda: quant(q, k, v))
    rows["quantize_qkv (compiled)"].pop("tflops")
    for bm, bn, warps, stages in ((128, 128, 8, 3), (128, 64, 4, 3), (128, 128, 8, 4), (128, 64, 8, 4),
                                  (64, 128, 4, 3), (128, 128, 4, 3), (256, 128, 8, 3), (128, 256, 8, 3)):
        name = f"fp8_kernel_m{bm}_n{bn}_w{warps}_s{stages}"
        try:
            out = T.fp8_attention_quantized(*packed, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages)
            record(name, lambda: T.fp8_attention_quantized(*packed, block_m=bm, block_n=bn, num_warps=warps,
                                                           num_stages=stages), out)
        except Exception as e:  # a launch shape that does not fit (shared memory, registers)
            rows[name] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
            log(f"{name:34s} {rows[name]['error']}")
    print(json.dumps({"bench": "fp8_attention", "commit": commit(), "gpu": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "shape": [B, L, H, D], "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
