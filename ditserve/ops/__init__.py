"""The layer library: every op is a plain-PyTorch reference plus optional fast paths chosen at construction."""

from ditserve.ops.attention import Attention, Fp8Attention
from ditserve.ops.base import NATIVE, CustomOp, OpsConfig
from ditserve.ops.fp8 import Fp8Linear, apply_fp8
from ditserve.ops.linear import Linear, LinearGELU
from ditserve.ops.norm import LayerNorm, MulAdd, NormScaleShift, NormTanhGate, ResidualNormScaleShift, RMSNorm
from ditserve.ops.rotary import RMSNormRotary, Rotary, axial_rope_cos_sin

__all__ = [
    "Attention", "CustomOp", "Fp8Attention", "Fp8Linear", "LayerNorm", "Linear", "LinearGELU", "MulAdd", "NATIVE", "NormScaleShift",
    "NormTanhGate", "OpsConfig", "ResidualNormScaleShift", "RMSNorm", "RMSNormRotary", "Rotary", "apply_fp8",
    "axial_rope_cos_sin",
]
