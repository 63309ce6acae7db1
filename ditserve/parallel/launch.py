"""The CLI's launch of a parallel run: one worker process per rank, spawned by ditserve itself (unless torchrun
started this process already), and a failed rank turned into one error line and an exit status."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from ditserve.parallel.config import ParallelConfig

EXIT_FAILED = 1


def under_torchrun() -> bool:
    """Whether this process is one rank of a run that torchrun (or another launcher) started: its environment
    names the rank and the world."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_workers(parallel: str | None) -> bool:
    """Whether a command with this --parallel plan must spawn its own workers."""
    return ParallelConfig.parse(parallel).enabled and not under_torchrun()


def run_workers(fn: Callable[..., Any], parallel: str, device: str | None, args: tuple, prog: str = "ditserve"
                ) -> int:
    """Run `fn(state, *args)` (a module-level function) on every rank of the plan (gloo processes with device
    "cpu", one per GPU otherwise) and return 0, or, when a rank raises or dies, print one line naming it and
    its error and return EXIT_FAILED (the other ranks are ended: torch.multiprocessing terminates them, and a
    rank waiting in a collective times out at the latest)."""
    import torch
    import torch.multiprocessing as mp

    from ditserve.parallel.state import launch

    plan = ParallelConfig.parse(parallel)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        launch(fn, plan, device, args)
    except mp.ProcessRaisedException as e:
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        last = lines[-1].strip() if lines else "failed"
        for prefix in ("ditserve.errors.ConfigError: ", "ConfigError: "):
            last = last.removeprefix(prefix)
        print(f"{prog}: error: --parallel {plan}: rank {e.error_index} failed: {last}", file=sys.stderr)
        return EXIT_FAILED
    except mp.ProcessExitedException as e:
        print(f"{prog}: error: --parallel {plan}: rank {e.error_index} died (exit status {e.exit_code}); the run "
              f"stopped", file=sys.stderr)
        return EXIT_FAILED
    return 0
