"""The op base class: a plain-PyTorch reference plus optional fast paths, one chosen at construction.

Every op subclasses `CustomOp` and implements `forward_native` (the reference: plain PyTorch, correct on every
device, and what torch.compile fuses on platforms without our kernels). An op with a Triton kernel also
implements `forward_cuda`. The constructor picks the path once, from the platform and `OpsConfig`, and binds
it; `forward` only calls the bound function: no device probing, no dtype checks, no try/except at run time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

import torch
from torch import nn

from ditserve.platform import Platform, platform_for

KernelsChoice = Literal["auto", "native", "triton"]


@dataclass(frozen=True)
class OpsConfig:
    """How ops pick their code path. Built once per model from the engine config.

    device: the device type the model will run on ("cuda", "cpu", ...); None means the best available.
    dtype: the compute dtype of the model's activations (some kernels only pay off in half precision).
    kernels: "auto" uses a fast path where it applies and is measured faster (see `compiled`);
        "native" forces the PyTorch reference everywhere (tests, debugging); "triton" uses every applicable
        Triton kernel and raises if the platform has none.
    compiled: whether the model will run under torch.compile. It changes what "auto" picks: compiled, inductor
        fuses the native reference into few kernels, so a fast path is taken only where bench/ops.py measured
        it beating that fused code (the op's `FAST_BY_DEFAULT`); eager, the native reference is several fp32
        kernels per op (5-10x slower than a fused kernel at FLUX sizes), so every applicable fast path is taken.
    """

    device: str | None = None
    dtype: torch.dtype = torch.bfloat16
    kernels: KernelsChoice = "auto"
    compiled: bool = False

    def __post_init__(self):
        if self.kernels not in ("auto", "native", "triton"):
            raise ValueError(f"kernels must be 'auto', 'native' or 'triton', got {self.kernels!r}")

    @property
    def platform(self) -> Platform:
        return platform_for(self.device)


NATIVE = OpsConfig(device="cpu", dtype=torch.float32, kernels="native")


class CustomOp(nn.Module):
    """Base class of every op. Subclasses implement `forward_native` and optionally `forward_cuda`.

    Class attributes a subclass may set:
      FAST_BY_DEFAULT: whether "auto" takes the fast path in a compiled model (set from bench/ops.py
        measurements against the compiled native path; eager models take every applicable fast path).
      FAST_DTYPES: the activation dtypes the fast path supports (others stay native).
    """

    FAST_BY_DEFAULT: ClassVar[bool] = False
    FAST_DTYPES: ClassVar[tuple[torch.dtype, ...]] = (torch.bfloat16, torch.float16)

    def __init__(self, ops: OpsConfig | None = None):
        super().__init__()
        ops = ops if ops is not None else OpsConfig()
        self.ops: OpsConfig = ops  # kept for ops built from this one (e.g. an fp8 replacement's sub-ops)
        self.path: str = self._select_path(ops)
        self._impl: Callable = getattr(self, f"forward_{self.path}")

    @classmethod
    def has_fast_path(cls) -> bool:
        return cls.forward_cuda is not CustomOp.forward_cuda

    def _select_path(self, ops: OpsConfig) -> str:
        if ops.kernels == "native":
            return "native"
        plat = ops.platform
        if ops.kernels == "triton" and not plat.fast_kernels:
            raise ValueError(
                f"kernels='triton' was asked for, but this platform cannot run Triton kernels "
                f"(device {plat.device_type!r}, triton importable: {plat.has_triton}); use kernels='auto'"
            )
        if not (plat.fast_kernels and self.has_fast_path() and ops.dtype in self.FAST_DTYPES):
            return "native"
        if ops.kernels == "triton" or not ops.compiled or self.FAST_BY_DEFAULT:
            return "cuda"
        return "native"

    def forward(self, *args, **kwargs):
        return self._impl(*args, **kwargs)

    def forward_native(self, *args, **kwargs):
        raise NotImplementedError

    def forward_cuda(self, *args, **kwargs):
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"path={self.path}"
