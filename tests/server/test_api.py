"""The HTTP API in-process (starlette's TestClient) on a fake pipeline: request parsing, every error path with
OpenAI's error body and status, API keys, body limits, url answers and their files, metrics, readiness, and
failures in the engine (out of memory, exceptions) that fail one request and leave the server serving."""

from __future__ import annotations

import base64
import contextlib
import io
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from ditserve.config import ConfigError
from ditserve.engine import Capabilities
from ditserve.engine.engine import REAL_WARMUP_STEPS
from ditserve.server import ServerConfig, create_app
from ditserve.server.app import parse_size

from .conftest import FakePipeline, fake_app, fake_colour, fake_engine

URL = "/v1/images/generations"


@contextlib.contextmanager
def client_for(app, ready: bool = True):
    with TestClient(app) as client:
        if ready:
            assert app.state.worker.wait_ready(30), app.state.worker.state
        yield client


@pytest.fixture
def client():
    with client_for(fake_app()) as c:
        yield c


def assert_error(r, status: int, param=..., code=...) -> dict:
    """The response is OpenAI's error body with this status (and param / code where given)."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not ...:
        assert err["param"] == param, err
    if code is not ...:
        assert err["code"] == code, err
    return err


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# ------------------------------------------------------------------------------------------------ success


def test_generate_b64(client):
    r = client.post(URL, json={"prompt": "a cat", "n": 2, "size": "128x64", "seed": 9})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"created", "data", "size", "output_format", "seed"}
    assert body["size"] == "128x64" and body["output_format"] == "png" and body["seed"] == 9
    assert abs(body["created"] - time.time()) < 60
    assert len(body["data"]) == 2
    for i, item in enumerate(body["data"]):
        assert set(item) == {"b64_json"}  # no null url
        img = decode(item["b64_json"])
        assert img.format == "PNG" and img.size == (128, 64)  # WIDTHxHEIGHT
        assert img.convert("RGB").getpixel((0, 0)) == fake_colour(9, i)


def test_request_fields_reach_the_pipeline():
    pipe = FakePipeline()
    with client_for(fake_app(pipe)) as client:
        r = client.post(URL, json={"prompt": "p", "model": "fake", "size": "96x80", "num_inference_steps": 7,
                                   "guidance_scale": 2.5, "seed": 3, "n": 1, "user": "u1"})
        assert r.status_code == 200, r.text
        r = client.post(URL, json={"prompt": "q", "size": "auto"})  # defaults, seed drawn by resolve
        assert r.status_code == 200, r.text
    (first,), (second,) = pipe.batches
    assert (first.prompt, first.height, first.width, first.steps, first.guidance, first.seed, first.num_images) == \
        ("p", 80, 96, 7, 2.5, 3, 1)
    assert (second.height, second.width, second.steps) == (64, 64, 2)
    # An unset seed is drawn by the server below 2**53 (exact in JavaScript) and reported.
    assert 0 <= second.seed < 2**53 and r.json()["seed"] == second.seed


@pytest.mark.parametrize("fmt,pil", [("jpeg", "JPEG"), ("webp", "WEBP"), ("png", "PNG")])
def test_output_formats(client, fmt, pil):
    from PIL import features

    if fmt == "webp" and not features.check("webp"):
        pytest.skip("this Pillow has no WebP support")
    extra = {"output_compression": 50} if fmt != "png" else {}
    r = client.post(URL, json={"prompt": "a", "output_format": fmt, **extra})
    assert r.status_code == 200, r.text
    assert r.json()["output_format"] == fmt
    assert decode(r.json()["data"][0]["b64_json"]).format == pil


def test_url_response_and_file_serving(tmp_path):
    app = fake_app(output_dir=tmp_path / "out")
    with client_for(app) as client:
        r = client.post(URL, json={"prompt": "a", "n": 2, "response_format": "url", "seed": 4, "output_format": "jpeg"})
        assert r.status_code == 200, r.text
        urls = [item["url"] for item in r.json()["data"]]
        assert all(set(item) == {"url"} for item in r.json()["data"])
        assert len(set(urls)) == 2
        for i, url in enumerate(urls):
            assert url.startswith("http://testserver/v1/images/files/") and url.endswith(".jpeg")
            f = client.get(url)
            assert f.status_code == 200 and f.headers["content-type"] == "image/jpeg"
            assert "max-age=" in f.headers["cache-control"]
            img = Image.open(io.BytesIO(f.content))
            assert img.size == (64, 64)
            assert max(abs(a - b) for a, b in zip(img.getpixel((32, 32)), fake_colour(4, i))) <= 3  # jpeg
        assert len(list((tmp_path / "out").iterdir())) == 2
        # Only the store's own names are served: no traversal, no other files of the folder.
        (tmp_path / "out" / "secret.png").write_bytes(b"x")
        (tmp_path / "secret.png").write_bytes(b"x")
        name = urls[0].rsplit("/", 1)[1]
        for bad in ["secret.png", "..%2Fsecret.png", "../secret.png", "%2e%2e/secret.png", name[:-5] + ".png",
                    name + "x", "..%2F..%2Fetc%2Fpasswd", "x" * 32 + ".png"]:
            assert_error(client.get("/v1/images/files/" + bad), 404)


def test_url_files_expire(tmp_path):
    app = fake_app(output_dir=tmp_path, url_ttl=0.3)
    with client_for(app) as client:
        url = client.post(URL, json={"prompt": "a", "response_format": "url"}).json()["data"][0]["url"]
        assert client.get(url).status_code == 200
        time.sleep(0.4)
        assert_error(client.get(url), 404)
        assert list(tmp_path.iterdir()) == []  # expired files are deleted, not only hidden


def test_models_health_ready_and_page(client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["fake"]
    assert body["data"][0]["object"] == "model"
    assert client.get("/v1/models/fake").json()["id"] == "fake"
    assert_error(client.get("/v1/models/other"), 404, param="model", code="model_not_found")
    assert client.get("/health").json()["status"] == "ok"
    ready = client.get("/ready")
    assert ready.status_code == 200 and ready.json()["model"] == "fake"
    assert ready.json()["default_size"] == "64x64" and ready.json()["max_n"] == 4
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="prompt"' in page.text and "/v1/images/generations" in page.text


# ----------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("size", ["100x100", "64", "64x", "x64", "64*64", "0x0", "8192x64", "64x8192", "-64x64",
                                  "64.0x64", " 64x64", "64X64", ""])
def test_bad_size_is_400(client, size):
    assert_error(client.post(URL, json={"prompt": "a", "size": size}), 400, param="size")


@pytest.mark.parametrize("n", [0, -1, 5, 100])
def test_n_out_of_range_is_400(client, n):
    err = assert_error(client.post(URL, json={"prompt": "a", "n": n}), 400, param="n")
    assert "between 1 and 4" in err["message"]


@pytest.mark.parametrize("field,value,param", [
    ("num_inference_steps", 0, "num_inference_steps"),
    ("num_inference_steps", 5000, "num_inference_steps"),
    ("guidance_scale", -1.0, "guidance_scale"),
    ("seed", -5, "seed"),
    ("seed", 2**64, "seed"),
    ("output_compression", 101, "output_compression"),
])
def test_bad_values_are_400(client, field, value, param):
    extra = {"output_format": "jpeg"} if field == "output_compression" else {}
    assert_error(client.post(URL, json={"prompt": "a", field: value, **extra}), 400, param=param)


def test_compression_for_png_is_the_lossless_zlib_level(client):
    """Harmless for png, so accepted (not advertised and then refused): 0-100 maps to zlib's levels, same pixels."""
    files = {}
    for c in (0, 100):
        r = client.post(URL, json={"prompt": "a", "seed": 3, "output_compression": c})
        assert r.status_code == 200, r.text
        files[c] = base64.b64decode(r.json()["data"][0]["b64_json"])
    assert len(files[0]) > 2 * len(files[100])  # level 0 stores, level 9 deflates a solid colour
    assert decode(base64.b64encode(files[0])).tobytes() == decode(base64.b64encode(files[100])).tobytes()


def test_negative_prompt_and_unsupported_options_are_400(client):
    err = assert_error(client.post(URL, json={"prompt": "a", "negative_prompt": "blurry"}), 400,
                       param="negative_prompt", code="unsupported_parameter")
    assert "negative_prompt is not supported by fake" in err["message"]
    for option, value in [("quality", "hd"), ("style", "vivid"), ("background", "transparent"),
                          ("moderation", "low"), ("partial_images", 2), ("stream", True)]:
        assert_error(client.post(URL, json={"prompt": "a", option: value}), 400, param=option,
                     code="unsupported_parameter")
    assert client.post(URL, json={"prompt": "a", "stream": False}).status_code == 200


def test_negative_prompt_reaches_a_family_with_classifier_free_guidance():
    pipe = FakePipeline()
    pipe.capabilities = Capabilities(family="fake", guidance="cfg")
    with client_for(fake_app(pipe)) as client:
        assert client.post(URL, json={"prompt": "a", "negative_prompt": "blurry"}).status_code == 200
    assert pipe.batches[0][0].negative_prompt == "blurry"


@pytest.mark.parametrize("body", [b"{bad json", b'{"prompt": "a",}', b"", b"\xff\xfe"])
def test_malformed_json_is_400(client, body):
    r = client.post(URL, content=body, headers={"content-type": "application/json"})
    if body == b"":  # no body at all: the required object is missing (schema)
        assert_error(r, 422)
    else:
        assert_error(r, 400, code="invalid_json")


@pytest.mark.parametrize("body,param", [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "a", "n": "2"}, "n"),  # strict: no "2" -> 2
    ({"prompt": "a", "n": 1.5}, "n"),
    ({"prompt": "a", "n": True}, "n"),
    ({"prompt": "a", "response_format": "jpeg"}, "response_format"),
    ({"prompt": "a", "output_format": "gif"}, "output_format"),
    ({"prompt": "a", "size": 512}, "size"),
    ({"prompt": "a", "seed": "1"}, "seed"),
    ({"prompt": "a", "colour": "red"}, "colour"),  # unknown fields are refused, never ignored
    ({"prompt": ["a", "b"]}, "prompt"),
])
def test_schema_violations_are_422(client, body, param):
    err = assert_error(client.post(URL, json=body), 422)
    assert err["param"] == param


@pytest.mark.parametrize("body", [["a"], "a", 5, None])
def test_json_that_is_not_an_object_is_422(client, body):
    assert_error(client.post(URL, json=body), 422)


def test_unknown_model_is_404(client):
    err = assert_error(client.post(URL, json={"prompt": "a", "model": "dall-e-3"}), 404, param="model",
                       code="model_not_found")
    assert "'fake'" in err["message"]


def test_unknown_route_and_method(client):
    assert_error(client.get("/v1/nothing"), 404)
    assert_error(client.get(URL), 405)


def test_oversized_body_is_413():
    with client_for(fake_app(max_body_bytes=2048)) as client:
        assert_error(client.post(URL, json={"prompt": "a" * 4000}), 413, code="request_too_large")
        assert client.post(URL, json={"prompt": "a" * 1000}).status_code == 200

        def chunks():  # no Content-Length: counted as it streams in
            for _ in range(10):
                yield b" " * 1000

        r = client.post(URL, content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in r.request.headers
        assert_error(r, 413, code="request_too_large")


def test_api_key():
    app = fake_app(api_key="s3cret-key")
    with client_for(app) as client:
        body = {"prompt": "a"}
        err = assert_error(client.post(URL, json=body), 401, code="invalid_api_key")
        assert "missing" in err["message"]
        assert assert_error(client.post(URL, json=body, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(client.post(URL, json=body, headers={"Authorization": "Bearer s3cret-key2"}), 401)
        assert_error(client.post(URL, json=body, headers={"Authorization": "Basic s3cret-key"}), 401)
        assert_error(client.get("/v1/models"), 401)
        assert_error(client.post(URL, content=b"{bad", headers={"content-type": "application/json"}), 401)
        auth = {"Authorization": "Bearer s3cret-key"}
        r = client.post(URL, json={**body, "response_format": "url"}, headers=auth)
        assert r.status_code == 200, r.text
        assert client.get("/v1/models", headers=auth).status_code == 200
        # Probes, metrics, the page and image files (capability URLs) need no key.
        for path in ("/health", "/ready", "/metrics", "/", r.json()["data"][0]["url"]):
            assert client.get(path).status_code == 200, path
        assert app.state.worker.engine  # sanity: the key check did not stop the engine


def test_empty_api_key_is_refused():
    with pytest.raises(ConfigError):
        ServerConfig(api_key="  ")


def test_not_ready_is_503_and_health_is_live():
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return fake_engine(FakePipeline())

    app = create_app(slow_load, ServerConfig(warmup=False))
    with client_for(app, ready=False) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/health").json()["state"] == "loading"
        err = assert_error(client.get("/ready"), 503, code="not_ready")
        assert "loading" in err["message"]
        r = client.post(URL, json={"prompt": "a"})
        assert_error(r, 503, code="not_ready")
        assert r.headers["retry-after"] == "5"
        assert_error(client.get("/v1/models"), 503)
        release.set()
        assert app.state.worker.wait_ready(10)
        assert client.get("/ready").status_code == 200
        assert client.post(URL, json={"prompt": "a"}).status_code == 200


def test_warmup_runs_before_ready():
    pipe = FakePipeline()
    app = create_app(lambda: fake_engine(pipe), ServerConfig(max_batch_size=4, warmup_size=(96, 128), warmup_steps=5))
    with client_for(app) as client:
        assert client.get("/ready").status_code == 200
        warm = [b[0] for b in pipe.batches]
        # per batch size: the dummy run at the warmup steps, then a short real run (CUDA graphs, VAE decode)
        assert [(p.prompt, p.num_images, p.height, p.width, p.steps) for p in warm] == \
            [("warmup", 1, 96, 128, 5), ("warmup", 1, 96, 128, REAL_WARMUP_STEPS),
             ("warmup", 2, 96, 128, 5), ("warmup", 2, 96, 128, REAL_WARMUP_STEPS)]


def test_load_failure_is_fatal_and_reported():
    fatal = []

    def bad_load():
        raise ConfigError("no model at /nowhere")

    app = create_app(bad_load, ServerConfig(), on_fatal=fatal.append)
    with client_for(app, ready=False) as client:
        assert not app.state.worker.wait_ready(10)
        assert len(fatal) == 1 and isinstance(fatal[0], ConfigError)
        err = assert_error(client.get("/ready"), 503)
        assert "no model at /nowhere" in err["message"]
        assert_error(client.get("/health"), 503, code="engine_down")


def test_queue_full_is_429_with_retry_after():
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    app = fake_app(pipe, max_queue=2, max_batch_size=1)
    with client_for(app) as client:
        results = {}

        def post(i):
            results[i] = client.post(URL, json={"prompt": f"p{i}", "seed": i})

        threads = [threading.Thread(target=post, args=(0,))]
        threads[0].start()
        assert pipe.started.wait(10)  # request 0 is running (held by the gate)
        for i in (1, 2):  # these two fill the queue
            threads.append(threading.Thread(target=post, args=(i,)))
            threads[-1].start()
        deadline = time.monotonic() + 10
        while app.state.worker.queue_depth() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = client.post(URL, json={"prompt": "one too many"})
        assert_error(r, 429, code="queue_full")
        assert int(r.headers["retry-after"]) >= 1
        gate.set()
        for t in threads:
            t.join(10)
        assert [results[i].status_code for i in range(3)] == [200, 200, 200]
        assert [results[i].json()["seed"] for i in range(3)] == [0, 1, 2]
        assert client.post(URL, json={"prompt": "after"}).status_code == 200
        metrics = client.get("/metrics").text
        assert 'ditserve_http_requests_total{endpoint="/v1/images/generations",status="429"} 1.0' in metrics


def test_timeout_is_504_and_queued_request_is_dropped():
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    app = fake_app(pipe, request_timeout=0.5, max_batch_size=1)
    with client_for(app) as client:
        first = {}
        t = threading.Thread(target=lambda: first.setdefault("r", client.post(URL, json={"prompt": "held"})))
        t.start()
        assert pipe.started.wait(10)
        r = client.post(URL, json={"prompt": "queued behind"})  # waits in the queue past its deadline
        assert_error(r, 504, code="timeout")
        assert app.state.worker.queue_depth() == 0  # removed from the queue, will never run
        t.join(10)
        assert_error(first["r"], 504, code="timeout")  # the running one timed out too
        gate.set()
        time.sleep(0.2)
        assert [b[0].prompt for b in pipe.batches] == ["held"]
        assert client.post(URL, json={"prompt": "after"}).status_code == 200


def test_out_of_memory_fails_the_batch_and_the_server_keeps_serving():
    def fail(batch):
        if batch[0].prompt == "huge":
            return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")
        return None

    app = fake_app(FakePipeline(fail=fail))
    with client_for(app) as client:
        err = assert_error(client.post(URL, json={"prompt": "huge"}), 503, code="out_of_memory")
        assert err["type"] == "server_error" and "out of memory" in err["message"]
        assert client.post(URL, json={"prompt": "fine"}).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/ready").status_code == 200
        assert 'ditserve_engine_failures_total{reason="out_of_memory"} 1.0' in client.get("/metrics").text


def test_engine_exception_fails_the_request_only():
    def fail(batch):
        return RuntimeError("kaboom") if batch[0].prompt == "bad" else None

    with client_for(fake_app(FakePipeline(fail=fail))) as client:
        err = assert_error(client.post(URL, json={"prompt": "bad"}), 500, code="error")
        assert err["type"] == "server_error" and "kaboom" in err["message"]
        assert client.post(URL, json={"prompt": "good"}).status_code == 200


def test_metrics(client):
    for _ in range(3):
        assert client.post(URL, json={"prompt": "a", "n": 2}).status_code == 200
    assert_error(client.post(URL, json={"prompt": "a", "n": 0}), 400)
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'ditserve_http_requests_total{endpoint="/v1/images/generations",status="200"} 3.0' in text
    assert 'ditserve_http_requests_total{endpoint="/v1/images/generations",status="400"} 1.0' in text
    assert "ditserve_images_generated_total 6.0" in text
    assert "ditserve_queue_depth 0.0" in text and "ditserve_ready 1.0" in text
    for stage in ("queue", "text_encode", "denoise", "decode", "encode", "total"):
        assert f'ditserve_stage_seconds_count{{stage="{stage}"}} 3.0' in text, stage
    assert "ditserve_batch_images_count 3.0" in text
    assert "ditserve_gpu_memory" not in text  # CPU pipeline: no GPU series


def test_apps_have_separate_metrics():
    with client_for(fake_app()) as a, client_for(fake_app()) as b:
        assert a.post(URL, json={"prompt": "x"}).status_code == 200
        assert "ditserve_images_generated_total 1.0" in a.get("/metrics").text
        assert "ditserve_images_generated_total 0.0" in b.get("/metrics").text


def test_parse_size():
    assert parse_size("1024x768") == (768, 1024)  # OpenAI: WIDTHxHEIGHT -> (height, width)
    assert parse_size(None) == (None, None) and parse_size("auto") == (None, None)
    for bad in ("1000x1000", "1024", "axb", "16x16"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_handler_exception_is_500_and_the_server_keeps_serving():
    """A failure outside the engine (here: the pipeline returns a video where the server expects images, so
    encoding fails) answers 500 with OpenAI's body, and the next request is served."""
    pipe = FakePipeline()
    real = pipe.generate_batch

    def broken(requests, **kwargs):
        results = real(requests)
        if requests[0].prompt == "broken":
            results[0].kind = "video"
        return results

    pipe.generate_batch = broken
    with TestClient(fake_app(pipe), raise_server_exceptions=False) as client:
        assert client.app.state.worker.wait_ready(10)
        assert_error(client.post(URL, json={"prompt": "broken"}), 500, code="internal_error")
        assert client.post(URL, json={"prompt": "fine"}).status_code == 200


@pytest.mark.gpu
def test_gpu_memory_metrics():
    pipe = FakePipeline()
    pipe.device = torch.device("cuda")
    with client_for(fake_app(pipe)) as client:
        text = client.get("/metrics").text
    for name in ("allocated", "reserved", "peak"):
        assert f'ditserve_gpu_memory_{name}_bytes{{device="cuda"}}' in text, name


def test_every_warmup_size_is_warmed_and_ready_reports_graph_memory():
    pipe = FakePipeline()
    app = create_app(lambda: fake_engine(pipe), ServerConfig(max_batch_size=1, warmup_size=((64, 64), (96, 128))))
    with client_for(app) as client:
        ready = client.get("/ready").json()
        assert ready["cuda_graph_mib"] == 0  # the fake has no CUDA graphs
        warm = [(b[0].height, b[0].width) for b in pipe.batches]
        assert warm == [(64, 64)] * 2 + [(96, 128)] * 2  # per size: the dummy run and the short real one


def test_serve_warmup_size_is_repeatable():
    from ditserve.cli import build_parser

    args = build_parser().parse_args(["serve", "--warmup-size", "64x64", "--warmup-size", "128x96"])
    assert args.warmup_size == ["64x64", "128x96"]


def test_idle_cuda_graphs_are_released_between_batches():
    pipe = FakePipeline()
    released = []
    pipe.release_idle_graphs = lambda seconds: released.append(seconds) or 1
    app = create_app(lambda: fake_engine(pipe), ServerConfig(warmup=False, graph_idle_seconds=0.05))
    with client_for(app) as client:
        time.sleep(0.1)
        assert client.post(URL, json={"prompt": "a"}).status_code == 200
    assert released == [0.05]
