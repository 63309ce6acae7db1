"""How many CPU threads torch uses for a model on the CPU: no more than the work can use, no more than the cores
actually free.

torch starts one OpenMP thread per core. On a machine where another process keeps a core busy, the thread on
that core falls behind and every parallel op waits for it at its barrier: a small model then runs many times
slower with two threads than with one. And a small forward (the packaged default model: ~100 tokens) gains
nothing from a second thread anyway, since each op's fork/join costs more than splitting it saves.

So when an engine is built on the CPU, `configure_cpu_threads` sets `torch.set_num_threads` once per process to

    min(threads the work can use, cores free now)      (at least 1)

- the work: one thread per `FLOPS_PER_THREAD` of a transformer forward at the model's default size;
- the free cores: the CPUs this process may run on (`os.sched_getaffinity`, and a cgroup CPU quota) minus what
  other processes used of them over the last moments (`/proc/stat`'s idle time, sampled since `start_sampling`
  or for `SAMPLE_S`, with this process's own CPU time given back; the 1-minute load average where /proc/stat
  cannot be read).

A user's own choice wins: with `OMP_NUM_THREADS` set, or a thread count torch would not pick by itself (a
`torch.set_num_threads` call), nothing is changed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

# One thread per this many FLOPs of a transformer forward: below it, OpenMP's fork/join at each of a forward's
# ~100 parallel ops costs more than splitting them saves (CPU, fp32). A conservative setting (the packaged model
# at its 64x64, ~0.35 GFLOP a forward, stays on one thread), not a measured crossover.
FLOPS_PER_THREAD = 2e9
SAMPLE_S = 0.1  # the shortest window of /proc/stat the free-core estimate is taken over
# Free cores are rounded down unless nearly whole: a core 75% idle still runs a thread that others delay.
ROUND_UP_ABOVE = 0.8


@dataclass(frozen=True)
class ThreadChoice:
    """What `configure_cpu_threads` decided: `threads` set (or kept), and why."""

    threads: int
    work_threads: int  # what the work could use
    free_cores: float  # the estimate of idle cores (over `cpus`)
    cpus: int  # CPUs this process may run on
    user_set: bool  # OMP_NUM_THREADS or torch.set_num_threads chose; nothing changed

    def describe(self) -> str:
        if self.user_set:
            return f"{self.threads} CPU thread(s), as set by OMP_NUM_THREADS / torch.set_num_threads"
        return (f"{self.threads} CPU thread(s): {self.cpus} CPU(s) here, {self.free_cores:.1f} free, "
                f"the work can use {self.work_threads}")


# ------------------------------------------------------------------------------------------- the cores


def usable_cpus() -> list[int]:
    """The CPU ids this process may run on (all of os.cpu_count() where affinity is unknown)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def cgroup_cpu_limit() -> float | None:
    """CPUs a cgroup-v2 quota allows (`/sys/fs/cgroup/cpu.max`: "QUOTA PERIOD"), or None without a quota."""
    try:
        quota, period = open("/sys/fs/cgroup/cpu.max").read().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


_clock, _cpu_time = time.monotonic, time.process_time  # (tests replace them)


@dataclass(frozen=True)
class _Sample:
    when: float
    idle: dict[int, int]  # CPU id -> idle + iowait jiffies
    total: dict[int, int]  # CPU id -> all jiffies
    own_cpu_s: float  # this process's CPU seconds (all threads)


def _read_proc_stat() -> tuple[dict[int, int], dict[int, int]] | None:
    try:
        lines = open("/proc/stat").read().splitlines()
    except OSError:
        return None
    idle, total = {}, {}
    for line in lines:
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *values = line.split()
            v = [int(x) for x in values[:8]]  # user nice system idle iowait irq softirq steal
            cpu = int(name[3:])
            idle[cpu], total[cpu] = v[3] + v[4], sum(v)
    return idle, total


def _sample() -> _Sample | None:
    stat = _read_proc_stat()
    if stat is None:
        return None
    return _Sample(_clock(), stat[0], stat[1], _cpu_time())


_start: _Sample | None = None


def start_sampling() -> None:
    """Note the CPUs' idle time now, so that `free_cores` can measure over the time until the engine is built
    (imports, model load) instead of sleeping `SAMPLE_S`. Cheap: one read of /proc/stat. The CLI calls it first."""
    global _start
    _start = _sample()


def free_cores(cpus: list[int] | None = None) -> float:
    """Cores of `cpus` (default: this process's) that no other process used, averaged over the window since
    `start_sampling` (at least `SAMPLE_S`; sleeps for the rest). This process's own CPU time in the window is
    counted as free: it is the work about to get the threads."""
    cpus = usable_cpus() if cpus is None else cpus
    limit = min(len(cpus), cgroup_cpu_limit() or math.inf)
    start = _start if _start is not None else _sample()
    if start is None:  # no /proc/stat: the 1-minute load average, which includes this process
        try:
            load = os.getloadavg()[0]
        except OSError:
            return float(limit)
        return max(0.0, min(limit, len(cpus) - load + 1))
    wait = SAMPLE_S - (_clock() - start.when)
    if wait > 0:
        time.sleep(wait)
    end = _sample()
    assert end is not None
    idle_cores = 0.0
    for cpu in cpus:
        d_total = end.total.get(cpu, 0) - start.total.get(cpu, 0)
        if d_total > 0:
            idle_cores += (end.idle.get(cpu, 0) - start.idle.get(cpu, 0)) / d_total
    window = max(end.when - start.when, 1e-6)
    own = (end.own_cpu_s - start.own_cpu_s) / window
    return max(0.0, min(limit, idle_cores + own))


# ------------------------------------------------------------------------------------------- the choice


def work_threads(forward_flops: float) -> int:
    """Threads a transformer forward of `forward_flops` can use (at least 1)."""
    return max(1, int(forward_flops // FLOPS_PER_THREAD))


def _torch_default_threads() -> set[int]:
    """Thread counts torch picks by itself (its intra-op default is the physical cores; which count it sees
    depends on the build): any of these means nobody chose."""
    cpus = usable_cpus()
    cores = set()
    for cpu in cpus:
        try:
            cores.add(open(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_cpus_list").read().strip())
        except OSError:
            cores.add(str(cpu))
    return {len(cpus), len(cores), os.cpu_count() or 1}


def user_chose_threads() -> bool:
    """Whether the user set the thread count: OMP_NUM_THREADS, or torch.set_num_threads to a count torch would
    not choose itself."""
    import torch

    return bool(os.environ.get("OMP_NUM_THREADS")) or torch.get_num_threads() not in _torch_default_threads()


def choose_threads(forward_flops: float, free: float, user_set: bool, current: int, cpus: int) -> ThreadChoice:
    """The decision, without side effects: see the module docstring."""
    want = work_threads(forward_flops)
    if user_set:
        return ThreadChoice(current, want, free, cpus, True)
    whole = math.floor(free) + (1 if free - math.floor(free) >= ROUND_UP_ABOVE else 0)
    return ThreadChoice(max(1, min(want, whole, cpus)), want, free, cpus, False)


_choice: ThreadChoice | None = None


def configure_cpu_threads(forward_flops: float) -> ThreadChoice:
    """Set torch's CPU thread count for a model whose forward costs `forward_flops`, once per process (later
    calls return the first decision). Never raises the count above what torch had."""
    global _choice
    if _choice is not None:
        return _choice
    import torch

    current = torch.get_num_threads()
    user_set = user_chose_threads()
    cpus = usable_cpus()
    choice = choose_threads(forward_flops, current if user_set else free_cores(cpus), user_set, current, len(cpus))
    if not user_set and choice.threads != current:
        torch.set_num_threads(min(choice.threads, current))
    _choice = choice
    return choice


def forward_flops(transformer, tokens: int) -> float:
    """A transformer forward's FLOPs over `tokens` tokens: 2 per parameter per token (the GEMMs), plus
    attention's 4 T^2 d per layer, with d and the layer count estimated from the parameters (a block holds
    ~12 d^2 of them) and the attention modules. An estimate: right within ~2x, which is what its users need."""
    params = sum(p.numel() for p in transformer.parameters())
    layers = sum(1 for m in transformer.modules() if type(m).__name__.endswith("Attention")) or 1
    width = math.sqrt(params / (12 * layers))
    return 2.0 * params * tokens + 4.0 * tokens * tokens * width * layers


def configure_for_pipeline(pipeline) -> ThreadChoice:
    """`configure_cpu_threads` for a loaded pipeline's transformer at its model's default size (the engine calls
    this once it is built on the CPU)."""
    from ditserve.config import SamplingParams

    spec = pipeline.spec
    params = SamplingParams(prompt="", height=spec.default_height, width=spec.default_width,
                            num_frames=spec.default_num_frames)
    tokens = pipeline.forward_tokens(params) + spec.max_sequence_length
    return configure_cpu_threads(forward_flops(pipeline.transformer, tokens))
