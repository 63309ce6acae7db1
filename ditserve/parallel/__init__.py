"""Several GPUs (or gloo processes on a CPU): Ulysses and ring sequence parallelism and CFG parallelism on
torch.distributed. `ParallelConfig` (the plan), `init_parallel` / `teardown` / `launch` (process groups and
workers), `SequenceParallelAttention` (the attention ops), `ditserve.parallel.sharding` (the models' hooks)."""

from ditserve.parallel.config import ParallelConfig

__all__ = ["ParallelConfig"]
