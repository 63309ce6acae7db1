"""What every bench script shares: the commit a run measured, a CUDA-event median timer, a profiler's per-kernel
GPU times, a GB/s table of kernel timings, and stderr logging.

Imported as `from benchutil import ...`: the scripts run as `python bench/NAME.py`, which puts bench/ first on
sys.path.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def log(msg: str) -> None:
    """Progress and tables go to stderr: stdout carries only the JSON line."""
    print(msg, file=sys.stderr, flush=True)


def commit() -> str | None:
    """$DITSERVE_COMMIT (the GPU machine gets a copy of the tree without .git), else `git rev-parse --short HEAD`
    of this checkout, else None."""
    if os.environ.get("DITSERVE_COMMIT"):
        return os.environ["DITSERVE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        return None


def bandwidth_rows(times_ms: dict[str, float], nbytes: int) -> dict[str, dict]:
    """{name: {"ms", "gb_s"}} for timings of calls that each move `nbytes` (read once, written once); logs each
    as microseconds and GB/s."""
    for name, ms in times_ms.items():
        log(f"    {name:20s} {ms * 1e3:7.1f} us ({nbytes / ms / 1e6:6.0f} GB/s)")
    return {name: {"ms": round(ms, 4), "gb_s": round(nbytes / ms / 1e6, 1)} for name, ms in times_ms.items()}


def cuda_median_ms(fn, iters: int, warmup: int) -> float:
    """Median ms of fn() over `iters` calls, each timed with CUDA events, after `warmup` untimed calls."""
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
    return sorted(times)[iters // 2]


def flux_step_inputs(model, size: int = 1024, text_len: int = 512) -> tuple[dict, object]:
    """A FLUX DiT's forward inputs on CUDA in bf16 (batch 1, a `size` x `size` image, seeded) and one step's
    conditioning, as the denoise loop hands it over (`FluxTransformer.precompute_conditioning`)."""
    from ditserve.models.flux import flux_example_inputs

    inputs = flux_example_inputs(model.config, size, size, batch=1, text_len=text_len, device="cuda",
                                 dtype=torch.bfloat16)
    g = inputs.get("guidance")
    with torch.inference_mode():
        cond = model.precompute_conditioning(inputs["timestep"][None], inputs["pooled_projections"],
                                             None if g is None else g[None])[0]
    return inputs, cond


def trace(fn, activity: str, iters: int):
    """A torch.profiler trace ("cuda" kernels or "cpu" host ops) of `iters` calls of fn, after one untraced call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if activity == "cuda" else ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return prof


def kernel_times(fn, iters: int = 5) -> dict[str, tuple[float, int]]:
    """{GPU kernel name: (GPU ms per call of fn, launches per call of fn)} from a torch.profiler trace of `iters`
    calls, after one untraced call."""
    prof = trace(fn, "cuda", iters)
    acc: dict[str, list] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            row = acc.setdefault(ev.name, [0.0, 0])
            row[0] += ev.device_time_total / 1e3  # us -> ms
            row[1] += 1
    return {name: (ms / iters, calls // iters) for name, (ms, calls) in acc.items()}
