"""Ctrl-C (and SIGTERM) for the CLI's batch commands (generate, bench, compile-report): stop within moments at
any stage, say so in one line, leave no partial output, exit 130 (143 for SIGTERM).

Python runs a signal handler only between bytecodes of the main thread, so a KeyboardInterrupt waits for the
op the main thread is in: a CPU attention over 65k tokens, or a model load, keeps it waiting for minutes.
Instead, the signal's number is written to a pipe by CPython's C-level handler (`signal.set_wakeup_fd`), and a
watcher thread blocked on that pipe acts at once: torch's ops release the GIL while they run, so the watcher
gets it within the interpreter's switch interval. It deletes the temporary output files
(`ditserve.media.abort_pending`), prints one line and ends the process with `os._exit`: nothing of the main
thread's half-done work (an output being written, a compile) runs further.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, the shell's convention for a process ended by Ctrl-C
_installed = False


def _noop(signum, frame) -> None:
    """The Python-level handler: nothing (the watcher thread acts). A Python handler must be installed for
    CPython to write the signal to the wakeup fd."""


def _watch(read_fd: int, command: str, cleanup) -> None:
    while True:
        try:
            data = os.read(read_fd, 64)
        except InterruptedError:
            continue
        signals = set(data)
        if signal.SIGINT in signals or signal.SIGTERM in signals:
            signum = signal.SIGINT if signal.SIGINT in signals else signal.SIGTERM
            break
    cleanup()
    what = "interrupted" if signum == signal.SIGINT else "terminated"
    lead = "\n" if sys.stderr is not None and sys.stderr.isatty() else ""  # past the ^C and a progress bar
    os.write(2, f"{lead}ditserve {command}: {what}; no output written\n".encode())
    os._exit(128 + signum)


def install(command: str) -> None:
    """Make SIGINT / SIGTERM end this process at once (see the module docstring). Main thread only; once per
    process (a second call does nothing)."""
    global _installed
    if _installed:
        return
    from ditserve import media  # imported here, not in the watcher: an import there could wait on the main thread's

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _noop)
    threading.Thread(target=_watch, args=(read_fd, command, media.abort_pending), name="ditserve-interrupt",
                     daemon=True).start()
    _installed = True
