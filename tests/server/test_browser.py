"""The web page at / end to end in headless Chromium (Debian's `chromium`, driven by Playwright) against the
packaged default model: fill the form, generate, see the image and the history.

Skips, saying why, only where Chromium or the Playwright package is not installed (`.ci/run` installs both);
a browser that is installed but fails to start is a failure.
"""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from PIL import Image

from ditserve.config import SamplingParams
from ditserve.server import ServerConfig, create_app

from .conftest import live_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BIG_SEED = 2**53 + 1  # not exact as a JavaScript number: the page must carry seeds as digit strings
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: apt-get install chromium "
                                                "chromium-driver; .ci/run does this)"),
    pytest.mark.skipif(sync_playwright is None, reason="the playwright Python package is not installed "
                                                       "(pip install -e '.[test]')"),
]


def data_url_image(src: str) -> Image.Image:
    header, b64 = src.split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB")


@pytest.fixture(scope="module")
def page_server(default_pipeline):
    pipe = default_pipeline
    app = create_app(lambda: pipe, ServerConfig(warmup_size=(64, 64), warmup_steps=1))
    with live_server(app) as live:
        yield live, pipe


def test_web_page_generates_and_keeps_history(page_server, tmp_path):
    live, pipe = page_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)  # e.g. a 404
            page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status == 404 else None)
            page.goto(live.url + "/")
            page.wait_for_function("document.getElementById('model-line').textContent.includes('default-model')",
                                   timeout=20_000)
            spec = pipe.spec  # the page shows the model's defaults
            assert (f"default {spec.default_width}x{spec.default_height}, {spec.default_steps} steps"
                    in page.inner_text("#model-line"))
            assert page.is_hidden("#api-key-label")  # no key configured
            # The size menu offers what the model draws well, its default first, labelled in full.
            options = page.eval_on_selector_all("#size option", "os => os.map(o => [o.value, o.textContent])")
            assert options[0] == ["64x64", "64x64 (default)"] and ["128x128", "128x128"] in options
            assert "256x256" not in [v for v, _ in options]
            assert page.evaluate("(() => { const s = document.getElementById('size'); "
                                 "return s.scrollWidth <= s.clientWidth; })()")
            # A typed value is drawn in the text colour, unlike the grey label and placeholder.
            page.fill("#steps", "2")
            colours = page.evaluate("""(() => {
                const c = (el, pseudo) => getComputedStyle(el, pseudo).color;
                const steps = document.getElementById('steps');
                return [c(steps), c(steps, '::placeholder'), c(steps.closest('label'))]; })()""")
            assert colours[0] != colours[1] and colours[0] != colours[2], colours

            # The browser's own validation blocks a submit: the status says so (no stale "done").
            page.fill("#steps", "0")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').className === 'error'", timeout=5_000)
            assert page.inner_text("#status").startswith("Steps:")

            page.fill("#prompt", "a red circle on a blue background")
            page.select_option("#size", "128x128")
            page.fill("#steps", "2")
            page.fill("#seed", str(BIG_SEED))
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=30_000)
            assert page.is_visible("#result")
            assert page.evaluate("document.getElementById('result').naturalWidth") == 128
            info = page.inner_text("#result-info")
            assert f"seed {BIG_SEED}" in info and "128x128" in info and "2 steps" in info
            # Shown scaled up by a whole factor, pixelated.
            page.wait_for_function("document.getElementById('result').getBoundingClientRect().width >= 256")
            assert page.evaluate("getComputedStyle(document.getElementById('result')).imageRendering") == "pixelated"

            shown = data_url_image(page.get_attribute("#result", "src"))
            direct = pipe.generate(SamplingParams(prompt="a red circle on a blue background", height=128, width=128,
                                                  steps=2, seed=BIG_SEED), progress=False).images[0]
            diff = np.abs(np.asarray(shown, np.int16) - np.asarray(direct, np.int16))
            assert diff.max() <= 1  # the page shows the model's image for that request

            page.fill("#prompt", "a green tree")
            page.fill("#seed", "")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('#history li').length === 2", timeout=30_000)
            captions = page.locator("#history li .prompt").all_inner_texts()
            assert captions == ["a green tree", "a red circle on a blue background"]  # newest first

            page.locator("#history li").nth(1).click()  # back to the first image, form refilled
            assert page.input_value("#seed") == str(BIG_SEED)
            assert page.get_attribute("#result", "src") == page.locator("#history li img").nth(1).get_attribute("src")

            assert errors == []  # no page error, no console error, no 404 (the favicon included)
            page.fill("#steps", "0")  # the server's 400 shows as an error on the page
            page.evaluate("document.getElementById('steps').removeAttribute('min')")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').className === 'error'", timeout=30_000)
            assert "400" in page.inner_text("#status") and "steps" in page.inner_text("#status")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            assert [e for e in errors if "status of 400" not in e] == []  # the console notes the 400 it got
        finally:
            browser.close()


def test_web_page_makes_a_video_and_plays_it(tmp_path):
    """A video model (the fake video engine): the page shows the video form, submits a job, follows its progress
    and plays the MP4 in a <video> element; a bad frame count shows the server's 400."""
    import threading

    from .conftest import FakeVideoPipeline, fake_app

    gate = threading.Event()
    pipe = FakeVideoPipeline(step_gate=gate)
    with live_server(fake_app(pipe)) as live, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(live.url + "/")
            page.wait_for_function("document.getElementById('model-line').textContent.includes('frames at')",
                                   timeout=20_000)
            assert page.is_visible("#video-fields") and page.is_visible("#first-frame-label")  # takes an image
            assert page.inner_text("#generate") == "Generate video"
            page.fill("#frames", "9")
            page.fill("#fps", "8")
            page.fill("#steps", "4")
            page.fill("#seed", str(BIG_SEED))
            page.click("#generate")
            # Held at the first step: the page shows the job in progress and its progress bar.
            page.wait_for_function("document.getElementById('status').textContent.startsWith('in progress')",
                                   timeout=20_000)
            assert page.is_visible("#progress") and "23%" in page.inner_text("#status")
            gate.set()
            page.wait_for_function("document.getElementById('status').textContent === 'done'", timeout=30_000)
            assert page.is_visible("#video") and page.is_hidden("#result") and page.is_hidden("#progress")
            page.wait_for_function("document.getElementById('video').readyState >= 1", timeout=10_000)
            width, height, duration = page.evaluate(
                "(() => { const v = document.getElementById('video'); return [v.videoWidth, v.videoHeight, "
                "v.duration]; })()")
            assert (width, height) == (64, 64) and abs(duration - 9 / 8) < 0.2, (width, height, duration)
            info = page.inner_text("#result-info")
            assert f"seed {BIG_SEED}" in info and "9 frames at 8 fps" in info
            [params] = pipe.batches[-1]
            assert (params.num_frames, params.fps, params.seed) == (9, 8.0, BIG_SEED)

            page.fill("#frames", "6")  # not 4n + 1: the server's 400 shows on the page
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').className === 'error'", timeout=30_000)
            assert "400" in page.inner_text("#status") and "4n + 1" in page.inner_text("#status")
            page.screenshot(path=str(tmp_path / "video-page.png"), full_page=True)
            assert errors == []
        finally:
            browser.close()
