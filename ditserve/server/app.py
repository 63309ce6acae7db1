"""The OpenAI-compatible HTTP server: `create_app` builds the FastAPI app, `run_server` serves it.

    POST /v1/images/generations   OpenAI's image request (+ steps, guidance, seed); b64_json or url answers
    GET  /v1/models[/{id}]        the served model
    GET  /v1/images/files/{name}  images of url answers (unguessable names, expiring; no API key needed)
    GET  /health                  liveness: 200 while the process can serve (also while loading)
    GET  /ready                   200 once the model is loaded and warmed up, else 503
    GET  /metrics                 Prometheus text format
    GET  /                        a web page to try the model

Every error has OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 400 bad values (size, n,
options) and malformed JSON, 401 missing or wrong API key, 404 unknown model or route, 413 body too large,
422 schema violations (wrong types, unknown fields), 429 queue full (Retry-After), 500 engine failure, 503
not ready / shutting down / GPU out of memory, 504 request timeout.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
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
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ditserve.config import ConfigError, SamplingParams
from ditserve.logging import init_logger
from ditserve.preflight import suggested_sizes
from ditserve.engine import Engine
from ditserve.server.config import ServerConfig
from ditserve.server.files import OutputStore
from ditserve.server.metrics import CONTENT_TYPE, ServerMetrics
from ditserve.server.schemas import (MEDIA_TYPES, OUTPUT_FORMATS, UNSUPPORTED_OPENAI_OPTIONS, ErrorBody, ImageData,
                                     ImageGenerationRequest, ImagesResponse, ModelCard, ModelList)
from ditserve.server.worker import EngineFailure, EngineWorker, Loader, NotAccepting, QueueFull

logger = init_logger(__name__)

FILES_PREFIX = "/v1/images/files/"
SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
DEFAULT_QUALITY = 95  # jpeg / webp encoder quality when output_compression is unset
SWEEP_INTERVAL_S = 60.0
# A ConfigError message names the SamplingParams field first; the API calls it by its OpenAI name.
_PARAM_NAMES = {"height": "size", "width": "size", "steps": "num_inference_steps", "guidance": "guidance_scale",
                "seed": "seed", "num_images": "n", "prompt": "prompt", "negative_prompt": "negative_prompt"}
_PARAM_WORD = re.compile(r"\b(" + "|".join(_PARAM_NAMES) + r")\b")
# Route label of /metrics' request counter for each path (bounded: file names and model ids are not labels).
_ENDPOINTS = ("/v1/images/generations", "/v1/models", "/health", "/ready", "/metrics", "/")


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
    Raises ConfigError for a malformed size or one out of the engine's limits."""
    if size is None or size == "auto":
        return None, None
    m = SIZE.fullmatch(size)
    if m is None:
        raise ConfigError(f'size must be "WIDTHxHEIGHT" (e.g. "1024x768") or "auto", got {size!r}')
    width, height = int(m[1]), int(m[2])
    SamplingParams(prompt="", height=height, width=width).validate()
    return height, width


def encode_images(images: list[Any], fmt: str, quality: int) -> list[bytes]:
    """PIL images -> encoded files of format `fmt` ("png", "jpeg", "webp")."""
    out = []
    for image in images:
        buf = io.BytesIO()
        image.save(buf, format=OUTPUT_FORMATS[fmt], **({} if fmt == "png" else {"quality": quality}))
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
            self.metrics.requests.labels(_endpoint(scope["path"]), str(status)).inc()


def _endpoint(path: str) -> str:
    if path in _ENDPOINTS:
        return path
    if path.startswith(FILES_PREFIX):
        return FILES_PREFIX + "{name}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


class _BodyLimit:
    """413 for a body over `max_bytes`: at once from Content-Length, else while a chunked body streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            status = 413 if length.isdigit() else 400
            message = (f"the request body is larger than {self.max_bytes} bytes" if status == 413
                       else "malformed Content-Length header")
            return await error_response(status, message, code="request_too_large" if status == 413 else None)(
                scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise APIError(413, f"the request body is larger than {self.max_bytes} bytes",
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
    worker = EngineWorker(load, config, metrics, on_fatal=on_fatal)
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

    app = FastAPI(title="ditserve", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible image generation with diffusion transformers.")
    app.state.worker, app.state.metrics, app.state.store, app.state.config = worker, metrics, store, config
    # Outermost last: count every request, then the body limit, then the API key.
    if config.api_key is not None:
        app.add_middleware(_ApiKeyAuth, api_key=config.api_key)
    app.add_middleware(_BodyLimit, max_bytes=config.max_body_bytes)
    app.add_middleware(_RequestCounter, metrics=metrics)
    _add_error_handlers(app)

    error_responses = {code: {"model": ErrorBody} for code in (400, 401, 404, 413, 422, 429, 500, 503, 504)}

    def require_ready() -> None:
        if not worker.ready:
            raise APIError(503, _not_ready_message(worker), type="server_error", code="not_ready",
                           headers={"Retry-After": "5"})

    @app.post("/v1/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
              responses=error_responses)
    async def generations(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
        arrival = time.monotonic()
        require_ready()
        if body.model is not None and body.model != worker.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {worker.model_name!r}",
                           param="model", code="model_not_found")
        params, fmt, quality = _request_params(body, config, formats)
        if params.seed is None:  # drawn here, below 2**53: JSON readers that parse numbers as doubles
            params.seed = secrets.randbits(53)  # (JavaScript) read it exactly and can send it back
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
        files = await run_in_threadpool(encode_images, result.images, fmt, quality)
        if body.response_format == "url":
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

    @app.get(FILES_PREFIX + "{name}", responses={404: {"model": ErrorBody}})
    async def image_file(name: str) -> Response:
        data = await run_in_threadpool(store.read, name)
        if data is None:
            raise APIError(404, "no such image (it may have expired)", code="not_found")
        return Response(data, media_type=MEDIA_TYPES[name.rsplit(".", 1)[1]],
                        headers={"Cache-Control": f"private, max-age={int(store.expires_in(name))}"})

    @app.get("/v1/models", response_model=ModelList, responses=error_responses)
    async def models() -> ModelList:
        require_ready()
        return ModelList(data=[ModelCard(id=worker.model_name, created=worker.started_at)])

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=error_responses)
    async def model(model: str) -> ModelCard:
        require_ready()
        if model != worker.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {worker.model_name!r}",
                           param="model", code="model_not_found")
        return ModelCard(id=worker.model_name, created=worker.started_at)

    @app.get("/health")
    async def health() -> JSONResponse:
        if not worker.alive:
            return error_response(503, f"the engine is not running: {_not_ready_message(worker)}",
                                  type="server_error", code="engine_down")
        return JSONResponse({"status": "ok", "state": worker.state})

    @app.get("/ready")
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
                             "output_formats": sorted(formats),
                             # sizes the model draws well, its default first (the web page's size menu)
                             "sizes": suggested_sizes(spec.default_height, spec.default_width)})

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        metrics.queue_depth.set(worker.queue_depth())
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def _request_params(body: ImageGenerationRequest, config: ServerConfig, formats: set[str]
                    ) -> tuple[SamplingParams, str, int]:
    """The request's SamplingParams (unresolved), output format and encoder quality. Raises APIError(400).
    What the model cannot do (a negative prompt for a family without classifier-free guidance, ...) is refused
    when the engine resolves the request, with the family's own message."""
    for option in UNSUPPORTED_OPENAI_OPTIONS:
        if getattr(body, option) is not None:
            raise APIError(400, f"{option!r} is not supported by ditserve; leave it unset", param=option,
                           code="unsupported_parameter")
    if body.stream:
        raise APIError(400, "streaming is not supported; leave 'stream' unset or false", param="stream",
                       code="unsupported_parameter")
    if not 1 <= body.n <= config.max_batch_size:
        raise APIError(400, f"n must be between 1 and {config.max_batch_size} (the server's max batch size), "
                            f"got {body.n}", param="n", code="invalid_value")
    if body.output_format not in formats:
        raise APIError(400, f"output_format {body.output_format!r} is not available on this server "
                            f"(this Pillow cannot write it); use one of {sorted(formats)}",
                       param="output_format", code="invalid_value")
    quality = DEFAULT_QUALITY
    if body.output_compression is not None:
        if body.output_format == "png":
            raise APIError(400, "output_compression applies to jpeg and webp only", param="output_compression",
                           code="invalid_value")
        if not 0 <= body.output_compression <= 100:
            raise APIError(400, f"output_compression must be between 0 and 100, got {body.output_compression}",
                           param="output_compression", code="invalid_value")
        quality = body.output_compression
    try:
        height, width = parse_size(body.size)
    except ConfigError as e:
        raise APIError(400, str(e), param="size", code="invalid_value") from None
    params = SamplingParams(prompt=body.prompt, height=height, width=width, steps=body.num_inference_steps,
                            guidance=body.guidance_scale, seed=body.seed, num_images=body.n,
                            negative_prompt=body.negative_prompt)
    try:
        params.validate()
    except ConfigError as e:
        raise _bad_value(e) from None
    return params, body.output_format, quality


def _bad_value(e: ConfigError) -> APIError:
    m = _PARAM_WORD.search(str(e))
    code = "unsupported_parameter" if " is not supported by " in str(e) else "invalid_value"
    return APIError(400, str(e), param=_PARAM_NAMES[m[1]] if m else None, code=code)


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
        return error_response(exc.status_code, str(exc.detail), code=codes.get(exc.status_code),
                              headers=getattr(exc, "headers", None))

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
    server = uvicorn.Server(uvicorn.Config(
        app, log_level="info" if verbose else "warning", access_log=verbose, lifespan="on",
        # uvicorn waits this long for in-flight requests after a signal; then lifespan shutdown drains the rest
        timeout_graceful_shutdown=int(config.request_timeout) + 5))
    worker: EngineWorker = app.state.worker
    announce(f"ditserve: listening on {url} (loading {model or 'the default model'})")

    def announce_ready() -> None:
        if worker.wait_ready():
            announce(f"ditserve: ready: {worker.model_name} at {url}/v1 (web page: {url}/)")

    threading.Thread(target=announce_ready, name="ditserve-announce", daemon=True).start()
    server.run(sockets=[sock])
    if worker.state == "failed":
        raise worker.error
