"""Linear layer whose bias handling is a construction-time constant."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.ops.base import CustomOp, OpsConfig


class Linear(CustomOp):
    """y = x @ W^T + b. x: (..., in_features) -> (..., out_features).

    `bias_dtype` lets the bias live in another dtype than the weight (e.g. a bf16 bias beside quantised
    weights). Whether the bias must be cast to the activation dtype is decided here, once, and stored as the
    constant `cast_bias`: forward never inspects dtypes (a per-call dtype check is a graph-break hazard and
    wasted host time).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, ops: OpsConfig | None = None,
                 dtype: torch.dtype | None = None, device=None, bias_dtype: torch.dtype | None = None):
        super().__init__(ops)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype or dtype, device=device))
                     if bias else None)
        weight_dtype = self.weight.dtype
        self.cast_bias: bool = bias and (bias_dtype is not None and bias_dtype != weight_dtype)
        if device is None or torch.device(device).type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default initialisation.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        if self.cast_bias:
            return F.linear(x, self.weight, self.bias.to(x.dtype))
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {super().extra_repr()}"
