"""Reference implementations (plain PyTorch) of the fused ops.

These are the ground truth: the ops' `forward_native` calls them, the custom ops in `ditserve.kernels` use
them as their CPU/default implementation, and tests compare every fast path against them and against an fp64
evaluation. Math runs in fp32 (or fp64 for fp64 inputs) and rounds once to the input dtype at the end, which
is what the Triton kernels do too.

Shapes: x (..., D); modulation tensors (scale, shift, gate) broadcast against x, typically (B, 1, D) for
per-sample modulation or (B, L, D) for per-token modulation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F


def _up(t: torch.Tensor) -> torch.Tensor:
    """Compute dtype: fp64 stays fp64 (for references), everything else goes to fp32."""
    return t if t.dtype == torch.float64 else t.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dim. x: (..., D), weight: (D,) or None."""
    xf = _up(x)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * _up(weight)
    return y.to(x.dtype)


def _norm(xf: torch.Tensor, weight: torch.Tensor | None, eps: float, rms: bool) -> torch.Tensor:
    """Normalise an already up-cast tensor over the last dim (RMS or mean/variance), times weight."""
    if rms:
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        y = F.layer_norm(xf, xf.shape[-1:], eps=eps)
    if weight is not None:
        y = y * _up(weight)
    return y


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm without affine parameters over the last dim."""
    return _norm(_up(x), None, eps, rms=False).to(x.dtype)


def norm_scale_shift(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    rms: bool,
) -> torch.Tensor:
    """AdaLN modulation: y = norm(x) * (1 + scale) + shift. x: (B, L, D); scale, shift: (B, 1, D) or (B, L, D)."""
    y = _norm(_up(x), weight, eps, rms)
    return (y * (1 + _up(scale)) + _up(shift)).to(x.dtype)


def residual_norm_scale_shift(
    x: torch.Tensor,
    residual: torch.Tensor,
    gate: torch.Tensor | None,
    weight: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gated residual add, then AdaLN modulation of the new residual stream.

    r = residual + gate * x   (gate None means 1), rounded to residual's dtype: the new residual stream
    y = norm(r) * (1 + scale) + shift
    Returns (y, r). x, residual: (B, L, D); gate, scale, shift: (B, 1, D) or (B, L, D).
    """
    xf = _up(x)
    if gate is not None:
        xf = xf * _up(gate)
    r = (_up(residual) + xf).to(residual.dtype)
    y = _norm(_up(r), weight, eps, rms)
    y = y * (1 + _up(scale)) + _up(shift)
    return y.to(x.dtype), r


def norm_tanh_gate(
    x: torch.Tensor,
    gate: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> torch.Tensor:
    """Z-Image / Lumina style gated residual: y = residual + tanh(gate) * norm(x) (residual None means 0)."""
    y = torch.tanh(_up(gate)) * _norm(_up(x), weight, eps, rms)
    if residual is not None:
        y = _up(residual) + y
    return y.to(x.dtype if residual is None else residual.dtype)


def mul_add(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, k: float) -> torch.Tensor:
    """y = a * (k + b) + c, computed in fp32 and rounded once to a's dtype."""
    return (_up(a) * (k + _up(b)) + _up(c)).to(a.dtype)


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1.0) -> torch.Tensor:
    """Sinusoidal features of timesteps, [cos | sin]: t (N,) -> (N, dim) float32. diffusers' `Timesteps(dim,
    flip_sin_to_cos=True, downscale_freq_shift=0, scale)` op for op, so fp32 results are bit-identical: the fp32
    frequencies exp(-ln(max_period) * i / (dim/2)), i < dim/2, times t in fp32, then times `scale` (where not 1).
    Every family's timestep (and guidance) embedder starts with it."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    args = t.float()[:, None] * torch.exp(exponent)[None, :]  # (N, dim/2)
    if scale != 1:
        args = scale * args
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)  # (N, dim)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate pairs of channels of x by angles whose cos/sin are given.

    x: (B, L, H, D). cos, sin: (L, D/2) or (B, L, D/2), one angle per channel pair.
    interleaved=True pairs channels (2i, 2i+1) (FLUX, Wan); False pairs (i, i + D/2) (the "half-split" /
    GPT-NeoX layout). Rotation: (a, b) -> (a cos - b sin, a sin + b cos), in fp32, rounded to x's dtype.
    """
    xf = _up(x)
    c = _up(cos).unsqueeze(-2)  # (..., L, 1, D/2): broadcast over heads
    s = _up(sin).unsqueeze(-2)
    if interleaved:
        a, b = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    else:
        a, b = xf.chunk(2, dim=-1)
        out = torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    return out.to(x.dtype)


def rms_norm_rotary(xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], cos: torch.Tensor,
                    sin: torch.Tensor, eps: float, interleaved: bool) -> torch.Tensor:
    """The per-head q/k norm of a DiT, then RoPE over the joint sequence: each part of xs is RMS-normed with its
    own weight (and rounded to its dtype, as `rms_norm` returns it), the parts are concatenated over tokens, and
    the result is rotated by `apply_rotary`.

    xs: (B, L_i, H, D) each; weights: (D,) each; cos, sin: (sum L_i, D/2) or (B, sum L_i, D/2)
    -> (B, sum L_i, H, D) in xs' dtype.
    """
    normed = [rms_norm(x, w, eps) for x, w in zip(xs, weights)]
    return apply_rotary(normed[0] if len(normed) == 1 else torch.cat(normed, dim=1), cos, sin, interleaved)


FP8_DTYPE = torch.float8_e4m3fn  # 3 mantissa bits, largest value 448


def quantize_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row fp8 quantisation: t (R, C), any float dtype -> (q (R, C) float8_e4m3fn,
    scale (R, 1) float32) with t ~= q * scale.

    scale = max|row| / 448, so each row uses fp8's full range. The scale is floored at fp32's smallest normal
    number, so an all-zero row gets a positive scale and quantises to zeros (not 0/0; a subnormal floor could
    be flushed to zero by fast GPU division). Values are divided in fp32 and clamped to +-448 before the cast
    (a cast beyond fp8's range gives NaN, and fp32 rounding can land just past it).
    """
    # Limits come from torch.finfo here, not from float module globals: dynamo folds finfo to constants,
    # whereas under dynamic=True it traces a float global as a graph input (a scalar tensor and an .item()).
    fp8_max = torch.finfo(FP8_DTYPE).max
    amax = t.abs().amax(dim=-1, keepdim=True).float()  # (R, 1)
    scale = (amax / fp8_max).clamp(min=torch.finfo(torch.float32).tiny)  # (R, 1) fp32
    q = (t.float() / scale).clamp(-fp8_max, fp8_max).to(FP8_DTYPE)  # (R, C)
    return q, scale


class QuantizedRows(NamedTuple):
    """An activation quantised to fp8 per row (`quantize_rows`), standing in for the tensor it quantises: what
    an fp8 layer's producer (a norm) hands it when the two fuse (`NormScaleShift(..., quantize=True)`)."""

    q: torch.Tensor  # (R, C) float8_e4m3fn
    scale: torch.Tensor  # (R, 1) float32
    shape: torch.Size  # the activation's shape (..., C); R = the product of its leading dims


def quantized(y: torch.Tensor) -> QuantizedRows:
    """`quantize_rows` of y (..., C) over its last dim, as a QuantizedRows."""
    return QuantizedRows(*quantize_rows(y.reshape(-1, y.shape[-1])), y.shape)


def tensorwise(x: torch.Tensor, descale: torch.Tensor) -> QuantizedRows:
    """An fp8 tensor x (..., C) with one scale for all of it (descale (1,) fp32) as a `QuantizedRows` (every row's
    scale the same), for an fp8 layer to read. The rows must be contiguous (a row slice of a contiguous tensor)."""
    rows = x.reshape(-1, x.shape[-1])
    return QuantizedRows(rows, descale.expand(rows.shape[0], 1).contiguous(), x.shape)


def quantize_tensor(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Symmetric per-tensor fp8 quantisation: t (any shape, float) -> (q float8_e4m3fn, descale (1,) float32,
    scale (1,) float32) with t ~= q * descale and scale = 1 / descale. Limits as `quantize_rows`."""
    fp8_max = torch.finfo(FP8_DTYPE).max
    descale = (t.abs().amax().float() / fp8_max).clamp(min=torch.finfo(torch.float32).tiny).reshape(1)
    scale = 1.0 / descale
    return (t.float() * scale).clamp(-fp8_max, fp8_max).to(FP8_DTYPE), descale, scale


def rms_norm_rotary_fp8(xs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor], cos: torch.Tensor,
                        sin: torch.Tensor, eps: float, interleaved: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`rms_norm_rotary`, its output quantised to fp8 with one scale for the whole tensor, fixed by the weights: an
    RMS-normed row of D channels has no entry beyond sqrt(D) in magnitude, so after the weight and any rotation no
    entry exceeds sqrt(D) * max|w| (over all parts' weights), and descale = that bound / 448 never overflows, with
    no pass over the data to find its amax (fp8 keeps its relative precision over its whole range).

    Returns (q (B, S, H, D) float8_e4m3fn, descale (1,) float32): the output ~= q * descale. The quantisation
    multiplies the (rounded) output by 1 / descale, as the CUDA kernel does.
    """
    out = rms_norm_rotary(xs, weights, cos, sin, eps, interleaved)
    fp8_max = torch.finfo(FP8_DTYPE).max
    w_max = torch.stack([w.detach().abs().amax() for w in weights]).amax().float()
    descale = (w_max * (math.sqrt(out.shape[-1]) / fp8_max)).clamp(min=torch.finfo(torch.float32).tiny).reshape(1)
    q = (out.float() * (1.0 / descale)).clamp(-fp8_max, fp8_max).to(FP8_DTYPE)
    return q, descale


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor,
                  descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor) -> torch.Tensor:
    """Attention of per-tensor fp8 inputs with an fp8 output (the reference of cuDNN's fp8 SDPA, in fp32, without
    its rounding of the probabilities to fp8): q, k, v (B, S, H, D) float8_e4m3fn, descale_* (1,) fp32 ->
    softmax((q dq)(k dk)^T / sqrt(D)) (v dv) * scale_o, (B, S, H, D) float8_e4m3fn. The caller picks scale_o so
    that the output cannot overflow (1 / descale_v: each output row is a convex combination of v's rows)."""
    fp8_max = torch.finfo(FP8_DTYPE).max
    q, k, v = ((x.float() * s).transpose(1, 2) for x, s in ((q, descale_q), (k, descale_k), (v, descale_v)))
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, S, H, D) fp32
    return (o * scale_o).clamp(-fp8_max, fp8_max).to(FP8_DTYPE)


def gelu_quantize_rows(plain: torch.Tensor | None, pre: torch.Tensor, bias: torch.Tensor | None,
                       plain_descale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The input of an fp8 projection that follows a tanh-GELU, quantised per row: rows of
    [plain | gelu_tanh(pre + bias)] -> `quantize_rows` of them.

    plain: (R, A) or None (FLUX's single block: the attention output, concatenated before the GELU'd MLP
    hidden state); pre: (R, G) the MLP hidden state before its activation; bias: (G,) or None, added first.
    Returns (q (R, A + G) float8_e4m3fn, scale (R, 1) float32). Roundings are the unfused ops' (bias add, then
    GELU, each rounded to pre's dtype). plain_descale: (1,) fp32 when plain is fp8 with one scale for all of it
    (FLUX's single block with fp8 attention): plain is read as plain * plain_descale, in fp32.
    """
    y = pre if bias is None else pre + bias
    y = F.gelu(y, approximate="tanh")  # (R, G)
    if plain is not None and plain_descale is not None:
        plain = plain.float() * plain_descale
    return quantize_rows(y if plain is None else torch.cat((plain, y), dim=-1))
