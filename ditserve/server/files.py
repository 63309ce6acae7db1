"""The folder behind `response_format: "url"`: bounded in age and size, served by name only.

Each image gets a random, unguessable name (24 random bytes, URL-safe base64: 32 characters, plus its
format's suffix), so its URL is a capability: whoever has the URL can fetch it until it expires, and nobody
can guess another. `path(name)` accepts only names of exactly that shape, so no request can reach anything
but the store's own files (no "..", no slashes, no other files in a user-given folder). Files expire after
`ttl` seconds; the oldest go first when a new one would push the folder past `max_bytes`.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

NAME = re.compile(r"[A-Za-z0-9_-]{32}\.(png|jpeg|webp)")


class OutputStore:
    """Image files for URL responses. Thread-safe (saved from worker threads, read from the event loop)."""

    def __init__(self, root: Path | None, ttl: float, max_bytes: int):
        self._temporary = root is None
        root = Path(tempfile.mkdtemp(prefix="ditserve-images-")) if root is None else Path(root).expanduser()
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        self.ttl = ttl
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        # name -> (created, size), oldest first. Files of ours left by an earlier run count too.
        existing = []
        for entry in os.scandir(self.root):
            if NAME.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                existing.append((st.st_mtime, entry.name, st.st_size))
        self._files: dict[str, tuple[float, int]] = {name: (t, size) for t, name, size in sorted(existing)}
        self._bytes = sum(size for _, size in self._files.values())
        self.sweep()

    def save(self, data: bytes, fmt: str) -> str:
        """Store `data` as a new file of format `fmt` ("png", "jpeg", "webp"); returns its name."""
        name = f"{secrets.token_urlsafe(24)}.{fmt}"
        path = self.root / name
        with self._lock:
            self._evict(len(data))
            tmp = self.root / f".{name}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, path)  # readers never see a partial file
            self._files[name] = (time.time(), len(data))
            self._bytes += len(data)
        return name

    def read(self, name: str) -> bytes | None:
        """The bytes of file `name`, or None when there is no such (unexpired) file of ours."""
        if not NAME.fullmatch(name):
            return None
        with self._lock:
            entry = self._files.get(name)
            if entry is None:
                return None
            if time.time() - entry[0] >= self.ttl:
                self._remove(name)
                return None
        try:
            return (self.root / name).read_bytes()
        except FileNotFoundError:  # removed by someone else meanwhile
            return None

    def expires_in(self, name: str) -> float:
        entry = self._files.get(name)
        return 0.0 if entry is None else max(0.0, entry[0] + self.ttl - time.time())

    def sweep(self) -> int:
        """Delete expired files; returns how many."""
        now = time.time()
        with self._lock:
            expired = [name for name, (created, _) in self._files.items() if now - created >= self.ttl]
            for name in expired:
                self._remove(name)
        return len(expired)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._files)

    def close(self) -> None:
        """Remove the folder if the store made it (a user-given folder keeps its unexpired files)."""
        if self._temporary:
            shutil.rmtree(self.root, ignore_errors=True)

    def _evict(self, incoming: int) -> None:
        """Oldest files out until `incoming` more bytes fit (caller holds the lock)."""
        while self._files and self._bytes + incoming > self.max_bytes:
            self._remove(next(iter(self._files)))

    def _remove(self, name: str) -> None:
        _, size = self._files.pop(name)
        self._bytes -= size
        try:
            (self.root / name).unlink()
        except FileNotFoundError:
            pass
