"""ditserve.platform: probing, caching, and the device types recognised without their hardware."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ditserve.platform import Platform, current_platform, platform_for, probe_platform

OTHER_ACCELERATORS = ["mps", "xpu", "npu", "musa"]


def test_current_platform_is_cached():
    assert current_platform() is current_platform()
    assert current_platform("cpu") is current_platform("cpu")
    assert platform_for(None) is current_platform()
    assert platform_for("cpu") is current_platform("cpu")


def test_platform_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        current_platform("cpu").has_triton = True


def test_cpu_platform_fields():
    p = probe_platform("cpu")
    assert p.device_type == "cpu" and p.device_name == "cpu"
    assert p.compute_capability is None
    assert p.supports_fp8 is False and p.has_triton is False and p.fast_kernels is False
    assert p.supports_bf16 is True


def test_default_is_the_best_available():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        expected = "mps"
    assert probe_platform().device_type == expected


def test_unknown_device_type_raises_listing_known():
    with pytest.raises(ValueError, match=r"unknown device type 'tpu'.*cuda, cpu, mps, xpu, npu, musa"):
        probe_platform("tpu")
    with pytest.raises(ValueError, match="unknown device type 'tpu'"):
        platform_for("tpu:0")


@pytest.mark.parametrize("device_type", OTHER_ACCELERATORS)
def test_other_accelerators_recognised_without_hardware(device_type):
    """Probing needs no device of that type: they are recognised and routed to the native paths."""
    p = probe_platform(device_type)
    assert p.device_type == device_type
    assert p.has_triton is False and p.fast_kernels is False and p.supports_fp8 is False
    assert p.compute_capability is None
    assert isinstance(p.supports_amp, bool)


@pytest.mark.parametrize("device", ["npu", "npu:0", "musa:1", "xpu:0", "mps", torch.device("xpu", 0)])
def test_platform_for_device_strings_of_unloaded_backends(device):
    """torch.device('npu') fails without torch_npu; platform_for still maps the string to its platform."""
    expected = device.type if isinstance(device, torch.device) else device.split(":")[0]
    assert platform_for(device).device_type == expected


def test_platform_for_torch_device():
    assert platform_for(torch.device("cpu")) is current_platform("cpu")


def test_cuda_without_gpu_raises(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="no CUDA device"):
        probe_platform("cuda")


def test_accelerator_order(monkeypatch):
    """With no CUDA: xpu, npu, musa are tried before mps; cpu is the fallback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert probe_platform().device_type == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert probe_platform().device_type == "mps"
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    assert probe_platform().device_type == "xpu"


def test_fast_kernels_needs_cuda_and_triton():
    base = Platform("cuda", "gpu", (9, 0), supports_bf16=True, supports_amp=True, supports_fp8=True, has_triton=True)
    assert base.fast_kernels is True
    assert dataclasses.replace(base, has_triton=False).fast_kernels is False
    assert dataclasses.replace(base, device_type="xpu").fast_kernels is False


@pytest.mark.gpu
def test_cuda_platform_fields():
    p = probe_platform("cuda")
    assert p.device_type == "cuda" and p.device_name == torch.cuda.get_device_name()
    assert p.compute_capability == torch.cuda.get_device_capability()
    assert p.supports_fp8 == (p.compute_capability >= (8, 9))
    assert platform_for("cuda:0") is current_platform("cuda")



def test_kernel_modules_do_not_probe_cuda_at_import():
    """Importing the kernels and a model (which imports them) must not touch the CUDA driver: checked in a fresh
    interpreter whose torch.cuda.is_available raises."""
    import subprocess
    import sys

    code = ("import torch\n"
            "def probe():\n    raise SystemExit('torch.cuda.is_available() called at import')\n"
            "torch.cuda.is_available = probe\n"
            "import ditserve.kernels.norm, ditserve.kernels.quant, ditserve.kernels.rotary, ditserve.models.flux\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr + out.stdout
