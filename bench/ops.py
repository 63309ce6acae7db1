"""Micro-benchmark of the fused elementwise/norm ops on one CUDA GPU, bf16.

For each op and size: eager native (the `ditserve.ops.functional` reference), torch.compile'd native
(inductor, fullgraph, static shapes) and, where one exists, the Triton custom op called eagerly
(`torch.ops.ditserve.*`). Two timings of each:
  ms        `triton.testing.do_bench` median: one call at a time, L2 flushed before each (so it includes
            whatever host launch overhead the flush does not hide: what an eager call costs);
  ms_graph  `triton.testing.do_bench_cudagraph` median: many calls replayed from one CUDA graph, rotating
            over enough input sets to exceed 3x L2 (the GPU time alone: what a call costs inside a captured or
            compiled graph with no launch gaps).
Achieved GB/s counts each input read once and each output written once, and is set against the
device-to-device copy bandwidth measured in the same run (a large copy_: bytes read + bytes written).

Sizes: FLUX.1-dev at 1024² (4608 tokens x 3072) and Wan2.1-14B at 480x832x81 (32760 tokens x 5120); the
RMSNorm rows also at their per-head q/k-norm shape (D = 128). Modulation is per-sample (B=1, 1, D), sliced
from one (1, 1, 6D) vector as the models do. Also sweeps the launch layouts of the three Triton kernels
(resident / looped rows, chunk, num_warps).

Usage: python bench/ops.py [--ops rms_norm,norm_scale_shift,...] [--sizes flux1-dev,wan-14b] [--no-sweep]
Prints a table, then ONE JSON line last: {"bench": "ops", "env": {...}, "results": [...], "sweep": [...]}.
The commit is read from $DITSERVE_COMMIT, else `git rev-parse --short HEAD` (benchutil.commit).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from benchutil import commit as benchutil_commit  # noqa: E402
from ditserve.kernels import norm as K  # noqa: E402
from ditserve.ops import functional as Fn  # noqa: E402

EPS = 1e-6
SIZES = {"flux1-dev": (4608, 3072, 24), "wan-14b": (32760, 5120, 40)}  # tokens, width, heads (head dim 128)
DTYPE = torch.bfloat16
ALL_OPS = ("rms_norm", "norm_scale_shift", "residual_norm_scale_shift", "mul_add", "rotary")


@dataclass
class Case:
    """One op at one size: the native function, its Triton op (or None), input sets, and bytes moved."""

    op: str
    size: str
    shape: str
    native: Callable
    triton: Callable | None
    arg_sets: list[tuple]  # identical shapes; [0] for do_bench, all of them rotated for the graph timing
    nbytes: int


@dataclass
class Result:
    op: str
    size: str
    shape: str
    impl: str  # eager | compiled | triton
    ms: float
    gbps: float
    frac_of_copy: float
    ms_graph: float
    frac_of_copy_graph: float
    max_abs_diff_vs_eager: float
    compile_s: float | None = None


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _randn(*shape, dtype=DTYPE, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device="cuda") * scale + shift).to(dtype)


# Native functions and their Triton ops: module level so each compiles once per shape (static shapes).
def _rms_native(x, w):
    return Fn.rms_norm(x, w, EPS)


def _rms_triton(x, w):
    return K.rms_norm(x, w, EPS)


def _nss_native(x, scale, shift):
    return Fn.norm_scale_shift(x, None, scale, shift, EPS, False)


def _nss_triton(x, scale, shift):
    return K.norm_scale_shift(x, None, scale, shift, EPS, False)


def _rnss_native(x, residual, gate, scale, shift):
    return Fn.residual_norm_scale_shift(x, residual, gate, None, scale, shift, EPS, False)


def _rnss_triton(x, residual, gate, scale, shift):
    return K.residual_norm_scale_shift(x, residual, gate, None, scale, shift, EPS, False)


def _mul_add_native(a, b, c):
    return Fn.mul_add(a, b, c, 1.0)


def _rotary_native(x, cos, sin):
    return Fn.apply_rotary(x, cos, sin, True)


def _modulation(D: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(shift, scale, gate), each (1, 1, D), sliced from one AdaLN embedding (1, 1, 6D)."""
    return _randn(1, 1, 6 * D, scale=0.5).chunk(6, dim=-1)[:3]


def _inputs(op: str, L: int, D: int, H: int) -> tuple[str, tuple, int]:
    """(shape label, args, bytes moved) for one fresh input set of `op`."""
    x = _randn(1, L, D, scale=2.0, shift=0.3)
    if op == "rms_norm":
        w = _randn(D, scale=0.1, shift=1.0)
        return f"{L}x{D}", (x, w), _nbytes(x, w, x)
    if op == "rms_norm_qk":
        xh, wh = _randn(1, L, H, 128), _randn(128, scale=0.1, shift=1.0)
        return f"{L}x{H}x128", (xh, wh), _nbytes(xh, wh, xh)
    shift, scale, gate = _modulation(D)
    if op == "norm_scale_shift":
        return f"{L}x{D}", (x, scale, shift), _nbytes(x, scale, shift, x)
    if op == "residual_norm_scale_shift":
        residual = _randn(1, L, D)
        return f"{L}x{D}", (x, residual, gate, scale, shift), _nbytes(x, residual, gate, scale, shift, x, x)
    if op == "mul_add":
        return f"{L}x{D}", (x, scale, shift), _nbytes(x, scale, shift, x)
    if op == "rotary":
        q = _randn(1, L, H, 128)
        ang = torch.rand(L, 64, device="cuda", dtype=torch.float64) * 100
        cos, sin = ang.cos().float(), ang.sin().float()
        return f"{L}x{H}x128", (q, cos, sin), _nbytes(q, cos, sin, q)
    raise ValueError(op)


FUNCS = {
    "rms_norm": (_rms_native, _rms_triton),
    "rms_norm_qk": (_rms_native, _rms_triton),
    "norm_scale_shift": (_nss_native, _nss_triton),
    "residual_norm_scale_shift": (_rnss_native, _rnss_triton),
    "mul_add": (_mul_add_native, None),
    "rotary": (_rotary_native, None),
}


def build_case(op: str, size: str) -> Case:
    L, D, H = SIZES[size]
    shape, args, nbytes = _inputs(op, L, D, H)
    n_sets = max(1, math.ceil(3 * torch.cuda.get_device_properties(0).L2_cache_size / nbytes))
    arg_sets = [args] + [_inputs(op, L, D, H)[1] for _ in range(n_sets - 1)]
    native, triton_fn = FUNCS[op]
    return Case(op, size, shape, native, triton_fn, arg_sets, nbytes)


def _time(fn: Callable, case: Case) -> tuple[float, float]:
    """(do_bench median ms on the first input set, CUDA-graph median ms rotating over all sets)."""
    args = case.arg_sets[0]
    ms = do_bench(lambda: fn(*args), warmup=25, rep=200, return_mode="median")
    sets = itertools.cycle(case.arg_sets)
    ms_graph = do_bench_cudagraph(lambda: fn(*next(sets)), rep=50, return_mode="median")
    return ms, ms_graph


def _max_diff(a, b) -> float:
    a = a if isinstance(a, torch.Tensor) else a[0]  # (y, r) ops: compare y
    b = b if isinstance(b, torch.Tensor) else b[0]
    return (a.float() - b.float()).abs().max().item()


def copy_bandwidth_gbps() -> float:
    src = torch.empty(2**29, device="cuda", dtype=DTYPE).normal_()  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    nbytes = 2 * src.numel() * src.element_size()
    return nbytes / (ms * 1e-3) / 1e9


def run_case(case: Case, copy_gbps: float) -> list[Result]:
    def result(impl, fn, diff, compile_s=None):
        ms, ms_graph = _time(fn, case)
        gbps, gbps_graph = (case.nbytes / (t * 1e-3) / 1e9 for t in (ms, ms_graph))
        return Result(case.op, case.size, case.shape, impl, round(ms, 5), round(gbps, 1),
                      round(gbps / copy_gbps, 3), round(ms_graph, 5), round(gbps_graph / copy_gbps, 3),
                      diff, compile_s)

    args = case.arg_sets[0]
    ref = case.native(*args)
    results = [result("eager", case.native, 0.0)]
    compiled = torch.compile(case.native, backend="inductor", fullgraph=True, dynamic=False)
    t0 = time.perf_counter()
    out = compiled(*args)
    torch.cuda.synchronize()
    compile_s = round(time.perf_counter() - t0, 2)
    results.append(result("compiled", compiled, _max_diff(out, ref), compile_s))
    if case.triton is not None:
        results.append(result("triton", case.triton, _max_diff(case.triton(*args), ref)))
    return results


SWEEP = [  # (looped, chunk, num_warps): the launch layouts compared for each Triton op and size
    (False, None, 4), (False, None, 8), (False, None, 16),
    (True, 512, 4), (True, 1024, 4), (True, 2048, 4), (True, 2048, 8),
]


def layout_sweep(sizes: list[str]) -> list[dict]:
    """Direct kernel calls (the table's inputs) in each SWEEP layout; CUDA-graph medians with rotation."""
    from ditserve.kernels import triton_norm as T

    direct = {
        "rms_norm": lambda args, **kw: T.rms_norm(*args, EPS, **kw),
        "norm_scale_shift": lambda args, **kw: T.norm_scale_shift(args[0], None, *args[1:], EPS, False, **kw),
        "residual_norm_scale_shift": lambda args, **kw: T.residual_norm_scale_shift(
            *args[:3], None, *args[3:], EPS, False, **kw),
        # the fp8 tier's variants (resident rows only: wider ones quantise outside the kernel)
        "norm_scale_shift_fp8": lambda args, **kw: T.norm_scale_shift_fp8(args[0], None, *args[1:], EPS, False,
                                                                           num_warps=kw["num_warps"]),
        "residual_norm_scale_shift_fp8": lambda args, **kw: T.residual_norm_scale_shift_fp8(
            *args[:3], None, *args[3:], EPS, False, num_warps=kw["num_warps"]),
    }
    rows = []
    for size in sizes:
        D = SIZES[size][1]
        for op, call in direct.items():
            max_d = T.RMS_RESIDENT_MAX_D if op == "rms_norm" else T.RESIDENT_MAX_D
            fp8 = op.endswith("_fp8")
            default = T.launch_config(D, T.fp8_num_warps(D, fp8), resident_max_d=max_d)
            if fp8 and default.looped:
                continue
            case = build_case(op.removesuffix("_fp8"), size)
            for looped, chunk, nw in SWEEP:
                if fp8 and looped:
                    continue
                kw = {"looped": looped, "chunk": chunk, "num_warps": nw}
                is_default = T.launch_config(D, **kw) == default
                sets = itertools.cycle(case.arg_sets)
                ms = do_bench_cudagraph(lambda: call(next(sets), **kw), rep=50, return_mode="median")
                rows.append({"op": op, "size": size, "layout": "looped" if looped else "resident", "chunk": chunk,
                             "num_warps": nw, "default": is_default, "ms_graph": round(ms, 5)})
            torch.cuda.empty_cache()
    return rows


def env_info() -> dict:
    commit = benchutil_commit() or "unknown"
    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(),
        "sms": props.multi_processor_count,
        "l2_mb": round(props.L2_cache_size / 2**20, 1),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "dtype": str(DTYPE).removeprefix("torch."),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=",".join(ALL_OPS))
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--no-sweep", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/ops.py needs a CUDA GPU")
    if not K.TRITON_REGISTERED:
        raise SystemExit("the Triton kernels are not registered (is triton importable?)")
    torch._dynamo.config.cache_size_limit = 64
    # Compile in this process: a pool of compile workers starting up competes for the CPU with the timed
    # launches (seen: the first case timed 3x slow).
    torch._inductor.config.compile_threads = 1
    torch.manual_seed(0)
    ops = a.ops.split(",")
    if "rms_norm" in ops:
        ops.insert(ops.index("rms_norm") + 1, "rms_norm_qk")
    sizes = a.sizes.split(",")

    copy_gbps = copy_bandwidth_gbps()
    results: list[Result] = []
    for size in sizes:
        for op in ops:
            case_results = run_case(build_case(op, size), copy_gbps)
            for r in case_results:  # progress, on stderr
                print(f"  {r.op:26s} {r.size:10s} {r.impl:9s} {r.ms:8.4f} ms {r.ms_graph:8.4f} ms (graph)",
                      file=sys.stderr, flush=True)
            results.extend(case_results)
            torch.cuda.empty_cache()
    sweep = [] if a.no_sweep else layout_sweep(sizes)

    print(f"\ncopy bandwidth (read+write): {copy_gbps:.0f} GB/s")
    print(f"{'op':26s} {'size':10s} {'shape':13s} {'impl':8s} {'ms':>7s} {'GB/s':>5s} {'%copy':>5s} "
          f"{'ms_graph':>8s} {'%copy':>5s} {'max|Δ|':>7s} {'compile_s':>9s}")
    for r in results:
        cs = f"{r.compile_s:9.1f}" if r.compile_s is not None else ""
        print(f"{r.op:26s} {r.size:10s} {r.shape:13s} {r.impl:8s} {r.ms:7.4f} {r.gbps:5.0f} "
              f"{100 * r.frac_of_copy:4.0f}% {r.ms_graph:8.4f} {100 * r.frac_of_copy_graph:4.0f}% "
              f"{r.max_abs_diff_vs_eager:7.3g} {cs}")
    if sweep:
        print("\nlayout sweep (direct kernel calls, CUDA-graph ms; * = the automatic choice)")
        for r in sweep:
            print(f"  {r['op']:26s} {r['size']:10s} {r['layout']:8s} chunk={str(r['chunk']):4s} "
                  f"warps={r['num_warps']:2d} {r['ms_graph']:8.4f}{' *' if r['default'] else ''}")
    env = env_info()
    env["copy_gbps"] = round(copy_gbps, 1)
    print(json.dumps({"bench": "ops", "env": env, "results": [asdict(r) for r in results], "sweep": sweep}))


if __name__ == "__main__":
    main()
