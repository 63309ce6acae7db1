"""The README's serve example, run as written (its Python block, pointed at a live server of the packaged default
model), draws what its prompt says: each image is judged by `ditserve.shapes.judge`."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

from PIL import Image

from ditserve.server import ServerConfig, create_app
from ditserve.shapes import judge, parse_prompt

from .conftest import live_server

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_serve_example_draws_its_prompt(default_pipeline):
    block = re.search(r"```python\n(from openai import OpenAI\n.*?)```", README.read_text(), re.DOTALL)
    assert block, "the README's serve example (a ```python block starting 'from openai import OpenAI') is gone"
    code = block[1]
    assert 'base_url="http://127.0.0.1:30000/v1"' in code
    app = create_app(lambda: default_pipeline, ServerConfig(warmup=False))
    with live_server(app) as live:
        scope: dict = {}
        exec(code.replace("http://127.0.0.1:30000", live.url), scope)  # noqa: S102 - the README's own code
    prompt = re.search(r'prompt="([^"]+)"', code)[1]
    spec = parse_prompt(prompt)  # the example must use the model's prompt template
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))).convert("RGB") for d in scope["r"].data]
    assert images and all(judge(img).matches(spec) for img in images), [judge(img) for img in images]
