"""Process groups of a parallel run on torch.distributed: setup, the subgroups of the three degrees, teardown, and
the launcher that spawns one process per GPU (or gloo processes on a CPU).

Rank layout (ulysses innermost, so a Ulysses group's ranks are neighbours, on one NVLink island first):

    rank = cfg_rank * (ring * ulysses) + ring_rank * ulysses + ulysses_rank

The sequence shard a rank holds is its sequence-parallel rank `sp_rank = ring_rank * ulysses + ulysses_rank`:
a Ulysses group's shards are contiguous, so after its all-to-all each rank holds one contiguous ring chunk.

Backend: NCCL on CUDA, gloo on CPU, with a collective timeout (`timeout_s`): a rank that dies makes the others'
next collective fail after at most that long instead of waiting forever.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from ditserve.errors import ConfigError
from ditserve.parallel.config import ParallelConfig

# The collective timeout of a parallel run (seconds): longer than any single collective of a denoise step (the
# first step compiles on every rank, so ranks can drift apart by a compile), short enough that a dead rank ends
# the run instead of hanging it.
DEFAULT_TIMEOUT_S = 600.0


@dataclass
class ParallelState:
    """One rank's view of the run: its config, ranks and process groups (None for a degree of 1)."""

    config: ParallelConfig
    rank: int
    world_size: int
    device: torch.device
    ulysses_rank: int
    ring_rank: int
    cfg_rank: int
    ulysses_group: Any  # dist.ProcessGroup | None
    ring_group: Any
    cfg_group: Any
    sp_group: Any  # ulysses x ring: the ranks sharing one sequence

    @property
    def sp_rank(self) -> int:
        """This rank's sequence shard index (see the module docstring)."""
        return self.ring_rank * self.config.ulysses + self.ulysses_rank

    @property
    def sp(self) -> int:
        return self.config.sp

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that owns the request queue and writes the outputs."""
        return self.rank == 0


_STATE: ParallelState | None = None


def current() -> ParallelState | None:
    """The running parallel state, or None in a one-process run."""
    return _STATE


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def _group_ranks(cfg: ParallelConfig) -> dict[str, list[list[int]]]:
    """Every subgroup of every degree, as lists of global ranks (each rank in exactly one group per degree)."""
    U, R, C = cfg.ulysses, cfg.ring, cfg.cfg

    def rank(c, r, u):
        return c * R * U + r * U + u

    return {
        "ulysses": [[rank(c, r, u) for u in range(U)] for c in range(C) for r in range(R)],
        "ring": [[rank(c, r, u) for r in range(R)] for c in range(C) for u in range(U)],
        "cfg": [[rank(c, r, u) for c in range(C)] for r in range(R) for u in range(U)],
        "sp": [[rank(c, r, u) for r in range(R) for u in range(U)] for c in range(C)],
    }


def init_parallel(config: ParallelConfig, device: str | torch.device | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S) -> ParallelState:
    """Join the run's process group (initialising torch.distributed from the environment, as torchrun or
    `launch` set it: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and build the subgroups. `device`:
    "cuda" (this rank's GPU is cuda:LOCAL_RANK), "cpu", or None (CUDA when available). Raises ConfigError when
    the world size is not the config's product."""
    global _STATE
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ConfigError(f"--parallel: {var} is not set; launch with ditserve's own workers or torchrun")
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend_for(device), timeout=timeout, **kwargs)
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != config.world_size:
        raise ConfigError(f"--parallel {config}: needs {config.world_size} processes, the run has {world}")
    groups: dict[str, Any] = {}
    for name, all_ranks in _group_ranks(config).items():
        for ranks in all_ranks:  # every rank creates every group, in the same order (torch.distributed's rule)
            pg = dist.new_group(ranks, timeout=timeout) if len(ranks) > 1 else None
            if rank in ranks:
                groups[name] = pg
    U, R = config.ulysses, config.ring
    _STATE = ParallelState(config=config, rank=rank, world_size=world, device=device,
                           ulysses_rank=rank % U, ring_rank=(rank // U) % R, cfg_rank=rank // (U * R),
                           ulysses_group=groups["ulysses"], ring_group=groups["ring"], cfg_group=groups["cfg"],
                           sp_group=groups["sp"])
    return _STATE


def teardown() -> None:
    """Leave the process group (every rank calls it at the end of a run)."""
    global _STATE
    _STATE = None
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, fn: Callable, config: ParallelConfig, device: str, args: tuple, result_path: str,
            timeout_s: float) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(config.world_size))
    if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:  # the cores shared among the workers
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.world_size))
    try:
        state = init_parallel(config, device, timeout_s)
        result = fn(state, *args)
        if rank == 0:
            torch.save(result, result_path)
    finally:
        teardown()


def launch(fn: Callable[..., Any], config: ParallelConfig, device: str = "cpu", args: tuple = (),
           timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """Run `fn(state, *args)` on config.world_size spawned processes (one per GPU with device "cuda", gloo
    processes with "cpu") and return rank 0's result (pickled through a file). `fn` must be importable by name
    (a module-level function). A rank that raises or dies ends the others (torch.multiprocessing terminates them)
    and raises here: torch.multiprocessing's ProcessRaisedException / ProcessExitedException."""
    import torch.multiprocessing as mp

    if device.startswith("cuda") and torch.cuda.device_count() < config.world_size:
        raise ConfigError(f"--parallel {config}: needs {config.world_size} GPUs, {torch.cuda.device_count()} "
                          f"visible")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(free_port())
    with tempfile.TemporaryDirectory(prefix="ditserve-parallel-") as tmp:
        path = os.path.join(tmp, "rank0.pt")
        mp.start_processes(_worker, args=(fn, config, device.split(":")[0], args, path, timeout_s),
                           nprocs=config.world_size, join=True, start_method="spawn")
        return torch.load(path, weights_only=False) if os.path.exists(path) else None
