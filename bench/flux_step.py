"""FLUX.1-dev transformer, one forward at full size (random weights), ditserve beside diffusers in one process.

GPU only. Batch 1, 1024x1024 (4096 image tokens) + 512 text tokens, bf16. Measures, in this order:
  1. ditserve: dummy load of the transformer alone (meta -> device -> random init), peak memory of the load and
     of one 1024x1024 forward (the issue-3 memory bound: <= 30 GB on an 80 GB GPU);
  2. diffusers' FluxTransformer2DModel built with the SAME weights (copied through our weight map), output
     relative error ours vs diffusers on the same inputs;
  3. one-forward times (CUDA events, median of --iters after warmup) for diffusers eager / regional compile and
     ditserve eager / regional compile, with compile seconds, TFLOP/s from torch.utils.flop_counter and the
     bf16 GEMM rate measured in the same run.
Prints a table to stderr and ONE JSON line last on stdout.

    python bench/flux_step.py [--iters 10] [--skip-compile] [--kernels auto,native,triton]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import torch


def timed(fn, iters: int, warmup: int = 3) -> float:
    """Median ms of fn() over `iters` runs, CUDA events, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    times.sort()
    return times[len(times) // 2]


def gemm_rate_tflops() -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ms = timed(lambda: a @ b, iters=20)
    return 2 * 8192**3 / ms / 1e9


def count_tflop(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    fc = FlopCounterMode(display=False)
    with fc:
        fn()
    return fc.get_total_flops() / 1e12


def compile_seconds(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--kernels", default="auto",
                    help="comma-separated kernels modes to time (auto, native, triton); the first is the "
                         "default reported as ratio_vs_diffusers_compiled, and the one whose memory is measured")
    ap.add_argument("--skip-compile", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/flux_step.py needs a CUDA GPU", file=sys.stderr)
        return 2

    import diffusers

    from ditserve.compile import CompileConfig, compile_model, flux_example_inputs
    from ditserve.config import EngineConfig
    from ditserve.loader import load_transformer

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    dev = torch.device("cuda")
    rec: dict = {"bench": "flux_step", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "diffusers": diffusers.__version__, "height": 1024, "width": 1024, "text_len": 512,
                 "kernels": args.kernels}
    # The device machine gets a copy of the tree without .git: pass DITSERVE_COMMIT there.
    rec["commit"] = os.environ.get("DITSERVE_COMMIT")
    if not rec["commit"]:
        try:
            rec["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                           text=True).stdout.strip() or None
        except OSError:
            rec["commit"] = None
    rec["gemm_bf16_tflops"] = round(gemm_rate_tflops(), 1)

    # 1. ditserve: dummy transformer alone, then peak memory of one 1024x1024 forward.
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    engine = EngineConfig(device="cuda", dtype="bf16", load_format="dummy", kernels=args.kernels.split(",")[0])
    t0 = time.perf_counter()
    ours, _ = load_transformer("flux.1-dev", engine)
    torch.cuda.synchronize()
    rec["ditserve_dummy_load_s"] = round(time.perf_counter() - t0, 2)
    rec["ditserve_params_b"] = round(sum(p.numel() for p in ours.parameters()) / 1e9, 4)
    rec["ditserve_load_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    inputs = flux_example_inputs(ours.config, 1024, 1024, batch=1, text_len=512, device=dev, dtype=torch.bfloat16)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        out_ours = ours(**inputs)
    torch.cuda.synchronize()
    rec["ditserve_forward_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    log(f"ditserve dummy load {rec['ditserve_dummy_load_s']} s, load peak {rec['ditserve_load_peak_gib']} GiB, "
        f"1024x1024 forward peak {rec['ditserve_forward_peak_gib']} GiB")

    # 2. diffusers with the same weights.
    from diffusers import FluxTransformer2DModel

    from ditserve.models.flux import FLUX_1_DEV

    cfg = {k: v for k, v in FLUX_1_DEV.components["transformer"][1].items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = FluxTransformer2DModel(**cfg)
    ref = ref.to_empty(device=dev).to(torch.bfloat16).eval().requires_grad_(False)
    ours_params = dict(ours.named_parameters())
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():
        for key, (name, start, stop) in ours.weight_map().items():
            src = ours_params[name] if start is None else ours_params[name][start:stop]
            ref_params[key].copy_(src)
    with torch.inference_mode():
        out_ref = ref(**inputs, return_dict=False)[0]
    rec["rel_err_vs_diffusers"] = float((out_ours.float() - out_ref.float()).norm() / out_ref.float().norm())
    log(f"relative error ours vs diffusers (bf16): {rec['rel_err_vs_diffusers']:.4f}")
    del out_ours, out_ref

    def run(model, **kw):
        with torch.inference_mode():
            return model(**inputs, **kw)

    tflop = count_tflop(lambda: run(ours))
    rec["tflop_per_forward"] = round(tflop, 2)
    rows = {}

    def measure(name, fn, compile_s=None):
        ms = timed(fn, args.iters)
        rows[name] = {"ms": round(ms, 2), "tflops": round(tflop / ms * 1e3, 1),
                      "frac_of_gemm_rate": round(tflop / ms * 1e3 / rec["gemm_bf16_tflops"], 3)}
        if compile_s is not None:
            rows[name]["compile_s"] = round(compile_s, 1)
        log(f"{name:36s} {ms:8.2f} ms  {tflop / ms * 1e3:6.1f} TFLOP/s"
            + ("" if compile_s is None else f"  (compile {compile_s:.1f} s)"))

    measure("diffusers_eager", lambda: run(ref, return_dict=False))
    if not args.skip_compile:
        # diffusers' own regional compilation: each repeated block class compiled once.
        ref.compile_repeated_blocks(fullgraph=True)
        c = compile_seconds(lambda: run(ref, return_dict=False))
        measure("diffusers_regional_compile", lambda: run(ref, return_dict=False), c)

    # ditserve in each kernels mode, eager and compiled: op paths are bound at construction (and "auto" picks
    # differently for a model that will be compiled), so each row gets a fresh model; weights are copied from
    # diffusers' model on the device; dynamo's cache is dropped first so the old model is freed and each
    # compiled row pays its own compile.
    ref_sd = ref.state_dict()
    first = True
    for kernels in args.kernels.split(","):
        for compiled in ((False, True) if not args.skip_compile else (False,)):
            if not first:
                torch._dynamo.reset()
                del ours
                gc.collect()
                torch.cuda.empty_cache()
                ours, _ = load_transformer("flux.1-dev", replace(engine, kernels=kernels, compile=compiled))
                ours.load_diffusers_state_dict(ref_sd)
            first = False
            if compiled:
                compile_model(ours, CompileConfig())
                c = compile_seconds(lambda: run(ours))
                measure(f"ditserve_regional_compile[{kernels}]", lambda: run(ours), c)
            else:
                measure(f"ditserve_eager[{kernels}]", lambda: run(ours))
    if not args.skip_compile:
        best_ref = rows["diffusers_regional_compile"]["ms"]
        ours_default = rows[f"ditserve_regional_compile[{args.kernels.split(',')[0]}]"]["ms"]
        rec["ratio_vs_diffusers_compiled"] = round(ours_default / best_ref, 3)
    rec["results"] = rows
    rec["peak_gib_all"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
