"""LoRA adapters in the server: the request field `lora: [{"name": ..., "weight": ...}]`, the adapters given at
start (`--lora NAME=PATH[:WEIGHT]`), and a folder of adapters loaded by name on first use (`--lora-dir DIR`).

    request --check (names, weights)--> acquire: pin the names; load the missing ones on the engine thread
            (evicting the least recently used unpinned folder adapter past --lora-max-loaded) --> engine
            (`SamplingParams.extra["lora"]`; the pipeline's batch key keeps different adapters apart) --> release

Names are plain file stems (letters, digits, '_', '-', '.', not starting with '.'): a name never becomes a path
outside the folder. A request's adapters stay loaded (pinned) from its check until it is answered, so an eviction
never removes an adapter a queued request uses; when every loaded folder adapter is pinned and one more is needed
the request gets 503 with Retry-After. Loading and unloading run on the engine thread (`EngineWorker.call`),
between batches, as the engine's `LoRAManager` needs. Metrics: `ditserve_lora_loads_total`,
`ditserve_lora_evictions_total`, `ditserve_lora_loaded_adapters`.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ditserve.config import LORA_WEIGHT_RANGE, ConfigError
from ditserve.logging import init_logger
from ditserve.server.schemas import LoRACard, LoRAChoice

logger = init_logger(__name__)

NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
SUFFIX = ".safetensors"
MAX_LISTED = 1000  # folder adapters listed by /v1/models and the schema


def _api_error(*args, **kwargs):
    from ditserve.server.app import APIError  # app imports this module

    return APIError(*args, **kwargs)


class ServerAdapters:
    """The server's view of the engine's LoRA adapters (`Engine.lora`, a LoRAManager, or None) and of the
    --lora-dir folder. `enabled`: the engine has LoRA (requests may set `lora`)."""

    def __init__(self, worker, metrics, folder: Path | None, max_loaded: int):
        self.worker, self.metrics = worker, metrics
        self.folder = None if folder is None else Path(folder)
        self.max_loaded = max_loaded
        self._lock = threading.Lock()
        self._pins: dict[str, int] = {}  # folder adapter -> requests using it
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded folder adapters, least recently used first

    @classmethod
    def create(cls, worker, metrics, config) -> "ServerAdapters":
        return cls(worker, metrics, config.lora_dir, config.lora_max_loaded)

    @property
    def manager(self):
        engine = self.worker.engine
        return None if engine is None else engine.lora

    @property
    def enabled(self) -> bool:
        return self.manager is not None

    # ------------------------------------------------------------------------------------------ names

    def folder_names(self) -> list[str]:
        """The adapter names of the folder (file stems of NAME.safetensors), sorted, at most MAX_LISTED."""
        if self.folder is None:
            return []
        names = sorted(p.name[:-len(SUFFIX)] for p in self.folder.glob("*" + SUFFIX) if p.is_file())
        return [n for n in names if NAME.fullmatch(n)][:MAX_LISTED]

    def _folder_file(self, name: str) -> Path | None:
        if self.folder is None or not NAME.fullmatch(name):
            return None
        path = self.folder / (name + SUFFIX)
        return path if path.is_file() else None

    def names(self) -> list[str]:
        """Every name a request may select: loaded adapters and the folder's."""
        manager = self.manager
        loaded = sorted(manager.adapters) if manager is not None else []
        return sorted({*loaded, *self.folder_names()})

    def cards(self) -> list[LoRACard]:
        manager = self.manager
        adapters = dict(manager.adapters) if manager is not None else {}
        default = dict(manager.default) if manager is not None else {}
        cards = [LoRACard(name=n, loaded=True, rank=a.rank, default_weight=default.get(n))
                 for n, a in sorted(adapters.items())]
        cards += [LoRACard(name=n, loaded=False) for n in self.folder_names() if n not in adapters]
        return cards

    # ---------------------------------------------------------------------------------------- requests

    def check(self, entries: list[LoRAChoice]) -> list[tuple[str, float]]:
        """A request's `lora` entries -> [(name, weight)]. APIError(400) naming the problem: no LoRA on this
        server, an unknown name, a weight that is not finite or out of LORA_WEIGHT_RANGE, a name given twice."""
        manager = self.manager
        if manager is None:
            raise _api_error(400, "lora: this server has no LoRA adapters (start it with --lora NAME=PATH or "
                                  "--lora-dir DIR)", param="lora", code="unsupported_parameter")
        low, high = LORA_WEIGHT_RANGE
        out = []
        for entry in entries:
            if entry.name not in manager.adapters and self._folder_file(entry.name) is None:
                known = ", ".join(self.names()[:20]) or "none"
                raise _api_error(400, f"lora: no adapter named {entry.name[:80]!r}; known: {known}", param="lora",
                                 code="invalid_value")
            if not (math.isfinite(entry.weight) and low <= entry.weight <= high):
                raise _api_error(400, f"lora: the weight of {entry.name!r} must be a finite number between {low:g} "
                                      f"and {high:g}, got {entry.weight}", param="lora", code="invalid_value")
            out.append((entry.name, float(entry.weight)))
        if len({n for n, _ in out}) != len(out):
            raise _api_error(400, "lora: an adapter is named twice in one request", param="lora",
                             code="invalid_value")
        return out

    async def acquire(self, selection: list[tuple[str, float]] | None) -> tuple[str, ...]:
        """Pin the folder adapters of `selection` and load those not loaded yet (on the engine thread). Returns
        the pinned names, for `release`. APIError: 400 when an adapter cannot apply to this model, 503 when every
        loaded folder adapter is in use."""
        manager = self.manager
        if manager is None or not selection or self.folder is None:
            return ()
        start = {n for n, _ in manager.default}
        names = tuple(n for n, _ in selection if n not in start and self._folder_file(n) is not None)
        with self._lock:
            for n in names:
                self._pins[n] = self._pins.get(n, 0) + 1
        try:
            for n in names:
                if n not in manager.adapters:
                    await asyncio.wrap_future(self.worker.call(lambda n=n: self._load(n)))
                with self._lock:
                    if n in self._lru:
                        self._lru.move_to_end(n)
        except BaseException:
            self.release(names)
            raise
        return names

    def release(self, names: tuple[str, ...]) -> None:
        with self._lock:
            for n in names:
                self._pins[n] -= 1
                if not self._pins[n]:
                    del self._pins[n]

    # ------------------------------------------------------------------------------------ engine thread

    def _load(self, name: str) -> None:
        """Load folder adapter `name` (engine thread), first evicting the least recently used unpinned ones past
        max_loaded."""
        manager = self.manager
        if name in manager.adapters:  # another request loaded it meanwhile
            return
        with self._lock:
            while len(self._lru) >= self.max_loaded:
                victim = next((n for n in self._lru if not self._pins.get(n)), None)
                if victim is None:
                    raise _api_error(503, f"lora: all {self.max_loaded} loaded adapters of --lora-dir are in use by "
                                          f"other requests (--lora-max-loaded); retry shortly", type="server_error",
                                     param="lora", code="lora_busy", headers={"Retry-After": "5"})
                del self._lru[victim]
                manager.unload(victim)
                self.metrics.lora_evictions.inc()
                logger.info(f"LoRA adapter {victim!r} evicted")
        try:
            manager.load(name, str(self.folder / (name + SUFFIX)))
        except ConfigError as e:
            raise _api_error(400, f"lora: adapter {name!r} cannot be used with this model: {e}", param="lora",
                             code="invalid_value") from None
        with self._lock:
            self._lru[name] = None
            self.metrics.lora_loads.inc()
            self.metrics.lora_loaded.set(len(self._lru))
        logger.info(f"LoRA adapter {name!r} loaded from {self.folder}")


def lora_schema(adapters: ServerAdapters | None) -> dict[str, Any]:
    """The OpenAPI schema of the request's `lora` field: the names this server knows and the weight range, or
    null-only where the server has no LoRA (None: not loaded yet, the general shape)."""
    low, high = LORA_WEIGHT_RANGE
    if adapters is not None and not adapters.enabled:
        return {"type": "null", "description": "LoRA adapters: none on this server (a 400 when set)"}
    name: dict[str, Any] = {"type": "string"}
    if adapters is not None:
        name["enum"] = adapters.names()
    entry = {"type": "object", "required": ["name"], "additionalProperties": False,
             "properties": {"name": name, "weight": {"type": "number", "minimum": low, "maximum": high,
                                                     "default": 1.0}}}
    return {"anyOf": [{"type": "array", "items": entry, "uniqueItems": True}, {"type": "null"}],
            "description": f"LoRA adapters and their weights ({low:g} to {high:g}), stacked; unset: the adapters "
                           f"the server started with, []: none"}
