"""The layer library: every op is a plain-PyTorch reference plus optional fast paths chosen at construction."""

from ditserve.ops.attention import Attention
from ditserve.ops.base import NATIVE, CustomOp, OpsConfig
from ditserve.ops.linear import Linear
from ditserve.ops.norm import LayerNorm, MulAdd, NormScaleShift, NormTanhGate, ResidualNormScaleShift, RMSNorm
from ditserve.ops.rotary import Rotary, axial_rope_cos_sin

__all__ = [
    "Attention", "CustomOp", "LayerNorm", "Linear", "MulAdd", "NATIVE", "NormScaleShift", "NormTanhGate",
    "OpsConfig", "ResidualNormScaleShift", "RMSNorm", "Rotary", "axial_rope_cos_sin",
]
