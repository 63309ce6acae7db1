"""Micro-benchmark of the fused elementwise/norm ops on one CUDA GPU, bf16.

For each op and size: eager native (the `ditserve.ops.functional` reference), torch.compile'd native
(inductor, fullgraph, static shapes) and, where one exists, the Triton custom op called eagerly
(`torch.ops.ditserve.*`). Times are `triton.testing.do_bench` medians (it flushes L2 between calls, and these
tensors are far beyond L2 anyway). Achieved GB/s counts each input read once and each output written once,
and is set against the device-to-device copy bandwidth measured in the same run (a large copy_: bytes read +
bytes written).

Sizes: FLUX.1-dev at 1024² (4608 tokens x 3072) and Wan2.1-14B at 480x832x81 (32760 tokens x 5120); the
RMSNorm rows also at their per-head q/k-norm shape (D = 128). Modulation is per-sample (B=1, 1, D).

Also sweeps num_warps of the three Triton kernels, to check the launch heuristic.

Usage: python bench/ops.py [--ops rms_norm,norm_scale_shift,...] [--sizes flux1-dev,wan-14b] [--no-sweep]
Prints a table, then ONE JSON line last: {"bench": "ops", "env": {...}, "results": [...], "sweep": [...]}.
The commit is read from $DITSERVE_COMMIT, else `git rev-parse --short HEAD`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from ditserve.kernels import norm as K  # noqa: E402
from ditserve.ops import functional as Fn  # noqa: E402

EPS = 1e-6
SIZES = {"flux1-dev": (4608, 3072, 24), "wan-14b": (32760, 5120, 40)}  # tokens, width, heads (head dim 128)
DTYPE = torch.bfloat16


@dataclass
class Case:
    """One op at one size: the native function, its Triton op (or None), inputs, and bytes moved."""

    op: str
    size: str
    shape: str
    native: Callable
    triton: Callable | None
    args: tuple
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
    max_abs_diff_vs_eager: float
    compile_s: float | None = None


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _randn(*shape, dtype=DTYPE, scale=1.0, shift=0.0):
    return (torch.randn(*shape, device="cuda") * scale + shift).to(dtype)


# Native functions: module level so each compiles once per shape (static shapes).
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


def build_cases(ops: list[str], sizes: list[str]) -> list[Case]:
    cases = []
    for size in sizes:
        L, D, H = SIZES[size]
        x = _randn(1, L, D, scale=2.0, shift=0.3)
        # Modulation sliced from one (1, 1, 6D) vector, as the models do (chunk of the AdaLN embedding).
        emb = _randn(1, 1, 6 * D, scale=0.5)
        shift, scale, gate = emb.chunk(6, dim=-1)[:3]
        out = x  # output bytes equal an x-sized tensor for every op here
        if "rms_norm" in ops:
            w = _randn(D, scale=0.1, shift=1.0)
            cases.append(Case("rms_norm", size, f"{L}x{D}", _rms_native, _rms_triton, (x, w), _nbytes(x, w, out)))
            xh = _randn(1, L, H, 128)
            wh = _randn(128, scale=0.1, shift=1.0)
            cases.append(Case("rms_norm_qk", size, f"{L}x{H}x128", _rms_native, _rms_triton, (xh, wh),
                              _nbytes(xh, wh, xh)))
        if "norm_scale_shift" in ops:
            cases.append(Case("norm_scale_shift", size, f"{L}x{D}", _nss_native, _nss_triton, (x, scale, shift),
                              _nbytes(x, scale, shift, out)))
        if "residual_norm_scale_shift" in ops:
            residual = _randn(1, L, D)
            cases.append(Case("residual_norm_scale_shift", size, f"{L}x{D}", _rnss_native, _rnss_triton,
                              (x, residual, gate, scale, shift),
                              _nbytes(x, residual, gate, scale, shift, out, residual)))
        if "mul_add" in ops:
            cases.append(Case("mul_add", size, f"{L}x{D}", _mul_add_native, None, (x, scale, shift),
                              _nbytes(x, scale, shift, out)))
        if "rotary" in ops:
            q = _randn(1, L, H, 128)
            ang = torch.rand(L, 64, device="cuda", dtype=torch.float64) * 100
            cos, sin = ang.cos().float(), ang.sin().float()
            cases.append(Case("rotary", size, f"{L}x{H}x128", _rotary_native, None, (q, cos, sin),
                              _nbytes(q, cos, sin, q)))
    return cases


def _time(fn: Callable, args: tuple) -> float:
    return do_bench(lambda: fn(*args), warmup=25, rep=200, return_mode="median")


def _max_diff(a, b) -> float:
    a = a if isinstance(a, torch.Tensor) else a[0]  # (y, r) ops: compare y
    b = b if isinstance(b, torch.Tensor) else b[0]
    return (a.float() - b.float()).abs().max().item()


def copy_bandwidth_gbps() -> float:
    src = torch.empty(2**29, device="cuda", dtype=DTYPE).normal_()  # 1 GiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    nbytes = 2 * src.numel() * src.element_size()
    del src, dst
    return nbytes / (ms * 1e-3) / 1e9


def run_case(case: Case, copy_gbps: float) -> list[Result]:
    def result(impl, ms, diff, compile_s=None):
        gbps = case.nbytes / (ms * 1e-3) / 1e9
        return Result(case.op, case.size, case.shape, impl, round(ms, 5), round(gbps, 1),
                      round(gbps / copy_gbps, 3), diff, compile_s)

    ref = case.native(*case.args)
    results = [result("eager", _time(case.native, case.args), 0.0)]
    compiled = torch.compile(case.native, backend="inductor", fullgraph=True, dynamic=False)
    t0 = time.perf_counter()
    out = compiled(*case.args)
    torch.cuda.synchronize()
    compile_s = round(time.perf_counter() - t0, 2)
    results.append(result("compiled", _time(compiled, case.args), _max_diff(out, ref), compile_s))
    if case.triton is not None:
        out = case.triton(*case.args)
        results.append(result("triton", _time(case.triton, case.args), _max_diff(out, ref)))
    return results


def warps_sweep(sizes: list[str]) -> list[dict]:
    """Direct kernel calls at num_warps 4/8/16 against the default heuristic."""
    from ditserve.kernels import triton_norm as T

    rows = []
    for size in sizes:
        L, D, _ = SIZES[size]
        x = _randn(1, L, D, scale=2.0, shift=0.3)
        residual = _randn(1, L, D)
        shift, scale, gate = _randn(1, 1, 6 * D, scale=0.5).chunk(6, dim=-1)[:3]
        calls = {
            "rms_norm": lambda nw: T.rms_norm(x, None, EPS, num_warps=nw),
            "norm_scale_shift": lambda nw: T.norm_scale_shift(x, None, scale, shift, EPS, False, num_warps=nw),
            "residual_norm_scale_shift": lambda nw: T.residual_norm_scale_shift(
                x, residual, gate, None, scale, shift, EPS, False, num_warps=nw),
        }
        default = T.launch_config(D)[2]
        for op, call in calls.items():
            for nw in (4, 8, 16):
                ms = do_bench(lambda: call(nw), warmup=25, rep=100, return_mode="median")
                rows.append({"op": op, "size": size, "num_warps": nw, "default": nw == default, "ms": round(ms, 5)})
    return rows


def env_info() -> dict:
    commit = os.environ.get("DITSERVE_COMMIT")
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=Path(__file__).parent, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "commit": commit,
        "date": datetime.date.today().isoformat(),
        "dtype": str(DTYPE).removeprefix("torch."),
        "triton_registered": K.TRITON_REGISTERED,
    }


def main() -> None:
    all_ops = "rms_norm,norm_scale_shift,residual_norm_scale_shift,mul_add,rotary"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", default=all_ops)
    p.add_argument("--sizes", default=",".join(SIZES))
    p.add_argument("--no-sweep", action="store_true")
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/ops.py needs a CUDA GPU")
    if not K.TRITON_REGISTERED:
        raise SystemExit("the Triton kernels are not registered (is triton importable?)")
    torch._dynamo.config.cache_size_limit = 64
    torch.manual_seed(0)

    copy_gbps = copy_bandwidth_gbps()
    results: list[Result] = []
    for case in build_cases(a.ops.split(","), a.sizes.split(",")):
        case_results = run_case(case, copy_gbps)
        for r in case_results:  # progress, on stderr
            print(f"  {r.op:26s} {r.size:10s} {r.impl:9s} {r.ms:8.4f} ms", file=sys.stderr, flush=True)
        results.extend(case_results)
    sweep = [] if a.no_sweep else warps_sweep(a.sizes.split(","))

    print(f"\ncopy bandwidth (read+write): {copy_gbps:.0f} GB/s")
    print(f"{'op':26s} {'size':10s} {'shape':14s} {'impl':9s} {'ms':>8s} {'GB/s':>7s} {'%copy':>6s} "
          f"{'max|Δ|':>8s} {'compile s':>9s}")
    for r in results:
        cs = f"{r.compile_s:9.1f}" if r.compile_s is not None else ""
        print(f"{r.op:26s} {r.size:10s} {r.shape:14s} {r.impl:9s} {r.ms:8.4f} {r.gbps:7.0f} "
              f"{100 * r.frac_of_copy:5.0f}% {r.max_abs_diff_vs_eager:8.3g} {cs}")
    if sweep:
        print("\nnum_warps sweep (direct kernel calls, ms; * = default heuristic)")
        for s in sweep:
            print(f"  {s['op']:26s} {s['size']:10s} warps={s['num_warps']:2d} {s['ms']:8.4f}{' *' if s['default'] else ''}")
    env = env_info()
    env["copy_gbps"] = round(copy_gbps, 1)
    print(json.dumps({"bench": "ops", "env": env, "results": [asdict(r) for r in results], "sweep": sweep}))


if __name__ == "__main__":
    main()
