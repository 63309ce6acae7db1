"""The asynchronous video API (`ditserve.server.videos`) over HTTP: a job's lifecycle with a fake video engine
(queued, in progress with its progress, completed, the MP4, the list, delete), cancelling a queued and a running
job, expiry, the bounds (jobs kept, MP4 bytes), bad inputs (400 naming the field and its range), OpenAI's SDK with a
multipart input image, and one job end to end on a tiny Wan checkpoint whose MP4 decodes with the right frame
count, size and fps."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import sys
import threading
import time

import anyio
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ditserve.server import ServerConfig, create_app

from .conftest import FakePipeline, FakeVideoPipeline, fake_app, fake_colour, live_server

URL = "/v1/videos"


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def wait_for(client, video_id: str, statuses=("completed", "failed", "cancelled"), timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"{URL}/{video_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {video_id} did not reach {statuses}: {job}")


def decode_mp4(data: bytes) -> tuple[list[np.ndarray], float]:
    import av

    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, float(stream.average_rate)


def metric(client, line: str) -> float:
    for row in client.get("/metrics").text.splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    raise AssertionError(f"no metric {line}")


@pytest.fixture
def video_client():
    pipe = FakeVideoPipeline()
    with TestClient(fake_app(pipe)) as c:
        assert c.app.state.worker.wait_ready(10)
        yield c, pipe


# ------------------------------------------------------------------------------------------- lifecycle


def test_job_lifecycle(video_client):
    c, pipe = video_client
    r = c.post(URL, json={"prompt": "a", "size": "80x64", "num_frames": 9, "fps": 12, "seed": 3,
                          "num_inference_steps": 4, "negative_prompt": "blurry", "guidance_scale": 5})
    assert r.status_code == 200, r.text
    job = r.json()
    assert job["object"] == "video" and job["status"] in ("queued", "in_progress") and job["id"].startswith("video_")
    assert (job["size"], job["num_frames"], job["fps"], job["seed"], job["seconds"]) == ("80x64", 9, 12.0, 3, "0.75")
    done = wait_for(c, job["id"])
    assert done["status"] == "completed" and done["progress"] == 100 and done["error"] is None
    assert done["expires_at"] == done["completed_at"] + 3600
    [params] = pipe.batches[-1]
    assert (params.steps, params.guidance, params.negative_prompt) == (4, 5.0, "blurry")

    r = c.get(f"{URL}/{job['id']}/content")
    assert r.status_code == 200 and r.headers["content-type"] == "video/mp4"
    frames, fps = decode_mp4(r.content)
    assert len(frames) == 9 and frames[0].shape == (64, 80, 3) and fps == 12
    for j, frame in enumerate(frames):  # the fake's colours (frame j: red + j), through lossy H.264
        expected = np.array(fake_colour(3, 0)) + [j, 0, 0]
        assert np.abs(frame.reshape(-1, 3).mean(0) - expected).max() < 4, (j, frame[0, 0])

    listed = c.get(URL).json()
    assert listed["object"] == "list" and [v["id"] for v in listed["data"]] == [job["id"]]
    assert not listed["has_more"]
    assert metric(c, 'ditserve_video_jobs_total{event="submitted"}') == 1
    assert metric(c, 'ditserve_video_jobs_total{event="completed"}') == 1
    assert metric(c, "ditserve_video_job_seconds_count") == 1
    assert metric(c, "ditserve_video_storage_bytes") == len(r.content)

    path = c.app.state.videos.jobs[job["id"]].path
    assert path.exists()
    assert c.delete(f"{URL}/{job['id']}").json() == {"id": job["id"], "object": "video.deleted", "deleted": True}
    assert not path.exists()
    assert error_of(c.get(f"{URL}/{job['id']}"), 404)["code"] == "video_not_found"
    error_of(c.get(f"{URL}/{job['id']}/content"), 404)
    error_of(c.get(f"{URL}/video_nope"), 404)


def test_content_survives_a_deletion_and_encodes_leave_the_request_pool_free(monkeypatch):
    """The MP4 gets a name of the answer's own before it is sent: the job deleted right after that loses the answer
    nothing, the name goes when the answer ends, and Range requests work (players seek). A file gone from under a
    completed job is a 404 with OpenAI's body, not a 500. MP4 encodes run on their own thread: with one encode
    held, the request pool still answers (a content request and an image decode need it)."""
    import ditserve.server.videos as videos

    held, release = threading.Event(), threading.Event()
    write = videos._write_mp4

    def slow_write(output, path):
        if output.params.prompt == "held":
            held.set()
            release.wait(30)
        return write(output, path)

    with TestClient(fake_app(FakeVideoPipeline())) as c:
        assert c.app.state.worker.wait_ready(10)
        job = wait_for(c, c.post(URL, json={"prompt": "a", "size": "80x64", "num_frames": 9}).json()["id"])
        whole = c.get(f"{URL}/{job['id']}/content").content
        r = c.get(f"{URL}/{job['id']}/content", headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == whole[10:20]
        jobs = c.app.state.videos
        path, link = jobs.jobs[job["id"]].path, os.link

        def link_then_delete(src, dst):  # (on the event loop) the job deleted once its answer has its own name
            link(src, dst)
            jobs.remove(jobs.jobs[job["id"]])  # what DELETE, expiry and the disk budget do to a finished job

        monkeypatch.setattr(videos.os, "link", link_then_delete)
        assert c.get(f"{URL}/{job['id']}/content").content == whole and not path.exists()
        monkeypatch.undo()
        error_of(c.get(f"{URL}/{job['id']}"), 404)
        assert os.listdir(path.parent) == []  # the answer's own name went with it

        other = wait_for(c, c.post(URL, json={"prompt": "b"}).json()["id"])
        c.app.state.videos.jobs[other["id"]].path.unlink()
        assert error_of(c.get(f"{URL}/{other['id']}/content"), 404)["code"] == "video_not_found"

        kept = wait_for(c, c.post(URL, json={"prompt": "c"}).json()["id"])
        monkeypatch.setattr(videos, "_write_mp4", slow_write)
        c.portal.call(lambda: setattr(anyio.to_thread.current_default_thread_limiter(), "total_tokens", 1))
        held_job = c.post(URL, json={"prompt": "held"}).json()
        assert held.wait(10)
        start = time.monotonic()
        kept_bytes = c.app.state.videos.jobs[kept["id"]].path.read_bytes()
        assert c.get(f"{URL}/{kept['id']}/content").content == kept_bytes
        assert time.monotonic() - start < 10  # (an encode in the request pool would hold its one thread for 30 s)
        assert c.get(f"{URL}/{held_job['id']}").json()["status"] != "completed"
        release.set()
        assert wait_for(c, held_job["id"])["status"] == "completed"


def test_seconds_become_the_models_frame_count(video_client):
    """seconds x fps, to the nearest count of the rule 4n + 1 (OpenAI's SDK sends seconds as a string)."""
    c, _ = video_client
    for seconds, fps, frames in ((1, 8, 9), ("4", 16, 65), (0.1, 8, 1), ("8", 120, 961), (2.5, None, 21)):
        body = {"prompt": "a", "seconds": seconds, **({"fps": fps} if fps else {})}
        r = c.post(URL, json=body)
        assert r.status_code == 200 and r.json()["num_frames"] == frames, (body, r.text)


def test_cancel_a_running_job_stops_it_at_the_next_step():
    gate = threading.Event()
    pipe = FakeVideoPipeline(step_gate=gate)
    with TestClient(fake_app(pipe)) as c:
        assert c.app.state.worker.wait_ready(10)
        steps = []
        job = c.post(URL, json={"prompt": "a", "num_inference_steps": 4}).json()
        running = wait_for(c, job["id"], ("in_progress",))
        assert running["progress"] == 95 * 1 // 4  # one step done, held at the gate
        original = pipe.on_step

        work = c.app.state.videos.jobs[job["id"]].work
        pipe.on_step = lambda done, total: (steps.append(done), original(done, total))
        assert c.delete(f"{URL}/{job['id']}").json() == {"id": job["id"], "object": "video.deleted", "deleted": True}
        error_of(c.get(f"{URL}/{job['id']}"), 404)
        gate.set()
        deadline = time.monotonic() + 10
        while not work.future.done():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert steps == [2]  # the loop ended at the next step's hook
        assert metric(c, 'ditserve_video_jobs_total{event="cancelled"}') == 1
        assert metric(c, 'ditserve_engine_failures_total{reason="error"}') == 0
        # The engine goes on with the next job.
        assert wait_for(c, c.post(URL, json={"prompt": "b"}).json()["id"])["status"] == "completed"


def test_a_failed_job_reports_its_error_and_its_neighbour_completes():
    pipe = FakeVideoPipeline(fail=lambda batch: RuntimeError("boom") if any(p.prompt == "bad" for p in batch) else None)
    with TestClient(fake_app(pipe)) as c:
        assert c.app.state.worker.wait_ready(10)
        bad, good = (c.post(URL, json={"prompt": p}).json() for p in ("bad", "good"))
        failed = wait_for(c, bad["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "error" and "boom" in failed["error"]["message"]
        assert wait_for(c, good["id"])["status"] == "completed"
        err = error_of(c.get(f"{URL}/{bad['id']}/content"), 409)
        assert err["code"] == "video_not_ready" and "failed" in err["message"]
        assert metric(c, 'ditserve_video_jobs_total{event="failed"}') == 1


def test_cancel_a_queued_job_never_runs_it():
    gate = threading.Event()
    pipe = FakeVideoPipeline(gate=gate)
    with TestClient(fake_app(pipe)) as c:
        assert c.app.state.worker.wait_ready(10)
        first = c.post(URL, json={"prompt": "first"}).json()
        assert pipe.started.wait(10)
        second = c.post(URL, json={"prompt": "second"}).json()
        assert c.get(f"{URL}/{second['id']}").json()["status"] == "queued"
        assert c.get(f"{URL}/{second['id']}/content").status_code == 409
        assert c.delete(f"{URL}/{second['id']}").json()["deleted"] is True
        assert c.app.state.worker.queue_depth() == 0
        gate.set()
        assert wait_for(c, first["id"])["status"] == "completed"
        time.sleep(0.1)
        assert [[p.prompt for p in b] for b in pipe.batches] == [["first"]]
        error_of(c.get(f"{URL}/{second['id']}"), 404)


def test_jobs_expire_and_are_bounded():
    pipe = FakeVideoPipeline()
    with TestClient(fake_app(pipe, video_ttl=0.3)) as c:
        assert c.app.state.worker.wait_ready(10)
        job = wait_for(c, c.post(URL, json={"prompt": "a"}).json()["id"])
        assert job["expires_at"] - job["completed_at"] in (0, 1)
        path = c.app.state.videos.jobs[job["id"]].path
        time.sleep(0.35)
        error_of(c.get(f"{URL}/{job['id']}"), 404)
        assert not path.exists() and metric(c, 'ditserve_video_jobs_total{event="expired"}') == 1

    # At most max_video_jobs kept: the oldest finished one goes; with none finished, 429.
    gate = threading.Event()
    pipe = FakeVideoPipeline(gate=gate)
    with TestClient(fake_app(pipe, max_video_jobs=2)) as c:
        assert c.app.state.worker.wait_ready(10)
        a, b = (c.post(URL, json={"prompt": p}).json() for p in "ab")
        err = error_of(c.post(URL, json={"prompt": "c"}), 429)
        assert err["code"] == "too_many_jobs" and "at most 2" in err["message"]
        gate.set()
        wait_for(c, a["id"]), wait_for(c, b["id"])
        third = c.post(URL, json={"prompt": "c"})
        assert third.status_code == 200
        assert [v["id"] for v in c.get(URL, params={"order": "asc"}).json()["data"]] == [b["id"], third.json()["id"]]

    # At most video_max_bytes of MP4s: the oldest completed video goes to make room.
    with TestClient(fake_app(FakeVideoPipeline(), video_max_bytes=3000)) as c:
        assert c.app.state.worker.wait_ready(10)
        first = wait_for(c, c.post(URL, json={"prompt": "a", "seed": 1}).json()["id"])
        second = wait_for(c, c.post(URL, json={"prompt": "b", "seed": 2}).json()["id"])
        assert first["status"] == second["status"] == "completed"
        error_of(c.get(f"{URL}/{first['id']}"), 404)
        assert c.get(f"{URL}/{second['id']}/content").status_code == 200
        big = wait_for(c, c.post(URL, json={"prompt": "c", "size": "512x512", "num_frames": 17}).json()["id"])
        assert big["status"] == "failed" and big["error"]["code"] == "too_large"


def test_list_pages(video_client):
    c, _ = video_client
    ids = [c.post(URL, json={"prompt": str(i)}).json()["id"] for i in range(3)]
    page = c.get(URL, params={"limit": 2}).json()
    assert [v["id"] for v in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = c.get(URL, params={"limit": 2, "after": page["last_id"]}).json()
    assert [v["id"] for v in rest["data"]] == [ids[0]] and not rest["has_more"]
    for bad in ({"limit": 101}, {"limit": "x"}, {"order": "up"}):
        assert error_of(c.get(URL, params=bad), 400)["param"] == next(iter(bad))


# ------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("raw,param,words", [
    ('{"prompt": "a", "size": "00080x64"}', "size", "ASCII digits"),
    ('{"prompt": "a", "size": "72x64"}', "size", "multiple of 16"),
    ('{"prompt": "a", "num_frames": 6}', "num_frames", "4n + 1"),
    ('{"prompt": "a", "num_frames": 1025}', "num_frames", "between 1 and 1024"),
    ('{"prompt": "a", "seconds": 9}', "seconds", "at most 8"),
    ('{"prompt": "a", "seconds": "12"}', "seconds", "at most 8"),
    ('{"prompt": "a", "seconds": 0}', "seconds", "greater than 0"),
    ('{"prompt": "a", "seconds": 1e999}', "seconds", "finite"),
    ('{"prompt": "a", "seconds": 4, "num_frames": 5}', "seconds", "give one of them"),
    ('{"prompt": "a", "fps": 0}', "fps", "between 1 and 120"),
    ('{"prompt": "a", "fps": 121, "seconds": 1}', "fps", "between 1 and 120"),
    ('{"prompt": "a", "fps": NaN}', "fps", "finite"),
    ('{"prompt": "a", "guidance_scale": 3.41e38}', "guidance_scale", "between 0 and 50"),
    ('{"prompt": "a", "guidance_2": 2}', "guidance_2", "not supported"),
    ('{"prompt": "a", "num_inference_steps": 1001}', "num_inference_steps", "between 1 and 1000"),
    ('{"prompt": "a", "seed": -1}', "seed", "between 0 and 9223372036854775807"),
    ('{"prompt": "\\ud800"}', "prompt", "not valid Unicode"),
    ('{"prompt": "a", "negative_prompt": "\\udfff"}', "negative_prompt", "not valid Unicode"),
    ('{"prompt": "a", "input_reference": "data:image/png;base64,aGVsbG8="}', "input_reference", "not an image"),
    ('{"prompt": "a", "input_reference": "http://example.invalid/x.png"}', "input_reference", "data: URL"),
])
def test_bad_values_are_400_naming_the_field(video_client, raw, param, words):
    c, pipe = video_client
    err = error_of(c.post(URL, content=raw, headers={"content-type": "application/json"}), 400)
    assert err["param"] == param and words in err["message"], err
    assert pipe.batches == []  # nothing reached the engine


def test_malformed_requests(video_client):
    c, _ = video_client
    assert error_of(c.post(URL, json={"prompt": "a", "frames": 5}), 422)["param"] == "frames"
    assert error_of(c.post(URL, json={"prompt": "a", "num_frames": "5"}), 422)["param"] == "num_frames"
    assert error_of(c.post(URL, content=b"{", headers={"content-type": "application/json"}), 400)["code"] == \
        "invalid_json"
    assert error_of(c.post(URL, content=b"prompt=a", headers={"content-type": "text/plain"}), 400)["code"] == \
        "invalid_content_type"
    err = error_of(c.post(URL, data={"prompt": "a", "num_frames": "five"}, files={"x": ("a.txt", b"1")}), 422)
    assert err["param"] in ("num_frames", "x")
    err = error_of(c.post(URL, data={"prompt": "a", "num_frames": "five"}, files={"input_reference": ("i.png", png())}),
                   422)
    assert err["param"] == "num_frames"


def png(width: int = 40, height: int = 24, colour=(10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_an_image_model_refuses_videos_and_a_video_model_refuses_images():
    with TestClient(fake_app(FakePipeline())) as c:
        assert c.app.state.worker.wait_ready(10)
        err = error_of(c.post(URL, json={"prompt": "a"}), 400)
        assert err["code"] == "unsupported_model" and "makes images" in err["message"]
        assert not any(p.startswith(URL) for p in c.get("/openapi.json").json()["paths"])
    with TestClient(fake_app(FakeVideoPipeline())) as c:
        assert c.app.state.worker.wait_ready(10)
        err = error_of(c.post("/v1/images/generations", json={"prompt": "a"}), 400)
        assert err["code"] == "unsupported_model" and "POST /v1/videos" in err["message"]
        schema = c.get("/openapi.json").json()
        assert "/v1/images/generations" not in schema["paths"] and URL in schema["paths"]
        body = schema["paths"][URL]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert body["num_frames"]["anyOf"][0]["enum"][:3] == [1, 5, 9]
        assert body["guidance_2"]["type"] == "null"  # one expert: refused
        assert body["fps"]["anyOf"][0] == {"type": "number", "minimum": 1.0, "maximum": 120.0}


@pytest.mark.skipif(shutil.which("st", path=os.path.dirname(sys.executable)) is None,
                    reason="schemathesis is not installed (pip install -e .[test])")
def test_schemathesis_finds_nothing_on_the_video_routes(tmp_path):
    """schemathesis, every check (valid data accepted, invalid refused, statuses and bodies as documented, deleted
    jobs gone, Allow headers, ...), on the video routes of a live server with the fake video engine (a text-to-video
    one: a generated input_reference is random bytes, no picture), capped at 96x96 and 2 steps."""
    pipe = FakeVideoPipeline()
    pipe.capabilities = dataclasses.replace(pipe.capabilities, max_input_images=0)
    with live_server(fake_app(pipe, api_key="k-fuzz", max_steps=2, max_image_size=96)) as live:
        run = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "st"), "run", live.url + "/openapi.json",
             "--include-path-regex", "^/v1/videos", "--checks", "all", "--header", "Authorization: Bearer k-fuzz",
             "--max-examples", "3", "--seed", "1", "--no-color", "--suppress-health-check", "all",
             # schemathesis' own 10 s per request, not the server's deadlines (tested on their own), is what a busy
             # 2-core CI machine once ran into: a GET of a finished job's MP4 behind a burst of encodes
             "--request-timeout", "60"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    summary = run.stdout[-3000:]
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert " passed" in summary and "5 selected" in run.stdout, summary
    assert "failure" not in summary.split("SUMMARY")[-1], summary  # (a warning that random ids find no job is not one)


# ------------------------------------------------------------------------- OpenAI's SDK, multipart image


@pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the SDK's note on OpenAI's own service
def test_openai_sdk_creates_an_image_to_video_job_with_a_multipart_image():
    openai = pytest.importorskip("openai")
    pipe = FakeVideoPipeline()
    app = fake_app(pipe, api_key="k-video")
    with live_server(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="k-video")
        video = client.videos.create(prompt="a red apple", size="80x64", seconds="4",
                                     input_reference=("first.png", png(), "image/png"))
        assert video.status in ("queued", "in_progress") and video.size == "80x64"
        deadline = time.monotonic() + 30
        while (video := client.videos.retrieve(video.id)).status != "completed":
            assert video.status in ("queued", "in_progress") and time.monotonic() < deadline
            time.sleep(0.05)
        frames, fps = decode_mp4(client.videos.download_content(video.id).read())
        assert len(frames) == 33 and fps == 8  # 4 s at the model's 8 fps: 32 frames, the nearest 4n + 1 is 33
        [params] = pipe.batches[-1]
        assert params.images[0].size == (40, 24) and params.images[0].getpixel((0, 0)) == (10, 200, 30)
        assert [v.id for v in client.videos.list().data] == [video.id]
        assert client.videos.delete(video.id).deleted


# ------------------------------------------------------------------------------------ a tiny Wan, end to end


def test_a_job_on_a_tiny_wan_checkpoint(tmp_path):
    """The real engine: a job's MP4 decodes (PyAV) with the requested frame count, size and fps, and shows the
    video the engine makes for the same request."""
    from ditserve.config import EngineConfig, SamplingParams
    from ditserve.engine import Engine
    from ditserve.testing_wan import build_tiny_wan_pipeline

    engine = Engine.load(str(build_tiny_wan_pipeline(tmp_path / "wan", seed=2)), EngineConfig(device="cpu"))
    app = create_app(lambda: engine, ServerConfig(warmup=False))
    request = {"prompt": "a photo of a cat", "negative_prompt": "blurry", "size": "80x64", "num_frames": 5,
               "fps": 12, "num_inference_steps": 2, "guidance_scale": 4, "seed": 3}
    with TestClient(app) as c:
        assert app.state.worker.wait_ready(60)
        job = c.post(URL, json=request).json()
        done = wait_for(c, job["id"], timeout=120)
        assert done["status"] == "completed", done
        frames, fps = decode_mp4(c.get(f"{URL}/{job['id']}/content").content)
    assert len(frames) == 5 and frames[0].shape == (64, 80, 3) and fps == 12
    steps = []
    engine.pipeline.on_step = lambda done, total: steps.append((done, total))  # the denoise loop's progress hook
    direct = engine.generate(SamplingParams(prompt="a photo of a cat", negative_prompt="blurry", height=64, width=80,
                                            num_frames=5, fps=12, steps=2, guidance=4.0, seed=3)).frames[0]
    assert steps == [(1, 2), (2, 2)]
    for ours, ref in zip(frames, direct):
        mse = ((ours.astype(np.float64) - ref) ** 2).mean()
        assert 10 * np.log10(255.0**2 / max(mse, 1e-12)) >= 25  # H.264 in yuv420p: lossy, but the same video


def test_an_image_to_video_job_on_a_tiny_wan_i2v_checkpoint(tmp_path):
    """Multipart with the first frame: the job's video is the engine's for that image."""
    from ditserve.config import EngineConfig, SamplingParams
    from ditserve.engine import Engine
    from ditserve.testing_wan import build_tiny_wan_i2v_pipeline

    engine = Engine.load(str(build_tiny_wan_i2v_pipeline(tmp_path / "wan-i2v", seed=2)), EngineConfig(device="cpu"))
    first = png(80, 64, (200, 40, 90))
    with TestClient(create_app(lambda: engine, ServerConfig(warmup=False))) as c:
        assert c.app.state.worker.wait_ready(60)
        fields = {"prompt": "a photo of a cat", "size": "80x64", "num_frames": "5", "fps": "12",
                  "num_inference_steps": "2", "guidance_scale": "4", "seed": "3"}
        job = c.post(URL, data=fields, files={"input_reference": ("first.png", first, "image/png")}).json()
        done = wait_for(c, job["id"], timeout=120)
        assert done["status"] == "completed", done
        frames, fps = decode_mp4(c.get(f"{URL}/{job['id']}/content").content)
        err = error_of(c.post(URL, json={"prompt": "no image", "size": "80x64", "num_frames": 5}), 400)
        assert err["param"] == "input_reference" and "exactly one input image" in err["message"]
    assert len(frames) == 5 and frames[0].shape == (64, 80, 3) and fps == 12
    direct = engine.generate(SamplingParams(prompt="a photo of a cat", height=64, width=80, num_frames=5, fps=12,
                                            steps=2, guidance=4.0, seed=3,
                                            images=[Image.open(io.BytesIO(first))])).frames[0]
    for ours, ref in zip(frames, direct):
        mse = ((ours.astype(np.float64) - ref) ** 2).mean()
        assert 10 * np.log10(255.0**2 / max(mse, 1e-12)) >= 25


@pytest.mark.gpu
def test_gpu_an_81_frame_480p_job_and_a_cancel_on_the_dummy_wan_1_3b():
    """On a CUDA GPU: the wan2.1-t2v-1.3b preset (dummy weights, bf16) serves a job at its defaults (832x480, 81
    frames, 16 fps) whose MP4 decodes with those; a 50-step job deleted while it denoises frees the engine at its
    next step (the next job runs)."""
    from ditserve.config import EngineConfig
    from ditserve.engine import Engine

    engine = Engine.load("wan2.1-t2v-1.3b", EngineConfig(device="cuda", load_format="dummy"))
    with TestClient(create_app(lambda: engine, ServerConfig(warmup=False, max_batch_size=1))) as c:
        assert c.app.state.worker.wait_ready(600)
        job = c.post(URL, json={"prompt": "a cat surfing a wave", "num_inference_steps": 2, "seed": 1}).json()
        assert (job["size"], job["num_frames"], job["fps"]) == ("832x480", 81, 16.0)
        done = wait_for(c, job["id"], timeout=600)
        assert done["status"] == "completed", done
        frames, fps = decode_mp4(c.get(f"{URL}/{job['id']}/content").content)
        assert len(frames) == 81 and frames[0].shape == (480, 832, 3) and fps == 16

        long = c.post(URL, json={"prompt": "a long one", "num_inference_steps": 50}).json()
        wait_for(c, long["id"], ("in_progress",), timeout=600)
        deadline = time.monotonic() + 600
        while c.get(f"{URL}/{long['id']}").json()["progress"] == 0:  # a step done: the denoise loop runs
            assert time.monotonic() < deadline
            time.sleep(0.05)
        work = c.app.state.videos.jobs[long["id"]].work
        start = time.monotonic()
        assert c.delete(f"{URL}/{long['id']}").json()["deleted"] is True
        while not work.future.done():
            assert time.monotonic() - start < 30, "the cancelled job did not stop at its next step"
            time.sleep(0.05)
        assert metric(c, 'ditserve_video_jobs_total{event="cancelled"}') == 1
        after = c.post(URL, json={"prompt": "next", "num_inference_steps": 1, "num_frames": 5}).json()
        assert wait_for(c, after["id"], timeout=600)["status"] == "completed"
