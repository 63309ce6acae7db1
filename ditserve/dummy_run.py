"""Dummy-run mode: warmup and autotune forwards that skip work whose output nobody reads.

A warmup (or a max-autotune run at a large batch) exists to compile and tune the DiT's blocks. What comes
after the blocks, the final norm + output projection of the DiT, a sequence-parallel gather, the VAE decode,
is not compiled by the regional policy and its result is thrown away, yet it can dominate the memory peak of a
large-batch run (the VAE decode at 1024x1024 and batch 8 alone needs tens of GiB). Under `dummy_run()`:

- `FluxTransformer.finish` skips norm_out / proj_out and returns a zero tensor of the output's shape (a
  broadcast view of one element, so no memory);
- `FluxPipeline.generate_batch` skips the VAE decode and returns results with no images;
- a sequence-parallel gather (when the engine has one) is meant to check `in_dummy_run()` the same way.

The flag is read only outside compiled regions (the regional compile's regions are the blocks), so the graphs
compiled in a dummy run are exactly the ones real requests use. Not thread-local: the engine runs one model
call at a time per process.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

_depth = 0  # nesting depth of active dummy_run() blocks


@contextlib.contextmanager
def dummy_run() -> Iterator[None]:
    """Within this block, forwards and pipelines skip unused work (see the module docstring). Nests."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def in_dummy_run() -> bool:
    """Whether a `dummy_run()` block is active."""
    return _depth > 0
