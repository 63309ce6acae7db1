"""CFG parallelism: the two classifier-free-guidance branches on the two ranks of a cfg group.

Cfg rank 0 predicts the conditional rows, cfg rank 1 the unconditional ones; an all-gather gives every rank both
predictions, and every rank combines them and steps the same latents (the same noise, schedule and scheduler on
every rank), so the ranks stay in lockstep with no other exchange. The pipeline's denoise loop calls these hooks.
"""

from __future__ import annotations

import secrets

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from ditserve.parallel.state import ParallelState, current


def cfg_state(cfg: bool) -> ParallelState | None:
    """The parallel state when this run splits the guidance branches (a cfg degree of 2 and CFG active), else
    None (a one-process run, or a request without CFG: then every rank of the cfg group runs the same rows)."""
    state = current()
    return state if cfg and state is not None and state.config.cfg == 2 else None


def gather_branches(v: torch.Tensor, state: ParallelState) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's branch prediction (B, ...) -> (cond, uncond), each (B, ...), the same on both ranks."""
    both = funcol.wait_tensor(funcol.all_gather_single(v.contiguous(), 0, state.cfg_group))  # (2B, ...)
    return both.chunk(2)


def shared_seed() -> int:
    """A fresh random seed, the same on every rank of the run (rank 0's draw, broadcast): the ranks must draw the
    same noise. In a one-process run, just a fresh seed."""
    seed = [secrets.randbits(63)]
    if current() is not None:
        dist.broadcast_object_list(seed, src=0)
    return seed[0]
