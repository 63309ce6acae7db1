"""ditserve.logging: once-per-process messages, safe under torch.compile; importing the package is inert."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import uuid

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from ditserve.logging import DitLogger, init_logger, setup_logging


def unique(text: str) -> str:
    """The once-registry is process-wide: each test logs messages no other test has used."""
    return f"{text} {uuid.uuid4().hex}"


def records(caplog, msg):
    return [r for r in caplog.records if r.getMessage() == msg]


def test_init_logger_wraps_named_logger():
    log = init_logger("ditserve.test.wrap")
    assert isinstance(log, DitLogger)
    assert log.logger is logging.getLogger("ditserve.test.wrap") and log.name == "ditserve.test.wrap"
    assert log.isEnabledFor is not None and log.getEffectiveLevel() == log.logger.getEffectiveLevel()  # delegated


@pytest.mark.parametrize("method,level", [("info_once", logging.INFO), ("warning_once", logging.WARNING)])
def test_once_logs_exactly_once(method, level, caplog):
    caplog.set_level(logging.INFO, logger="ditserve")
    log = init_logger("ditserve.test.once")
    msg, other = unique("kernel missing"), unique("another message")
    for _ in range(3):
        getattr(log, method)(msg)
    getattr(log, method)(other)
    got = records(caplog, msg)
    assert len(got) == 1 and got[0].levelno == level and got[0].name == "ditserve.test.once"
    assert len(records(caplog, other)) == 1  # a different message is its own "once"


def test_once_is_per_logger_and_level(caplog):
    caplog.set_level(logging.INFO, logger="ditserve")
    msg = unique("shared text")
    init_logger("ditserve.test.a").warning_once(msg)
    init_logger("ditserve.test.b").warning_once(msg)
    init_logger("ditserve.test.a").info_once(msg)
    init_logger("ditserve.test.a").warning_once(msg)
    assert sorted((r.name, r.levelno) for r in records(caplog, msg)) == [
        ("ditserve.test.a", logging.INFO), ("ditserve.test.a", logging.WARNING), ("ditserve.test.b", logging.WARNING)]


def test_plain_methods_are_not_deduplicated(caplog):
    caplog.set_level(logging.INFO, logger="ditserve")
    log = init_logger("ditserve.test.plain")
    msg = unique("every time")
    log.info(msg)
    log.info(msg)
    assert len(records(caplog, msg)) == 2


def test_warning_once_under_compile_no_graph_break(caplog):
    caplog.set_level(logging.INFO, logger="ditserve")
    log = init_logger("ditserve.test.compiled")
    msg = unique("falling back to the native path")

    def f(x):
        log.warning_once(msg)
        return torch.nn.functional.silu(x) * 2

    counter = CompileCounter()
    compiled = torch.compile(f, fullgraph=True, backend=counter)  # fullgraph: a graph break would raise
    x = torch.randn(4, 8)
    torch.testing.assert_close(compiled(x), f(x))
    assert counter.frame_count == 1
    assert len(records(caplog, msg)) == 1  # logged while tracing; f(x) in eager above found it already seen
    for n in (5, 6, 7):  # new shapes: recompiles (automatic dynamic) must not log again
        compiled(torch.randn(n, 8))
    compiled(x)
    assert len(records(caplog, msg)) == 1


def test_setup_logging_attaches_one_handler():
    logger = logging.getLogger("ditserve")
    saved_handlers, saved_level = list(logger.handlers), logger.level
    try:
        logger.handlers.clear()
        setup_logging("DEBUG")
        setup_logging(logging.INFO)
        assert len(logger.handlers) == 1 and logger.level == logging.INFO
    finally:
        logger.handlers[:] = saved_handlers
        logger.setLevel(saved_level)


_IMPORT_PROBE = r"""
import json, logging, sys
import torch
import torch._dynamo.config, torch._inductor.config

def snapshot():
    return {
        "root_handlers": [repr(h) for h in logging.getLogger().handlers],
        "root_level": logging.getLogger().level,
        "ditserve_handlers": [repr(h) for h in logging.getLogger("ditserve").handlers],
        "ditserve_level": logging.getLogger("ditserve").level,
        "dynamo": {k: repr(v) for k, v in torch._dynamo.config.get_config_copy().items()},
        "inductor": {k: repr(v) for k, v in torch._inductor.config.get_config_copy().items()},
        "default_dtype": str(torch.get_default_dtype()),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cuda_reduced_precision": torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction,
        "cudnn": [torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
                  torch.backends.cudnn.deterministic, torch.backends.cudnn.allow_tf32],
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "grad": torch.is_grad_enabled(),
        "num_threads": torch.get_num_threads(),
        "cuda_initialized": torch.cuda.is_initialized(),
    }

before = snapshot()
import ditserve, ditserve.ops, ditserve.logging, ditserve.platform, ditserve.config, ditserve.registry
import ditserve.kernels.norm
from ditserve.platform import current_platform
after = snapshot()
diff = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
for k in ("dynamo", "inductor"):
    if k in diff:
        diff[k] = {n: (before[k].get(n), after[k].get(n)) for n in set(before[k]) | set(after[k])
                   if before[k].get(n) != after[k].get(n)}
print(json.dumps({"diff": diff, "platform_probed": current_platform.cache_info().currsize}))
"""


def test_import_changes_no_global_state():
    """Importing ditserve adds no logging handlers, sets no torch flags and probes no device (fresh process)."""
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["diff"] == {}
    assert result["platform_probed"] == 0


def test_emit_once_carries_torchs_constant_mark_without_importing_dynamo():
    """`_emit_once` is marked as torch.compiler.assume_constant_result marks a function, and importing
    ditserve.logging does not import torch._dynamo (about 1 s of a CLI's start-up); marked that way, a warn-once
    inside a fullgraph compile still adds no graph break."""
    from ditserve.logging import _emit_once

    marked = torch.compiler.assume_constant_result(lambda: 1)
    assert marked.__dict__ == {"_dynamo_marked_constant": True}
    assert _emit_once._dynamo_marked_constant is True
    code = ("import sys, torch, ditserve.logging\n"
            "print('torch._dynamo' in sys.modules)\n"
            "log = ditserve.logging.init_logger('ditserve.test.subprocess')\n"
            "def f(x):\n"
            "    log.warning_once('once')\n"
            "    return x * 2\n"
            "torch.compile(f, fullgraph=True, backend='eager')(torch.ones(2))\n"  # a graph break would raise
            "print('compiled')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "compiled"]
