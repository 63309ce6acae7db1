"""`POST /v1/images/edits`: OpenAI's multipart edit request, driven with the official `openai` client against a
fake edit model (the images reach the engine, in order) and the tiny Qwen-Image-Edit checkpoint (the served image
is the engine's); every bad input is a 400 naming the problem, nothing is written to disk, the edits' own body cap
leaves the JSON routes' cap as it was, and the schema describes the route only where the model takes images."""

from __future__ import annotations

import base64
import io
import os
import shutil
import subprocess
import sys
import tempfile

import httpx2
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ditserve.config import EngineConfig, SamplingParams
from ditserve.engine import Capabilities, Engine, Output
from ditserve.server import ServerConfig, create_app

from .conftest import FakePipeline, fake_app, live_server

URL = "/v1/images/edits"


class FakeEditPipeline(FakePipeline):
    """The fake model taking up to two input images: image i of a request is filled with the colour of the
    request's last input image's top-left pixel, plus i, so a test sees which image reached the engine."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.capabilities = Capabilities(family="fake-edit", guidance="distilled", max_input_images=2)

    def generate_batch(self, requests, progress=False):
        self.batches.append(list(requests))
        out = []
        for p in requests:
            r, g, b = p.images[-1].getpixel((0, 0))
            frames = np.stack([np.full((p.height, p.width, 3), (r, g, (b + i) % 256), np.uint8)
                               for i in range(p.num_images)])
            out.append(Output(kind="image", frames=frames, peak_memory_bytes=None, params=p,
                              timings={"text_encode_s": 0.0, "denoise_s": 0.0, "decode_s": 0.0, "total_s": 0.0}))
        return out


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def solid(colour, size=(40, 24), fmt="PNG") -> bytes:
    return encoded(Image.new("RGB", size, colour), fmt)


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


@pytest.fixture(scope="module")
def edit_client():
    pipe = FakeEditPipeline()
    with TestClient(fake_app(pipe, max_input_pixels=64 * 64, max_image_bytes=64 << 10)) as c:
        assert c.app.state.worker.wait_ready(10)
        yield c, pipe


def test_openai_client_edit(tmp_path):
    """The official client's `images.edit`: one image (b64_json), two images as `image[]` (url), the answer's
    fields as generations gives them; the engine got the decoded RGB images in order, the size and the seed."""
    pipe = FakeEditPipeline()
    with live_server(fake_app(pipe, api_key="k-1")) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="k-1", max_retries=0)
        r = client.images.edit(image=("in.png", solid((200, 10, 30)), "image/png"), prompt="make it blue", n=2,
                               size="96x64", extra_body={"seed": 7, "num_inference_steps": 1})
        assert r.size == "96x64" and r.output_format == "png" and r.seed == 7 and len(r.data) == 2
        assert [decoded(d.b64_json).getpixel((0, 0)) for d in r.data] == [(200, 10, 30), (200, 10, 31)]
        r = client.images.edit(image=[("a.jpg", solid((0, 0, 0), fmt="JPEG"), "image/jpeg"),
                                      ("b.webp", solid((0, 255, 0), fmt="WEBP"), "image/webp")],
                               prompt="the second", response_format="url", output_format="jpeg")
        png = httpx2.get(r.data[0].url)
        assert png.status_code == 200 and png.headers["content-type"] == "image/jpeg"
        with pytest.raises(openai.BadRequestError) as e:
            client.images.edit(image=("x.png", b"not an image", "image/png"), prompt="p")
        assert "image[0]: not an image" in str(e.value)
    (one,), (two,) = pipe.batches
    assert (one.height, one.width, one.seed, one.steps, one.num_images) == (64, 96, 7, 1, 2)
    assert one.prompt == "make it blue" and [im.mode for im in one.images] == ["RGB"]
    assert len(two.images) == 2  # in order: black (jpeg), then green (lossy webp: within 2 levels)
    assert max(two.images[0].getpixel((0, 0))) <= 2 and np.abs(np.subtract(two.images[1].getpixel((0, 0)),
                                                                            (0, 255, 0))).max() <= 2


def truncated_png() -> bytes:
    rng = np.random.default_rng(0)
    data = encoded(Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)))
    return data[: len(data) // 2]


@pytest.mark.parametrize("files,fields,status,param,words", [
    ({"image": ("x.png", b"GIF89a not really")}, {}, 400, "image[0]", "not an image"),
    ({"image": ("x.png", truncated_png())}, {}, 400, "image[0]", "truncated or corrupt"),
    ({"image": ("x.png", b"")}, {}, 400, "image[0]", "empty"),
    ({"image": ("x.png", solid((1, 2, 3), size=(65, 64)))}, {}, 400, "image[0]", "--max-input-pixels 4096"),
    ({"image": ("x.gif", encoded(Image.new("RGB", (8, 8)), "GIF"))}, {}, 400, "image[0]", "PNG, JPEG or WebP"),
    ([("image[]", ("a.png", solid((1, 1, 1)))) for _ in range(3)], {}, 400, "image", "at most 2 input image"),
    ({"image": ("x.png", solid((1, 2, 3))), "mask": ("m.png", solid((0, 0, 0)))}, {}, 400, "mask", "not supported"),
    ({}, {}, 400, "image", "at least one input image"),
    ({"image": ("x.png", solid((1, 2, 3)))}, {"quality": "high"}, 400, "quality", "not supported"),
    ({"image": ("x.png", solid((1, 2, 3)))}, {"n": "two"}, 422, "n", "integer"),
    ({"image": ("x.png", solid((1, 2, 3)))}, {"guidance_scale": "nan"}, 422, "guidance_scale", "number"),
    ({"image": ("x.png", solid((1, 2, 3)))}, {"guidance_scale": "1e999"}, 400, "guidance_scale", "finite"),
    ({"image": ("x.png", solid((1, 2, 3)))}, {"n": "17"}, 400, "n", "between 1 and 4"),
    ({"image": ("x.png", solid((1, 2, 3)))}, {"size": "00064x64"}, 400, "size", "ASCII digits"),
    ({"image": ("x.png", solid((1, 2, 3)))}, {"prompt": "\ud800"}, 400, "prompt", "not valid Unicode"),
    ({"image": ("x.png", solid((1, 2, 3)))}, {"colour": "red"}, 422, "colour", "unknown field"),
    ({"image": ("x.png", solid((1, 2, 3)))}, {"lora": '[{"name": "a"}]'}, 400, "lora", "no LoRA adapters"),
])
def test_bad_requests_are_refused_naming_the_problem(edit_client, files, fields, status, param, words):
    c, pipe = edit_client
    before = len(pipe.batches)
    data = {"prompt": "p", **fields}
    if "\ud800" in data["prompt"]:  # httpx cannot encode a lone surrogate: send the bytes it would be
        body = (b'--B\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n\xed\xa0\x80\r\n--B\r\n'
                b'Content-Disposition: form-data; name="image"; filename="x.png"\r\n\r\n' + solid((1, 2, 3)) +
                b"\r\n--B--\r\n")
        r = c.post(URL, content=body, headers={"content-type": "multipart/form-data; boundary=B"})
        err = error_of(r, 400)
        assert err["param"] == "prompt" and "UTF-8" in err["message"]
        return
    err = error_of(c.post(URL, data=data, files=files), status)
    assert err["param"] == param and words in err["message"], err
    assert len(pipe.batches) == before  # nothing reached the engine


def test_body_caps_and_content_type(edit_client):
    """Edits have their own cap (--max-image-bytes, here 64 KiB), the JSON routes keep --max-body-bytes."""
    c, _ = edit_client
    big = np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    err = error_of(c.post(URL, data={"prompt": "p"}, files={"image": ("x.png", encoded(Image.fromarray(big)))}),
                   413)
    assert "65536 bytes" in err["message"]
    ok = c.post(URL, data={"prompt": "p", "size": "64x64"}, files={"image": ("x.png", solid((9, 9, 9)))})
    assert ok.status_code == 200, ok.text
    err = error_of(c.post("/v1/images/generations", json={"prompt": "x" * (1 << 20)}), 413)
    assert "1048576 bytes" in err["message"]
    err = error_of(c.post(URL, json={"prompt": "p"}), 400)
    assert "multipart/form-data" in err["message"]
    whole = (b'--B\r\nContent-Disposition: form-data; name="prompt"\r\n\r\np\r\n--B\r\nContent-Disposition: '
             b'form-data; name="image"; filename="x.png"\r\n\r\n' + solid((1, 2, 3)) + b"\r\n--B--\r\n")
    headers = {"content-type": "multipart/form-data; boundary=B"}
    assert c.post(URL, content=whole, headers=headers).status_code == 200
    for cut in (whole[:-12], whole[:-5], b"garbage"):  # inside the image, before the closing boundary, no parts
        err = error_of(c.post(URL, content=cut, headers=headers), 400)
        assert err["code"] == "invalid_multipart" and "multipart body is" in err["message"], err


def test_text_to_image_model_refuses_edits_and_hides_the_route():
    with TestClient(fake_app()) as c:
        assert c.app.state.worker.wait_ready(10)
        err = error_of(c.post(URL, data={"prompt": "p"}, files={"image": ("x.png", solid((1, 2, 3)))}), 400)
        assert err["param"] == "image" and "takes no input image" in err["message"]
        assert URL not in c.get("/openapi.json").json()["paths"]


def test_schema_of_the_edit_route(edit_client):
    c, _ = edit_client
    op = c.get("/openapi.json").json()["paths"][URL]["post"]
    schema = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["prompt"] and schema["properties"]["image"]["format"] == "binary"
    assert schema["properties"]["n"]["maximum"] == 4 and schema["properties"]["mask"] == {
        "type": "null", "description": "OpenAI's `mask`: not supported by ditserve; a 400 when set"}
    assert {"200", "400", "413", "422", "429"} <= set(op["responses"])


def test_nothing_is_written_to_disk(monkeypatch, tmp_path):
    """A request larger than Starlette's 1 MiB spooling threshold: no temporary file appears."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pipe = FakeEditPipeline()
    noise = np.random.default_rng(2).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    data = encoded(Image.fromarray(noise))
    assert len(data) > 1 << 20
    with TestClient(fake_app(pipe, max_input_pixels=1 << 20)) as c:
        assert c.app.state.worker.wait_ready(10)
        r = c.post(URL, data={"prompt": "p", "size": "64x64"}, files={"image": ("x.png", data)})
        assert r.status_code == 200, r.text
    assert list(tmp_path.iterdir()) == []
    assert np.array_equal(np.asarray(pipe.batches[0][0].images[0]), noise)


# --------------------------------------------------------------------------------- the tiny edit model


@pytest.fixture(scope="module")
def qwen_edit(tmp_path_factory):
    from ditserve.testing_qwen_image import build_tiny_qwen_image_edit_pipeline

    folder = build_tiny_qwen_image_edit_pipeline(tmp_path_factory.mktemp("qwen-edit") / "tiny")
    return Engine.load(str(folder), EngineConfig(device="cpu"))


def test_openai_client_on_the_tiny_edit_model(qwen_edit):
    """The served image is the engine's image for the same request and input image; a second image is one
    too many for Qwen-Image-Edit (400)."""
    rng = np.random.default_rng(3)
    picture = Image.fromarray(rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)).resize((56, 40), Image.BILINEAR)
    app = create_app(lambda: qwen_edit, ServerConfig(warmup=False))
    with live_server(app) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="none", max_retries=0)
        r = client.images.edit(image=("in.png", encoded(picture), "image/png"), prompt="a cat", size="64x64",
                               extra_body={"seed": 3, "num_inference_steps": 2, "guidance_scale": 1.0})
        with pytest.raises(openai.BadRequestError) as e:
            client.images.edit(image=[("a.png", encoded(picture), "image/png")] * 2, prompt="a cat")
        assert "at most 1 input image" in str(e.value)
    served = np.asarray(decoded(r.data[0].b64_json))
    direct = qwen_edit.generate(SamplingParams(prompt="a cat", images=[picture], height=64, width=64, steps=2,
                                               guidance=1.0, seed=3)).frames[0]
    assert np.abs(served.astype(int) - direct.astype(int)).max() <= 1


@pytest.mark.skipif(shutil.which("st", path=os.path.dirname(sys.executable)) is None,
                    reason="schemathesis is not installed (pip install -e .[test])")
def test_schemathesis_on_the_edit_route(tmp_path):
    """schemathesis against the edit route of a live server with an edit model (the fake one: every request
    that passes the checks reaches it). Every check but positive_data_acceptance: a schema can say that `image`
    is a file, not that its bytes decode as a picture, so a schema-valid request with random bytes is rightly a
    400. Bounded: 10 examples per phase."""
    pipe = FakeEditPipeline()
    with live_server(fake_app(pipe, api_key="k-fuzz", max_batch_size=2, max_steps=2, max_image_size=96)) as live:
        run = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "st"), "run", live.url + "/openapi.json",
             "--include-path", URL, "--checks", "all", "--exclude-checks", "positive_data_acceptance",
             "--header", "Authorization: Bearer k-fuzz", "--max-examples", "10", "--seed", "1", "--no-color",
             "--suppress-health-check", "all", "--request-timeout", "60"],  # (not its 10 s: a busy CI machine)
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    summary = run.stdout[-3000:]
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert " passed" in summary and "failure" not in summary.split("SUMMARY")[-1], summary
    assert "Tested: 1" in summary, summary  # the route was in the schema and fuzzed


def test_lora_field_of_an_edit():
    """The form's `lora` (JSON text) is generations' field: checked by the same rules and handed to the engine."""
    from types import SimpleNamespace

    pipe = FakeEditPipeline()
    pipe.lora = SimpleNamespace(adapters={"style": SimpleNamespace(rank=4)}, default=())  # what the server reads
    with TestClient(fake_app(pipe)) as c:
        assert c.app.state.worker.wait_ready(10)
        image = {"image": ("x.png", solid((1, 2, 3)))}
        r = c.post(URL, data={"prompt": "p", "lora": '[{"name": "style", "weight": 0.5}]'}, files=image)
        assert r.status_code == 200, r.text
        err = error_of(c.post(URL, data={"prompt": "p", "lora": '[{"name": "other"}]'}, files=image), 400)
        assert err["param"] == "lora" and "no adapter named 'other'" in err["message"]
        err = error_of(c.post(URL, data={"prompt": "p", "lora": '[{"name": "style", "weight": 1e3}]'}, files=image),
                       400)
        assert "between -10 and 10" in err["message"]
        error_of(c.post(URL, data={"prompt": "p", "lora": "style"}, files=image), 422)
    assert [p.extra["lora"] for (p,) in pipe.batches] == [[("style", 0.5)]]
