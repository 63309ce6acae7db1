"""Loggers with once-per-process messages that are safe inside torch.compile'd code.

`init_logger(name)` returns a `DitLogger` (a wrapper over `logging.getLogger(name)`, so handlers and levels
work as usual) with `info_once` and `warning_once`. The once-helpers route through `_emit_once`, marked
`torch.compiler.assume_constant_result`: under torch.compile dynamo runs it once while tracing and treats its
result as a constant, so a warn-once inside a compiled function logs (once) and adds no graph break.

This module configures nothing at import: no handlers, no levels. The CLI calls `setup_logging()`.
"""

from __future__ import annotations

import logging
import sys
import threading

import torch

_seen: set[tuple[str, int, str]] = set()
_seen_lock = threading.Lock()


def _assume_constant_result(fn):
    """`torch.compiler.assume_constant_result`, without importing torch._dynamo when nothing has yet (about 1 s
    of a CLI's start-up on a 2-core machine): the decorator only sets this attribute, which dynamo reads when it
    traces a call (tests/test_logging.py holds the two the same)."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _emit_once(logger_name: str, level: int, msg: str) -> bool:
    """Log `msg` at `level` unless this (logger, level, msg) was logged before. Returns whether it logged."""
    key = (logger_name, level, msg)
    with _seen_lock:
        if key in _seen:
            return False
        _seen.add(key)
    logging.getLogger(logger_name).log(level, msg)
    return True


class DitLogger:
    """A thin wrapper over a `logging.Logger` adding `info_once` / `warning_once`.

    It is deliberately not a `logging.Logger` subclass: dynamo refuses any method call on a Logger object
    (a graph break), while a plain object's methods are inlined, and `_emit_once` then runs at trace time.
    Everything else (`info`, `warning`, `setLevel`, `handlers`, ...) is delegated to the wrapped logger.
    """

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.name = logger.name

    def __getattr__(self, attr):
        return getattr(self.logger, attr)

    def info_once(self, msg: str) -> None:
        """Log at INFO once per process per message (pass a fully formatted string)."""
        _emit_once(self.name, logging.INFO, msg)

    def warning_once(self, msg: str) -> None:
        """Log at WARNING once per process per message (pass a fully formatted string)."""
        _emit_once(self.name, logging.WARNING, msg)


def init_logger(name: str) -> DitLogger:
    """A `DitLogger` over `logging.getLogger(name)` (the module's `__name__` by convention)."""
    return DitLogger(logging.getLogger(name))


def setup_logging(level: int | str = logging.INFO) -> None:
    """Attach one stderr handler to the `ditserve` logger. For the CLI and server, never called on import."""
    root = logging.getLogger("ditserve")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(level)
