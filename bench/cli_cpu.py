"""`ditserve generate` on the CPU with the packaged default model, wall time end to end (a fresh process each run:
imports, model load, 28 steps, decode, PNG), with the cores idle and with one core kept busy by another process
(`python -c "while True: pass"`), the case ditserve's CPU thread choice is for (`ditserve/threads.py`).

    python bench/cli_cpu.py                       # 5 runs each; JSON line last
    python bench/cli_cpu.py --max-load 0.5        # first wait until the 1-minute load average is below 0.5

The 1-minute load average before and after is recorded: other work on the machine shows up in every figure.
OMP_NUM_THREADS is removed from the children's environment (ditserve chooses; set --omp N to force N threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "a red circle on a blue background"


def run_generate(out: str, env: dict[str, str]) -> tuple[float, str]:
    cmd = [sys.executable, "-m", "ditserve", "generate", "--prompt", PROMPT, "--seed", "0", "--no-progress",
           "--output", out]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"generate failed: {proc.stderr}")
    return wall, [line for line in proc.stderr.splitlines() if "denoise" in line][-1]


def series(runs: int, env: dict[str, str], out: str) -> dict:
    results = [run_generate(out, env) for _ in range(runs)]
    walls = [round(w, 2) for w, _ in results]
    return {"wall_s": walls, "median_s": statistics.median(walls), "summary_of_median_run":
            results[sorted(range(runs), key=lambda i: walls[i])[runs // 2]][1]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--max-load", type=float, default=None, help="wait until the 1-minute load is below this")
    p.add_argument("--omp", type=int, default=None, help="set OMP_NUM_THREADS in the children (default: unset)")
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if args.omp is not None:
        env["OMP_NUM_THREADS"] = str(args.omp)
    while args.max_load is not None and os.getloadavg()[0] > args.max_load:
        time.sleep(5)
    rec = {"bench": "cli_cpu", "cpus": len(os.sched_getaffinity(0)), "omp_num_threads": args.omp,
           "load_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.png")
        run_generate(out, env)  # untimed: page cache warm
        rec["idle"] = series(args.runs, env, out)
        rec["load_between"] = [round(x, 2) for x in os.getloadavg()]
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(2)
            rec["one_core_busy"] = series(args.runs, env, out)
        finally:
            busy.kill()
            busy.wait()
    rec["load_after"] = [round(x, 2) for x in os.getloadavg()]
    print(f"idle cores: median {rec['idle']['median_s']} s; one core busy: median "
          f"{rec['one_core_busy']['median_s']} s (load before {rec['load_before'][0]})", file=sys.stderr)
    print(json.dumps(rec))


if __name__ == "__main__":
    main()
