"""The fp8 tier as the engine sees it: `EngineConfig.quantization`, the `--quantization` flag of generate /
serve / compile-report, the refusal before any weight is loaded (CPU, GPUs below sm_89, dtypes other than
bf16), the loader hook (real and dummy weights), the generate summary and the server's /ready.

GPUs are faked by monkeypatching torch.cuda's capability queries; the layer itself is tested in
tests/ops/test_fp8.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
from fastapi.testclient import TestClient

import ditserve.ops.fp8 as fp8_mod
from ditserve.cli import main
from ditserve.config import ConfigError, EngineConfig
from ditserve.engine_args import check_engine
from ditserve.loader import load_transformer
from ditserve.ops import Fp8Linear, Linear


@pytest.fixture(autouse=True)
def _fresh_log_handlers():
    """setup_logging (run by main) attaches a handler bound to the sys.stderr of its time."""
    yield
    logging.getLogger("ditserve").handlers.clear()


def fake_gpus(monkeypatch, *gpus: tuple[str, tuple[int, int]]):
    """Make torch see these CUDA devices: (name, compute capability) per index."""

    def index(device=None):
        d = torch.device("cuda") if device is None else torch.device(device)
        return d.index or 0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: gpus[index(device)][0])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: gpus[index(device)][1])


# ---------------------------------------------------------------------------------------------- config


def test_engine_config_quantization_field():
    assert EngineConfig().quantization is None  # off by default
    assert EngineConfig(quantization="fp8").quantization == "fp8"
    for bad in ("int8", "FP8", "fp4", ""):
        with pytest.raises(ConfigError, match=r"unknown quantization .*valid: fp8"):
            EngineConfig(quantization=bad)


# ---------------------------------------------------------------------------------------------- refusal


@pytest.mark.parametrize("device", ["cpu", None])
def test_refused_without_a_gpu(device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # None then resolves to the CPU
    with pytest.raises(ConfigError, match=r"compute capability 8\.9\+.*the device is 'cpu'"):
        check_engine(EngineConfig(device=device, quantization="fp8"))
    check_engine(EngineConfig(device=device))  # off: nothing to refuse


@pytest.mark.parametrize("name,cc", [("NVIDIA A100-SXM4-80GB", (8, 0)), ("NVIDIA GeForce RTX 3090", (8, 6)),
                                     ("Tesla V100", (7, 0))])
def test_refused_on_gpus_without_fp8(name, cc, monkeypatch):
    fake_gpus(monkeypatch, (name, cc))
    with pytest.raises(ConfigError, match=rf"needs .*8\.9\+.*{name} with compute capability {cc[0]}\.{cc[1]}"):
        check_engine(EngineConfig(device="cuda", quantization="fp8"))


@pytest.mark.parametrize("name,cc", [("NVIDIA L40S", (8, 9)), ("NVIDIA H100 80GB HBM3", (9, 0)),
                                     ("NVIDIA B200", (10, 0))])
def test_accepted_on_fp8_gpus(name, cc, monkeypatch):
    fake_gpus(monkeypatch, (name, cc))
    check_engine(EngineConfig(device="cuda", quantization="fp8"))  # bf16 by default on a GPU
    check_engine(EngineConfig(device="cuda", dtype="bf16", quantization="fp8"))
    check_engine(EngineConfig(quantization="fp8"))  # the best device: the GPU


def test_judged_by_the_gpu_asked_for(monkeypatch):
    fake_gpus(monkeypatch, ("NVIDIA H100 80GB HBM3", (9, 0)), ("NVIDIA A100-SXM4-80GB", (8, 0)))
    check_engine(EngineConfig(device="cuda:0", quantization="fp8"))
    with pytest.raises(ConfigError, match="A100.*8\\.0"):
        check_engine(EngineConfig(device="cuda:1", quantization="fp8"))


@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_refused_in_other_dtypes_than_bf16(dtype, monkeypatch):
    fake_gpus(monkeypatch, ("NVIDIA H100 80GB HBM3", (9, 0)))
    with pytest.raises(ConfigError, match=f"computes in bf16.*--dtype {dtype}"):
        check_engine(EngineConfig(device="cuda", dtype=dtype, quantization="fp8"))


# ---------------------------------------------------------------------------------------------- CLI

CPU = ["--device", "cpu"]


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "x", "--steps", "1", "--no-progress"],
    ["serve", "--port", "0", "--no-warmup"],
    ["compile-report", "--backend", "eager"],
])
def test_cli_flag_reaches_the_refusal_before_loading(argv, tmp_path, capsys, monkeypatch):
    """Each subcommand that loads a model takes --quantization and refuses it on the CPU in one line, before
    loading anything (the loader would fail the test)."""
    import ditserve.loader as loader

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(loader, "load_model", no_load)
    monkeypatch.setattr(loader, "load_transformer", no_load)
    monkeypatch.chdir(tmp_path)
    assert main([*argv, *CPU, "--quantization", "fp8"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ditserve"), captured.err
    assert "--quantization fp8 needs an NVIDIA GPU" in lines[0] and "'cpu'" in lines[0]
    assert list(tmp_path.iterdir()) == []  # no image written


def test_cli_flag_choices(capsys):
    assert main(["generate", "--prompt", "x", "--quantization", "int8"]) == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err
    assert main(["generate", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--quantization {fp8}" in help_text and "lossy" in help_text and "off by default" in help_text


def test_generate_runs_fp8_and_says_so(tmp_path, capsys, monkeypatch):
    """End to end on the packaged default model, with the device check bypassed (the CPU runs
    torch._scaled_mm): the summary names the tier, and the image is close to, but not exactly, the
    unquantised one."""
    import numpy as np
    from PIL import Image

    monkeypatch.setattr(fp8_mod, "check_fp8_device", lambda device, dtype: None)
    base = ["generate", "--prompt", "a red circle", "--seed", "3", "--no-progress", *CPU]
    assert main([*base, "--output", str(tmp_path / "ref.png")]) == 0
    assert "quantization" not in capsys.readouterr().err
    assert main([*base, "--output", str(tmp_path / "fp8.png"), "--quantization", "fp8"]) == 0
    assert " | quantization fp8 | " in capsys.readouterr().err
    ref, got = (np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=np.float64) for n in ("ref", "fp8"))
    diff = np.abs(ref - got)
    assert 0 < diff.mean() < 10  # a few levels of 255 on average: lossy, not a different picture


# ---------------------------------------------------------------------------------------------- loader


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def swapped_layers(model) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}


@pytest.mark.parametrize("load_format", ["auto", "dummy"])
def test_loader_quantises_the_declared_layers(load_format):
    """load_transformer with quantization "fp8" returns the fp8 model, from the checkpoint or from dummy
    weights (the same random weights as the unquantised dummy model, quantised)."""
    from ditserve.models.flux import flux_example_inputs

    ref, _ = load_transformer(None, EngineConfig(device="cpu", load_format=load_format))
    model, config = load_transformer(None, EngineConfig(device="cpu", load_format=load_format, quantization="fp8"))
    expected = {f"{lst}.{i}.{name}" for lst, names in model.fp8_linears
                for i in range(len(getattr(model, lst))) for name in names}
    assert swapped_layers(model) == expected and not swapped_layers(ref)
    assert isinstance(model.x_embedder, Linear) and isinstance(model.double_blocks[0].mod, Linear)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    # The same weights, quantised: each fp8 weight dequantises to the unquantised model's, within fp8 rounding.
    for name in expected:
        w = ref.get_submodule(name).weight
        assert rel_err(model.get_submodule(name).dequantized_weight(), w) < 0.05, name
    inputs = flux_example_inputs(model.config, 64, 64, batch=2, text_len=16)
    with torch.inference_mode():
        err = rel_err(model(**inputs), ref(**inputs))
    assert err < 0.08
    if load_format == "auto":  # (dummy weights zero every bias: the gates close and the blocks barely count)
        assert err > 1e-3


class EnginePipeline:
    """Just enough of a pipeline for an Engine behind a server that does not warm up: a spec, capabilities and a
    device."""

    def __init__(self, engine: EngineConfig):
        from ditserve.engine import Capabilities
        from ditserve.registry import preset

        self.spec, self.device, self.engine, self.cache = preset("flux.1-schnell"), torch.device("cpu"), engine, None
        self.capabilities = Capabilities(family="FLUX.1", guidance="none")


def test_ready_reports_the_quantization():
    from ditserve.server import ServerConfig
    from ditserve.server.app import create_app

    for quantization in (None, "fp8"):
        from ditserve.engine import Engine

        config = EngineConfig(device="cpu", quantization=quantization)
        app = create_app(lambda: Engine("fake", EnginePipeline(config), config), ServerConfig(warmup=False))
        with TestClient(app) as client:
            assert app.state.worker.wait_ready(30)
            assert client.get("/ready").json()["quantization"] == quantization
