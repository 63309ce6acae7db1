"""LoRA adapters in the server, on the tiny FLUX.1 checkpoint: an adapter given at start (`--lora NAME=PATH`) and a
--lora-dir folder loaded by name on request (an LRU bounded in count, metrics for loads and evictions); the
request field `lora` (served image = the engine's image with the same adapters; bad names and weights are 400s);
requests with different adapters never share a batch; /v1/models and the schema list the adapters; serve's flags."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import io
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from ditserve.config import ConfigError, EngineConfig, SamplingParams
from ditserve.engine import Engine
from ditserve.engine_args import add_engine_flags, engine_from_args
from ditserve.lora import LoRAConfig, LoRASpec
from ditserve.server import ServerConfig, create_app
from ditserve.testing import build_tiny_flux_pipeline

URL = "/v1/images/generations"
REQ = {"prompt": "a red circle", "size": "64x64", "num_inference_steps": 2, "guidance_scale": 3.5, "seed": 4}


def make_adapter(file, transformer_config: dict, seed: int, modules=("to_q", "to_v", "proj_out")):
    """A diffusers-format LoRA (`transformer.<module>.lora_A/B.weight`, rank 2, no alphas: scale 1) on some
    Linear layers of block 0 of both kinds, random and strong enough to change the image."""
    from safetensors.torch import save_file

    d = transformer_config["num_attention_heads"] * transformer_config["attention_head_dim"]
    g = torch.Generator().manual_seed(seed)
    names = {"to_q": ("transformer_blocks.0.attn.to_q", d, d), "to_v": ("single_transformer_blocks.0.attn.to_v", d, d),
             "proj_out": ("single_transformer_blocks.0.proj_out", 5 * d, d)}
    sd = {}
    for m in modules:
        module, n_in, n_out = names[m]
        sd[f"transformer.{module}.lora_A.weight"] = torch.randn(2, n_in, generator=g) * 0.5
        sd[f"transformer.{module}.lora_B.weight"] = torch.randn(n_out, 2, generator=g) * 0.5
    save_file(sd, str(file))
    return file


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import json

    root = tmp_path_factory.mktemp("lora-server")
    path = build_tiny_flux_pipeline(root / "tiny", guidance_embeds=True, seed=1)
    config = json.loads((path / "transformer" / "config.json").read_text())
    folder = root / "adapters"
    folder.mkdir()
    start = make_adapter(root / "style.safetensors", config, seed=0)
    for i, name in enumerate(("k1", "k2")):
        make_adapter(folder / f"{name}.safetensors", config, seed=i + 1)
    (folder / "notes.txt").write_text("not an adapter")
    lora = LoRAConfig((LoRASpec(str(start), 1.0, name="style"),), mode="unfused", targets="all", max_rank=8)
    engine = Engine.load(str(path), EngineConfig(device="cpu", dtype="fp32", lora=lora))
    return engine, folder


@pytest.fixture(autouse=True)
def unload_folder_adapters(setup):
    """Each test's app starts with only the start adapter loaded (an app's LRU owns what it loaded)."""
    yield
    manager = setup[0].lora
    for name in [n for n in manager.adapters if n != "style"]:
        manager.unload(name)


def b64_image(r) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))


def direct(engine: Engine, lora) -> np.ndarray:
    extra = {} if lora is None else {"lora": lora}
    return engine.generate(SamplingParams(prompt=REQ["prompt"], height=64, width=64, steps=2, guidance=3.5, seed=4,
                                          extra=extra)).frames[0]


def test_adapters_by_request(setup):
    engine, folder = setup
    app = create_app(lambda: engine, ServerConfig(warmup=False, lora_dir=folder, lora_max_loaded=1))
    with TestClient(app) as c:
        assert app.state.worker.wait_ready(30)
        cards = c.get("/v1/models").json()["data"][0]["lora_adapters"]
        assert cards == [{"name": "style", "loaded": True, "rank": 2, "default_weight": 1.0},
                         {"name": "k1", "loaded": False, "rank": None, "default_weight": None},
                         {"name": "k2", "loaded": False, "rank": None, "default_weight": None}]
        default = b64_image(c.post(URL, json=REQ))  # no `lora`: the start adapter at its weight
        none = b64_image(c.post(URL, json={**REQ, "lora": []}))
        k1 = b64_image(c.post(URL, json={**REQ, "lora": [{"name": "k1", "weight": 0.5}]}))
        k1_alone = direct(engine, [("k1", 0.5)])  # the engine is idle: run it here, before k1 is evicted
        stacked = b64_image(c.post(URL, json={**REQ, "lora": [{"name": "style"}, {"name": "k2", "weight": -1}]}))
        metrics = c.get("/metrics").text
        cards = {d["name"]: d["loaded"] for d in c.get("/v1/models/" + engine.name).json()["lora_adapters"]}
        schema = c.get("/openapi.json").json()["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    # Each answer is the engine's own image for the same adapters; the adapters change the image.
    assert np.abs(default.astype(int) - direct(engine, None)).max() <= 1
    assert np.abs(none.astype(int) - direct(engine, [])).max() <= 1
    assert np.abs(k1.astype(int) - k1_alone).max() <= 1
    assert np.abs(stacked.astype(int) - direct(engine, [("style", 1.0), ("k2", -1.0)])).max() <= 1
    for a, b in ((default, none), (none, k1), (k1, stacked)):
        assert np.abs(a.astype(int) - b).mean() > 1
    # --lora-max-loaded 1: loading k2 evicted k1; the start adapter is never counted nor evicted.
    assert "ditserve_lora_loads_total 2.0" in metrics and "ditserve_lora_evictions_total 1.0" in metrics
    assert cards == {"style": True, "k1": False, "k2": True}
    entry = schema["lora"]["anyOf"][0]["items"]["properties"]
    assert entry["name"]["enum"] == ["k1", "k2", "style"] and entry["weight"]["maximum"] == 10


@pytest.mark.parametrize("lora,words", [
    ([{"name": "nope"}], "no adapter named 'nope'"),
    ([{"name": "../adapters/k1"}], "no adapter named"),  # a name is a file stem, never a path
    ([{"name": "notes"}], "no adapter named"),
    ([{"name": "k1", "weight": 10.5}], "between -10 and 10"),
    ([{"name": "k1", "weight": float("nan")}], "finite"),
    ([{"name": "k1"}, {"name": "k1", "weight": 2}], "named twice"),
])
def test_bad_lora_fields_are_400(setup, lora, words):
    import json

    engine, folder = setup
    app = create_app(lambda: engine, ServerConfig(warmup=False, lora_dir=folder))
    with TestClient(app) as c:
        assert app.state.worker.wait_ready(30)
        r = c.post(URL, content=json.dumps({**REQ, "lora": lora}), headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "lora" and words in err["message"], err
        r = c.post(URL, json={**REQ, "lora": [{"name": "k1", "scale": 1}]})  # unknown key: schema violation
        assert r.status_code == 422, r.text


def test_different_adapters_never_share_a_batch(setup):
    """The worker batches queued requests by the engine's batch key, which holds the adapter selection: with
    the engine busy, two requests with k1 at 0.5 share a batch, one with k1 at 1.0 and one with none run apart,
    and each image equals that request run alone."""
    engine, folder = setup
    gate, batches = threading.Event(), []
    run = engine.generate_batch

    def gated(requests, progress=False):
        batches.append([p.extra["lora"] for p in requests])
        if requests[0].prompt == "blocker":
            gate.wait(30)
        return run(requests, progress=progress)

    eng = Engine(engine.name, engine.pipeline, engine.config)
    eng.generate_batch = gated
    app = create_app(lambda: eng, ServerConfig(warmup=False, lora_dir=folder, max_batch_size=4))
    results = {}
    bodies = {"blocker": {**REQ, "prompt": "blocker", "lora": []},
              "a": {**REQ, "lora": [{"name": "k1", "weight": 0.5}]},
              "b": {**REQ, "lora": [{"name": "k1", "weight": 1.0}]},
              "c": {**REQ, "lora": [{"name": "k1", "weight": 0.5}], "seed": 5},
              "d": {**REQ, "lora": []}}
    with TestClient(app) as c:
        assert app.state.worker.wait_ready(30)
        assert c.post(URL, json={**REQ, "lora": [{"name": "k1"}]}).status_code == 200  # loads k1 first
        batches.clear()

        def post(name):
            results[name] = c.post(URL, json=bodies[name])

        threads = [threading.Thread(target=post, args=("blocker",))]
        threads[0].start()
        deadline = time.monotonic() + 20
        while not batches and time.monotonic() < deadline:
            time.sleep(0.01)
        for depth, name in enumerate("abcd", start=1):
            threads.append(threading.Thread(target=post, args=(name,)))
            threads[-1].start()
            while app.state.worker.queue_depth() < depth and time.monotonic() < deadline:
                time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(60)
    assert batches == [[()], [(("k1", 0.5),), (("k1", 0.5),)], [(("k1", 1.0),)], [()]]
    for name in "abcd":  # k1 is still loaded (the app's LRU holds up to 8)
        body = bodies[name]
        alone = engine.generate(SamplingParams(prompt=body["prompt"], height=64, width=64, steps=2, guidance=3.5,
                                               seed=body["seed"], extra={"lora": body["lora"]})).frames[0]
        assert np.abs(b64_image(results[name]).astype(int) - alone).max() <= 1, name


def test_an_adapter_in_use_is_never_evicted(setup):
    """--lora-max-loaded 1: while a queued request uses k1, a request for k2 cannot evict it: 503 with
    Retry-After (code lora_busy); the k1 request gets its image; once it is answered, k2 loads (k1 evicted)."""
    engine, folder = setup
    gate, started = threading.Event(), threading.Event()
    run = engine.generate_batch

    def gated(requests, progress=False):
        if requests[0].prompt == "blocker":
            started.set()
            gate.wait(30)
        return run(requests, progress=progress)

    eng = Engine(engine.name, engine.pipeline, engine.config)
    eng.generate_batch = gated
    app = create_app(lambda: eng, ServerConfig(warmup=False, lora_dir=folder, lora_max_loaded=1))
    results = {}
    with TestClient(app) as c:
        assert app.state.worker.wait_ready(30)
        assert c.post(URL, json={**REQ, "lora": [{"name": "k1"}]}).status_code == 200  # loads k1

        def post(name, body):
            results[name] = c.post(URL, json=body)

        threads = [threading.Thread(target=post, args=("blocker", {**REQ, "prompt": "blocker", "lora": []})),
                   threading.Thread(target=post, args=("k1", {**REQ, "lora": [{"name": "k1"}]}))]
        threads[0].start()
        assert started.wait(20)
        threads[1].start()
        deadline = time.monotonic() + 20
        while app.state.worker.queue_depth() < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        threads.append(threading.Thread(target=post, args=("k2", {**REQ, "lora": [{"name": "k2"}]})))
        threads[-1].start()  # its load waits for the engine thread, which runs it before the k1 request
        while not app.state.worker._calls and time.monotonic() < deadline:  # the load is queued
            time.sleep(0.01)
        gate.set()
        for t in threads:
            t.join(60)
        busy = results["k2"]
        assert busy.status_code == 503 and busy.headers["retry-after"] == "5", busy.text
        assert busy.json()["error"]["code"] == "lora_busy"
        assert results["k1"].status_code == 200 and results["blocker"].status_code == 200
        assert c.post(URL, json={**REQ, "lora": [{"name": "k2"}]}).status_code == 200  # k1 is free: evicted
        assert sorted(engine.lora.adapters) == ["k2", "style"]
        assert app.state.metrics.lora_evictions._value.get() == 1


def _serve_args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_engine_flags(p)
    p.add_argument("--lora-dir", default=None)
    p.add_argument("--lora-max-rank", type=int, default=64)
    return p.parse_args(argv)


def test_serve_flags(tmp_path):
    """serve: --lora NAME=PATH[:WEIGHT] names an adapter; unfused by default; --lora-dir needs unfused and makes
    slots on every Linear of --lora-max-rank. generate's --lora PATH[:WEIGHT] is unchanged (fuse, the stem)."""
    lora = engine_from_args(_serve_args("--lora", "style=/x/a.safetensors:0.7", "--lora", "/x/b.safetensors")).lora
    assert [(s.name, s.path, s.weight) for s in lora.adapters] == [("style", "/x/a.safetensors", 0.7),
                                                                   ("b", "/x/b.safetensors", 1.0)]
    assert lora.mode == "unfused" and lora.targets == "auto"
    lora = engine_from_args(_serve_args("--lora-dir", str(tmp_path), "--lora-max-rank", "16")).lora
    assert (lora.mode, lora.targets, lora.max_rank, lora.adapters) == ("unfused", "all", 16, ())
    with pytest.raises(ConfigError, match="--lora-dir .* needs --lora-mode unfused"):
        engine_from_args(_serve_args("--lora-dir", str(tmp_path), "--lora-mode", "fuse"))
    with pytest.raises(ConfigError, match="no such folder"):
        engine_from_args(_serve_args("--lora-dir", str(tmp_path / "missing")))
    p = argparse.ArgumentParser()
    add_engine_flags(p)
    lora = engine_from_args(p.parse_args(["--lora", "./a=b/c.safetensors:2"])).lora  # generate: no NAME, fuse
    assert (lora.mode, lora.adapters[0].name, lora.adapters[0].path, lora.adapters[0].weight) == (
        "fuse", "c", "./a=b/c.safetensors", 2.0)
