"""Live servers on loopback: the official `openai` client against the packaged default model, a bounded
concurrency run (32 clients, 200 requests) against `ditserve serve` in a subprocess, graceful shutdown with
requests in flight, and the CLI's start-up errors."""

from __future__ import annotations

import base64
import io
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2
import numpy as np
import openai
import pytest
from PIL import Image

from ditserve.cli import main
from ditserve.config import SamplingParams
from ditserve.server import ServerConfig, create_app

from .conftest import FakePipeline, fake_app, live_server

URL = "/v1/images/generations"


def png(b64_or_bytes) -> Image.Image:
    data = base64.b64decode(b64_or_bytes) if isinstance(b64_or_bytes, str) else b64_or_bytes
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.fixture(scope="module")
def default_server(default_pipeline):
    """The default model behind a live server (key required), on a free loopback port."""
    pipe = default_pipeline
    app = create_app(lambda: pipe, ServerConfig(api_key="k-123", max_batch_size=4, warmup_size=(64, 64),
                                                        warmup_steps=1))
    with live_server(app) as live:
        yield live, pipe


def test_openai_client_b64_and_url(default_server):
    live, pipe = default_server
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="k-123", max_retries=0)
    assert [m.id for m in client.models.list()] == ["default-model"]

    r = client.images.generate(model="default-model", prompt="a red circle on a blue background", n=2,
                               size="64x64", response_format="b64_json",
                               extra_body={"seed": 11, "num_inference_steps": 2})
    assert len(r.data) == 2 and r.size == "64x64" and r.output_format == "png"
    images = [png(d.b64_json) for d in r.data]
    assert all(img.size == (64, 64) and img.format == "PNG" for img in images)
    # The server's image is the pipeline's image for the same request (same seed -> same noise).
    direct = pipe.generate(SamplingParams(prompt="a red circle on a blue background", height=64, width=64,
                                          steps=2, seed=11, num_images=2), progress=False)
    for served, ref in zip(images, direct.images):
        diff = np.abs(np.asarray(served.convert("RGB"), np.int16) - np.asarray(ref, np.int16))
        assert diff.max() <= 1
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))

    r = client.images.generate(prompt="a green tree", size="128x64", response_format="url",
                               extra_body={"seed": 5, "num_inference_steps": 1})
    (item,) = r.data
    assert item.b64_json is None and item.url.startswith(live.url + "/v1/images/files/")
    fetched = httpx2.get(item.url)  # no key needed: the URL is the capability
    assert fetched.status_code == 200 and png(fetched.content).size == (128, 64)


def test_openai_client_errors(default_server):
    live, _ = default_server
    client = openai.OpenAI(base_url=live.url + "/v1", api_key="k-123", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", size="100x100")
    assert e.value.status_code == 400 and e.value.body["param"] == "size"
    with pytest.raises(openai.NotFoundError) as e:
        client.images.generate(prompt="x", model="dall-e-3")
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:  # FluxPipeline has no true CFG
        client.images.generate(prompt="x", extra_body={"negative_prompt": "blurry"})
    assert e.value.body["param"] == "negative_prompt" and "not supported by FLUX.1" in e.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError):
        client.images.generate(prompt="x", extra_body={"num_inference_steps": "two"})
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")


def test_shutdown_drains_in_flight_requests():
    """uvicorn's signal handler sets should_exit: requests already running or queued still get their images;
    new connections are refused."""
    gate = threading.Event()
    pipe = FakePipeline(gate=gate)
    app = fake_app(pipe, max_batch_size=1)
    results = {}
    with live_server(app) as live:
        def post(i):
            results[i] = httpx2.post(live.url + URL, json={"prompt": f"p{i}", "seed": i}, timeout=30)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while (len(pipe.batches) < 1 or app.state.worker.queue_depth() < 2) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.state.worker.queue_depth() == 2  # one running, two queued
        live.server.should_exit = True
        deadline = time.monotonic() + 10
        with pytest.raises(httpx2.ConnectError):  # the listening socket closes within uvicorn's next tick
            while time.monotonic() < deadline:
                httpx2.get(live.url + "/health", timeout=2)
                time.sleep(0.05)
        gate.set()
        for t in threads:
            t.join(30)
    assert [results[i].status_code for i in range(3)] == [200, 200, 200]
    assert [results[i].json()["seed"] for i in range(3)] == [0, 1, 2]
    assert app.state.worker.state == "stopped"


# --------------------------------------------------------------------------------------- subprocesses


class Served:
    """`python -m ditserve serve ...` in a subprocess on a free port."""

    def __init__(self, *args: str, timeout: float = 120.0):
        self.proc = subprocess.Popen([sys.executable, "-m", "ditserve", "serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + timeout
        self.url = None
        while self.url is None:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"server exited ({self.proc.wait()}): {''.join(self.lines)}")
            self.lines.append(line)
            if m := re.search(r"listening on (http://\S+)", line):
                self.url = m[1]
            assert time.monotonic() < deadline, "server did not start"
        threading.Thread(target=self._drain, daemon=True).start()
        while httpx2.get(self.url + "/ready").status_code != 200:
            assert self.proc.poll() is None, "".join(self.lines)
            assert time.monotonic() < deadline, "server did not get ready"
            time.sleep(0.1)

    def _drain(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return int(re.search(r"VmRSS:\s+(\d+) kB", f.read())[1]) * 1024

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def one_answer(client: httpx2.Client, url: str, i: int, timeout: float = 60.0) -> tuple[int, dict, bool]:
    """POST request i (failing past `timeout` seconds); returns (status, body, well-formed)."""
    n = 1 + i % 2
    body = {"prompt": f"request {i}", "n": n, "size": "64x64", "seed": i, "num_inference_steps": 1,
            "response_format": "url" if i % 5 == 0 else "b64_json"}
    r = client.post(url + URL, json=body, timeout=timeout)
    payload = r.json()
    if r.status_code != 200:
        ok = set(payload) == {"error"} and {"message", "type", "param", "code"} <= set(payload["error"])
        return r.status_code, payload, ok
    ok = payload["seed"] == i and len(payload["data"]) == n
    for item in payload["data"]:
        raw = client.get(item["url"]).content if body["response_format"] == "url" else item["b64_json"]
        ok = ok and png(raw).size == (64, 64)
    return r.status_code, payload, ok


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's RSS from /proc")
def test_concurrent_clients_each_get_one_answer_and_memory_stays_flat():
    server = Served("--max-batch-size", "4", "--max-queue", "64", "--warmup-size", "64x64", "--warmup-steps", "1")
    try:
        # The deadline scales with this machine's speed now (a busy machine is slower, not hung): the slowest of
        # three requests alone, t. With 32 clients and batches of 4 images, a request waits behind at most
        # 32 * 2 / 4 = 16 batches of <= 4 images (n is 1 or 2), each taking at most ~4 t: 64 t; twice that, plus
        # 30 s for scheduling noise. A real hang still fails (the client times out).
        with httpx2.Client() as c:
            one = []
            for i in range(2000, 2003):
                t0 = time.monotonic()
                assert one_answer(c, server.url, i, timeout=120)[0] == 200
                one.append(time.monotonic() - t0)
        deadline = 30.0 + 128 * max(one)
        local = threading.local()

        def run(i):
            if not hasattr(local, "client"):
                local.client = httpx2.Client()
            return one_answer(local.client, server.url, i, timeout=deadline)

        with ThreadPoolExecutor(32) as pool:  # settle allocator pools and caches first
            warm = list(pool.map(run, range(1000, 1064)))
        assert all(status == 200 and ok for status, _, ok in warm)
        rss_before = server.rss_bytes()
        with ThreadPoolExecutor(32) as pool:  # ~3 s on 2 idle cores
            answers = list(pool.map(run, range(200)))
        rss_after = server.rss_bytes()
        metrics = httpx2.get(server.url + "/metrics").text
    finally:
        status = server.stop()
    assert len(answers) == 200
    assert all(ok for _, _, ok in answers), [a for a in answers if not a[2]][:3]
    assert [s for s, _, _ in answers] == [200] * 200  # a 64-deep queue holds 32 clients: no 429
    assert sorted(body["seed"] for _, body, _ in answers) == list(range(200))
    assert 'ditserve_http_requests_total{endpoint="/v1/images/generations",status="200"} 267.0' in metrics
    batches = float(re.search(r"ditserve_batch_images_count (\S+)", metrics)[1])
    assert batches < 267 * 0.8, f"{batches} batches for 267 requests: concurrent requests were not batched"
    growth = rss_after - rss_before
    assert growth < 16 * 2**20, f"server RSS grew {growth / 2**20:.1f} MiB over 200 requests"
    assert status in (0, -signal.SIGTERM), "".join(server.lines)


def test_sigterm_drains_a_real_server():
    server = Served("--max-batch-size", "1", "--warmup-size", "64x64", "--warmup-steps", "1")
    results = {}
    try:
        def post(i):  # ~1 s each on 2 CPU cores with the trained default model (64x64 native, 28 steps)
            results[i] = httpx2.post(server.url + URL, json={"prompt": "x", "size": "256x256", "seed": i,
                                                             "num_inference_steps": 8}, timeout=120)

        threads = [threading.Thread(target=post, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while "ditserve_queue_depth 2.0" not in httpx2.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline, "requests did not queue up"
            time.sleep(0.02)
        server.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        status = server.proc.wait(60)
    finally:
        server.stop()
    assert [results[i].status_code for i in range(3)] == [200, 200, 200], "".join(server.lines)
    assert all(png(results[i].json()["data"][0]["b64_json"]).size == (256, 256) for i in range(3))
    assert status in (0, -signal.SIGTERM)
    assert "Traceback" not in "".join(server.lines)


@pytest.fixture
def _fresh_log_handlers():
    """setup_logging attaches a handler bound to the sys.stderr of its time; capsys swaps sys.stderr per test."""
    yield
    logging.getLogger("ditserve").handlers.clear()


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, _fresh_log_handlers):
    import socket

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    cases = {
        "bad model": ["--model", str(tmp_path / "nowhere")],
        "bad key file": ["--api-key-file", str(tmp_path / "missing-key")],
        "two keys": ["--api-key", "a", "--api-key-file", str(tmp_path / "k")],
        "bad warmup size": ["--warmup-size", "100x100"],
        "bad batch size": ["--max-batch-size", "0"],
        "bad connection cap": ["--max-connections", "0"],
        "bad header timeout": ["--header-timeout", "-1"],
        "bad image size cap": ["--max-image-size", "32"],
        "bad port": ["--port", "70000"],
        "busy port": ["--port", str(busy_port)],
    }
    try:
        for what, args in cases.items():
            argv = ["serve", "--port", "0", *args] if "--port" not in args else ["serve", *args]
            assert main(argv) == 2, what
            lines = capsys.readouterr().err.splitlines()
            # One error line; a model that fails to load is found after the socket is open (one line before).
            assert lines and "error: " in lines[-1] and lines[-1].startswith("ditserve"), (what, lines)
            assert all(line.startswith("ditserve: listening on ") for line in lines[:-1]), (what, lines)
            # Every other mistake (a busy port included) is refused before the socket opens and the model loads.
            assert len(lines) == (2 if what == "bad model" else 1), (what, lines)
    finally:
        busy.close()


def test_cli_api_key_file(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("file-key-1\n")
    server = Served("--api-key-file", str(key_file), "--no-warmup")
    try:
        assert httpx2.get(server.url + "/v1/models").status_code == 401
        r = httpx2.get(server.url + "/v1/models", headers={"Authorization": "Bearer file-key-1"})
        assert r.status_code == 200 and r.json()["data"][0]["id"] == "default-model"
    finally:
        server.stop()
    assert any("ready: default-model" in line for line in server.lines)
