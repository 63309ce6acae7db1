"""What fuzzing the server found, held by tests: every number has a finite range and text is valid Unicode
(400 naming the field), sizes parse strictly, a failing batch fails only its failing request, slow clients are cut
off in time while others are served, and schemathesis (all checks) finds nothing against the packaged model."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import httpx2
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from ditserve.server import ServerConfig, create_app

from .conftest import FakePipeline, fake_app, fake_colour, fake_engine, live_server

URL = "/v1/images/generations"


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.fixture(scope="module")
def client():
    with TestClient(fake_app()) as c:
        assert c.app.state.worker.wait_ready(10)
        yield c


# ------------------------------------------------------------------------------- ranges, text and sizes


@pytest.mark.parametrize("raw,param,words", [
    ('{"prompt": "", "guidance_scale": 4.08e231}', "guidance_scale", "between 0 and 50"),
    ('{"prompt": "", "guidance_scale": 3.41e38}', "guidance_scale", "between 0 and 50"),  # overflows float32
    ('{"prompt": "", "guidance_scale": 50.5}', "guidance_scale", "between 0 and 50"),
    ('{"prompt": "", "guidance_scale": 1e999}', "guidance_scale", "finite"),  # Python's json reads inf
    ('{"prompt": "", "guidance_scale": NaN}', "guidance_scale", "finite"),
    ('{"prompt": "", "guidance_scale": -Infinity}', "guidance_scale", "finite"),
    ('{"prompt": "", "num_inference_steps": 1001}', "num_inference_steps", "between 1 and 1000"),
    ('{"prompt": "", "num_inference_steps": 1e300}', "num_inference_steps", "between 1 and 1000"),  # 1e300 == int
    ('{"prompt": "", "seed": 9223372036854775808}', "seed", "between 0 and 9223372036854775807"),
    ('{"prompt": "", "seed": -1}', "seed", "between 0 and 9223372036854775807"),
    ('{"prompt": "", "n": 100000000000000000000}', "n", "between 1 and 4"),
    ('{"prompt": "", "output_format": "jpeg", "output_compression": -1}', "output_compression", "between 0 and 100"),
    ('{"prompt": "\\ud800"}', "prompt", "not valid Unicode"),
    ('{"prompt": "a\\udc00b"}', "prompt", "not valid Unicode"),
    ('{"prompt": "ok", "negative_prompt": "\\udfff"}', "negative_prompt", "not valid Unicode"),
])
def test_out_of_range_numbers_and_lone_surrogates_are_400_naming_the_field(client, raw, param, words):
    err = error_of(client.post(URL, content=raw, headers={"content-type": "application/json"}), 400)
    assert err["param"] == param and err["message"].startswith(param) and words in err["message"], err


def test_integers_with_a_zero_fraction_are_integers(client):
    """JSON Schema's integer includes 2.0; 2.5, "2" and true stay refused (422)."""
    r = client.post(URL, json={"prompt": "a", "n": 2.0, "num_inference_steps": 3.0, "seed": 7.0})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2 and r.json()["seed"] == 7
    for bad in ({"n": 2.5}, {"n": "2"}, {"seed": True}):
        error_of(client.post(URL, json={"prompt": "a", **bad}), 422)


@pytest.mark.parametrize("size", ["00064x00064", "064x64", "64x064", "١٢٨x١٢٨", "６４x64", "64x64\n", "+64x64",
                                  "64 x 64", "AUTO", "auto ", "64x64x64"])
def test_sizes_parse_strictly(client, size):
    """ASCII digits without leading zeros, "x", ASCII digits; or "auto". Nothing else."""
    err = error_of(client.post(URL, json={"prompt": "a", "size": size}), 400)
    assert err["param"] == "size" and "ASCII digits" in err["message"], err


def test_server_limits_on_steps_and_size():
    """--max-steps and --max-image-size narrow the engine's ranges (and cap the model's default steps)."""
    pipe = FakePipeline()
    pipe.spec = dataclasses.replace(pipe.spec, default_steps=8)
    with TestClient(fake_app(pipe, max_steps=4, max_image_size=96)) as c:
        assert c.app.state.worker.wait_ready(10)
        err = error_of(c.post(URL, json={"prompt": "a", "num_inference_steps": 5}), 400)
        assert err["param"] == "num_inference_steps" and "between 1 and 4" in err["message"]
        err = error_of(c.post(URL, json={"prompt": "a", "size": "112x64"}), 400)
        assert err["param"] == "size" and "at most 96" in err["message"]
        assert c.post(URL, json={"prompt": "a", "size": "96x96", "num_inference_steps": 4}).status_code == 200
        assert c.post(URL, json={"prompt": "a"}).status_code == 200
        schema = c.get("/openapi.json").json()["components"]["schemas"]["ImageGenerationRequest"]["properties"]
        sizes = c.get("/ready").json()["sizes"]  # the web page's menu: only sizes this server accepts
    assert [p.steps for (p,) in pipe.batches] == [4, 4]  # the unset steps: the model's 8, capped to 4
    assert schema["num_inference_steps"]["anyOf"][0]["maximum"] == 4
    assert schema["size"]["anyOf"][0]["pattern"] == "^(auto|(64|80|96)x(64|80|96))$"
    assert sizes[0] == "64x64" and all(max(map(int, s.split("x"))) <= 96 for s in sizes), sizes


# ---------------------------------------------------------------------------------- failures stay put


@pytest.mark.parametrize("error", [RuntimeError("tokenizer cannot take this prompt"),
                                   torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")])
def test_a_failing_request_does_not_fail_its_batch_neighbour(error):
    """The worker batches a bad and a good request; the batch fails; each is rerun alone: the good one gets its
    image (200), only the bad one gets the error."""
    gate = threading.Event()
    pipe = FakePipeline(gate=gate, fail=lambda batch: error if any(p.prompt == "bad" for p in batch) else None)
    app = fake_app(pipe, max_batch_size=4)
    results = {}
    with TestClient(app) as c:
        assert app.state.worker.wait_ready(10)

        def post(name, seed):
            results[name] = c.post(URL, json={"prompt": name, "seed": seed})

        threads = [threading.Thread(target=post, args=("blocker", 1))]
        threads[0].start()
        assert pipe.started.wait(10)  # the engine is busy: the next two queue up together
        for depth, (name, seed) in enumerate((("bad", 2), ("good", 3)), start=1):
            threads.append(threading.Thread(target=post, args=(name, seed)))
            threads[-1].start()
            deadline = time.monotonic() + 10
            while app.state.worker.queue_depth() < depth and time.monotonic() < deadline:  # queued in this order
                time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(30)
        metrics = c.get("/metrics").text
    assert [[p.prompt for p in b] for b in pipe.batches] == [["blocker"], ["bad", "good"], ["bad"], ["good"]]
    good = results["good"]
    assert good.status_code == 200, good.text
    img = base64.b64decode(good.json()["data"][0]["b64_json"])
    assert Image.open(io.BytesIO(img)).convert("RGB").getpixel((0, 0)) == fake_colour(3, 0)
    oom = isinstance(error, torch.OutOfMemoryError)
    err = error_of(results["bad"], 503 if oom else 500)
    assert err["code"] == ("out_of_memory" if oom else "error")
    assert results["blocker"].status_code == 200
    assert "ditserve_batch_splits_total 1.0" in metrics


# ------------------------------------------------------------------------------------------ slow clients


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_stalled_clients_are_cut_off_while_others_are_served():
    """Partial headers, or full headers and no body: each gets 408 and is closed within the deadline; a normal
    request is answered meanwhile; an idle keep-alive connection is closed after its timeout."""
    app = fake_app(header_timeout=1.0, body_timeout=1.0, keep_alive_timeout=1.0)
    with live_server(app) as live:
        start = time.monotonic()
        stalled = []
        for i in range(10):
            s = _connect(live.url)
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Ty")  # partial headers
            stalled.append(s)
            s = _connect(live.url)
            s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prompt\"")  # full headers, a part of the body
            stalled.append(s)
        r = httpx2.post(live.url + URL, json={"prompt": "served meanwhile"}, timeout=10)
        assert r.status_code == 200 and time.monotonic() - start < 1.0  # before any deadline passed
        answers = [_read_all(s) for s in stalled]
        closed_after = time.monotonic() - start
        for s in stalled:
            s.close()
        for answer in answers:
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower(), answer
            assert json.loads(body)["error"]["code"] == "request_timeout"
        assert closed_after < 1.0 + 2.0, f"stalled connections were closed only after {closed_after:.1f} s"
        metrics = httpx2.get(live.url + "/metrics", timeout=5).text
        for reason in ("header_timeout", "body_timeout"):
            assert f'ditserve_connections_refused_total{{reason="{reason}"}} 10.0' in metrics, reason
        # The cut-off requests whose heads arrived count as what their clients got.
        assert 'ditserve_http_requests_total{endpoint="/v1/images/generations",status="408"} 10.0' in metrics
        assert 'status="400"' not in metrics
        # A connection that trickles the next request's head a byte at a time is cut off at the same deadline.
        s = _connect(live.url)
        t0 = time.monotonic()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n" * 10:
                s.sendall(bytes([byte]))
                time.sleep(0.05)
        assert time.monotonic() - t0 < 3.0
        s.close()
        # Keep-alive: an idle connection after a response is closed after keep_alive_timeout.
        s = _connect(live.url)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        t0 = time.monotonic()
        assert _read_all(s).startswith(b"HTTP/1.1 200 ")
        assert 0.5 < time.monotonic() - t0 < 3.0
        s.close()
        assert httpx2.get(live.url + "/health", timeout=5).status_code == 200


def test_max_connections():
    """One connection over --max-connections gets 503 with OpenAI's body and Retry-After, then is closed; once
    connections close, requests are served again."""
    app = fake_app(max_connections=3)
    with live_server(app) as live:
        idle = [_connect(live.url) for _ in range(3)]
        time.sleep(0.2)  # accepted by the server
        over = _connect(live.url)
        over.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = _read_all(over).partition(b"\r\n\r\n")
        over.close()
        assert head.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in head.lower(), head
        assert json.loads(body)["error"]["code"] == "too_many_connections"
        assert app.state.metrics.connections_refused.labels("max_connections")._value.get() == 1
        for s in idle:
            s.close()
        time.sleep(0.2)
        assert httpx2.get(live.url + "/health", timeout=5).status_code == 200


# -------------------------------------------------------------------------------------------- fuzzing


@pytest.mark.skipif(shutil.which("st", path=os.path.dirname(sys.executable)) is None,
                    reason="schemathesis is not installed (pip install -e .[test])")
def test_schemathesis_finds_nothing_against_the_default_model(default_pipeline, tmp_path):
    """schemathesis, every check (schema conformance of answers and statuses, valid data accepted, invalid data
    refused, auth not ignored, ...), against the live server on the packaged default model. Bounded: 10 examples
    per operation and phase, and the server caps the work of one request (n <= 2, 2 steps, 96x96)."""
    app = create_app(lambda: default_pipeline, ServerConfig(api_key="k-fuzz", max_batch_size=2, max_steps=2,
                                                            max_image_size=96, warmup_size=(64, 64),
                                                            warmup_steps=1))
    with live_server(app) as live:
        run = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "st"), "run", live.url + "/openapi.json",
             "--checks", "all", "--header", "Authorization: Bearer k-fuzz", "--max-examples", "10",
             "--seed", "1", "--no-color", "--suppress-health-check", "all", "--report", "har",
             "--report-dir", str(tmp_path), "--request-timeout", "60"],  # (not its 10 s: a busy CI machine)
            capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its cache folder goes there too
    summary = run.stdout[-3000:]
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert " passed" in summary and "failure" not in summary.split("SUMMARY")[-1], summary
    assert app.state.metrics.engine_failures.labels("error")._value.get() == 0



def test_max_image_size_below_the_models_default_size_fails_the_load():
    """A request without a size gets the model's default size: a cap below it is refused at start."""
    pipe = FakePipeline()
    pipe.spec = dataclasses.replace(pipe.spec, default_width=128)
    fatal = []
    app = create_app(lambda: fake_engine(pipe), ServerConfig(max_image_size=96, warmup=False), on_fatal=fatal.append)
    with TestClient(app):
        assert not app.state.worker.wait_ready(10)
    assert len(fatal) == 1 and "--max-image-size 96 is below the model's default size 128x64" in str(fatal[0])
