"""Ctrl-C: a running `ditserve generate` stops within about a second at any stage, prints one line, leaves no
output (nor a temporary file) and exits 130 (`ditserve.interrupt`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

PROMPT = "a red circle on a blue background"
DEADLINE_S = 2.0  # "about a second", with slack for a busy 2-core machine


def start(out_dir, *flags) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ditserve", "generate", "--prompt", PROMPT, "--no-progress",
                             "--output", str(out_dir / "out.png"), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def interrupt(proc: subprocess.Popen) -> tuple[float, str, str]:
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    return time.monotonic() - t0, out, err


def wait_for_line(proc: subprocess.Popen, needle: str, timeout: float = 120) -> list[str]:
    """stderr lines up to and including the first holding `needle` (the process keeps running)."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            pytest.fail(f"generate ended before {needle!r}: {lines}")
        lines.append(line.rstrip("\n"))
        if needle in line:
            return lines
    pytest.fail(f"no {needle!r} within {timeout} s: {lines}")


def test_ctrl_c_during_the_denoise(tmp_path):
    """A 4096x4096 request on the CPU (hours of work): the warning says so up front; SIGINT mid-denoise ends it."""
    proc = start(tmp_path, "--height", "4096", "--width", "4096")
    before = wait_for_line(proc, "of denoising (an estimate); Ctrl-C stops it")
    time.sleep(1.0)  # inside the first step's attention over 65,568 tokens
    assert proc.poll() is None
    seconds, out, err = interrupt(proc)
    assert proc.returncode == 130, err
    assert seconds < DEADLINE_S
    assert err.strip().splitlines() == ["ditserve generate: interrupted; no output written"], (before, err)
    assert out == "" and list(tmp_path.iterdir()) == []


def test_ctrl_c_during_start_up(tmp_path):
    """SIGINT while Python imports torch and the engine: the same one line and status."""
    proc = start(tmp_path)
    time.sleep(0.8)
    assert proc.poll() is None
    seconds, out, err = interrupt(proc)
    assert proc.returncode == 130 and seconds < DEADLINE_S, err
    assert err.strip().splitlines() == ["ditserve generate: interrupted; no output written"]
    assert list(tmp_path.iterdir()) == []
