"""The levers of bench/flux_step.py (`--levers NAME,...` or `--levers all`).

Each lever is a variant of ditserve's compiled FLUX forward (or of a stage around it) measured in the same
process as the default row, with what it changes and the prediction written down before the run (LEVERS).
The result of a lever is its ms, `delta_ms` against the row it varies (the default compiled row, or the fp8
row for fp8 levers) and whatever else it measured. A lever that fails is recorded with its error.
Levers measured and adopted earlier (the fp8 bias after `_scaled_mm`, 299e18c) are in bench/results/ only.
"""

from __future__ import annotations

import contextlib
import subprocess
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from benchutil import log
from torch import nn

# name -> (what changes, prediction written before the run).
LEVERS = {
    "coordinate_descent": ("inductor coordinate_descent_tuning=True",
                           "-1 to -2 ms: better block sizes for the fused norm/modulation/RoPE kernels"),
    "max_autotune": ("mode=max-autotune-no-cudagraphs (GEMM templates autotuned, epilogues fused into them)",
                     "0 to -3 ms: cuBLAS is already near its rate at these shapes; compile +60 s or more"),
    "whole_model": ("whole-model compile (regional=False)",
                    "-1 to -2 ms: residual/gate of block i fuses with the norm of block i+1; compile x3"),
    "cuda_graph": ("the compiled forward captured in one CUDA graph and replayed",
                   "-0.5 to -2 ms: ~900 launches a forward, mostly hidden behind GPU work already"),
    "attention_contiguous": ("q, k, v made contiguous (B, H, S, D) before SDPA (compiled: fused into RoPE's store)",
                             "-3 to -7 ms: in-model attention runs 31.9 ms vs 24.5 at the standalone cuDNN rate"),
    "attention_flash": ("SDPA forced to the flash backend (eager forward, vs eager default = cuDNN)",
                        "+20 ms: FA2 runs FLUX attention at about half cuDNN's rate on Hopper"),
    "precomputed_modulation": (
        "every block's AdaLN modulation vectors computed once per request for all steps (one M=steps GEMM per "
        "block: FluxTransformer.precompute_conditioning, the default since 4f35b68 measured it) vs one M=1 GEMV "
        "per block per step; ms: the default row (forward + the per-request precompute / steps), base: per step",
        "-1.8 to -2.2 ms: the per-step GEMVs read 6.5 GB of modulation weights (~2.1 ms at 3 TB/s); the "
        "precompute reads them once per request (~2.2 ms / 28 steps). 4f35b68 measured -3.46 ms"),
    "gelu_epilogue": (
        "the double blocks' MLP GELU (tanh) and bias in cuBLASLt's GEMM epilogue (LinearGELU's CUDA path) vs "
        "a separate fused GELU kernel; ms: epilogue on, base: off (whichever is not the default is rebuilt). "
        "(4f35b68 also split the single block's projections to use it there: 0 ms net, reverted)",
        "-1 to -1.5 ms: the double blocks' GELU kernels (1/3 of 5.9 ms) go; the micro-benchmark saves "
        "0.057 ms per 4608-token MLP GEMM"),
    "fp8_tensorwise": (
        "fp8 tier with one scale per tensor (weights and activations) instead of per row",
        "-2 to -4 ms on the fp8 row: bench/fp8_gemm.py measured tensor-wise 3-10% faster than row-wise on the "
        "big GEMMs; error grows (one scale for all tokens)"),
    "vae_channels_last_compiled": (
        "VAE decode of a 1024x1024 image: channels-last, and channels-last + torch.compile of the decoder",
        "eager 99 ms -> compiled 65-80 ms (GroupNorm + SiLU fused, convolutions in NHWC); peak memory of the "
        "decode -1 GiB or more (fewer fp32 intermediates)"),
    "pointwise_single_config": (
        "inductor triton.autotune_pointwise=False: one launch config per pointwise kernel instead of 2-3 that are "
        "compiled and benchmarked at the kernel's first call; cold start (child processes, alternating with the "
        "default, twice) and the compiled forward",
        "cold compile + first forward -1 to -3 s (the first forward spends ~4 s beyond compile, mostly first-call "
        "config benchmarking); forward +0 to +0.5 ms (~5 ms of elementwise kernels, some in a worse config)"),
    "dynamic_shapes_on": (
        "compile with symbolic sizes from the start (--dynamic-shapes on: CompileConfig(dynamic=True)) instead of "
        "the default auto (static for the first size; d33a9ff measured static as lever static_shapes against "
        "dynamic=True, then the default); cold start (child processes, alternating with the default, twice) and "
        "the compiled forward",
        "cold compile + first forward +4 to +5 s (d33a9ff: static 13.8 / 14.4 s vs dynamic 17.9 / 19.5 s); "
        "forward 0 to +0.5 ms (symbolic index math)"),
    "static_no_padding": (
        "the default compile (auto: static shapes for the first size) with inductor comprehensive_padding=False "
        "(static shapes let inductor pad the strides of intermediate buffers; symbolic ones do not)",
        "-1 to -3 ms: 2fa7121 measured the static graph 3.2 ms slower than the symbolic one (other elementwise "
        "+1.3 ms, attention +1.1 ms in the profile), which padded buffers and the copies around them would "
        "explain"),
    "prewarm_off": (
        "cold start only: CompileConfig(prewarm=False), i.e. torch's default: inductor's compile workers start "
        "at its first graph and ditserve's Triton norm kernels compile at the first forward, vs the default "
        "(workers started before loading, the kernels compiled on a side thread while dynamo traces)",
        "the default starts 1 to 3 s sooner: the kernels' first-call compile took 1-2.4 s (df981f5), and "
        "until the workers are up inductor compiles a graph's kernels one by one in the main process"),
    "norm_rotary_kernel": (
        "the q/k RMSNorm + RoPE of every block as ditserve's Triton kernel (RMSNormRotary's CUDA path: reads each "
        "(token, head) row once from the fused projection, writes it once into the joint [txt, img] q/k) vs "
        "inductor fusing the native ops (the path before the op existed); ms: kernel on, base: off",
        "-2.5 to -4 ms: c44df54's per-kernel profile has inductor's fused norm+RoPE kernels at 4.7 ms (single "
        "blocks, ~0.9 TB/s) + 1.5 ms (double blocks) + 1-2 ms of copies around them; at ~2.5 TB/s the same "
        "bytes take ~2 ms"),
    "attention_fa4": (
        "every block's attention by flash-attn-4 (--attention fa4, its CuTe-DSL SM90 kernel, as the custom op "
        "ditserve::fa4_attention) vs cuDNN SDPA; needs the flash-attn-4 package (skipped without it)",
        "-1 to -2 ms: bench/attention.py (c44df54) has FA4 at 510-525 TFLOP/s alone vs cuDNN 573-592, but in the "
        "model its 57 calls took 24.6 ms vs cuDNN's 26.3 (bench/flux_shapes_ab.py, one model each)"),
    "attention_power": (
        "diagnostic: cuDNN SDPA at FLUX's shape timed alone, back to back, and interleaved with the single "
        "block's GEMMs (profiler kernel times), with the SM clock sampled by nvidia-smi",
        "in-model attention runs 0.55 ms a call vs 0.42 alone: interleaved with GEMMs the SM clock drops "
        "(power limit), which would make the standalone rate an unreachable floor"),
}
# Levers with a cold-start part: the settings the cold-start children compile with (flux_step.py stage 0):
# inductor config patches and CompileConfig fields. Those in COLD_START_ONLY have no in-process part.
COLD_START_LEVERS = {"pointwise_single_config": {"inductor": {"triton.autotune_pointwise": False}},
                     "dynamic_shapes_on": {"compile": {"dynamic": True}},
                     "prewarm_off": {"compile": {"prewarm": False}}}
COLD_START_ONLY = {"prewarm_off"}
BF16_ORDER = ["norm_rotary_kernel", "attention_fa4",
              "precomputed_modulation", "gelu_epilogue", "prewarm_off", "pointwise_single_config", "dynamic_shapes_on",
              "static_no_padding", "attention_power",
              "vae_channels_last_compiled", "cuda_graph", "attention_contiguous", "attention_flash",
              "coordinate_descent", "whole_model", "max_autotune"]  # slowest compiles last
FP8_ORDER = ["fp8_tensorwise"]


@dataclass
class LeverBench:
    """What a lever needs from flux_step's run."""

    fresh: Callable[..., nn.Module]  # fresh(kernels, compiled) -> a ditserve model with the run's weights
    run: Callable[..., torch.Tensor]  # run(model) -> one forward on the run's inputs (conditioning precomputed)
    run_per_step: Callable[..., torch.Tensor]  # the same, computing the conditioning inside the forward
    step_share_ms: float  # the per-request conditioning precompute / steps (added to the rows of `run`)
    measure: Callable[..., float]  # measure(row_name, fn, compile_s=None, **extra) -> median ms (and a row)
    clock: Any  # flux_step.Clock
    rows: dict  # the rows measured so far
    kernels0: str  # the default kernels mode
    inputs: dict  # the forward's inputs
    steps: int  # denoising steps of a request
    out_bf16: torch.Tensor  # the default bf16 output (the reference of the error columns)
    compile_cfg: Any = None  # the engine's CompileConfig (the default rows')
    ab_rounds: int = 0  # --ab: inductor levers also alternate this many fresh default / lever models


def select(spec: str | None) -> list[str]:
    """--levers value -> lever names in run order ("all": every lever). Unknown names raise ValueError."""
    if not spec:
        return []
    names = list(LEVERS) if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = sorted(set(names) - set(LEVERS))
    if unknown:
        raise ValueError(f"unknown lever(s) {unknown}; known: {sorted(LEVERS)}")
    return [n for n in BF16_ORDER + FP8_ORDER if n in names]


def run_levers(names: list[str], b: LeverBench) -> dict:
    out = {}
    funcs = {"precomputed_modulation": precomputed_modulation, "gelu_epilogue": gelu_epilogue,
             "fp8_tensorwise": fp8_tensorwise, "vae_channels_last_compiled": vae_channels_last_compiled,
             "attention_power": attention_power, "cuda_graph": cuda_graph,
             "norm_rotary_kernel": norm_rotary_kernel, "attention_fa4": attention_fa4,
             "attention_contiguous": attention_contiguous, "attention_flash": attention_flash,
             "coordinate_descent": inductor_lever, "whole_model": inductor_lever, "max_autotune": inductor_lever,
             "pointwise_single_config": inductor_lever, "dynamic_shapes_on": inductor_lever,
             "static_no_padding": inductor_lever}
    default_row = b.rows.get(f"ditserve_compiled[{b.kernels0}]", {}).get("ms")
    for name in names:
        what, prediction = LEVERS[name]
        rec: dict[str, Any] = {"what": what, "prediction": prediction}
        if name in COLD_START_ONLY:
            rec["result"] = "cold start only: see cold_start_levers"
            out[name] = rec
            continue
        try:
            res = funcs[name](b, name) if funcs[name] is inductor_lever else funcs[name](b)
            base = res.pop("base_ms", default_row)
            rec.update(res)
            if rec.get("ms") is not None and base is not None:
                rec["delta_ms"] = round(rec["ms"] - base, 2)
        except Exception as e:  # a lever that fails is a result too
            rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            log(f"lever {name} failed: {rec['error']}")
        finally:
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        out[name] = rec
        log(f"lever {name}: {({k: v for k, v in rec.items() if k not in ('what', 'prediction')})}")
    return out


def _compiled(b: LeverBench, cfg=None, kernels=None, edit: Callable[[nn.Module], None] | None = None
              ) -> tuple[nn.Module, float]:
    """A fresh compiled ditserve model and its compile seconds (first call); `edit` changes the model before it
    is compiled."""
    from ditserve.compile import compile_model

    model = b.fresh(kernels or b.kernels0, True)
    if edit is not None:
        edit(model)
    compile_model(model, cfg or b.compile_cfg)
    return model, b.clock.seconds(lambda: b.run(model))


def _compiled_with_fast_path(b: LeverBench, cls: type, fast: bool) -> tuple[nn.Module, float]:
    """`_compiled` with `cls.FAST_BY_DEFAULT = fast` while the model is built (the ops read it at construction)."""
    default = cls.FAST_BY_DEFAULT
    cls.FAST_BY_DEFAULT = fast
    try:
        return _compiled(b)
    finally:
        cls.FAST_BY_DEFAULT = default


def _fast_path_lever(b: LeverBench, name: str, cls: type, flag_key: str, ab: bool = True) -> dict:
    """The default compiled row against a fresh model built with `cls`'s fast path flipped: ms = fast path on,
    base_ms = off, whichever is the engine's default. With --ab (and `ab`), pairs of fresh models alternate too;
    there "default" is the fast path off and "lever" on."""
    default = cls.FAST_BY_DEFAULT
    model, c_s = _compiled_with_fast_path(b, cls, not default)
    other = b.measure(f"lever:{name}={'on' if not default else 'off'}", lambda: b.run(model), c_s,
                      add_ms=b.step_share_ms)
    paths = sorted({m.path for m in model.modules() if isinstance(m, cls)})
    err = _rel_err(b.run(model), b.out_bf16)
    base = b.rows[f"ditserve_compiled[{b.kernels0}]"]["ms"]
    on, off = (other, base) if not default else (base, other)
    out = {"ms": round(on, 2), "base_ms": round(off, 2), flag_key: default, "rebuilt_paths": paths,
           "rel_err_rebuilt_vs_default": err}
    if ab and b.ab_rounds:
        model = None
        out.update(_alternate(b, name, lambda: _compiled_with_fast_path(b, cls, False)[0],
                              lambda: _compiled_with_fast_path(b, cls, True)[0]))
    return out


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return round(float((a.float() - ref.float()).norm() / ref.float().norm()), 5)


# ------------------------------------------------------------------------------------------ bf16 forward


def precomputed_modulation(b: LeverBench) -> dict:
    model, c_s = _compiled(b)
    per_step = b.measure("lever:modulation_per_step", lambda: b.run_per_step(model), c_s)
    return {"ms": b.rows[f"ditserve_compiled[{b.kernels0}]"]["ms"], "base_ms": round(per_step, 2),
            "rel_err_per_step_vs_default": _rel_err(b.run_per_step(model), b.out_bf16)}


def gelu_epilogue(b: LeverBench) -> dict:
    from ditserve.ops.linear import LinearGELU

    # The GEMM alone, at the single block's MLP shape: linear, linear + GELU kernel, the epilogue.
    M, K, N = 4608, 3072, 12288
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5
    bias = torch.randn(N, device="cuda", dtype=torch.bfloat16) * 0.1
    with torch.inference_mode():
        t_lin = b.clock.ms(lambda: F.linear(x, w, bias), iters=20)
        t_two = b.clock.ms(lambda: F.gelu(F.linear(x, w, bias), approximate="tanh"), iters=20)
        t_epi = b.clock.ms(lambda: torch._addmm_activation(bias, x, w.t(), use_gelu=True), iters=20)
        y = torch._addmm_activation(bias, x, w.t(), use_gelu=True).float()
        pre = F.linear(x.float(), w.float(), bias.float())
        err_tanh = _rel_err(y, F.gelu(pre, approximate="tanh"))
        err_erf = _rel_err(y, F.gelu(pre))
    micro = {"shape_MKN": [M, K, N], "linear_ms": round(t_lin, 3), "linear_then_gelu_ms": round(t_two, 3),
             "epilogue_ms": round(t_epi, 3), "rel_err_vs_tanh_gelu_fp32": err_tanh,
             "rel_err_vs_erf_gelu_fp32": err_erf}
    log(f"GELU epilogue micro: {micro}")
    return {**_fast_path_lever(b, "gelu_epilogue", LinearGELU, "epilogue_by_default", ab=False), "micro": micro}


def _alternate(b: LeverBench, name: str, build_default: Callable, build_lever: Callable) -> dict:
    """--ab N: N pairs of fresh default and lever models, alternately (the spread between models of one
    setting); {"ab": ..., "ms": median lever ms, "base_ms": median default ms}."""
    ab: dict[str, list[float]] = {"default": [], "lever": []}
    for _ in range(b.ab_rounds):
        for which, build in (("default", build_default), ("lever", build_lever)):
            model = None
            model = build()
            ab[which].append(round(b.measure(f"lever:{name}:{which}", lambda: b.run(model),
                                             add_ms=b.step_share_ms), 2))
    med = {k: sorted(v)[len(v) // 2] for k, v in ab.items()}
    return {"ab": ab, "ms": med["lever"], "base_ms": med["default"]}


def norm_rotary_kernel(b: LeverBench) -> dict:
    from ditserve.ops.rotary import RMSNormRotary

    return _fast_path_lever(b, "norm_rotary_kernel", RMSNormRotary, "kernel_by_default")


def attention_fa4(b: LeverBench) -> dict:
    from ditserve.ops.attention import Attention, attention_backend_available

    if not attention_backend_available("fa4"):
        return {"result": "skipped: flash-attn-4 is not installed"}

    def build(backend: str) -> nn.Module:
        def use_backend(model: nn.Module) -> None:
            for blk in [*model.double_blocks, *model.single_blocks]:
                blk.attn = Attention(backend)

        return _compiled(b, edit=use_backend)[0]

    model = build("fa4")
    ms = b.measure("lever:attention_fa4", lambda: b.run(model), add_ms=b.step_share_ms)
    out = {"ms": round(ms, 2), "rel_err_vs_default": _rel_err(b.run(model), b.out_bf16)}
    if b.ab_rounds:
        model = None
        out.update(_alternate(b, "attention_fa4", lambda: build("sdpa"), lambda: build("fa4")))
    return out


def inductor_lever(b: LeverBench, name: str) -> dict:
    import torch._inductor.config as inductor_config

    cfg_kwargs, patch = {"pointwise_single_config": ({}, COLD_START_LEVERS["pointwise_single_config"]["inductor"]),
                         "dynamic_shapes_on": ({"dynamic": True}, {}),
                         "static_no_padding": ({}, {"comprehensive_padding": False}),
                         "coordinate_descent": ({}, {"coordinate_descent_tuning": True}),
                         "whole_model": ({"regional": False}, {}),
                         "max_autotune": ({"mode": "max-autotune-no-cudagraphs"}, {})}[name]
    cfg = replace(b.compile_cfg, **cfg_kwargs)
    with inductor_config.patch(patch):
        model, c_s = _compiled(b, cfg)
        ms = b.measure(f"lever:{name}", lambda: b.run(model), c_s, add_ms=b.step_share_ms)
    out = {"ms": round(ms, 2), "compile_s": round(c_s, 1)}
    if b.ab_rounds:
        def lever_model():
            with inductor_config.patch(patch):
                return _compiled(b, cfg)[0]

        out.update(_alternate(b, name, lambda: _compiled(b)[0], lever_model))
    return out


def cuda_graph(b: LeverBench) -> dict:
    """The compiled forward captured in one CUDA graph (static inputs: the bench's own)."""
    model, _ = _compiled(b)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            b.run(model)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        b.run(model)
    return {"ms": round(b.measure("lever:cuda_graph", graph.replay, add_ms=b.step_share_ms), 2)}


def attention_contiguous(b: LeverBench) -> dict:
    """q, k, v made contiguous (B, H, S, D) before SDPA: in a compiled block the transposed store folds into
    the kernel that produces q / k (RoPE)."""
    import ditserve.ops.attention as attention_module

    def sdpa_contiguous(q, k, v, mask):
        out = F.scaled_dot_product_attention(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(),
                                             v.transpose(1, 2).contiguous(), attn_mask=mask)
        return out.transpose(1, 2)

    saved = attention_module._sdpa
    try:
        attention_module._sdpa = sdpa_contiguous  # read when an Attention is constructed
        model, c_s = _compiled(b)
        return {"ms": round(b.measure("lever:attention_contiguous", lambda: b.run(model), c_s,
                                      add_ms=b.step_share_ms), 2)}
    finally:
        attention_module._sdpa = saved


def attention_flash(b: LeverBench) -> dict:
    """Eager forward with SDPA forced to flash, against the eager default (cuDNN)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = b.fresh(b.kernels0, False)
    eager = b.measure("lever:eager_default_attention", lambda: b.run(model))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ms = b.measure("lever:eager_flash_attention", lambda: b.run(model))
    return {"ms": round(ms, 2), "base_ms": eager}


# ------------------------------------------------------------------------------------------ fp8


def fp8_tensorwise(b: LeverBench) -> dict:
    """Fp8Linear with per-tensor scales: weights requantised from the row-wise ones, activations scaled by
    their tensor amax."""
    from ditserve.ops import fp8 as fp8_module

    def forward_tensorwise(self, x):
        x2 = x.reshape(-1, self.in_features)
        scale = (x2.abs().amax().float() / 448.0).clamp(min=torch.finfo(torch.float32).tiny)  # () fp32
        x_fp8 = (x2.float() / scale).clamp(-448.0, 448.0).to(fp8_module.FP8_DTYPE)
        y = torch._scaled_mm(x_fp8, self.weight.t(), scale_a=scale, scale_b=self.weight_scale_t,
                             out_dtype=x.dtype)
        if self.bias is not None:
            y = y + self.bias
        if self.activation == "gelu_tanh":
            y = F.gelu(y, approximate="tanh")
        return y.reshape(*x.shape[:-1], self.out_features)

    base = min((v["ms"] for k, v in b.rows.items() if k.startswith("ditserve_fp8_compiled")), default=None)
    model = b.fresh("native", True)
    fp8_module.apply_fp8(model)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, fp8_module.Fp8Linear):
                w = m.dequantized_weight()  # (N, K) fp32
                s = (w.abs().amax() / 448.0).clamp(min=torch.finfo(torch.float32).tiny)
                m.weight.data = (w / s).clamp(-448.0, 448.0).to(fp8_module.FP8_DTYPE)
                m.register_buffer("weight_scale_t", s.reshape(()))
                m._impl = forward_tensorwise.__get__(m)
    from ditserve.compile import compile_model

    compile_model(model, b.compile_cfg)
    c_s = b.clock.seconds(lambda: b.run(model))
    ms = b.measure("lever:fp8_tensorwise[native]", lambda: b.run(model), c_s, add_ms=b.step_share_ms)
    return {"ms": round(ms, 2), "base_ms": base, "compile_s": round(c_s, 1),
            "rel_l2_vs_bf16": _rel_err(b.run(model), b.out_bf16)}


# ------------------------------------------------------------------------------------------ around the DiT


def vae_channels_last_compiled(b: LeverBench) -> dict:
    """FLUX's VAE (dummy weights) decoding one 1024x1024 latent: eager, channels-last, channels-last compiled."""
    from diffusers import AutoencoderKL

    from ditserve.models.flux import FLUX_1_DEV

    cfg = FLUX_1_DEV.components["vae"][1]
    vae = AutoencoderKL(**cfg).to("cuda", torch.bfloat16).eval().requires_grad_(False)
    z = torch.randn(1, cfg["latent_channels"], 128, 128, device="cuda", dtype=torch.bfloat16)
    out: dict[str, Any] = {}
    ref = None

    def decode():
        with torch.inference_mode():
            return vae.decode(z, return_dict=False)[0]

    for variant in ("eager", "channels_last", "channels_last_compiled"):
        if variant == "channels_last":
            vae.to(memory_format=torch.channels_last)
        if variant == "channels_last_compiled":
            vae.decoder.compile()
            c_s = b.clock.seconds(decode)
        torch.cuda.synchronize()
        base_mem = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        img = decode()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base_mem) / 2**30
        ms = b.clock.ms(decode, iters=10)
        out[variant] = {"ms": round(ms, 2), "peak_above_weights_gib": round(peak, 2)}
        if variant == "channels_last_compiled":
            out[variant]["compile_s"] = round(c_s, 1)
        if ref is None:
            ref = img.float()
        else:
            out[variant]["rel_err_vs_eager"] = _rel_err(img, ref)
        log(f"VAE decode {variant}: {out[variant]}")
    return {"ms": out["channels_last_compiled"]["ms"], "base_ms": out["eager"]["ms"], "variants": out}


def attention_power(b: LeverBench) -> dict:
    """cuDNN SDPA at FLUX's attention shape: alone, and interleaved with the single block's three GEMMs (57
    rounds, as in a forward); per-kernel times from the profiler; SM clock and power sampled meanwhile."""
    from torch.profiler import ProfilerActivity, profile

    H, S, Dh, D = 24, 4608, 128, 3072
    q, k, v = (torch.randn(1, S, H, Dh, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    x = torch.randn(S, D, device="cuda", dtype=torch.bfloat16)
    ws = [torch.randn(n, kk, device="cuda", dtype=torch.bfloat16) * kk**-0.5
          for n, kk in ((3 * D, D), (4 * D, D), (D, 5 * D))]
    h5 = torch.randn(S, 5 * D, device="cuda", dtype=torch.bfloat16)

    def attn_only():
        for _ in range(57):
            F.scaled_dot_product_attention(q, k, v)

    def interleaved():
        for _ in range(57):
            F.linear(x, ws[0])
            F.linear(x, ws[1])
            F.scaled_dot_product_attention(q, k, v)
            F.linear(h5, ws[2])

    smi = None
    with contextlib.suppress(OSError):
        smi = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                                "-lms", "50"], stdout=subprocess.PIPE, text=True)
    res = {}
    try:
        for name, fn in (("alone", attn_only), ("interleaved_with_gemms", interleaved)):
            with torch.inference_mode():
                fn()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    for _ in range(3):
                        fn()
                    torch.cuda.synchronize()
            attn_us = [ev.device_time_total for ev in prof.events()
                       if ev.device_type == torch.autograd.DeviceType.CUDA
                       and any(s in ev.name.lower() for s in ("fmha", "cudnn", "flash", "attention", "sdpa"))]
            attn_us.sort()
            res[name] = {"sdpa_ms_per_call_median": round(attn_us[len(attn_us) // 2] / 1e3, 4),
                         "sdpa_tflops": round(4 * H * S * S * Dh / (attn_us[len(attn_us) // 2] / 1e6) / 1e12, 1),
                         "calls": len(attn_us)}
    finally:
        if smi is not None:
            smi.terminate()
            samples = []
            for line in smi.communicate()[0].splitlines():
                with contextlib.suppress(ValueError):
                    clk, pw = (float(t) for t in line.split(","))
                    samples.append((clk, pw))
            if samples:
                res["sm_clock_mhz_min_max"] = [min(s[0] for s in samples), max(s[0] for s in samples)]
                res["power_w_max"] = max(s[1] for s in samples)
    return {"ms": None, **res}
