"""The asynchronous video API: OpenAI's Videos API shape, as SGLang and vLLM-Omni serve it.

    POST   /v1/videos                  create a job (JSON, or multipart/form-data with an `input_reference` image
                                       for image-to-video); answers at once with the job object
    GET    /v1/videos                  the jobs, newest first (`limit`, `after`, `order`)
    GET    /v1/videos/{id}             one job: status (queued, in_progress, completed, failed), progress
    GET    /v1/videos/{id}/content     the MP4 (H.264, `ditserve.media.save_mp4`) once completed (409 before)
    DELETE /v1/videos/{id}             delete a job and its file; a queued job is cancelled (it never runs), a
                                       running one stops at its next denoise step

A job runs on the engine's worker like an image request (the same queue and its `--max-queue`, 429 when full),
and lives on the server, not on the client's connection: the client polls. Progress is the denoise steps done
(0-95 %, reported by the pipeline's `on_step` hook), then 100 once the MP4 is written. Jobs are bounded: at most
`ServerConfig.max_video_jobs` kept (the oldest finished one is deleted to make room, else 429), at most
`video_max_bytes` of MP4 files (the oldest finished videos are deleted to make room), and a finished job expires
`video_ttl` seconds after it ended (then 404). Files live in a temporary folder removed at exit.

Every numeric field has a documented finite range (400 naming the field and the range, as on the image routes):
`size` as the image routes take it, `seconds` in (0, 8] (a number, or a decimal string as OpenAI's SDK sends it),
`num_frames` the model's frame rule (k n + r, at most 1024), `fps` 1-120, `num_inference_steps`, `guidance_scale`,
`guidance_2` (two-expert models) and `seed` as for images. `seconds` becomes the frame count of the model's rule
nearest to seconds x fps (8 s x 120 fps stays within 1024 frames); `seconds` and `num_frames` together are a 400.
A server whose model makes images answers 400 here, and its `/openapi.json` lists no video route.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, ValidationError

from ditserve.config import REQUEST_RANGES, ConfigError, SamplingParams
from ditserve.logging import init_logger
from ditserve.server.metrics import LATENCY_BUCKETS
from ditserve.server.schemas import Integer

logger = init_logger(__name__)

VIDEOS_PATH = "/v1/videos"
MAX_SECONDS = 8.0  # seconds x fps (fps <= 120) stays within num_frames' 1024
DENOISE_PERCENT = 95  # progress: the denoise steps cover 0-95 %, the decode and the MP4 the rest
DEFAULT_FPS = 16.0  # a video model whose spec has no fps
LIST_LIMIT = (1, 100)
ID = re.compile(r"video_[0-9a-f]{32}")
# A decimal string for `seconds` (OpenAI's SDK sends "4"): in (0, 8], ASCII digits.
SECONDS_TEXT = r"^(0\.[0-9]*[1-9][0-9]*|[1-7](\.[0-9]+)?|8(\.0+)?)$"
_INTEGER = re.compile(r"-?[0-9]{1,30}")
_NUMBER = re.compile(r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INTEGER_FIELDS = ("num_frames", "num_inference_steps", "seed")
_NUMBER_FIELDS = ("seconds", "fps", "guidance_scale", "guidance_2")
FINISHED = ("completed", "failed")


class VideoRequest(BaseModel):
    """The body of `POST /v1/videos` (JSON; the multipart form has the same fields, `input_reference` a file).
    Ranges are checked by the server (400 naming the field), as for images."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    model: str | None = None
    size: str | None = None
    seconds: float | str | None = None  # OpenAI's; a number or a decimal string
    num_frames: Integer | None = None
    fps: float | None = None
    seed: Integer | None = None
    negative_prompt: str | None = None
    num_inference_steps: Integer | None = None
    guidance_scale: float | None = None
    guidance_2: float | None = None
    input_reference: str | None = None  # JSON: a data: URL (base64) of a PNG, JPEG or WebP image
    user: str | None = None


class VideoError(BaseModel):
    code: str
    message: str


class VideoObject(BaseModel):
    """A video job, as OpenAI's `Video` (plus ditserve's num_frames, fps and seed)."""

    id: str
    object: Literal["video"] = "video"
    status: Literal["queued", "in_progress", "completed", "failed"]
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    progress: int
    model: str
    prompt: str
    size: str
    seconds: str
    num_frames: int
    fps: float
    seed: int
    error: VideoError | None = None


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool


@dataclass(eq=False)
class VideoJob:
    """One job: its request (resolved), the worker's job while it waits or runs, its file once completed."""

    id: str
    params: SamplingParams
    model: str
    created_at: float  # time.time()
    status: str = "queued"
    progress: int = 0
    finished_at: float | None = None
    error: VideoError | None = None
    path: Path | None = None
    bytes: int = 0
    work: Any = None  # the worker's Job

    def view(self, ttl: float) -> VideoObject:
        p = self.params
        status = self.status
        if status == "queued" and self.work is not None and self.work.future.running():
            status = "in_progress"
        return VideoObject(id=self.id, status=status, created_at=int(self.created_at),
                           completed_at=None if self.finished_at is None else int(self.finished_at),
                           expires_at=None if self.finished_at is None else int(self.finished_at + ttl),
                           progress=self.progress, model=self.model, prompt=p.prompt, size=f"{p.width}x{p.height}",
                           seconds=f"{round(p.num_frames / p.fps, 3):g}", num_frames=p.num_frames, fps=p.fps, seed=p.seed,
                           error=self.error)


class VideoMetrics:
    """ditserve_video_jobs_total{event} (submitted, completed, failed, cancelled, expired: deleted by age, the
    job cap or the disk budget), ditserve_video_job_seconds (submission to MP4, completed jobs),
    ditserve_video_storage_bytes (MP4 files kept)."""

    def __init__(self, registry):
        self.jobs = Counter("ditserve_video_jobs", "video jobs by event", ["event"], registry=registry)
        for event in ("submitted", "completed", "failed", "cancelled", "expired"):
            self.jobs.labels(event)
        self.seconds = Histogram("ditserve_video_job_seconds", "seconds from a video job's submission to its MP4",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.storage = Gauge("ditserve_video_storage_bytes", "bytes of MP4 files kept", registry=registry)


# ------------------------------------------------------------------------------------------------ the jobs


class VideoJobs:
    """The jobs of one server (event-loop side; the engine thread only writes a job's progress)."""

    def __init__(self, worker, config, metrics: VideoMetrics):
        self.worker, self.config, self.metrics = worker, config, metrics
        self.root = Path(tempfile.mkdtemp(prefix="ditserve-videos-"))
        self.jobs: dict[str, VideoJob] = {}  # oldest first
        self._tasks: set[asyncio.Task] = set()
        self._sweeper: asyncio.Task | None = None
        # One encoder thread of its own, not the request thread pool: a burst of finished jobs queues here (x264
        # is multithreaded itself) instead of taking every pool thread from the requests that need one (a file
        # answer, an input image's decode).
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ditserve-mp4")

    @property
    def total_bytes(self) -> int:
        return sum(job.bytes for job in self.jobs.values())

    def get(self, video_id: str) -> VideoJob | None:
        self.sweep()
        return self.jobs.get(video_id) if ID.fullmatch(video_id) else None

    def add(self, job: VideoJob) -> None:
        """Keep `job` (made room for by the caller: `make_room`) and follow it to its end."""
        self.jobs[job.id] = job
        self.metrics.jobs.labels("submitted").inc()
        task = asyncio.get_running_loop().create_task(self._follow(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_every(min(60.0, self.config.video_ttl)))

    def make_room(self) -> bool:
        """Delete the oldest finished job while max_video_jobs are kept; False when every kept job is unfinished."""
        self.sweep()
        while len(self.jobs) >= self.config.max_video_jobs:
            oldest = next((j for j in self.jobs.values() if j.status in FINISHED), None)
            if oldest is None:
                return False
            self.remove(oldest, expired=True)
        return True

    def remove(self, job: VideoJob, expired: bool = False) -> None:
        self.jobs.pop(job.id, None)
        if job.path is not None:
            job.path.unlink(missing_ok=True)
        self.metrics.storage.set(self.total_bytes)
        if expired:
            self.metrics.jobs.labels("expired").inc()

    def sweep(self) -> None:
        """Delete the jobs (and files) finished more than video_ttl seconds ago."""
        now = time.time()
        for job in [j for j in self.jobs.values() if j.finished_at is not None
                    and now - j.finished_at >= self.config.video_ttl]:
            self.remove(job, expired=True)

    def cancel(self, job: VideoJob) -> None:
        """Delete an unfinished job: a queued one never runs; a running one stops at its next denoise step (its
        result, if it still finishes alongside a batch neighbour, is dropped)."""
        self.worker.stop(job.work)
        self.metrics.jobs.labels("cancelled").inc()
        self.remove(job)

    def _finish(self, job: VideoJob, status: str, error: VideoError | None = None) -> None:
        job.status, job.error, job.finished_at = status, error, time.time()
        self.metrics.jobs.labels(status).inc()

    async def _follow(self, job: VideoJob) -> None:
        """Wait for the engine, write the MP4, and set the job's end state."""
        from ditserve.server.worker import Cancelled, EngineFailure, NotAccepting

        try:
            output = await asyncio.wrap_future(job.work.future)
        except (Cancelled, asyncio.CancelledError):
            return
        except EngineFailure as e:
            if job.id in self.jobs:
                self._finish(job, "failed", VideoError(code=e.reason, message=str(e)))
            return
        except NotAccepting as e:
            if job.id in self.jobs:
                self._finish(job, "failed", VideoError(code="shutting_down", message=str(e)))
            return
        if job.id not in self.jobs:  # deleted meanwhile
            return
        path = self.root / f"{job.id}.mp4"
        try:
            size = await asyncio.wrap_future(self._encoder.submit(_write_mp4, output, path))
        except Exception as e:  # an encoder failure stays with its job
            logger.exception(f"video job {job.id}: the MP4 could not be written")
            self._finish(job, "failed", VideoError(code="encode_failed", message=f"{type(e).__name__}: {e}"))
            return
        if job.id not in self.jobs:
            path.unlink(missing_ok=True)
            return
        if size > self.config.video_max_bytes:
            path.unlink(missing_ok=True)
            self._finish(job, "failed", VideoError(code="too_large", message=(
                f"the video is {size} bytes, more than this server keeps (--video-max-bytes "
                f"{self.config.video_max_bytes})")))
            return
        for old in [j for j in self.jobs.values() if j.path is not None]:  # oldest first, until it fits
            if self.total_bytes + size <= self.config.video_max_bytes:
                break
            self.remove(old, expired=True)
        job.path, job.bytes, job.progress = path, size, 100
        self._finish(job, "completed")
        self.metrics.seconds.observe(job.finished_at - job.created_at)
        self.metrics.storage.set(self.total_bytes)

    async def _sweep_every(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.sweep()

    def close(self) -> None:
        """Stop following jobs and delete the folder (at shutdown, after the worker drained)."""
        for task in [*self._tasks, *([self._sweeper] if self._sweeper is not None else [])]:
            task.cancel()
        self._encoder.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _write_mp4(output, path: Path) -> int:
    """The job's video (output.frames (1, F, H, W, 3)) as an H.264 MP4 at `path`, written under a temporary name
    first; returns its size in bytes."""
    from ditserve.media import save_mp4

    tmp = path.with_name(f".{path.name}")
    try:
        save_mp4(output.frames[0], output.fps, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.stat().st_size


# --------------------------------------------------------------------------------------------- parsing


def frames_for(seconds: float, fps: float, rule: tuple[int, int] | None) -> int:
    """The frame count of the model's rule (k n + r) nearest to seconds x fps (at least one frame)."""
    if rule is None:
        return max(1, round(seconds * fps))
    k, r = rule
    return k * max(0, round((seconds * fps - r) / k)) + r


def _seconds(value: float | str) -> float:
    """`seconds` -> a number in (0, MAX_SECONDS]. Raises ConfigError naming the field and the range."""
    if isinstance(value, str):
        if not re.fullmatch(SECONDS_TEXT[1:-1], value):
            raise ConfigError(f"seconds must be a number greater than 0 and at most {MAX_SECONDS:g} (or such a "
                              f"decimal string, e.g. \"4\"), got {value[:40]!r}")
        value = float(value)
    if isinstance(value, bool) or not math.isfinite(value) or not 0 < value <= MAX_SECONDS:
        raise ConfigError(f"seconds must be a finite number greater than 0 and at most {MAX_SECONDS:g}, got {value}")
    return float(value)


def _form_fields(parts) -> tuple[dict[str, Any], bytes | None]:
    """Multipart parts -> the request's fields, typed (numbers parse strictly from their text, else 422), and
    the input_reference file's bytes."""
    from ditserve.server.app import APIError

    fields: dict[str, Any] = {}
    image = None
    for part in parts:
        name = part.name
        if name in fields or (name == "input_reference" and image is not None):
            raise APIError(422, f"{name}: given more than once", param=name, code="duplicate_field")
        if name == "input_reference":
            if part.filename is None:
                raise APIError(422, "input_reference: expected an image file", param=name, code="invalid_type")
            image = part.data
            continue
        if name not in VideoRequest.model_fields:
            raise APIError(422, f"{name}: unknown field", param=name, code="extra_forbidden")
        if part.filename is not None:
            raise APIError(422, f"{name}: expected a text field, got a file", param=name, code="invalid_type")
        try:
            text = part.data.decode("utf-8")
        except UnicodeDecodeError:
            raise APIError(400, f"{name} is not valid UTF-8 text", param=name, code="invalid_value") from None
        if name in _INTEGER_FIELDS:
            if not _INTEGER.fullmatch(text):
                raise APIError(422, f"{name}: expected an integer, got {text[:40]!r}", param=name, code="int_type")
            fields[name] = int(text)
        elif name in _NUMBER_FIELDS:
            if not _NUMBER.fullmatch(text):
                raise APIError(422, f"{name}: expected a number, got {text[:40]!r}", param=name, code="float_type")
            fields[name] = float(text)
        else:
            fields[name] = text
    return fields, image


def _data_url(value: str) -> bytes:
    """A JSON input_reference, "data:image/...;base64,...", -> its bytes. Raises ConfigError."""
    head, _, data = value.partition(",")
    if not (head.startswith("data:image/") and head.endswith(";base64")):
        raise ConfigError("input_reference must be a data: URL of an image (\"data:image/png;base64,...\"), or an "
                          "image file in a multipart/form-data request")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise ConfigError("input_reference: the data: URL is not valid base64") from None


# ------------------------------------------------------------------------------------------------- schema


def _nullable(schema: dict[str, Any], description: str, nullable: bool) -> dict[str, Any]:
    if not nullable:
        return {**schema, "description": description}
    return {"anyOf": [schema, {"type": "null"}], "description": description}


def request_schema(limits, capabilities, multipart: bool) -> dict[str, Any]:
    """The request body's schema for this server and model (`limits`: the app's `RequestLimits`;
    `capabilities`: the model's, or None before it is loaded): each field states what the server accepts."""
    nullable = not multipart  # a form field is left out, never null
    sizes = "|".join(str(v) for v in limits.sizes())
    seed_low, seed_high = REQUEST_RANGES["seed"]
    fps_low, fps_high = REQUEST_RANGES["fps"]
    frames_high = int(REQUEST_RANGES["num_frames"][1])
    rule = capabilities.frame_rule if capabilities is not None else None
    frames = ({"type": "integer", "enum": list(range(rule[1] or rule[0], frames_high + 1, rule[0]))} if rule
              else {"type": "integer", "minimum": 1, "maximum": frames_high})
    two_experts = capabilities is not None and capabilities.two_experts
    image = capabilities is None or capabilities.max_input_images > 0
    refused = {"type": "null", "description": "not supported by the served model; a 400 when set"}
    if multipart:
        refused = {"not": {}, "description": "not supported by the served model; a 400 when set"}
    seconds = {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SECONDS}
    properties = {
        "prompt": {"type": "string", "description": "the prompt: valid Unicode (a lone surrogate is a 400)"},
        "model": _nullable({"type": "string"}, "the served model's id (optional)", nullable),
        "size": _nullable({"type": "string", "pattern": f"^(auto|({sizes})x({sizes}))$"}, limits.size_text(),
                          nullable),
        "seconds": _nullable(seconds if multipart else {"anyOf": [seconds, {"type": "string",
                                                                            "pattern": SECONDS_TEXT}]},
                             f"clip length in seconds, in (0, {MAX_SECONDS:g}]: the frame count of the model's rule "
                             f"nearest to seconds x fps; not with num_frames", nullable),
        "num_frames": _nullable(frames, "frames of the video (the model's rule" + (f": {rule[0]}n + {rule[1]}" if rule
                                else "") + f", at most {frames_high}); not with seconds (default: the model's)",
                                nullable),
        "fps": _nullable({"type": "number", "minimum": fps_low, "maximum": fps_high},
                         f"frames per second of the MP4, {fps_low:g}-{fps_high:g} (default: the model's)", nullable),
        "seed": _nullable({"type": "integer", "minimum": seed_low, "maximum": seed_high},
                          "the noise seed (default: drawn, and returned in the job)", nullable),
        "negative_prompt": (_nullable({"type": "string"}, "what classifier-free guidance steers away from",
                                      nullable) if limits.negative_prompt else refused),
        "num_inference_steps": _nullable({"type": "integer", "minimum": 1, "maximum": limits.max_steps},
                                         f"denoise steps, 1-{limits.max_steps} (default: the model's)", nullable),
        "guidance_scale": _nullable({"type": "number", "minimum": 0, "maximum": limits.max_guidance},
                                    f"the guidance scale, 0-{limits.max_guidance:g} (default: the model's)", nullable),
        "guidance_2": (_nullable({"type": "number", "minimum": 0, "maximum": REQUEST_RANGES["guidance_2"][1]},
                                 "the second (low-noise) expert's guidance scale (default: guidance_scale)", nullable)
                       if two_experts else refused),
        "input_reference": (refused if not image else
                            {"type": "string", "format": "binary", "description": "the first frame (image to "
                             "video): a PNG, JPEG or WebP file"} if multipart else
                            _nullable({"type": "string", "pattern": "^data:image/[a-z]+;base64,"},
                                      "the first frame (image to video): a data: URL of a PNG, JPEG or WebP image",
                                      nullable)),
        "user": _nullable({"type": "string"}, "an end-user identifier (accepted, not used)", nullable),
    }
    set_ = {"not": {"type": "null"}}
    both = ({"required": ["seconds", "num_frames"]} if multipart else
            {"required": ["seconds", "num_frames"], "properties": {"seconds": set_, "num_frames": set_}})
    return {"type": "object", "required": ["prompt"], "properties": properties, "additionalProperties": False,
            "not": both, "description": "a video job: OpenAI's Videos API fields and ditserve's extensions "
                                        "(seconds or num_frames, not both)"}


def patch_openapi(schema: dict[str, Any], limits, capabilities) -> None:
    """Make `schema` true for the served model: no video routes for a model that makes images, no image
    generation route for one that makes videos, and the video request's fields with this server's ranges."""
    paths = schema["paths"]
    if capabilities is not None and capabilities.output != "video":
        for path in [p for p in paths if p == VIDEOS_PATH or p.startswith(VIDEOS_PATH + "/")]:
            del paths[path]
        return
    if capabilities is not None:  # the image routes answer 400 for a video model
        paths.pop("/v1/images/generations", None)
        paths.pop("/v1/images/edits", None)
    post = paths[VIDEOS_PATH]["post"]
    links = {}  # the job's id leads to its other operations (OpenAPI links: clients and fuzzers follow them)
    for path, method, name in ((VIDEOS_PATH + "/{video_id}", "get", "GetVideo"),
                               (VIDEOS_PATH + "/{video_id}/content", "get", "GetVideoContent"),
                               (VIDEOS_PATH + "/{video_id}", "delete", "DeleteVideo")):
        operation = paths.get(path, {}).get(method)
        if operation is not None and "operationId" in operation:
            links[name] = {"operationId": operation["operationId"], "parameters": {"video_id": "$response.body#/id"}}
    post["responses"]["200"]["links"] = links
    content = post["requestBody"]["content"]
    content["application/json"]["schema"] = request_schema(limits, capabilities, multipart=False)
    content["multipart/form-data"]["schema"] = request_schema(limits, capabilities, multipart=True)


# -------------------------------------------------------------------------------------------------- routes


def add_video_routes(app: FastAPI, worker, config, metrics, limits: Callable[[], Any], require_ready: Callable[[], None],
                     errors: Callable[..., dict]) -> VideoJobs:
    """Add the video routes to `app` (the app's worker, ServerConfig, ServerMetrics, `limits()` -> RequestLimits,
    `require_ready()` and `errors(*codes)` for the schema). Returns the jobs (the app closes them at shutdown)."""
    from ditserve.server.app import APIError, _bad_value, parse_size

    jobs = VideoJobs(worker, config, VideoMetrics(metrics.registry))

    def find(video_id: str) -> VideoJob:
        require_ready()
        job = jobs.get(video_id)
        if job is None:
            raise APIError(404, f"no video job {video_id!r} (it may have expired)", param="video_id",
                           code="video_not_found")
        return job

    def bad(e: ConfigError) -> APIError:
        """A 400 naming the field by its API name (the engine's messages name SamplingParams' fields)."""
        message = str(e)
        if message.startswith("seconds"):
            return APIError(400, message, param="seconds", code="invalid_value")
        if message.startswith("images"):
            return APIError(400, "input_reference" + message[len("images"):], param="input_reference",
                            code="invalid_value")
        return _bad_value(e)

    async def parse(request: Request) -> tuple[VideoRequest, bytes | None]:
        content_type = request.headers.get("content-type", "")
        body = await request.body()
        if content_type.startswith("multipart/form-data"):
            from ditserve.server.edits import parse_multipart

            fields, image = _form_fields(parse_multipart(body, content_type))
        elif content_type.split(";")[0].strip() == "application/json":
            try:
                fields = json.loads(body)
            except ValueError as e:
                raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
            image = None
        else:
            raise APIError(400, "send the request as application/json, or as "
                           "multipart/form-data with an input_reference file", code="invalid_content_type")
        if not isinstance(fields, dict):
            raise APIError(422, "the request body must be a JSON object", code="model_type")
        try:
            req = VideoRequest.model_validate(fields)
        except ValidationError as e:
            first = e.errors()[0]
            param = ".".join(str(x) for x in first.get("loc", ())) or None
            raise APIError(422, f"{param + ': ' if param else ''}{first.get('msg', 'invalid value')}", param=param,
                           code=first.get("type")) from None
        if req.input_reference is not None:
            try:
                image = _data_url(req.input_reference)
            except ConfigError as e:
                raise APIError(400, str(e), param="input_reference", code="invalid_image") from None
        return req, image

    async def params_of(req: VideoRequest, image: bytes | None) -> SamplingParams:
        engine = worker.engine
        caps, spec, limit = engine.capabilities, engine.spec, limits()
        if caps.output != "video":
            raise APIError(400, f"the served model {worker.model_name!r} makes images, not videos: use POST "
                                f"/v1/images/generations", param="model", code="unsupported_model")
        if req.model is not None and req.model != worker.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves {worker.model_name!r}",
                           param="model", code="model_not_found")
        if req.seconds is not None and req.num_frames is not None:
            raise APIError(400, "seconds and num_frames both set: give one of them", param="seconds",
                           code="invalid_value")
        try:
            height, width = parse_size(req.size)
        except ConfigError as e:
            raise APIError(400, str(e), param="size", code="invalid_value") from None
        for side in (height, width):
            if side is not None and side > limit.max_size:
                raise APIError(400, f"size: width and height must be at most {limit.max_size} on this server, got "
                                    f"{req.size!r}", param="size", code="invalid_value")
        if req.num_inference_steps is not None and req.num_inference_steps > limit.max_steps:
            raise APIError(400, f"num_inference_steps must be between 1 and {limit.max_steps} on this server, got "
                                f"{req.num_inference_steps}", param="num_inference_steps", code="invalid_value")
        fps, frames = req.fps, req.num_frames
        try:
            if req.seconds is not None:
                seconds = _seconds(req.seconds)
                SamplingParams(prompt="", fps=fps).validate()  # fps's own range first
                frames = frames_for(seconds, fps if fps is not None else spec.default_fps or DEFAULT_FPS,
                                    caps.frame_rule)
            params = SamplingParams(prompt=req.prompt, height=height, width=width, steps=req.num_inference_steps,
                                    guidance=req.guidance_scale, guidance_2=req.guidance_2, seed=req.seed,
                                    negative_prompt=req.negative_prompt, num_frames=frames, fps=fps)
            params.validate()
        except ConfigError as e:
            raise bad(e) from None
        if image is not None:
            if not caps.max_input_images:
                raise APIError(400, f"input_reference: the served model {worker.model_name!r} makes videos from "
                                    f"text only (it takes no input image)", param="input_reference",
                               code="unsupported_parameter")
            from ditserve.server.edits import decode_image

            params.images = [await run_in_threadpool(decode_image, image, "input_reference",
                                                     getattr(config, "max_input_pixels", 4096 * 4096))]
        if params.steps is None and spec.default_steps > limit.max_steps:
            params.steps = limit.max_steps
        if params.seed is None:
            params.seed = secrets.randbits(53)  # exact in JavaScript, as the image routes draw it
        if params.fps is None:
            params.fps = spec.default_fps or DEFAULT_FPS
        try:
            return engine.resolve(params)
        except ConfigError as e:
            raise bad(e) from None

    post_errors = errors(400, 401, 404, 408, 422, 429, 503)
    body = {"required": True, "content": {"application/json": {"schema": {"type": "object"}},
                                          "multipart/form-data": {"schema": {"type": "object"}}}}

    @app.post(VIDEOS_PATH, response_model=VideoObject, responses=post_errors, openapi_extra={"requestBody": body},
              summary="Create a video job")
    async def create_video(request: Request) -> VideoObject:
        require_ready()
        req, image = await parse(request)
        params = await params_of(req, image)
        if not jobs.make_room():
            raise APIError(429, f"this server keeps at most {config.max_video_jobs} video jobs and none has "
                                f"finished; retry later", type="rate_limit_error", code="too_many_jobs",
                           headers={"Retry-After": "5"})
        from ditserve.server.worker import NotAccepting, QueueFull

        job = VideoJob(id=f"video_{secrets.token_hex(16)}", params=params, model=worker.model_name,
                       created_at=time.time())

        def on_progress(done: int, total: int) -> None:  # the engine thread
            job.progress = DENOISE_PERCENT * done // total

        try:
            job.work = worker.submit(params, on_progress=on_progress)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except NotAccepting as e:
            raise APIError(503, str(e), type="server_error", code="not_ready", headers={"Retry-After": "5"}) from None
        jobs.add(job)
        return job.view(config.video_ttl)

    def query(request: Request, name: str, default: str | None, allowed=None) -> str | None:
        """A query parameter's value (the last one given), checked against `allowed`: 400 naming it."""
        values = request.query_params.getlist(name)
        value = values[-1] if values else default
        if allowed is not None and value is not None and value not in allowed:
            raise APIError(400, f"{name} must be one of {list(allowed)}, got {value[:40]!r}", param=name,
                           code="invalid_value")
        return value

    low, high = LIST_LIMIT
    list_parameters = [
        {"name": "limit", "in": "query", "required": False, "description": f"jobs per page, {low}-{high} (20)",
         "schema": {"type": "integer", "minimum": low, "maximum": high, "default": 20}},
        {"name": "after", "in": "query", "required": False, "description": "the last id of the previous page",
         "schema": {"type": "string"}},
        {"name": "order", "in": "query", "required": False, "description": "newest first (desc) or oldest first",
         "schema": {"type": "string", "enum": ["desc", "asc"], "default": "desc"}}]

    @app.get(VIDEOS_PATH, response_model=VideoList, responses=errors(400, 401, 503), summary="List video jobs",
             openapi_extra={"parameters": list_parameters})
    async def list_videos(request: Request) -> VideoList:
        require_ready()
        order = query(request, "order", "desc", ("desc", "asc"))
        after = query(request, "after", None)
        limit = query(request, "limit", "20")
        if not (re.fullmatch(r"[0-9]{1,3}", limit) and low <= int(limit) <= high):
            raise APIError(400, f"limit must be an integer between {low} and {high}, got {limit[:40]!r}",
                           param="limit", code="invalid_value")
        limit = int(limit)
        jobs.sweep()
        items = list(jobs.jobs.values())  # oldest first
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [j.id for j in items]
            items = items[ids.index(after) + 1:] if after in ids else []
        page = items[:limit]
        data = [j.view(config.video_ttl) for j in page]
        return VideoList(data=data, first_id=data[0].id if data else None, last_id=data[-1].id if data else None,
                         has_more=len(items) > limit)

    @app.get(VIDEOS_PATH + "/{video_id}", response_model=VideoObject, responses=errors(401, 404, 503),
             summary="A video job's status and progress")
    async def get_video(video_id: str) -> VideoObject:
        return find(video_id).view(config.video_ttl)

    @app.get(VIDEOS_PATH + "/{video_id}/content", response_class=FileResponse, summary="The video's MP4",
             openapi_extra={"parameters": [
                 {"name": "variant", "in": "query", "required": False, "description": "only the video (OpenAI's "
                  "thumbnail and spritesheet variants are not made)", "schema": {"type": "string", "enum": ["video"]}}]},
             responses={200: {"description": "the MP4 (H.264)", "content": {
                 "video/mp4": {"schema": {"type": "string", "format": "binary"}}}},
                 409: {"model": _error_model(), "description": "the job has not completed (or it failed)"},
                 **errors(400, 401, 404, 503)})
    async def video_content(video_id: str, request: Request) -> FileResponse:
        query(request, "variant", "video", ("video",))
        job = find(video_id)
        if job.status != "completed" or job.path is None:
            state = {"queued": "is queued", "in_progress": f"is in progress ({job.progress}%)",
                     "failed": "failed"}.get(job.status, job.status)
            raise APIError(409, f"video {video_id} {state}: its content exists once its status is completed",
                           param="video_id", code="video_not_ready")
        # A name of this answer's own for the MP4 (a hard link, made here on the event loop where jobs are
        # deleted): a deletion (expiry, the disk budget, a DELETE) while the file is sent removes the job's name,
        # not this one, and the file's bytes stay until the answer ends. Starlette's FileResponse serves it (with
        # HTTP Range requests, as video players seek).
        link = job.path.with_name(f".{secrets.token_hex(8)}-{job.path.name}")
        try:
            os.link(job.path, link)
        except FileNotFoundError:
            raise APIError(404, f"video {video_id}'s file is gone (it may have expired)", param="video_id",
                           code="video_not_found") from None
        return _LinkedFileResponse(link, media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.delete(VIDEOS_PATH + "/{video_id}", response_model=VideoDeleted, responses=errors(401, 404, 503),
                summary="Delete a video job (cancelling it if it has not finished) and its file")
    async def delete_video(video_id: str) -> VideoDeleted:
        job = find(video_id)
        if job.status in FINISHED:
            jobs.remove(job)
        else:
            jobs.cancel(job)
        return VideoDeleted(id=job.id, deleted=True)

    return jobs


class _LinkedFileResponse(FileResponse):
    """A FileResponse of a link made for it alone: the link is removed however the answer ends (sent, or the
    client gone)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            Path(self.path).unlink(missing_ok=True)


def _error_model():
    from ditserve.server.schemas import ErrorBody

    return ErrorBody
