"""ditserve.threads: CPU threads from the work's size and the cores actually free; the user's choice wins."""

from __future__ import annotations

import os

import pytest

from ditserve import threads
from ditserve.threads import FLOPS_PER_THREAD, choose_threads


def test_small_work_gets_one_thread_even_on_idle_cores():
    c = choose_threads(0.5e9, free=8.0, user_set=False, current=8, cpus=8)
    assert c.threads == 1 and c.work_threads == 1 and not c.user_set


def test_large_work_gets_the_free_cores_never_more():
    big = 100 * FLOPS_PER_THREAD
    assert choose_threads(big, free=2.0, user_set=False, current=2, cpus=2).threads == 2
    assert choose_threads(big, free=1.05, user_set=False, current=2, cpus=2).threads == 1  # one core busy
    assert choose_threads(big, free=1.5, user_set=False, current=2, cpus=2).threads == 1  # half a core: no
    assert choose_threads(big, free=1.9, user_set=False, current=2, cpus=2).threads == 2  # nearly whole: yes
    assert choose_threads(big, free=0.1, user_set=False, current=2, cpus=2).threads == 1  # at least one
    assert choose_threads(big, free=64.0, user_set=False, current=4, cpus=4).threads == 4  # not above the CPUs
    assert choose_threads(3 * FLOPS_PER_THREAD, free=8.0, user_set=False, current=8, cpus=8).threads == 3


def test_the_users_choice_wins():
    c = choose_threads(100 * FLOPS_PER_THREAD, free=0.0, user_set=True, current=3, cpus=4)
    assert c.threads == 3 and c.user_set and "OMP_NUM_THREADS" in c.describe()


def test_free_cores_reads_idle_time_of_the_usable_cpus(monkeypatch):
    """Two CPUs over 100 jiffies: cpu0 idle 95%, cpu1 busy (idle 2%); cpu2 (not ours) idle. This process used
    no CPU in the window: 0.97 cores free."""
    samples = iter([({0: 0, 1: 0, 2: 0}, {0: 0, 1: 0, 2: 0}), ({0: 95, 1: 2, 2: 100}, {0: 100, 1: 100, 2: 100})])
    monkeypatch.setattr(threads, "_read_proc_stat", lambda: next(samples))
    monkeypatch.setattr(threads, "_start", None)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(threads, "_cpu_time", lambda: 0.0)
    assert threads.free_cores([0, 1]) == pytest.approx(0.97)


def test_free_cores_counts_this_process_as_free(monkeypatch):
    """Both CPUs busy over the window, but this process itself used one core of it: 1 core free for its work."""
    samples = iter([({0: 0, 1: 0}, {0: 0, 1: 0}), ({0: 0, 1: 0}, {0: 100, 1: 100})])
    clock = iter([0.0, 0.2, 0.2])
    monkeypatch.setattr(threads, "_read_proc_stat", lambda: next(samples))
    monkeypatch.setattr(threads, "_start", None)
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.5)
    monkeypatch.setattr(threads, "_clock", lambda: next(clock))
    monkeypatch.setattr(threads, "_cpu_time", iter([10.0, 10.2]).__next__)
    assert threads.free_cores([0, 1]) == pytest.approx(1.0)


def test_engine_on_cpu_sets_threads_once_unless_the_user_chose(monkeypatch):
    """Built on the CPU, the engine applies the choice (once per process): the packaged default model (~0.7 GFLOP
    a forward) gets one thread; with OMP_NUM_THREADS set, or a count set with torch.set_num_threads that torch
    would not pick, the count is left alone."""
    import torch

    from ditserve.config import EngineConfig
    from ditserve.engine import Engine

    calls = []
    real = threads.configure_for_pipeline
    monkeypatch.setattr(threads, "configure_for_pipeline", lambda p: calls.append(p) or real(p))
    engine = Engine.load(None, EngineConfig(device="cpu"))
    assert calls == [engine.pipeline]
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        default = len(os.sched_getaffinity(0))  # what torch picks by itself here
        for preset, expect in ((default, 1), (default + 3, default + 3)):
            monkeypatch.setattr(threads, "_choice", None)
            torch.set_num_threads(preset)
            threads.configure_for_pipeline(engine.pipeline)
            assert torch.get_num_threads() == expect, preset
        monkeypatch.setenv("OMP_NUM_THREADS", str(default))
        monkeypatch.setattr(threads, "_choice", None)
        torch.set_num_threads(default)
        assert threads.configure_for_pipeline(engine.pipeline).user_set and torch.get_num_threads() == default
        monkeypatch.setattr(threads, "_choice", None)
        first = threads.configure_for_pipeline(engine.pipeline)
        assert threads.configure_for_pipeline(engine.pipeline) is first  # once per process
    finally:
        torch.set_num_threads(before)
