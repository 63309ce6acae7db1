"""Where a CUDA-graph replay of FLUX.1-dev's compiled forward leaves the GPU idle between kernels.

GPU only. For each tier (bf16; fp8; fp8 + fp8 attention when cuDNN's frontend is importable): the dummy DiT at
full size, compiled as the engine compiles it, its forward (1024x1024, 512 text tokens, batch 1) replayed from
the engine's CUDA graph (`ditserve.cuda_graphs.GraphedForward`, as the denoise loop runs it). A profiler trace
of the replays gives every kernel's start and end: kernels per forward, busy time, idle time between
consecutive kernels of a replay (the trace's gaps), and the idle time after each kernel
family, so a change that removes launches can be judged by what the waits cost. CUDA-event wall time of the
replays alongside. Prints a table to stderr and one JSON line last.

    python bench/graph_gaps.py [--iters 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict

import torch
from benchutil import commit, cuda_median_ms, flux_step_inputs, log, trace
from flux_step import kernel_family


def variants() -> list[tuple[str, dict]]:
    from ditserve.kernels.attention_fp8 import CUDNN_REGISTERED

    out = [("bf16", {}), ("fp8", {"quantization": "fp8"})]
    if CUDNN_REGISTERED:
        out.append(("fp8_attn", {"quantization": "fp8", "fp8_attention": True}))
    return out


def gaps(prof, calls: int) -> dict:
    """Kernels per call, busy and idle ms per call, and idle ms per call after each kernel family, from the CUDA
    kernel events of a trace of `calls` back-to-back replays (idle between two replays is left out: it is the
    host's turn, not the graph's)."""
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    busy = sum(e.time_range.end - e.time_range.start for e in evs)  # us
    idle_after: dict[str, float] = defaultdict(float)
    gaps_us = []
    for a, b in zip(evs, evs[1:]):
        gap = b.time_range.start - a.time_range.end
        if 0 < gap < 1000:  # > 1 ms: between two replays
            idle_after[kernel_family(a.name)] += gap
            gaps_us.append(gap)
    gaps_us.sort()
    return {"kernels_per_forward": round(len(evs) / calls, 1), "busy_ms": round(busy / calls / 1e3, 2),
            "idle_ms": round(sum(gaps_us) / calls / 1e3, 2),
            "median_gap_us": round(gaps_us[len(gaps_us) // 2], 2) if gaps_us else None,
            "idle_ms_after_family": {k: round(v / calls / 1e3, 2)
                                     for k, v in sorted(idle_after.items(), key=lambda kv: -kv[1])}}


def measure(extra: dict, iters: int) -> dict:
    """One tier (EngineConfig fields `extra`): replay wall ms and `gaps` of its graphed forward."""
    from ditserve.compile import CompileConfig, compile_model
    from ditserve.config import EngineConfig
    from ditserve.cuda_graphs import GraphedForward
    from ditserve.loader import load_transformer

    engine = EngineConfig(device="cuda", load_format="dummy", compile=True, **extra)
    model, _ = load_transformer("flux.1-dev", engine)
    compile_model(model, CompileConfig.for_engine(engine))
    inputs, cond = flux_step_inputs(model)
    graphed = GraphedForward(model)

    def replay():
        with torch.inference_mode():
            return graphed(**inputs, conditioning=cond)

    for _ in range(4):  # warmup calls, capture, first replay
        replay()
    wall = cuda_median_ms(replay, iters=10, warmup=2)
    row = {"replay_ms": round(wall, 2), **gaps(trace(replay, "cuda", iters), iters)}
    graphed.graphs.clear()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        log("bench/graph_gaps.py needs a CUDA GPU")
        return 2

    rec = {"bench": "graph_gaps", "commit": commit(), "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, extra in variants():
        rec[name] = row = measure(extra, args.iters)
        log(f"{name:9s} replay {row['replay_ms']:7.2f} ms: {row['kernels_per_forward']} kernels, busy "
            f"{row['busy_ms']} ms, idle {row['idle_ms']} ms (median gap {row['median_gap_us']} us); idle after: "
            f"{row['idle_ms_after_family']}")
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
