"""ditserve.threads: CPU threads from the work's size and the cores actually free; the user's choice wins."""

from __future__ import annotations

import os
import subprocess
import sys

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


def _run(code: str, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_engine_on_cpu_sets_threads_once_unless_the_user_chose():
    """Built on the CPU, the packaged default model (~0.7 GFLOP a forward) runs on one thread; with
    OMP_NUM_THREADS set, or after torch.set_num_threads, the count is left alone."""
    code = ("import torch\nfrom ditserve.config import EngineConfig\nfrom ditserve.engine import Engine\n"
            "{before}\nEngine.load(None, EngineConfig(device='cpu'))\nprint(torch.get_num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert _run(code.format(before=""), env) == "1"
    odd = len(os.sched_getaffinity(0)) + 3  # a count torch never picks itself
    assert _run(code.format(before=f"torch.set_num_threads({odd})"), env) == str(odd)
