"""The fp8 tier (lossy, off by default: `--quantization fp8`): fp8 weights and per-token fp8 activations.

Each quantised Linear holds its weight as float8_e4m3fn with one fp32 scale per output channel (row) and
quantises its input per token (row) on the fly; the product runs as one row-wise scaled fp8 GEMM
(`torch._scaled_mm`; fast accumulation by default, see below), and the bias is added to its bf16 output (fused by inductor into
the op that follows, or in the GEMM's epilogue where an opaque kernel follows: the model's `fp8_bias_in_gemm`):

    y[m, n] = x_scale[m] * w_scale[n] * sum_k x_fp8[m, k] * w_fp8[n, k] + bias[n]

Row-wise (not tensor-wise) scales keep one outlier token or channel from costing every other row its
precision.

Fast accumulation (`fast_accum`, on by default in the tier; off: `--fp8-fast-accum off`): Hopper's fp8 tensor
cores accumulate in a narrower format than fp32; by default torch's kernels promote the partial sums to fp32
registers every few K-steps, which costs issue slots. With fast accumulation the whole K loop stays in the tensor
cores' accumulator. At FLUX.1-dev's double-block shapes on an H100 (bench/fp8_gemm.py --grouped, 7c318da) the
text + image GEMMs run 4-18% faster (qkv 263.6 -> 216.0 us, mlp_in 334.6 -> 280.4 us), and the compiled fp8
forward from a CUDA graph 93.33 -> 86.09 ms (bench/flux_step.py, 19b769d). The extra error is small beside the
fp8 rounding of the operands: the forward's relative L2 against bf16 went 0.1045 -> 0.1052. Like the tier itself,
it is lossy; on the CPU it changes nothing.

The activation is quantised by the op that produces it, not in a pass of its own: the AdaLN norms
hand the layer a `QuantizedRows` (`NormScaleShift(..., quantize=True)`; their CUDA kernels write fp8 rows and
scales), an MLP's output projection quantises gelu(hidden + bias) in one kernel (`forward_after_gelu`,
`GeluQuantize`), and elsewhere the plain-torch quantisation (`quantize_rows`) fuses into the producing op under
torch.compile.

fp8 GEMMs need tensor cores with fp8 support: CUDA compute capability 8.9+ (Ada, Hopper and newer).
`check_fp8_device` refuses anything else before a model is loaded. torch._scaled_mm also runs on the CPU,
which is what the tests use; that path is a reference, not a fast path.

Which layers are quantised is the model's decision, declared once in its class (`fp8_linears`): the
token-wise GEMMs of the repeated blocks, where nearly all FLOPs are, and in some models the blocks' modulation
GEMMs too (few FLOPs, but in some models a third of the parameters).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.config import DTYPES, FP8_FAST_ACCUM_DEFAULT, ConfigError
from ditserve.kernels import quant as K
from ditserve.ops import functional as Fn
from ditserve.ops.base import CustomOp, OpsConfig
from ditserve.ops.functional import FP8_DTYPE, quantize_rows  # noqa: F401 (re-exported)
from ditserve.ops.linear import Linear

# CUDA's fp8 GEMMs need both matrix dims along K and N to be multiples of 16 (16-byte aligned fp8 rows).
FP8_DIM_MULTIPLE = 16
FP8_MIN_CAPABILITY = (8, 9)  # Ada (sm_89) and Hopper (sm_90) and newer have fp8 tensor cores
# The tier's default for fast accumulation (see above; `EngineConfig.fp8_fast_accum` "auto"): one source, config's.
FAST_ACCUM_DEFAULT = FP8_FAST_ACCUM_DEFAULT
# The compute (activation) dtype of the tier: the row-wise scaled fp8 GEMM outputs bf16 on every fp8 GPU
# (on Ada, torch's row-wise kernel outputs nothing else).
FP8_COMPUTE_DTYPE = torch.bfloat16


class GeluQuantize(CustomOp):
    """The input of an fp8 projection that follows a tanh-GELU: forward(plain, pre, bias) =
    `ditserve.ops.functional.gelu_quantize_rows`, rows [plain | gelu_tanh(pre + bias)] quantised to fp8 per row.

    plain: (R, A) or None; pre: (R, G) (a row-strided view is read in place); bias: (G,) or None;
    plain_descale: (1,) float32 when plain is fp8 with that one scale (fp8 attention's output), else None
    -> (q (R, A + G) float8_e4m3fn, scale (R, 1) float32).
    """

    # Fast path: the Triton kernel `ditserve::gelu_quantize_rows` (one read of each input row, one fp8 write).
    # Compiled native, inductor reads each row twice (a looped amax, then the quantisation): 11.7 ms of FLUX.1-dev's
    # fp8 forward on an H100 (bench/flux_shapes_ab.py --variants static,fp8, 1c36007).
    FAST_BY_DEFAULT = True

    def forward_native(self, plain, pre, bias, plain_descale=None):
        return Fn.gelu_quantize_rows(plain, pre, bias, plain_descale)

    def forward_cuda(self, plain, pre, bias, plain_descale=None):
        return K.gelu_quantize_rows(plain, pre, bias, plain_descale)

    # No `warm`: the kernel specialises on the row widths, which only the caller knows; it compiles at its first
    # call (the fp8 tier's cold start pays it once).


class Fp8Linear(CustomOp):
    """A Linear with an fp8 weight and per-token dynamic fp8 activations. x: (..., K) -> (..., N), in the layer's
    compute dtype (`out_dtype`: the replaced layer's weight dtype, bf16 in the engine).

    weight: (N, K) float8_e4m3fn, row-major (CUDA's fp8 GEMM wants its second operand column-major; the
        forward passes `weight.t()`, a (K, N) column-major view). weight_scale: (1, N) float32, one scale per
        output channel. bias: (N,) in the compute dtype, or None.

    Build one from a loaded layer with `Fp8Linear.from_linear(linear)`, or a whole model's eligible layers
    with `apply_fp8(model)`. There is one code path (plain torch ops plus torch._scaled_mm), so `path` is
    always "native" (its `gelu_quantize` op has the model's paths).
    """

    takes_fp8 = True  # forward and matmul also take their input already quantised (a QuantizedRows)

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 activation: str | None = None, bias_in_gemm: bool = False, out_dtype: torch.dtype | None = None,
                 ops: OpsConfig | None = None, fast_accum: bool = False):
        super().__init__(OpsConfig(kernels="native"))  # one path on every device: no platform probe
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ValueError(f"Fp8Linear: weight must be a 2-D {FP8_DTYPE} tensor, got {weight.dim()}-D {weight.dtype}")
        N, K = weight.shape
        if N % FP8_DIM_MULTIPLE or K % FP8_DIM_MULTIPLE:
            raise ValueError(f"Fp8Linear: in_features ({K}) and out_features ({N}) must be multiples of "
                             f"{FP8_DIM_MULTIPLE} (fp8 GEMM alignment)")
        if weight_scale.dtype != torch.float32 or weight_scale.numel() != N:
            raise ValueError(f"Fp8Linear: weight_scale must hold {N} float32 values, got {weight_scale.numel()} "
                             f"{weight_scale.dtype}")
        if bias is not None and tuple(bias.shape) != (N,):
            raise ValueError(f"Fp8Linear: bias must have shape ({N},), got {tuple(bias.shape)}")
        if activation not in (None, "gelu_tanh"):
            raise ValueError(f"Fp8Linear: activation must be None or 'gelu_tanh', got {activation!r}")
        self.in_features, self.out_features = K, N
        self.activation = activation  # applied after the bias (that of the layer replaced, e.g. LinearGELU)
        self.weight = nn.Parameter(weight.contiguous(), requires_grad=False)  # (N, K) fp8
        self.register_buffer("weight_scale", weight_scale.reshape(1, N).contiguous())  # (1, N) fp32
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)  # (N,)
        # The bias in the GEMM's epilogue (True) or added after it (False, see `forward_native`).
        self.bias_in_gemm = bias_in_gemm and bias is not None
        self.out_dtype = out_dtype or (bias.dtype if bias is not None else FP8_COMPUTE_DTYPE)
        self.fast_accum = bool(fast_accum)  # the GEMM accumulates in the tensor cores' format (module docstring)
        # For callers whose input is [plain | gelu(pre)] (`forward_after_gelu`); its path follows the model's ops.
        self.gelu_quantize = GeluQuantize(ops)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: Linear | nn.Linear, bias_in_gemm: bool = False,
                    fast_accum: bool = False) -> "Fp8Linear":
        """Quantise a loaded layer: its weight per output channel to fp8; its bias kept in the weight's
        (compute) dtype. The layer itself is left unchanged. The new layer's ops (`GeluQuantize`'s path) are
        those of `linear` when it is one of ours."""
        if not isinstance(linear, (Linear, nn.Linear)):
            raise TypeError(f"Fp8Linear.from_linear takes a Linear layer, got {type(linear).__name__}")
        w = linear.weight  # (N, K)
        q, scale = quantize_rows(w)  # (N, K) fp8, (N, 1) fp32
        bias = None if linear.bias is None else linear.bias.to(w.dtype)
        return cls(q, scale, bias, activation=getattr(linear, "activation", None), bias_in_gemm=bias_in_gemm,
                   out_dtype=w.dtype, ops=getattr(linear, "ops", None), fast_accum=fast_accum)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the GEMM effectively uses: (N, K) float32 = fp8 values x per-row scale."""
        return self.weight.float() * self.weight_scale.t()

    def product(self, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """The fp8 GEMM of quantised rows: q (M, K) fp8, scale (M, 1) fp32 -> (M, N) in the compute dtype; the bias
        is in it only when `bias_in_gemm`."""
        return torch._scaled_mm(q, self.weight.t(), scale_a=scale, scale_b=self.weight_scale,
                                bias=self.bias if self.bias_in_gemm else None, out_dtype=self.out_dtype,
                                use_fast_accum=self.fast_accum)

    def pending_bias(self) -> torch.Tensor | None:
        """The bias `product` leaves out (None when it is in the GEMM, or there is none)."""
        return None if self.bias_in_gemm else self.bias

    def finish(self, y: torch.Tensor) -> torch.Tensor:
        """`product`'s output (M, N) -> the layer's: plus the pending bias, then the activation."""
        # The bias is added here, not in _scaled_mm's epilogue: at FLUX.1's shapes the row-wise kernel runs ~10%
        # slower with a bias (bench/fp8_gemm.py), while under torch.compile this add fuses into the next op.
        # Measured on the compiled FLUX.1-dev forward (H100): 112.82 -> 110.20 ms. Eager pays one add kernel.
        # Where the next op is one of our opaque kernels the add cannot fuse: the model asks for `bias_in_gemm`.
        bias = self.pending_bias()
        if bias is not None:
            y = y + bias
        if self.activation == "gelu_tanh":  # fused with the bias add under compile
            y = F.gelu(y, approximate="tanh")
        return y

    def _quantized(self, x: torch.Tensor | Fn.QuantizedRows) -> Fn.QuantizedRows:
        """x (..., K) quantised per token (M = every token of every sample), or x itself if it already is."""
        return x if isinstance(x, Fn.QuantizedRows) else Fn.quantized(x)

    def forward_native(self, x: torch.Tensor | Fn.QuantizedRows) -> torch.Tensor:
        q, scale, shape = self._quantized(x)  # (M, K) fp8, (M, 1) fp32
        y = self.finish(self.product(q, scale))  # (M, N)
        return y.reshape(*shape[:-1], self.out_features)  # (..., N)

    def matmul(self, x: torch.Tensor | Fn.QuantizedRows) -> torch.Tensor:
        """x (..., K) -> (..., N): the GEMM alone (no activation; the bias only when `bias_in_gemm`), for a caller
        that fuses the rest with what follows (`forward_after_gelu` of the next layer)."""
        q, scale, shape = self._quantized(x)
        return self.product(q, scale).reshape(*shape[:-1], self.out_features)

    def forward_after_gelu(self, plain: torch.Tensor | None, pre: torch.Tensor, bias: torch.Tensor | None = None,
                           plain_descale: torch.Tensor | None = None) -> torch.Tensor:
        """This layer applied to [plain | gelu_tanh(pre + bias)] (concatenated over channels), with the GELU and
        the input's fp8 quantisation in one pass (`GeluQuantize`): plain (..., A) or None, pre (..., G),
        A + G = in_features, bias (G,) or None -> (..., N). plain_descale (1,) fp32: plain is fp8 with that one
        scale (fp8 attention's output)."""
        G = pre.shape[-1]
        A = self.in_features - G
        if (A == 0) != (plain is None) or (plain is not None and plain.shape[-1] != A):
            raise ValueError(f"Fp8Linear.forward_after_gelu: plain ({None if plain is None else plain.shape[-1]}) + "
                             f"pre ({G}) channels must make in_features ({self.in_features})")
        q, scale = self.gelu_quantize(None if plain is None else plain.reshape(-1, A), pre.reshape(-1, G), bias,
                                      plain_descale)
        y = self.finish(self.product(q, scale))  # (M, N)
        return y.reshape(*pre.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"fp8 e4m3 weight (per-channel scale) x per-token fp8 activations"
                + (f", then {self.activation}" if self.activation else "")
                + (", bias in the GEMM" if self.bias_in_gemm else "")
                + (", fast accumulation" if self.fast_accum else "") + f", {super().extra_repr()}")


@torch.no_grad()
def apply_fp8(model: nn.Module, fast_accum: bool = FAST_ACCUM_DEFAULT) -> nn.Module:
    """Swap the Linear layers `model` declares eligible for fp8 (its class attribute `fp8_linears`: pairs of
    (block list attribute, names of Linear attributes in each block)) for `Fp8Linear`, in place; returns
    `model`. Layers named in the model's `fp8_bias_in_gemm` get their bias in the GEMM's epilogue (those whose
    output goes to an op the bias add cannot fuse into). `fast_accum`: the GEMMs' fast accumulation (module
    docstring; the tier's default: on).

    Works on any loaded model (real or dummy weights, any device). Layers are quantised one at a time and
    each replaced layer gives up its weight and bias (set to None) as soon as its replacement is in place,
    so peak memory stays near the unquantised model's plus one layer's fp32 copy (tensors the caller still
    holds, e.g. a state dict, stay alive). Raises ConfigError for a model that declares no fp8 layers and
    ValueError for one already quantised.
    """
    declared = getattr(model, "fp8_linears", None)
    in_gemm = set(getattr(model, "fp8_bias_in_gemm", ()))
    if not declared:
        raise ConfigError(f"{type(model).__name__} declares no fp8 layers (fp8_linears): the fp8 tier does not "
                          f"support this model")
    for list_name, layer_names in declared:
        for i, block in enumerate(getattr(model, list_name)):
            for name in layer_names:
                layer = getattr(block, name)
                if isinstance(layer, Fp8Linear):
                    raise ValueError(f"{list_name}.{i}.{name} is already fp8: apply_fp8 was called twice")
                setattr(block, name, Fp8Linear.from_linear(layer, bias_in_gemm=name in in_gemm,
                                                           fast_accum=fast_accum))
                # Release the old weights now, not when the garbage collector finds the layer: an op holds a
                # reference cycle (its bound forward path), so dropping the layer alone frees nothing.
                layer.weight = layer.bias = None
    return model


def check_fp8_device(device: torch.device, dtype: torch.dtype) -> None:
    """Raise ConfigError unless `device` is a CUDA GPU with fp8 tensor cores and `dtype` is bf16.

    Called before any weight is loaded. The capability is that of the device asked for (not the current
    one), so `cuda:1` on a mixed machine is judged by its own GPU.
    """
    need = (f"--quantization fp8 needs an NVIDIA GPU with fp8 tensor cores (compute capability "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}+: Ada, Hopper or newer)")
    if device.type != "cuda":
        raise ConfigError(f"{need}; the device is {str(device)!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"{need}; torch sees no CUDA device")
    cc = tuple(torch.cuda.get_device_capability(device))
    if cc < FP8_MIN_CAPABILITY:
        raise ConfigError(f"{need}; {device} is {torch.cuda.get_device_name(device)} with compute capability "
                          f"{cc[0]}.{cc[1]}")
    if dtype != FP8_COMPUTE_DTYPE:
        name = next((k for k, v in DTYPES.items() if v == dtype), str(dtype))
        raise ConfigError(f"--quantization fp8 computes in bf16 (row-wise scaled fp8 GEMMs produce bf16); "
                          f"got --dtype {name}: drop --dtype or use --dtype bf16")
