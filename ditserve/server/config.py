"""`ServerConfig`: the HTTP server's per-process settings (the engine's are `EngineConfig`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ditserve.config import MIN_SIZE, ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 30000


@dataclass(frozen=True)
class ServerConfig:
    """Settings of `ditserve serve`.

    api_key: clients must send `Authorization: Bearer <api_key>` on /v1/* (None: no key needed).
    max_batch_size: most images in one denoise batch; also the largest `n` one request may ask for.
    max_queue: most requests waiting for the engine; one more gets 429 with Retry-After.
    request_timeout: seconds from arrival to answer; past it the request gets 504 (a request still waiting
        is dropped from the queue; one already running finishes and its result is discarded).
    max_body_bytes: largest request body; a larger one gets 413.
    output_dir: where images for `response_format: "url"` are kept (None: a temporary folder, removed at
        exit). Files are deleted after `url_ttl` seconds, and the oldest first when the folder would exceed
        `output_max_bytes`.
    warmup: run the model at start, before /ready turns true, with batch 1 and (when batching is on) batch 2,
        so the first real request does not pay compilation or allocator growth.
    warmup_size: (height, width) of the warmup, or several of them ((h, w), (h, w), ...), each warmed up; and
        warmup_steps its step count (None: the model's defaults). Set them to what requests will use: a compiled
        or cached model is warm for those shapes, and their CUDA graphs are captured (`ditserve.cuda_graphs`).
    graph_idle_seconds: CUDA graphs of shapes not run for this long are released (their memory goes back to
        the allocator; the shape is captured again when it returns). None: never.
    max_steps, max_image_size: the most denoise steps and the largest width or height one request may ask for
        (None: the engine's limits, 1000 steps and 4096 pixels); a larger request is a 400, and a request that
        leaves steps unset gets at most max_steps. They bound the work one request can make a public server do,
        and the OpenAPI schema states them.
    header_timeout, body_timeout: seconds a client has to send a request's head (from the connection's first
        byte, or the next request's), and then its body; past either the request gets 408 and the connection
        closes. keep_alive_timeout: seconds an idle keep-alive connection stays open. max_connections: most
        open connections; a request on one more gets 503 (Retry-After) and its connection closes.
    video_ttl: seconds a finished video job (its status, and the MP4 of a completed one) is kept after it ends;
        then it is deleted (404). max_video_jobs: most video jobs kept at once (queued, running and finished);
        past it the oldest finished one is deleted, or a new job gets 429 when none has finished.
        video_max_bytes: most bytes of MP4 files kept; the oldest finished videos are deleted to make room.
    max_image_bytes: largest body of an image edit request (multipart: its input images and fields; the JSON
        routes keep max_body_bytes). max_input_pixels: most pixels (width x height) of one input image, checked
        from its header before it is decoded.
    lora_dir: a folder of LoRA adapters (`NAME.safetensors`) that requests may select by name (`lora`), loaded
        on first use; at most lora_max_loaded of them stay loaded (least recently used evicted first; adapters
        given at start with --lora are not counted and never evicted).
    """

    api_key: str | None = None
    max_batch_size: int = 4
    max_queue: int = 64
    request_timeout: float = 600.0
    max_body_bytes: int = 1 << 20
    output_dir: Path | None = None
    url_ttl: float = 3600.0
    output_max_bytes: int = 1 << 30
    warmup: bool = True
    warmup_size: tuple[int, int] | tuple[tuple[int, int], ...] | None = None
    warmup_steps: int | None = None
    graph_idle_seconds: float | None = 600.0
    max_steps: int | None = None
    max_image_size: int | None = None
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 256
    max_image_bytes: int = 20 << 20
    max_input_pixels: int = 4096 * 4096
    lora_dir: Path | None = None
    lora_max_loaded: int = 8
    video_ttl: float = 3600.0
    max_video_jobs: int = 256
    video_max_bytes: int = 4 << 30

    @property
    def warmup_sizes(self) -> list[tuple[int | None, int | None]]:
        """The (height, width) of each warmup: the configured ones, else the model's default [(None, None)]."""
        if self.warmup_size is None:
            return [(None, None)]
        if isinstance(self.warmup_size[0], int):
            return [tuple(self.warmup_size)]
        return [tuple(hw) for hw in self.warmup_size]

    def __post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty")
        for name, low in (("max_batch_size", 1), ("max_queue", 1), ("max_body_bytes", 1024),
                          ("output_max_bytes", 1), ("max_connections", 1), ("max_steps", 1),
                          ("max_image_bytes", 1024), ("max_input_pixels", 1), ("lora_max_loaded", 1),
                          ("max_image_size", MIN_SIZE), ("max_video_jobs", 1), ("video_max_bytes", 1)):
            v = getattr(self, name)
            if v is None and name in ("max_steps", "max_image_size"):
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
        for name in ("request_timeout", "url_ttl", "header_timeout", "body_timeout", "keep_alive_timeout",
                     "video_ttl"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {v!r}")
