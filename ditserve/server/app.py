"""The OpenAI-compatible HTTP server: `create_app` builds the FastAPI app, `run_server` serves it.

    POST /v1/images/generations   OpenAI's image request (+ steps, guidance, seed); b64_json or url answers
    GET  /v1/models[/{id}]        the served model
    GET  /v1/images/files/{name}  images of url answers (unguessable names, expiring; no API key needed)
    GET  /health                  liveness: 200 while the process can serve (also while loading)
    GET  /ready                   200 once the model is loaded and warmed up, else 503
    GET  /metrics                 Prometheus text format
    GET  /                        a web page to try the model

Every error has OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 bad values (size, n,
options, every number out of its documented range, text that is not valid Unicode) and malformed JSON, 401 missing
or wrong API key, 404 unknown model or route, 408 a request head or body that did not arrive in time, 413 body too
large, 422 schema violations (wrong types, unknown fields), 429 queue full (Retry-After), 500 engine failure, 503
not ready / shutting down / GPU out of memory / too many connections, 504 request timeout. `/openapi.json` states
each field's accepted values for the served model (`RequestLimits`) and each route's error statuses.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import math
import re
import secrets
import socket
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ditserve.config import MAX_SIZE, MIN_SIZE, REQUEST_RANGES, SIZE_MULTIPLE, ConfigError, SamplingParams
from ditserve.logging import init_logger
from ditserve.preflight import suggested_sizes
from ditserve.engine import Engine
from ditserve.server.config import ServerConfig
from ditserve.server.connections import TIMED_OUT, guarded_protocol
from ditserve.server.edits import EDITS_PATH, edit_request_schema, edits_router
from ditserve.server.files import OutputStore
from ditserve.server.lora import ServerAdapters, lora_schema
from ditserve.server.metrics import CONTENT_TYPE, ServerMetrics
from ditserve.server.schemas import (MEDIA_TYPES, OUTPUT_FORMATS, UNSUPPORTED_OPENAI_OPTIONS, ErrorBody, Health,
                                     ImageData, ImageGenerationRequest, ImagesResponse, ModelCard, ModelList,
                                     ReadyInfo, RequestLimits)
from ditserve.server.videos import VIDEOS_PATH, add_video_routes, patch_openapi
from ditserve.server.worker import EngineFailure, EngineWorker, Loader, NotAccepting, QueueFull

logger = init_logger(__name__)

FILES_PREFIX = "/v1/images/files/"
# Sizes parse strictly: ASCII digits only (\d would take other scripts' digits), no sign, no leading zero (one
# spelling per size: "00064x00064" is refused), lower-case x.
SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")
DEFAULT_QUALITY = 95  # jpeg / webp encoder quality when output_compression is unset
SWEEP_INTERVAL_S = 60.0
# A ConfigError message names the SamplingParams field first; the API calls it by its OpenAI name.
_PARAM_NAMES = {"height": "size", "width": "size", "steps": "num_inference_steps", "guidance": "guidance_scale",
                "seed": "seed", "num_images": "n", "prompt": "prompt", "negative_prompt": "negative_prompt",
                "guidance_2": "guidance_2", "num_frames": "num_frames", "fps": "fps"}
_PARAM_WORD = re.compile(r"\b(" + "|".join(_PARAM_NAMES) + r")\b")
# What each error status of a route means, for the OpenAPI schema.
_ERRORS = {400: "a value out of its range, an unsupported option, or malformed JSON",
           401: "missing or wrong API key", 404: "no such model, route or file",
           408: "the request body did not arrive within --body-timeout", 413: "the body is over --max-body-bytes",
           422: "the body does not fit the schema", 429: "the queue is full (Retry-After)",
           500: "the engine or the server failed on this request",
           503: "not ready, shutting down, or the GPU ran out of memory", 504: "no answer within --request-timeout"}
# Route label of /metrics' request counter for each path (bounded: file names and model ids are not labels).
_ENDPOINTS = ("/v1/images/generations", "/v1/images/edits", "/v1/models", "/health", "/ready", "/metrics", "/")


class APIError(HTTPException):
    """An error answered with OpenAI's error body. A fastapi HTTPException, so raising it while the body is
    read (the body limit) passes through FastAPI's body parsing unchanged."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.body = ErrorBody(error={"message": message, "type": type, "param": param, "code": code})


def error_response(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """OpenAI's "WIDTHxHEIGHT" -> (height, width); None or "auto" -> (None, None), the model's default.
    Raises ConfigError for a malformed size (anything but ASCII digits without leading zeros, "x", ASCII digits)
    or one out of the engine's limits."""
    if size is None or size == "auto":
        return None, None
    m = SIZE.fullmatch(size)
    if m is None:
        raise ConfigError(f'size must be "WIDTHxHEIGHT" in ASCII digits without leading zeros (e.g. "1024x768") '
                          f'or "auto", got {size!r}')
    width, height = int(m[1]), int(m[2])
    SamplingParams(prompt="", height=height, width=width).validate()
    return height, width


def encode_images(images: list[Any], fmt: str, compression: int | None = None) -> list[bytes]:
    """PIL images -> encoded files of format `fmt` ("png", "jpeg", "webp"). `compression` (0-100, OpenAI's
    output_compression): the jpeg / webp quality (default 95), or for png the zlib level, 0-100 mapped to 0-9
    (lossless: the same pixels; default Pillow's 6)."""
    if fmt == "png":
        options = {} if compression is None else {"compress_level": round(compression * 9 / 100)}
    else:
        options = {"quality": DEFAULT_QUALITY if compression is None else compression}
    out = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format=OUTPUT_FORMATS[fmt], **options)
        out.append(buf.getvalue())
    return out


# ------------------------------------------------------------------------------------- ASGI middlewares


class _RequestCounter:
    """Counts every request by route and status for /metrics."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500  # unless a response starts

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            status = 408 if scope.get(TIMED_OUT) else status  # cut off by the protocol; the app saw a disconnect
            self.metrics.requests.labels(_endpoint(scope["path"]), str(status)).inc()


def _endpoint(path: str) -> str:
    if path in _ENDPOINTS:
        return path
    if path.startswith(FILES_PREFIX):
        return FILES_PREFIX + "{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith(VIDEOS_PATH + "/"):
        return VIDEOS_PATH + ("/{id}/content" if path.endswith("/content") else "/{id}")
    return VIDEOS_PATH if path == VIDEOS_PATH else "other"


class _BodyLimit:
    """413 for a body over `max_bytes` (or the path's own limit in `path_limits`: the image routes'): at once
    from Content-Length, else while a chunked body streams in."""

    def __init__(self, app, max_bytes: int, path_limits: dict[str, int] | None = None):
        self.app, self.default_max_bytes, self.path_limits = app, max_bytes, path_limits or {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        max_bytes = self.path_limits.get(scope["path"], self.default_max_bytes)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > max_bytes):
            status = 413 if length.isdigit() else 400
            message = (f"the request body is larger than {max_bytes} bytes" if status == 413
                       else "malformed Content-Length header")
            return await error_response(status, message, code="request_too_large" if status == 413 else None)(
                scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise APIError(413, f"the request body is larger than {max_bytes} bytes",
                                   code="request_too_large")
            return message

        await self.app(scope, limited_receive, send)


class _ApiKeyAuth:
    """401 for /v1/* without `Authorization: Bearer <key>` (image files excepted: their names are the
    capability). Keys are compared as SHA-256 digests with `hmac.compare_digest`: constant time, and
    independent of the key's length."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] == "http" and path.startswith("/v1/") and not path.startswith(FILES_PREFIX):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            given = hashlib.sha256(token.strip()).digest()
            if not (hmac.compare_digest(given, self._digest) and scheme.lower() == b"bearer"):
                message = ("missing API key: send 'Authorization: Bearer <key>'" if not auth
                           else "incorrect API key")
                return await error_response(401, message, code="invalid_api_key",
                                            headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)


# ------------------------------------------------------------------------------------------------- app


def create_app(load: Loader, config: ServerConfig | None = None, on_fatal=None) -> FastAPI:
    """The server's app. `load()` returns a loaded `ditserve.engine.Engine` and runs on the engine's thread when
    the app starts (so /health answers while it loads); `on_fatal(exc)` is called if loading or warmup fails.
    State for tests and embedding: `app.state.worker`, `app.state.metrics`, `app.state.store`."""
    from PIL import features

    config = config or ServerConfig()
    metrics = ServerMetrics()
    def load_within_limits():
        engine = load()
        spec = engine.spec
        if config.max_image_size is not None and max(spec.default_height, spec.default_width) > config.max_image_size:
            raise ConfigError(f"--max-image-size {config.max_image_size} is below the model's default size "
                              f"{spec.default_width}x{spec.default_height}, which a request without a size gets")
        return engine

    worker = EngineWorker(load_within_limits, config, metrics, on_fatal=on_fatal)
    store = OutputStore(config.output_dir, config.url_ttl, config.output_max_bytes)
    page = resources.files("ditserve.server").joinpath("static/index.html").read_text(encoding="utf-8")
    formats = {f for f in OUTPUT_FORMATS if f != "webp" or features.check("webp")}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        sweeper = asyncio.create_task(_sweep(store, min(SWEEP_INTERVAL_S, config.url_ttl)))
        try:
            yield
        finally:
            sweeper.cancel()
            await run_in_threadpool(worker.close, config.request_timeout)  # drain: queued + running finish
            store.close()
            videos.close()

    app = FastAPI(title="ditserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible image generation with diffusion transformers.")
    app.state.worker, app.state.metrics, app.state.store, app.state.config = worker, metrics, store, config
    # Outermost last: count every request, then the body limit, then the API key.
    if config.api_key is not None:
        app.add_middleware(_ApiKeyAuth, api_key=config.api_key)
    app.add_middleware(_BodyLimit, max_bytes=config.max_body_bytes,
                       path_limits={EDITS_PATH: config.max_image_bytes, VIDEOS_PATH: config.max_image_bytes})
    app.add_middleware(_RequestCounter, metrics=metrics)
    _add_error_handlers(app)

    def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
        """The error statuses a route can return (401 on /v1/* only when a key is configured; 413 on any
        route, from the body limit; 500 on any, from the catch-all handler), each with OpenAI's body."""
        codes = {*codes, 413, 500} - (set() if config.api_key is not None else {401})
        return {code: {"model": ErrorBody, "description": _ERRORS[code]} for code in sorted(codes)}

    limits_cache: list[RequestLimits] = []

    def limits() -> RequestLimits:
        """This server's `RequestLimits` for the served model (the engine is loaded)."""
        if not limits_cache:
            limits_cache.append(request_limits(config, worker.engine.capabilities, formats))
        return limits_cache[0]

    def require_ready() -> None:
        if not worker.ready:
            raise APIError(503, _not_ready_message(worker), type="server_error", code="not_ready",
                           headers={"Retry-After": "5"})

    @app.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
              responses={**errors(400, 401, 404, 408, 422, 429, 503, 504),
                         429: {"model": ErrorBody, "description": _ERRORS[429],
                               "headers": {"Retry-After": {"schema": {"type": "integer"},
                                                           "description": "seconds until a retry is likely to be "
                                                                          "accepted"}}}})
    async def generations(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
        arrival = time.monotonic()
        require_ready()
        return await answer(body, [], request, arrival)

    async def answer(body: ImageGenerationRequest, images: list[Any], request: Request,
                     arrival: float) -> ImagesResponse:
        """The request path of generations and edits (`images`: the edit's decoded input images): checks, LoRA
        adapters, queue, engine, encoding, and the images response."""
        if body.model is not None and body.model != worker.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {worker.model_name!r}",
                           param="model", code="model_not_found")
        if worker.engine.capabilities.output != "image":
            raise APIError(400, f"the served model {worker.model_name!r} makes videos, not images: use POST "
                                f"{VIDEOS_PATH}", param="model", code="unsupported_model")
        params, fmt, compression = _request_params(body, limits())
        params.images = images
        if params.steps is None and worker.engine.spec.default_steps > limits().max_steps:
            params.steps = limits().max_steps  # the server's --max-steps caps the model's default too
        if params.seed is None:  # drawn here, below 2**53: JSON readers that parse numbers as doubles
            params.seed = secrets.randbits(53)  # (JavaScript) read it exactly and can send it back
        if body.lora is not None:
            params.extra["lora"] = adapters.check(body.lora)  # [(name, weight)]; 400 naming the problem
        pinned = await adapters.acquire(params.extra.get("lora"))  # loaded, and kept loaded until answered
        try:
            return await _run(params, fmt, compression, body.response_format, request, arrival)
        finally:
            adapters.release(pinned)

    async def _run(params: SamplingParams, fmt: str, compression: int | None, response_format: str,
                   request: Request, arrival: float) -> ImagesResponse:
        try:
            params = worker.engine.resolve(params)
        except ConfigError as e:
            raise _bad_value(e) from None
        try:
            job = worker.submit(params)
        except QueueFull as e:
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(e.retry_after)}) from None
        except NotAccepting as e:
            raise APIError(503, str(e), type="server_error", code="not_ready", headers={"Retry-After": "5"}) from None

        left = config.request_timeout - (time.monotonic() - arrival)
        try:
            result = await asyncio.wait_for(asyncio.wrap_future(job.future), timeout=max(left, 0.0))
        except asyncio.TimeoutError:
            worker.cancel(job)
            raise APIError(504, f"the request did not finish within {config.request_timeout:g} s",
                           type="server_error", code="timeout") from None
        except EngineFailure as e:
            status = 503 if e.reason == "out_of_memory" else 500
            raise APIError(status, str(e), type="server_error", code=e.reason) from None
        except NotAccepting as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None

        encode_start = time.monotonic()
        files = await run_in_threadpool(encode_images, result.images, fmt, compression)
        if response_format == "url":
            names = await run_in_threadpool(lambda: [store.save(f, fmt) for f in files])
            base = str(request.base_url).rstrip("/")
            data = [ImageData(url=f"{base}{FILES_PREFIX}{name}") for name in names]
        else:
            data = [ImageData(b64_json=base64.b64encode(f).decode("ascii")) for f in files]
        done = time.monotonic()
        metrics.stage_seconds.labels("encode").observe(done - encode_start)
        metrics.stage_seconds.labels("total").observe(done - arrival)
        metrics.images.inc(len(data))
        p = result.params
        return ImagesResponse(created=int(time.time()), data=data, size=f"{p.width}x{p.height}", output_format=fmt,
                              seed=p.seed)

    adapters = ServerAdapters.create(worker, metrics, config)
    app.state.require_ready, app.state.adapters = require_ready, adapters
    app.include_router(edits_router(answer, errors(400, 401, 404, 408, 422, 429, 503, 504)))
    videos = app.state.videos = add_video_routes(app, worker, config, metrics, limits, require_ready, errors)

    @app.get(FILES_PREFIX + "{name}", response_class=Response,
             responses={200: {"description": "the image file", "content": {
                 media: {"schema": {"type": "string", "format": "binary"}} for media in MEDIA_TYPES.values()}},
                 **errors(404)})
    async def image_file(name: str) -> Response:
        data = await run_in_threadpool(store.read, name)
        if data is None:
            raise APIError(404, "no such image (it may have expired)", code="not_found")
        return Response(data, media_type=MEDIA_TYPES[name.rsplit(".", 1)[1]],
                        headers={"Cache-Control": f"private, max-age={int(store.expires_in(name))}"})

    @app.get("/v1/models", response_model=ModelList, responses=errors(401, 503))
    async def models() -> ModelList:
        require_ready()
        return ModelList(data=[model_card()])

    def model_card() -> ModelCard:
        return ModelCard(id=worker.model_name, created=worker.started_at,
                         lora_adapters=adapters.cards() if adapters.enabled else None)

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=errors(401, 404, 503))
    async def model(model: str) -> ModelCard:
        require_ready()
        if model != worker.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {worker.model_name!r}",
                           param="model", code="model_not_found")
        return model_card()

    @app.get("/health", response_model=Health, responses=errors(503))
    async def health() -> JSONResponse:
        if not worker.alive:
            return error_response(503, f"the engine is not running: {_not_ready_message(worker)}",
                                  type="server_error", code="engine_down")
        return JSONResponse({"status": "ok", "state": worker.state})

    @app.get("/ready", response_model=ReadyInfo, responses=errors(503))
    async def ready() -> JSONResponse:
        require_ready()
        spec = worker.engine.spec
        engine = worker.engine.config  # EngineConfig
        return JSONResponse({"status": "ready", "model": worker.model_name,
                             "default_size": f"{spec.default_width}x{spec.default_height}",
                             "default_steps": spec.default_steps, "default_guidance": spec.default_guidance,
                             "max_n": config.max_batch_size, "api_key_required": config.api_key is not None,
                             "quantization": engine.quantization if engine is not None else None,
                             "fp8_attention": bool(engine is not None and engine.fp8_attention),
                             "fp8_fast_accum": bool(engine is not None and engine.fp8_fast_accum_on),
                             "cuda_graph_mib": round(getattr(getattr(worker.engine, "pipeline", None),
                                                             "graph_memory_bytes", 0) / 2**20, 1),
                             "output_formats": sorted(formats),
                             # what the model makes (the web page shows the video form for "video")
                             "output": worker.engine.capabilities.output,
                             "max_input_images": worker.engine.capabilities.max_input_images,
                             "default_num_frames": spec.default_num_frames, "default_fps": spec.default_fps,
                             # sizes the model draws well, its default first (the web page's size menu)
                             "sizes": [s for s in suggested_sizes(spec.default_height, spec.default_width)
                                       if limits().accepts_size(*map(int, s.split("x")))]})

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}},
        **errors()})
    async def metrics_endpoint() -> Response:
        metrics.queue_depth.set(worker.queue_depth())
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema, made true for this server: the request fields' accepted values (once the model is
        loaded; until then the engine's general limits), no 422 on routes that have no input to validate,
        and the bearer scheme on the routes that need the key."""
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        ready = worker.engine is not None and worker.state in ("ready", "draining")
        limit = limits() if ready else request_limits(config, None, formats)
        properties = schema["components"]["schemas"]["ImageGenerationRequest"]["properties"]
        for name, prop in limit.openapi_properties().items():
            properties[name] = {**prop, "title": properties[name].get("title", name)}
        properties["lora"] = lora_schema(adapters if ready else None)
        if EDITS_PATH in schema["paths"]:  # the multipart body; no edits where the model takes no input image
            if ready and not worker.engine.capabilities.max_input_images:
                del schema["paths"][EDITS_PATH]
            else:
                content = schema["paths"][EDITS_PATH]["post"]["requestBody"]["content"]
                content["multipart/form-data"]["schema"] = edit_request_schema(limit, properties)
        patch_openapi(schema, limit, worker.engine.capabilities if ready else None)  # the video routes' truth
        for path, operations in schema["paths"].items():
            for method, operation in operations.items():
                if method != "post":
                    operation["responses"].pop("422", None)
                if config.api_key is not None and path.startswith("/v1/") and not path.startswith(FILES_PREFIX):
                    operation["security"] = [{"bearer": []}]
        for unused in ("HTTPValidationError", "ValidationError"):
            schema["components"]["schemas"].pop(unused, None)
        if config.api_key is not None:
            schema["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        if ready:
            app.openapi_schema = schema
        return schema

    app.openapi = openapi
    return app


def request_limits(config: ServerConfig, capabilities: Any, formats: set[str]) -> RequestLimits:
    """What a request may ask of this server: the engine's limits, narrowed by the server's settings
    (max_batch_size, max_steps, max_image_size) and by the served family's `Capabilities` (None: not loaded
    yet)."""
    multiple, low, high = SIZE_MULTIPLE, MIN_SIZE, MAX_SIZE
    max_guidance, negative_prompt = REQUEST_RANGES["guidance"][1], True
    if capabilities is not None:
        multiple = math.lcm(multiple, capabilities.size_multiple)
        low, high = max(low, capabilities.min_size), min(high, capabilities.max_size)
        max_guidance = 0.0 if capabilities.guidance == "none" else max_guidance
        negative_prompt = capabilities.guidance == "cfg"
    if config.max_image_size is not None:
        high = min(high, config.max_image_size)
    steps = REQUEST_RANGES["steps"][1] if config.max_steps is None else min(config.max_steps,
                                                                            REQUEST_RANGES["steps"][1])
    return RequestLimits(max_n=min(config.max_batch_size, REQUEST_RANGES["num_images"][1]), max_steps=int(steps),
                         size_multiple=multiple, min_size=low, max_size=high, max_guidance=float(max_guidance),
                         negative_prompt=negative_prompt, output_formats=tuple(sorted(formats)))


def _request_params(body: ImageGenerationRequest, limits: RequestLimits) -> tuple[SamplingParams, str, int | None]:
    """The request's SamplingParams (unresolved), output format and output_compression. Raises APIError(400)
    naming the field and its range. What the model cannot do (a negative prompt for a family without
    classifier-free guidance, ...) is refused when the engine resolves the request, with the family's own
    message."""
    for option in UNSUPPORTED_OPENAI_OPTIONS:
        if getattr(body, option) is not None:
            raise APIError(400, f"{option!r} is not supported by ditserve; leave it unset", param=option,
                           code="unsupported_parameter")
    if body.stream:
        raise APIError(400, "streaming is not supported; leave 'stream' unset or false", param="stream",
                       code="unsupported_parameter")
    if not 1 <= body.n <= limits.max_n:
        raise APIError(400, f"n must be between 1 and {limits.max_n} (the server's max batch size), "
                            f"got {body.n}", param="n", code="invalid_value")
    if body.output_format not in limits.output_formats:
        raise APIError(400, f"output_format {body.output_format!r} is not available on this server "
                            f"(this Pillow cannot write it); use one of {list(limits.output_formats)}",
                       param="output_format", code="invalid_value")
    if body.output_compression is not None and not 0 <= body.output_compression <= 100:
        raise APIError(400, f"output_compression must be between 0 and 100, got {body.output_compression}",
                       param="output_compression", code="invalid_value")
    if body.num_inference_steps is not None and body.num_inference_steps > limits.max_steps:
        raise APIError(400, f"num_inference_steps must be between 1 and {limits.max_steps} on this server, got "
                            f"{body.num_inference_steps}", param="num_inference_steps", code="invalid_value")
    try:
        height, width = parse_size(body.size)
    except ConfigError as e:
        raise APIError(400, str(e), param="size", code="invalid_value") from None
    for side in (height, width):
        if side is not None and not side <= limits.max_size:
            raise APIError(400, f"size: width and height must be at most {limits.max_size} on this server, got "
                                f"{body.size!r}", param="size", code="invalid_value")
    params = SamplingParams(prompt=body.prompt, height=height, width=width, steps=body.num_inference_steps,
                            guidance=body.guidance_scale, seed=body.seed, num_images=body.n,
                            negative_prompt=body.negative_prompt)
    try:
        params.validate()
    except ConfigError as e:
        raise _bad_value(e) from None
    return params, body.output_format, body.output_compression


def _bad_value(e: ConfigError) -> APIError:
    """A 400 for a request value the engine refused; the message names the field by its API name."""
    message = str(e)
    m = _PARAM_WORD.search(message)
    param = _PARAM_NAMES[m[1]] if m else None
    if m is not None and m.start() == 0 and param != m[1]:  # "steps must be ..." -> "num_inference_steps must be ..."
        message = f"size: {message}" if param == "size" else param + message[m.end():]
    code = "unsupported_parameter" if " is not supported by " in message else "invalid_value"
    return APIError(400, message, param=param, code=code)


def _not_ready_message(worker: EngineWorker) -> str:
    if worker.state == "failed":
        return f"the model failed to load: {type(worker.error).__name__}: {worker.error}"
    return {"created": "the engine has not started", "loading": "the model is loading",
            "warming": "the model is warming up", "draining": "the server is shutting down",
            "stopped": "the server has shut down"}.get(worker.state, worker.state)


async def _sweep(store: OutputStore, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        await run_in_threadpool(store.sweep)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body.model_dump(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # every method of the path (Starlette names only the first route's)
            from starlette.routing import Match

            methods = {m for route in request.app.routes if getattr(route, "methods", None)
                       and route.matches({**request.scope, "method": "GET"})[0] != Match.NONE for m in route.methods}
            headers = {**(headers or {}), "Allow": ", ".join(sorted(methods))}
        return error_response(exc.status_code, str(exc.detail), code=codes.get(exc.status_code), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(err.get("type") == "json_invalid" for err in errors):
            ctx = next(err.get("ctx", {}) for err in errors if err.get("type") == "json_invalid")
            return error_response(400, f"the request body is not valid JSON: {ctx.get('error', 'decode error')}",
                                  code="invalid_json")
        first = errors[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        where = f"{param}: " if param else ""
        return error_response(422, f"{where}{first.get('msg', 'invalid value')}{more}", param=param,
                              code=first.get("type"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error(f"unhandled {type(exc).__name__} on {request.url.path}: {exc}")
        return error_response(500, f"internal server error: {type(exc).__name__}", type="server_error",
                              code="internal_error")


# ---------------------------------------------------------------------------------------------- serving


def listen_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), before the slow model load, so a busy port fails at once.
    Raises ConfigError when it cannot be bound. Port 0 picks a free port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def uvicorn_config(app: FastAPI, config: ServerConfig, verbose: bool = False):
    """uvicorn's settings for `app`: the h11 protocol with the header and body deadlines and the connection cap
    (`ditserve.server.connections`), uvicorn's keep-alive timeout, and a graceful shutdown as long as a request
    may take."""
    import uvicorn

    refused = app.state.metrics.connections_refused
    return uvicorn.Config(
        app, log_level="info" if verbose else "warning", access_log=verbose, lifespan="on",
        http=guarded_protocol(config.header_timeout, config.body_timeout, config.max_connections,
                              on_refused=lambda reason: refused.labels(reason).inc()),
        ws="none",  # no WebSocket routes: an upgrade request is answered as plain HTTP, under the same deadlines
        timeout_keep_alive=config.keep_alive_timeout,
        # uvicorn waits this long for in-flight requests after a signal; then lifespan shutdown drains the rest
        timeout_graceful_shutdown=int(config.request_timeout) + 5)


def run_server(model: str | None, engine, config: ServerConfig, host: str, port: int, verbose: bool = False,
               announce=print) -> None:
    """Serve `model` until SIGINT/SIGTERM, then drain. The model loads on the engine thread while /health
    already answers; `announce(line)` is called with "listening on URL" at start and "ready" once warm.
    Raises the load error (ConfigError for user mistakes) if the model cannot be loaded or warmed up."""
    import uvicorn

    sock = listen_socket(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
    server: uvicorn.Server | None = None

    def on_fatal(exc: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(lambda: Engine.load(model, engine), config, on_fatal=on_fatal)
    server = uvicorn.Server(uvicorn_config(app, config, verbose))
    worker: EngineWorker = app.state.worker
    announce(f"ditserve: listening on {url} (loading {model or 'the default model'})")

    def announce_ready() -> None:
        if worker.wait_ready():
            announce(f"ditserve: ready: {worker.model_name} at {url}/v1 (web page: {url}/)")

    threading.Thread(target=announce_ready, name="ditserve-announce", daemon=True).start()
    server.run(sockets=[sock])
    if worker.state == "failed":
        raise worker.error
