"""Why is FLUX.1's statically compiled forward slower than its symbolic-shape one? Per-kernel A/B.

GPU only. Builds ditserve's FLUX.1-dev DiT (dummy weights, full size, 1024x1024 + 512 text tokens, bf16), compiles
it with static shapes (`CompileConfig(dynamic=False)`, what `--dynamic-shapes auto` runs for the first size) and
with symbolic token counts (`dynamic=True`, `--dynamic-shapes on`), on fresh models in alternation, and for each:
times the forward (CUDA events, median) and takes a profiler trace. Prints, to stderr, the kernels whose GPU time
per forward differs most between the two graphs (kernel names with inductor's numeric suffixes removed, so the
same fusion matches across graphs), and one JSON line last.

    python bench/flux_shapes_ab.py [--rounds 2] [--attention sdpa]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict

import torch
from benchutil import commit, cuda_median_ms, kernel_times, log


def kernel_key(name: str) -> str:
    """Inductor numbers its kernels per graph ("triton_poi_fused_add_mul_3"): drop the trailing number, and cut
    long template names so the same kernel matches across the two graphs."""
    return re.sub(r"_\d+$", "", name)[:110]


def kernel_table(fn, iters: int = 5) -> dict[str, dict]:
    """{kernel: {"ms": GPU ms per forward, "calls": launches per forward}} from a profiler trace."""
    table: dict[str, dict] = defaultdict(lambda: {"ms": 0.0, "calls": 0})
    for name, (ms, calls) in kernel_times(fn, iters).items():
        row = table[kernel_key(name)]
        row["ms"] += ms
        row["calls"] += calls
    return {k: {"ms": round(v["ms"], 3), "calls": v["calls"]} for k, v in table.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternating (static, symbolic) pairs of fresh models")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--attention", default="sdpa")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        log("bench/flux_shapes_ab.py needs a CUDA GPU")
        return 2

    from ditserve.compile import CompileConfig, compile_model, flux_example_inputs
    from ditserve.config import EngineConfig
    from ditserve.loader import load_transformer

    engine = EngineConfig(device="cuda", dtype="bf16", load_format="dummy", compile=True, attention=args.attention)
    inputs = cond = None
    ms: dict[str, list[float]] = {"static": [], "symbolic": []}
    tables: dict[str, dict] = {}
    for r in range(args.rounds):
        for name, dynamic in (("static", False), ("symbolic", True)):
            torch._dynamo.reset()
            model = None
            torch.cuda.empty_cache()
            torch.manual_seed(0)
            model, _ = load_transformer("flux.1-dev", engine)
            if inputs is None:
                inputs = flux_example_inputs(model.config, 1024, 1024, batch=1, text_len=512, device="cuda",
                                             dtype=torch.bfloat16)
            with torch.inference_mode():
                cond = model.precompute_conditioning(inputs["timestep"][None], inputs["pooled_projections"],
                                                     inputs["guidance"][None])[0]
            compile_model(model, CompileConfig(dynamic=dynamic))

            def fwd():
                with torch.inference_mode():
                    return model(**inputs, conditioning=cond)

            ms[name].append(round(cuda_median_ms(fwd, iters=args.iters, warmup=3), 2))
            log(f"round {r} {name}: {ms[name][-1]} ms")
            if r == 0:
                tables[name] = kernel_table(fwd)
    st, sy = tables["static"], tables["symbolic"]
    diff = []
    for k in set(st) | set(sy):
        a, b = st.get(k, {"ms": 0.0, "calls": 0}), sy.get(k, {"ms": 0.0, "calls": 0})
        diff.append({"kernel": k, "static_ms": a["ms"], "symbolic_ms": b["ms"], "delta_ms": round(a["ms"] - b["ms"], 3),
                     "static_calls": a["calls"], "symbolic_calls": b["calls"]})
    diff.sort(key=lambda d: -abs(d["delta_ms"]))
    log(f"GPU ms per forward: static {sum(v['ms'] for v in st.values()):.2f} ({len(st)} kernels), symbolic "
        f"{sum(v['ms'] for v in sy.values()):.2f} ({len(sy)} kernels)")
    log(f"{'static':>8s} {'symbolic':>9s} {'delta':>7s}  calls  kernel")
    for d in diff[:args.top]:
        log(f"{d['static_ms']:8.3f} {d['symbolic_ms']:9.3f} {d['delta_ms']:7.3f}  {d['static_calls']:>2d}/"
            f"{d['symbolic_calls']:<2d} {d['kernel']}")
    print(json.dumps({"bench": "flux_shapes_ab", "commit": commit(), "gpu": torch.cuda.get_device_name(),
                      "torch": torch.__version__, "attention": args.attention, "forward_ms": ms,
                      "gpu_ms": {n: round(sum(v["ms"] for v in t.values()), 2) for n, t in tables.items()},
                      "top_diff": diff[:args.top]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
