"""The packaged default model, checked as a newcomer meets it: every held-out prompt through `ditserve generate`
with no --model, one cold process each, timed end to end and judged by `ditserve.shapes.judge`.

CPU (or whatever `ditserve generate` picks here). Prints one line per prompt to stderr and one JSON line last:
accuracy (all three of background colour, shape colour and shape right), per-attribute accuracy, and the wall
time per command (median, max; the first run includes cold file caches).

    python bench/default_model.py [--limit N] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchutil import commit
from PIL import Image

from ditserve import shapes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=int, default=None, help="only the first N held-out prompts")
    ap.add_argument("--seed", type=int, default=0, help="--seed passed to every command")
    args = ap.parse_args()
    specs = shapes.held_out_specs()[:args.limit]
    walls, rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(specs):
            out = Path(tmp) / f"{i}.png"
            cmd = [sys.executable, "-m", "ditserve", "generate", "--prompt", spec.prompt, "--seed", str(args.seed),
                   "--output", str(out), "--quiet"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            with Image.open(out) as img:
                j = shapes.judge(img.convert("RGB"))
            ok = j.matches(spec)
            walls.append(wall)
            rows.append({"prompt": spec.prompt, "wall_s": round(wall, 2), "ok": ok,
                         "judged": [j.colour, j.shape, j.background]})
            print(f"{wall:5.2f} s  {'ok ' if ok else 'BAD'}  {spec.prompt}  -> {j.colour} {j.shape} on "
                  f"{j.background}", file=sys.stderr, flush=True)

    def frac(key):
        return round(sum(r["judged"][key] == v for r, v in zip(rows, values(key))) / len(rows), 4)

    def values(key):
        return [(s.colour, s.shape, s.background)[key] for s in specs]

    rec = {"bench": "default_model", "commit": commit(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "prompts": len(rows), "seed": args.seed, "accuracy": round(sum(r["ok"] for r in rows) / len(rows), 4),
           "colour_accuracy": frac(0), "shape_accuracy": frac(1), "background_accuracy": frac(2),
           "wall_s": {"first": round(walls[0], 2), "median": round(statistics.median(walls), 2),
                      "max": round(max(walls), 2)},
           "wrong": [r["prompt"] for r in rows if not r["ok"]]}
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
