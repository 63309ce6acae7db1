"""Per-kernel A/B of two builds of FLUX.1's compiled forward: where does the GPU time of one differ from the other's?

GPU only. Builds ditserve's FLUX.1-dev DiT (dummy weights, full size, 1024x1024 + 512 text tokens, bf16) in two
variants, on fresh models in alternation, and for each: times the forward (CUDA events, median) and takes a
profiler trace. Prints, to stderr, the kernels whose GPU time per forward differs most between the two graphs
(kernel names with inductor's numeric suffixes removed, so the same fusion matches across graphs), and one JSON
line last. Variants (`--variants A,B`):

    static    `CompileConfig(dynamic=False)`, what `--dynamic-shapes auto` runs for the first size
    symbolic  `dynamic=True` (symbolic token counts), `--dynamic-shapes on`
    fp8       static, with the fp8 tier (`--quantization fp8`)

    python bench/flux_shapes_ab.py [--variants static,symbolic] [--rounds 2] [--attention sdpa] [--kernels auto]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import defaultdict

import torch
from benchutil import commit, cuda_median_ms, flux_step_inputs, kernel_times, log, trace


def kernel_key(name: str) -> str:
    """Inductor numbers its kernels per graph ("triton_poi_fused_add_mul_3"): drop the trailing number, and cut
    long template names so the same kernel matches across the two graphs."""
    return re.sub(r"_\d+$", "", name)[:110]


def host_ms(fn, iters: int = 10) -> float:
    """Median host ms to issue fn() (launch everything, no wait): when it exceeds the GPU time, the forward is
    CPU-bound."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return sorted(times)[iters // 2]


def cpu_table(fn, top: int, iters: int = 3) -> list[dict]:
    """The `top` ops by host self time per call of fn(), from a CPU profiler trace."""
    prof = trace(fn, "cpu", iters)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    out = [{"op": e.key[:100], "self_ms": round(e.self_cpu_time_total / 1e3 / iters, 3), "calls": e.count // iters}
           for e in rows]
    for row in out:
        log(f"    host {row['self_ms']:8.3f} ms {row['calls']:5d} calls  {row['op']}")
    return out


def kernel_table(fn, iters: int = 5) -> dict[str, dict]:
    """{kernel: {"ms": GPU ms per forward, "calls": launches per forward}} from a profiler trace."""
    table: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "calls": 0})
    for name, (ms, calls) in kernel_times(fn, iters).items():
        row = table[kernel_key(name)]
        row["ms"] += ms
        row["calls"] += calls
    return {k: {"ms": round(v["ms"], 3), "calls": v["calls"]} for k, v in table.items()}


# variant -> (CompileConfig.dynamic, fp8 tier)
VARIANTS = {"static": (False, False), "symbolic": (True, False), "fp8": (False, True)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternating (static, symbolic) pairs of fresh models")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--kernels", default="auto", help="ditserve's --kernels (auto: its Triton kernels; native)")
    ap.add_argument("--variants", default="static,symbolic", help=f"two of {sorted(VARIANTS)}, comma-separated")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--cpu-top", type=int, default=0, help="also list the N ops with the most host (CPU) time")
    args = ap.parse_args()
    variants = args.variants.split(",")
    if len(variants) != 2 or not set(variants) <= set(VARIANTS):
        ap.error(f"--variants takes two of {sorted(VARIANTS)}, got {args.variants!r}")
    if not torch.cuda.is_available():
        log("bench/flux_shapes_ab.py needs a CUDA GPU")
        return 2

    from ditserve.compile import CompileConfig, compile_model
    from ditserve.config import EngineConfig
    from ditserve.loader import load_transformer

    from ditserve.ops.fp8 import apply_fp8

    engine = EngineConfig(device="cuda", dtype="bf16", load_format="dummy", compile=True, attention=args.attention,
                          kernels=args.kernels)
    ms: dict[str, list[float]] = {v: [] for v in variants}
    host: dict[str, list[float]] = {v: [] for v in variants}
    cpu_tables: dict[str, list] = {}
    tables: dict[str, dict] = {}
    for r in range(args.rounds):
        for name in variants:
            dynamic, fp8 = VARIANTS[name]
            torch._dynamo.reset()
            model = None
            torch.cuda.empty_cache()
            torch.manual_seed(0)
            model, _ = load_transformer("flux.1-dev", engine)
            inputs, cond = flux_step_inputs(model)
            if fp8:
                apply_fp8(model)
            compile_model(model, CompileConfig(dynamic=dynamic))

            def fwd():
                with torch.inference_mode():
                    return model(**inputs, conditioning=cond)

            ms[name].append(round(cuda_median_ms(fwd, iters=args.iters, warmup=3), 2))
            host[name].append(round(host_ms(fwd), 2))
            log(f"round {r} {name}: {ms[name][-1]} ms, host {host[name][-1]} ms to issue it")
            if r == 0:
                tables[name] = kernel_table(fwd)
                if args.cpu_top:
                    cpu_tables[name] = cpu_table(fwd, args.cpu_top)
    A, B = variants
    ta, tb = tables[A], tables[B]
    diff = []
    for k in set(ta) | set(tb):
        a, b = ta.get(k, {"ms": 0.0, "calls": 0}), tb.get(k, {"ms": 0.0, "calls": 0})
        diff.append({"kernel": k, f"{A}_ms": a["ms"], f"{B}_ms": b["ms"], "delta_ms": round(a["ms"] - b["ms"], 3),
                     f"{A}_calls": a["calls"], f"{B}_calls": b["calls"]})
    diff.sort(key=lambda d: -abs(d["delta_ms"]))
    log(f"GPU ms per forward: {A} {sum(v['ms'] for v in ta.values()):.2f} ({len(ta)} kernels), {B} "
        f"{sum(v['ms'] for v in tb.values()):.2f} ({len(tb)} kernels)")
    log(f"{A:>9s} {B:>9s} {'delta':>7s}  calls  kernel")
    for d in diff[:args.top]:
        log(f"{d[f'{A}_ms']:9.3f} {d[f'{B}_ms']:9.3f} {d['delta_ms']:7.3f}  {d[f'{A}_calls']:>3d}/"
            f"{d[f'{B}_calls']:<3d} {d['kernel']}")
    print(json.dumps({"bench": "flux_shapes_ab", "commit": commit(), "gpu": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "attention": args.attention, "kernels": args.kernels,
                      "variants": variants, "forward_ms": ms, "host_issue_ms": host,
                      "cpu_top": cpu_tables, "tables": tables,
                      "gpu_ms": {n: round(sum(v["ms"] for v in t.values()), 2) for n, t in tables.items()},
                      "top_diff": diff[:args.top]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
