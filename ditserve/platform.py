"""Which device we run on and what it can do: probed once, then read as constants.

`current_platform()` probes on first call (never at import, so importing ditserve does not touch CUDA) and
returns a frozen `Platform`. Ops and models read it in their constructors and bind their code paths there:
no forward path ever calls a capability check (a cached check inside a compiled region breaks the graph).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch

# Device kinds we recognise. Only cuda has fast paths (Triton kernels); the others run the native PyTorch
# reference of every op, which is correct everywhere torch runs.
KNOWN_DEVICE_TYPES = ("cuda", "cpu", "mps", "xpu", "npu", "musa")


@dataclass(frozen=True)
class Platform:
    device_type: str  # one of KNOWN_DEVICE_TYPES
    device_name: str  # e.g. "NVIDIA H100 80GB HBM3" or "cpu"
    compute_capability: tuple[int, int] | None  # CUDA only
    supports_bf16: bool
    supports_amp: bool  # autocast works on this device type
    supports_fp8: bool  # fp8 matmuls (torch._scaled_mm): CUDA sm_89+
    has_triton: bool  # triton importable AND a device it can target (cuda)

    @property
    def fast_kernels(self) -> bool:
        """Whether our Triton kernels can run here."""
        return self.device_type == "cuda" and self.has_triton


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _accelerator_type() -> str:
    """The first available accelerator, else cpu. Probes without initialising a device context where
    torch allows it."""
    if torch.cuda.is_available():
        return "cuda"
    for name in ("xpu", "npu", "musa"):
        mod = getattr(torch, name, None)
        if mod is not None and hasattr(mod, "is_available") and mod.is_available():
            return name
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def probe_platform(device_type: str | None = None) -> Platform:
    """Probe a device type (default: the best available). Prefer `current_platform()`, which caches."""
    device_type = device_type or _accelerator_type()
    if device_type not in KNOWN_DEVICE_TYPES:
        raise ValueError(f"unknown device type {device_type!r}; known: {', '.join(KNOWN_DEVICE_TYPES)}")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device 'cuda' was asked for, but torch sees no CUDA device")
        cc = torch.cuda.get_device_capability()
        return Platform(
            device_type="cuda",
            device_name=torch.cuda.get_device_name(),
            compute_capability=cc,
            supports_bf16=torch.cuda.is_bf16_supported(),
            supports_amp=True,
            supports_fp8=cc >= (8, 9),
            has_triton=_triton_importable(),
        )
    if device_type == "cpu":
        return Platform("cpu", "cpu", None, supports_bf16=True, supports_amp=True, supports_fp8=False,
                        has_triton=False)
    # mps, xpu, npu, musa: recognised, routed to the native path.
    amp = False
    try:
        amp = torch.amp.is_autocast_available(device_type)
    except Exception:  # older torch or an out-of-tree backend without the hook
        amp = False
    return Platform(device_type, device_type, None, supports_bf16=True, supports_amp=amp, supports_fp8=False,
                    has_triton=False)


@functools.cache
def current_platform(device_type: str | None = None) -> Platform:
    """The platform for `device_type` (default: best available), probed once per process.

    Call it from constructors only; forward paths read the constants their module stored.
    """
    return probe_platform(device_type)


def platform_for(device: torch.device | str | None) -> Platform:
    """The platform of a torch device (or the best available when None).

    A string is split on ":" rather than parsed by `torch.device`, which rejects device types whose backend
    is not loaded (e.g. "npu" without torch_npu); `probe_platform` then names the known types.
    """
    if device is None:
        return current_platform()
    device_type = device.type if isinstance(device, torch.device) else str(device).split(":", 1)[0]
    return current_platform(device_type)
