"""Linear layers: the plain one (bias handling a construction-time constant) and one with a tanh-GELU applied
to its output (on CUDA inside the GEMM's epilogue)."""

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

    # The activation applied to the output ("gelu_tanh" in LinearGELU): a quantised replacement of this layer
    # (`ditserve.ops.fp8.Fp8Linear.from_linear`) applies it too.
    activation: str | None = None
    # Whether the layer takes its input quantised to fp8 (a `QuantizedRows`): True only for `Fp8Linear`. A block
    # asks its norm for a quantised output when the layer after it takes one.
    takes_fp8: bool = False

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


class LinearGELU(Linear):
    """gelu_tanh(x @ W^T + b): an MLP's input projection and its activation. x: (..., in) -> (..., out).

    The CUDA path runs the GELU (tanh approximation) and the bias in the GEMM's epilogue: cuBLASLt's
    GELU_BIAS epilogue, through `torch._addmm_activation`, which torch.compile keeps as one opaque kernel. That
    saves the separate activation kernel, a read and a write of the (tokens x 4D) hidden state. The native
    path is the two ops, which inductor fuses into one elementwise kernel after the GEMM. (On the CPU
    `torch._addmm_activation` computes the exact erf GELU, not the tanh one: the native path is used there.)
    """

    activation = "gelu_tanh"
    # bench/flux_levers.py gelu_epilogue (H100, 4f35b68): at 4608 x 3072 -> 12288 the GEMM then the GELU kernel
    # take 0.629 ms, the epilogue 0.572 (the GEMM alone 0.544).
    FAST_BY_DEFAULT = True

    def __init__(self, in_features: int, out_features: int, ops: OpsConfig | None = None,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__(in_features, out_features, bias=True, ops=ops, dtype=dtype, device=device)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(F.linear(x, self.weight, self.bias), approximate="tanh")

    def forward_cuda(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, in)
        y = torch._addmm_activation(self.bias, x2, self.weight.t(), use_gelu=True)  # (M, out)
        return y.reshape(*x.shape[:-1], self.out_features)
