"""Prometheus metrics of one server, in a registry of its own (never prometheus_client's global default, so a
process can build many apps, as the tests do).

    ditserve_http_requests_total{endpoint, status}   every API request, by route and HTTP status
    ditserve_queue_depth                             requests waiting for the engine
    ditserve_ready                                   1 once the model is loaded and warmed up
    ditserve_stage_seconds{stage}                    per-stage latency: queue, text_encode, denoise, decode,
                                                     encode (image files), total (arrival to response)
    ditserve_batch_images                            images per denoise batch
    ditserve_images_generated_total                  images returned to clients
    ditserve_engine_failures_total{reason}           engine runs that failed (out_of_memory, error)
    ditserve_batch_splits_total                      failed batches rerun one request at a time
    ditserve_connections_refused_total{reason}       connections cut off: header_timeout, body_timeout (408),
                                                     max_connections (503)
    ditserve_lora_loads_total, ditserve_lora_evictions_total   LoRA adapters loaded from --lora-dir, evicted
    ditserve_lora_loaded_adapters                    --lora-dir adapters loaded now
    ditserve_gpu_memory_{allocated,reserved,peak}_bytes   the model's CUDA device, read at scrape time
"""

from __future__ import annotations

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# Seconds: from a 64x64 image on CPU (milliseconds) to a large video-sized request (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0,
                   600.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
STAGES = ("queue", "text_encode", "denoise", "decode", "encode", "total")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _CudaMemoryCollector:
    """GPU memory of one CUDA device, read when scraped (no polling thread)."""

    def __init__(self, device: torch.device):
        self.device = device

    def collect(self):
        for name, read, help_text in (
            ("allocated", torch.cuda.memory_allocated, "bytes held by tensors"),
            ("reserved", torch.cuda.memory_reserved, "bytes held by the caching allocator"),
            ("peak", torch.cuda.max_memory_allocated, "peak bytes held by tensors (since the last batch began)"),
        ):
            g = GaugeMetricFamily(f"ditserve_gpu_memory_{name}_bytes", f"CUDA memory: {help_text}",
                                  labels=["device"])
            g.add_metric([str(self.device)], float(read(self.device)))
            yield g


class ServerMetrics:
    """The metric objects of one app; `render()` is the /metrics body."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("ditserve_http_requests", "API requests by route and HTTP status",
                                ["endpoint", "status"], registry=r)
        self.queue_depth = Gauge("ditserve_queue_depth", "requests waiting for the engine", registry=r)
        self.ready = Gauge("ditserve_ready", "1 once the model is loaded and warmed up", registry=r)
        self.stage_seconds = Histogram("ditserve_stage_seconds", "latency of each stage of an image request",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("ditserve_batch_images", "images per denoise batch",
                                      buckets=BATCH_BUCKETS, registry=r)
        self.images = Counter("ditserve_images_generated", "images returned to clients", registry=r)
        self.engine_failures = Counter("ditserve_engine_failures", "engine runs (batches, or one request after a "
                                       "split) that failed", ["reason"], registry=r)
        self.batch_splits = Counter("ditserve_batch_splits", "failed batches of several requests rerun one "
                                    "request at a time", registry=r)
        self.connections_refused = Counter("ditserve_connections_refused", "connections cut off (408 past a "
                                           "deadline, 503 over the cap)", ["reason"], registry=r)
        self.lora_loads = Counter("ditserve_lora_loads", "LoRA adapters loaded from --lora-dir", registry=r)
        self.lora_evictions = Counter("ditserve_lora_evictions", "LoRA adapters of --lora-dir unloaded to make room "
                                      "(--lora-max-loaded)", registry=r)
        self.lora_loaded = Gauge("ditserve_lora_loaded_adapters", "LoRA adapters of --lora-dir loaded now",
                                 registry=r)
        for reason in ("header_timeout", "body_timeout", "max_connections"):
            self.connections_refused.labels(reason)
        for stage in STAGES:  # every series exists from the start, at 0
            self.stage_seconds.labels(stage)
        for reason in ("out_of_memory", "error"):
            self.engine_failures.labels(reason)
        self._gpu_collector: _CudaMemoryCollector | None = None

    def watch_device(self, device: torch.device) -> None:
        """Export GPU memory for `device` when it is a CUDA device (called once the model is loaded)."""
        if device.type == "cuda" and self._gpu_collector is None:
            self._gpu_collector = _CudaMemoryCollector(device)
            self.registry.register(self._gpu_collector)

    def render(self) -> bytes:
        return generate_latest(self.registry)
