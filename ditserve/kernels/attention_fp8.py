"""fp8 attention (`--fp8-attention`), `ditserve::fp8_attention`, on cuDNN's fp8 SDPA.

Contract (B batch, S tokens, H heads, D head dim):
  fp8_attention(q, k, v (B, S, H, D) float8_e4m3fn contiguous, descale_q, descale_k, descale_v, scale_o (1,) fp32)
      -> o (B, S, H, D) float8_e4m3fn contiguous
It is `ditserve.ops.functional.fp8_attention` (the reference, in fp32): softmax((q dq)(k dk)^T / sqrt(D)) (v dv),
times scale_o, in fp8. On CUDA with the nvidia-cudnn-frontend package, cuDNN's fp8 SDPA runs it: Q K^T and P V on
fp8 tensor cores, with the probabilities P rounded to fp8 (scaled by 448: they lie in [0, 1]); on Hopper cuDNN
writes only an fp8 output (a bf16 one needs Blackwell), which is why the op's output is fp8 and its scale the
caller's. At FLUX.1's attention (1 x 4608 tokens x 24 heads x 128) on an H100: 299.5 us against cuDNN bf16's
439.8 us, with 5.9% relative L2 error against fp32 on random inputs (bf16: 0.23%; bench/fp8_attention.py).

Why cuDNN through its Python frontend (an optional dependency, `pip install nvidia-cudnn-frontend`): PyTorch
exposes no fp8 SDPA; FlashAttention-3's fp8 kernels are not packaged for this stack, flash-attn-4's fp8 path is
Blackwell-only, and a plain Triton kernel only matched cuDNN's bf16 rate (bench/fp8_attention.py). The frontend's
graph is built once per shape and device and kept for the process (cleared at exit, before the bindings go).
"""

from __future__ import annotations

import atexit
import importlib.util
import math

import torch

from ditserve.errors import ConfigError
from ditserve.ops import functional as Fn

CUDNN_MODULE, CUDNN_PACKAGE = "cudnn", "nvidia-cudnn-frontend"
P_SCALE = 448.0  # the probabilities' fp8 scale: P in [0, 1] -> [0, 448], fp8's range


def cudnn_frontend_available() -> bool:
    return importlib.util.find_spec(CUDNN_MODULE) is not None


def check_available() -> None:
    """Raise ConfigError, naming the package, unless cuDNN's fp8 attention is registered for CUDA."""
    if not CUDNN_REGISTERED:
        raise ConfigError(f"--fp8-attention runs on cuDNN's fp8 attention, which needs the Python package "
                          f"{CUDNN_PACKAGE!r} (module {CUDNN_MODULE!r}): pip install {CUDNN_PACKAGE}")


@torch.library.custom_op("ditserve::fp8_attention", mutates_args=())
def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor,
                  descale_k: torch.Tensor, descale_v: torch.Tensor, scale_o: torch.Tensor) -> torch.Tensor:
    return Fn.fp8_attention(q, k, v, descale_q, descale_k, descale_v, scale_o).contiguous()


@fp8_attention.register_fake
def _(q, k, v, descale_q, descale_k, descale_v, scale_o):
    return q.new_empty(q.shape)


class _CudnnGraph:
    """One built cuDNN fp8 SDPA graph for (B, S, H, D) tensors laid out (B, S, H, D) contiguous, on one device."""

    def __init__(self, B: int, S: int, H: int, D: int, device: torch.device):
        import cudnn

        e4m3, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        with torch.cuda.device(device):
            self.handle = cudnn.create_handle()
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=fp32, compute_data_type=fp32,
                              handle=self.handle)
        dims, strides = (B, H, S, D), (S * H * D, D, H * D, 1)  # cuDNN's (B, H, S, D) view of our layout
        self.q, self.k, self.v = (graph.tensor(name=n, dim=dims, stride=strides, data_type=e4m3) for n in "qkv")
        scalar = dict(dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
        self.scalars = [graph.tensor(name=n, **scalar) for n in ("descale_q", "descale_k", "descale_v",
                                                                 "descale_s", "scale_s", "scale_o")]
        self.o, _, amax_s, amax_o = graph.sdpa_fp8(
            q=self.q, k=self.k, v=self.v, descale_q=self.scalars[0], descale_k=self.scalars[1],
            descale_v=self.scalars[2], descale_s=self.scalars[3], scale_s=self.scalars[4], scale_o=self.scalars[5],
            generate_stats=False, attn_scale=1.0 / math.sqrt(D))
        self.o.set_output(True).set_dim(dims).set_stride(strides).set_data_type(e4m3)
        for amax in (amax_s, amax_o):  # not needed: no delayed scaling here
            amax.set_output(False).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph, self.workspace_size = graph, graph.get_workspace_size()
        # descale_s, scale_s: constants (P in [0, 1])
        self.p_scales = torch.tensor([1.0 / P_SCALE, P_SCALE], dtype=torch.float32, device=device)

    def __call__(self, q, k, v, descale_q, descale_k, descale_v, scale_o) -> torch.Tensor:
        import cudnn

        out = torch.empty_like(q)
        workspace = torch.empty(self.workspace_size, dtype=torch.uint8, device=q.device)
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        scalars = (descale_q, descale_k, descale_v, self.p_scales[0:1], self.p_scales[1:2], scale_o)
        pack = {self.q: q, self.k: k, self.v: v, self.o: out}
        pack.update(zip(self.scalars, scalars))
        self.graph.execute(pack, workspace, handle=self.handle)
        return out


_GRAPHS: dict[tuple, _CudnnGraph] = {}  # (device index, B, S, H, D) -> its built graph
atexit.register(_GRAPHS.clear)  # free the graphs while their bindings still exist (else nanobind reports leaks)


def _cudnn_fp8_attention(q, k, v, descale_q, descale_k, descale_v, scale_o) -> torch.Tensor:
    if q.dim() != 4 or not (q.shape == k.shape == v.shape):
        raise ValueError(f"fp8_attention: q, k, v must be (B, S, H, D) of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if any(t.dtype != Fn.FP8_DTYPE for t in (q, k, v)):
        raise ValueError(f"fp8_attention: q, k, v must be {Fn.FP8_DTYPE}, got {q.dtype}, {k.dtype}, {v.dtype}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    scales = [s.reshape(1).float().contiguous() for s in (descale_q, descale_k, descale_v, scale_o)]
    key = (q.device.index, *q.shape)
    graph = _GRAPHS.get(key)
    if graph is None:
        graph = _GRAPHS[key] = _CudnnGraph(*q.shape, q.device)
    return graph(q, k, v, *scales)


def _register_cudnn() -> bool:
    """Register cuDNN's fp8 SDPA for CUDA when the frontend is importable (no CUDA probe: registering needs no
    GPU, and importing ditserve must not touch the driver). Returns whether it did."""
    if not cudnn_frontend_available():
        return False
    fp8_attention.register_kernel("cuda")(_cudnn_fp8_attention)
    return True


CUDNN_REGISTERED: bool = _register_cudnn()
