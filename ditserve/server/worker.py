"""The engine worker: one thread owns the model and runs requests in batches from a bounded queue.

    HTTP handler --submit--> queue (<= max_queue requests) --> worker thread: batch -> generate_batch -> futures

The worker thread loads the model, warms it up, then loops: take the oldest waiting request, add the waiting
requests that can share its denoise batch (equal `engine.batch_key`: same size, steps, guidance and text
length) up to `max_batch_size` images (none when the engine has a DiT cache mounted, whose skip decisions are
taken for a whole batch), run them with `engine.generate_batch`, and complete each request's
future. Handlers wait on those futures from the event loop, so the loop never blocks on the model.

A failure stays with its request: when a batch of several requests fails (CUDA out-of-memory, after the
allocator's cache is emptied, or any other exception), each of its requests is rerun alone, so only a request that
fails by itself gets an `EngineFailure` on its future; then the worker takes the next batch. `close()`
stops accepting, lets the queued and running requests finish (drain), then stops the thread.

The worker speaks only `ditserve.engine.Engine`: `spec`, `capabilities`, `device`, `cache`, `resolve`,
`batch_key`, `generate_batch` (one Output per request, with `timings` text_encode_s / denoise_s / decode_s)
and `warmup` (dummy-run mode).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable

import torch

from ditserve.config import SamplingParams
from ditserve.logging import init_logger
from ditserve.server.config import ServerConfig
from ditserve.server.metrics import ServerMetrics

logger = init_logger(__name__)

# What a loader returns: a loaded `ditserve.engine.Engine`.
Loader = Callable[[], Any]

# Worker states, in order; "failed" when the model could not be loaded or warmed up.
STATES = ("created", "loading", "warming", "ready", "draining", "stopped", "failed")


class QueueFull(Exception):
    """The queue holds max_queue requests. `retry_after`: seconds until a retry is likely to be accepted."""

    def __init__(self, retry_after: int):
        super().__init__(f"the request queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class NotAccepting(Exception):
    """The worker takes no requests: it is not ready yet, or it is shutting down."""


class Cancelled(Exception):
    """Every request of a running batch was stopped (`EngineWorker.stop`): the denoise loop ended early."""


class EngineFailure(Exception):
    """A request failed in the engine (alone: a failing batch is split first). reason: "out_of_memory" or
    "error"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(eq=False)  # identity equality: a job is removed from the queue by identity
class Job:
    """One request in the queue. `future` gets the request's GenerationResult or an EngineFailure."""

    params: SamplingParams  # resolved: every default filled in, seed set
    key: Hashable  # pipeline.batch_key(params)
    images: int  # images this request makes
    arrival: float  # time.monotonic() when the request arrived
    future: Future = field(default_factory=Future)
    # on_progress(done, total): denoise steps done, called on the engine thread after each step (video jobs)
    on_progress: Callable[[int, int], None] | None = None
    stopped: bool = False  # set by `EngineWorker.stop`: a running request ends at its next step


class EngineWorker:
    """Owns the engine (loaded by `load` on the worker thread) and runs its batches."""

    def __init__(self, load: Loader, config: ServerConfig, metrics: ServerMetrics,
                 on_fatal: Callable[[BaseException], None] | None = None):
        self._load = load
        self.config = config
        self.metrics = metrics
        self.on_fatal = on_fatal  # called (on the worker thread) when loading or warmup fails
        self.model_name: str | None = None
        self.engine: Any = None
        self.state = "created"
        self.error: BaseException | None = None
        self.started_at = int(time.time())
        self._queue: deque[Job] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()  # `call`s waiting for the engine thread
        self._cond = threading.Condition()
        self._accepting = False
        self._closing = False
        self._batch_seconds: float | None = None  # moving average of batch run time, for Retry-After
        self._empty_cache: Callable[[], None] = lambda: None
        self._one_request_per_batch = False
        self._graphs_checked = time.monotonic()  # the last idle-graph sweep
        self._thread = threading.Thread(target=self._main, name="ditserve-engine", daemon=True)

    # --------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self.state = "loading"
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def alive(self) -> bool:
        """False once the worker failed or its thread died: the process cannot serve any more."""
        return self.state != "failed" and (self._thread.is_alive() or self.state in ("created", "stopped"))

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until ready (True), failed or stopped (False), or `timeout` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self.state in ("created", "loading", "warming"):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return self.state == "ready"

    def close(self, timeout: float | None = None) -> None:
        """Stop accepting requests, finish the queued and running ones, and stop the thread (waiting up to
        `timeout` seconds). Requests still queued after that fail with NotAccepting."""
        with self._cond:
            self._accepting = False
            self._closing = True
            if self.state == "ready":
                self.state = "draining"
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
            self.metrics.queue_depth.set(0)
        for job in left:
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(NotAccepting("the server shut down before this request ran"))

    # ---------------------------------------------------------------------------------------- requests

    def submit(self, params: SamplingParams, on_progress: Callable[[int, int], None] | None = None) -> Job:
        """Queue a resolved request (`on_progress`: see `Job`). Raises NotAccepting (not ready, or shutting down)
        or QueueFull."""
        with self._cond:
            if not self._accepting:
                raise NotAccepting(f"the engine is {self.state}")
            if len(self._queue) >= self.config.max_queue:
                raise QueueFull(self._retry_after())
            job = Job(params=params, key=self.engine.batch_key(params),
                      images=len(params.prompts) * params.num_images, arrival=time.monotonic(),
                      on_progress=on_progress)
            self._queue.append(job)
            self.metrics.queue_depth.set(len(self._queue))
            self._cond.notify_all()
        return job

    def cancel(self, job: Job) -> bool:
        """Give up on a request (its client timed out). A queued request is removed and never runs (True);
        a running one finishes and its result is dropped (False)."""
        with self._cond:
            if not job.future.cancel():
                return False
            try:
                self._queue.remove(job)
            except ValueError:  # already taken into a batch; the worker skips it
                pass
            self.metrics.queue_depth.set(len(self._queue))
            return True

    def stop(self, job: Job) -> bool:
        """Cancel a queued request (True), or stop a running one: its batch's denoise loop ends at the next step
        once every request of the batch is stopped, and the future gets `Cancelled` (False: it may still
        finish, when a neighbour in its batch goes on)."""
        if self.cancel(job):
            return True
        job.stopped = True
        return False

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn()` on the engine thread between two batches (work that must not race a running batch, such as
        loading a LoRA adapter); the returned future gets its result or exception. Raises NotAccepting."""
        with self._cond:
            if not self._accepting:
                raise NotAccepting(f"the engine is {self.state}")
            future: Future = Future()
            self._calls.append((fn, future))
            self._cond.notify_all()
        return future

    def _run_calls(self) -> None:
        with self._cond:
            calls, self._calls = self._calls, deque()
        for fn, future in calls:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:
                    future.set_exception(e)

    def queue_depth(self) -> int:
        return len(self._queue)

    def _retry_after(self) -> int:
        """Seconds until the queue has likely moved on: the batches ahead of a new request, at the recent
        batch run time (at least 1 s)."""
        per_batch = self._batch_seconds or 1.0
        batches_ahead = math.ceil(len(self._queue) / self.config.max_batch_size)
        return max(1, math.ceil(per_batch * batches_ahead))

    # ------------------------------------------------------------------------------------------ thread

    def _main(self) -> None:
        try:
            self.engine = self._load()
            self.model_name = self.engine.name
            device = torch.device(self.engine.device)
            self.metrics.watch_device(device)
            if device.type == "cuda":
                self._empty_cache = torch.cuda.empty_cache
            # A DiT cache decides per batch (one residual difference over all rows), so a request batched with
            # others could be computed differently from the same request alone: with a cache, one request a batch.
            self._one_request_per_batch = self.engine.cache is not None
            self._set_state("warming")
            if self.config.warmup:
                self._warmup()
        except BaseException as e:  # anything at all: the server must learn it can never be ready
            self.error = e
            self._set_state("failed")
            if self.on_fatal is not None:
                self.on_fatal(e)
            return
        with self._cond:
            if not self._closing:
                self._accepting = True
                self.state = "ready"
                self.metrics.ready.set(1)
            self._cond.notify_all()
        logger.info(f"engine ready: {self.model_name}")
        while (batch := self._next_batch()) is not None:
            self._run_calls()
            if batch:
                self._run(batch)
        self.metrics.ready.set(0)
        self._set_state("stopped")

    def _set_state(self, state: str) -> None:
        with self._cond:
            self.state = state
            self._cond.notify_all()

    def _warmup(self) -> None:
        """Run the real path once per batch shape requests will use: batch 1 and, when batching is on, batch 2
        (a compiled model specialises batch size 1; every larger batch shares one graph). Size and steps are
        the configured warmup's, else the model's defaults."""
        cfg = self.config
        for height, width in cfg.warmup_sizes:
            seconds = self.engine.warmup(height, width, cfg.warmup_steps,
                                         batch_sizes=(1, 2) if cfg.max_batch_size >= 2 else (1,))
            logger.info(f"warmup {width or 'default'}x{height or 'default'}: {seconds:.2f} s")

    def _release_idle_graphs(self) -> None:
        """Release the CUDA graphs of shapes unused for `graph_idle_seconds` (checked at most once a minute)."""
        idle = self.config.graph_idle_seconds
        release = getattr(getattr(self.engine, "pipeline", None), "release_idle_graphs", None)
        now = time.monotonic()
        if idle is None or release is None or now - self._graphs_checked < min(60.0, idle):
            return
        self._graphs_checked = now
        if released := release(idle):
            logger.info(f"released the CUDA graphs of {released} shape(s) unused for {idle:.0f} s")

    def _next_batch(self) -> list[Job] | None:
        """The next batch (possibly empty when every taken request was cancelled meanwhile), or None when
        closing with an empty queue."""
        with self._cond:
            while not self._queue and not self._calls and not self._closing:
                self._cond.wait()
            if not self._queue:
                return [] if self._calls else None
            head = self._queue.popleft()
            batch, images = [head], head.images
            for job in [] if self._one_request_per_batch else list(self._queue):
                if job.key == head.key and images + job.images <= self.config.max_batch_size:
                    self._queue.remove(job)
                    batch.append(job)
                    images += job.images
            self.metrics.queue_depth.set(len(self._queue))
        # From here a cancel() fails: the request runs and its client gets the answer (or has left).
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _run(self, batch: list[Job]) -> None:
        self._release_idle_graphs()
        start = time.monotonic()
        for job in batch:
            self.metrics.stage_seconds.labels("queue").observe(start - job.arrival)
        self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        """Run `batch` and complete its futures. A failing batch of several requests (out of memory included) is
        split and each request rerun alone, so only a request that fails by itself gets the error and every
        valid neighbour still gets its images."""
        start = time.monotonic()
        self.metrics.batch_images.observe(sum(job.images for job in batch))
        failure: tuple[str, str] | None = None
        pipeline = getattr(self.engine, "pipeline", None)
        if pipeline is not None:
            pipeline.on_step = lambda done, total: self._on_step(batch, done, total)
        try:
            results = self.engine.generate_batch([job.params for job in batch])
        except Cancelled as e:
            for job in batch:
                job.future.set_exception(e)
            return
        except torch.OutOfMemoryError:
            # Not bound to a name: the traceback (and the tensors its frames hold) is freed when this block
            # ends, before the cache is emptied below.
            failure = ("out_of_memory", "the GPU ran out of memory on this request; retry later, or ask for "
                                        "fewer or smaller images")
        except Exception as e:
            logger.exception(f"batch of {len(batch)} request(s) failed")
            failure = ("error", f"the engine failed on this request: {type(e).__name__}: {e}")
        finally:
            if pipeline is not None:
                pipeline.on_step = None
        if failure is not None:
            if failure[0] == "out_of_memory":
                self._empty_cache()
            self.metrics.engine_failures.labels(failure[0]).inc()
            if len(batch) > 1:
                logger.warning(f"rerunning the {len(batch)} requests of a failed batch one at a time")
                self.metrics.batch_splits.inc()
                for job in batch:
                    self._run_batch([job])
                return
            batch[0].future.set_exception(EngineFailure(*failure))
            return
        elapsed = time.monotonic() - start
        self._batch_seconds = elapsed if self._batch_seconds is None else 0.8 * self._batch_seconds + 0.2 * elapsed
        timings = results[0].timings
        for stage in ("text_encode", "denoise", "decode"):
            self.metrics.stage_seconds.labels(stage).observe(timings[f"{stage}_s"])
        for job, result in zip(batch, results):
            job.future.set_result(result)

    @staticmethod
    def _on_step(batch: list[Job], done: int, total: int) -> None:
        """The pipeline's step hook for `batch`: report progress, and end the loop once every request is stopped."""
        if all(job.stopped for job in batch):
            raise Cancelled("the request was cancelled while it ran")
        for job in batch:
            if job.on_progress is not None:
                job.on_progress(done, total)
