"""FLUX.1 transformer forward and end-to-end generate: ditserve beside diffusers, in one process, same weights.

GPU benchmark (a `--device cpu` smoke mode exists to check the script itself on a small model). Defaults:
dummy FLUX.1-dev at full size, batch 1, 1024x1024 (4096 image tokens) + 512 text tokens, bf16. In order:

  0. cold start: two fresh child processes that each load the dummy DiT, compile it regionally and run one
     forward, with one new inductor/Triton cache folder: the first compiles from nothing (cold), the second
     finds the first's artefacts (a second process, warm);
  1. ceilings of this GPU in this run: bf16 GEMM rate (8192^3) and SDPA's rate at FLUX's attention shape;
  2. ditserve: dummy load, load peak, 1024x1024 forward peak; diffusers' FluxTransformer2DModel with the SAME
     weights; output relative error; FLOPs per forward (torch.utils.flop_counter), split GEMM / attention;
  3. one-forward times (CUDA events, median of --iters after warmup): diffusers eager, diffusers compiled whole
     (fullgraph=True) and regionally (compile_repeated_blocks), ditserve eager and compiled per --kernels,
     ditserve fp8 (when this GPU has fp8) and fp8 + fp8 attention (`_attn` rows: --fp8-attention, when the
     nvidia-cudnn-frontend package is importable), fp8 with fp32 accumulation (`_fp32acc` rows: --fp8-fast-accum
     off; the other fp8 rows accumulate fast, the tier's default), each compiled row also replayed from CUDA graphs (`_graphs`
     rows: --cuda-graphs, the fp8 tier's default), and with --levers the variants of bench/flux_levers.py;
  4. profiler traces of ditserve's default compiled forward and of the fastest fp8 and fp8-attention rows: GPU
     time by op family, and (bf16) time above the floor (GEMM FLOPs at the measured GEMM rate, attention FLOPs at
     the measured SDPA rate);
  5. end to end: a --steps-step generate (text encode, denoise, VAE decode) of ditserve's pipeline beside
     diffusers' FluxPipeline built from the same dummy components (same T5/CLIP/VAE objects, same DiT weights),
     both compiled; device-to-host syncs inside ditserve's denoise loop (profiler + CUDA sync-debug mode); peak
     memory of the denoise and of the decode (the default streamed decode, diffusers' whole decode, tiled,
     compiled); fp8 (and fp8-attention) time and image PSNR against bf16 on the same seed.
Prints a table to stderr and ONE JSON line last on stdout (ratio_vs_diffusers_compiled = ditserve default
compiled ms / diffusers' best compiled ms).

    python bench/flux_step.py [--iters 10] [--kernels auto,native,triton] [--levers [NAME,...]] [--skip-e2e]
    python bench/flux_step.py --device cpu --model PATH --size 64 --text-len 16 --skip-compile   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch
from benchutil import commit, cuda_median_ms, kernel_times, log
from flux_levers import COLD_START_LEVERS, LEVERS, LeverBench, run_levers, select


class Clock:
    """Median wall time of a callable: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, fn, iters: int, warmup: int = 3) -> float:
        if self.cuda:
            return cuda_median_ms(fn, iters, warmup)
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return sorted(times)[iters // 2]

    def seconds(self, fn) -> float:
        """Wall seconds of one call (a compile, a generate), synchronised on both ends."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t0


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gemm_rate_tflops(clock: Clock, device: torch.device, dtype: torch.dtype) -> float:
    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn_like(a)
    return 2 * n**3 / clock.ms(lambda: a @ b, iters=20) / 1e9


def sdpa_rates_tflops(clock: Clock, heads: int, tokens: int, head_dim: int) -> dict[str, float]:
    """SDPA forward TFLOP/s at one attention shape (B=1), per backend that runs here (cuDNN, flash, ...)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(1, heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flop = 4 * heads * tokens * tokens * head_dim
    rates = {}
    # The layouts a FLUX block hands SDPA: q, k produced as (B, S, H, D) and transposed (views), v a view into
    # the single block's packed [q | k | v | mlp] projection (token stride 7 * H * D).
    q_v, k_v = (torch.randn(1, tokens, heads, head_dim, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                for _ in range(2))
    packed = torch.randn(1, tokens, 7 * heads * head_dim, device="cuda", dtype=torch.bfloat16)
    v_packed = packed[..., 2 * heads * head_dim:3 * heads * head_dim].unflatten(-1, (heads, head_dim)).transpose(1, 2)
    for name, args in (("default_bshd_views", (q_v, k_v, v)), ("default_bshd_views_v_packed", (q_v, k_v, v_packed))):
        ms = clock.ms(lambda: torch.nn.functional.scaled_dot_product_attention(*args), iters=20)
        rates[name] = round(flop / ms / 1e9, 1)
    for name, backend in (("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        ctx = contextlib.nullcontext() if backend is None else sdpa_kernel(backend)
        try:
            with ctx:
                ms = clock.ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), iters=20)
            rates[name] = round(flop / ms / 1e9, 1)
        except RuntimeError as e:  # backend not available for this shape / GPU
            rates[name] = None
            log(f"sdpa {name}: not available ({str(e).splitlines()[0][:80]})")
    return rates


def count_flops(fn) -> dict[str, float]:
    """TFLOP of one call: total, GEMMs (mm/addmm/bmm/_scaled_mm, and _addmm_activation: LinearGELU's
    epilogue GEMM, which torch's counter has no formula for) and attention (SDPA ops)."""
    from torch.utils.flop_counter import FlopCounterMode, addmm_flop

    def addmm_activation_flop(self_shape, a_shape, b_shape, *args, **kwargs):
        return addmm_flop(self_shape, a_shape, b_shape)

    fc = FlopCounterMode(display=False,
                         custom_mapping={torch.ops.aten._addmm_activation: addmm_activation_flop})
    with fc:
        fn()
    gemm = attn = 0
    for op, n in fc.get_flop_counts().get("Global", {}).items():
        name = str(op)
        if "attention" in name:
            attn += n
        elif any(s in name for s in ("mm", "addmm", "bmm", "linear")):
            gemm += n
    return {"total": fc.get_total_flops() / 1e12, "gemm": gemm / 1e12, "attention": attn / 1e12}


# ------------------------------------------------------------------------------------------ profiler


def kernel_family(name: str) -> str:
    """GPU kernel name -> op family. Inductor names its kernels after the ops it fused
    ("triton_red_fused_add_mul_native_layer_norm_..."); ditserve's own Triton kernels are named after their op."""
    n = name.lower()
    # inductor's fused kernels are named after every op fused in, the attention op or GEMM they feed included
    fused = n.startswith("triton_")
    if not fused and any(s in n for s in ("flash", "fmha", "cudnn", "attention", "sdpa")):
        return "attention"
    if not fused and any(s in n for s in ("gemm", "cutlass", "nvjet", "xmma", "cublas", "scaled_mm", "wgmma",
                                          "splitk")):
        return "gemm"
    if "memcpy" in n or "memset" in n:
        return "memcpy/memset"
    if any(s in n for s in ("norm", "rsqrt", "var_mean")):
        return "norm/modulation/rope (fused)"
    if any(s in n for s in ("gelu", "tanh", "silu", "erf")):
        return "activation (fused)"
    if "triton" in n:
        return "other elementwise (fused)"
    return "other"


def profile_families(fn, iters: int = 5) -> tuple[dict[str, float], float]:
    """(GPU ms per forward by family, GPU ms per forward in all) from a torch.profiler trace of `iters` calls."""
    fam: dict[str, float] = {}
    for name, (ms, _) in kernel_times(fn, iters).items():
        f = kernel_family(name)
        fam[f] = fam.get(f, 0.0) + ms
    total = sum(fam.values())
    return {k: round(v, 2) for k, v in sorted(fam.items(), key=lambda kv: -kv[1])}, round(total, 2)


def count_syncs(fn) -> dict[str, int]:
    """Host-blocking CUDA calls and device-to-host copies made by `fn`, from a profiler trace."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
    counts = {"cudaStreamSynchronize": 0, "cudaDeviceSynchronize": 0, "cudaEventSynchronize": 0,
              "memcpy_DtoH": 0}
    for ev in prof.events():
        if ev.name in counts:
            counts[ev.name] += 1
        elif "memcpy" in ev.name.lower() and "dtoh" in ev.name.lower().replace(" ", ""):
            counts["memcpy_DtoH"] += 1
    return counts


# ------------------------------------------------------------------------------------------ cold start


def child_cold_start(args) -> int:
    """(A child process.) Load the dummy DiT, compile it as the engine does (with --child-settings' inductor
    settings and CompileConfig fields, if any), time the first forward."""
    import torch._inductor.config as inductor_config

    from ditserve.compile import CompileConfig, compile_model, warm_compile_workers
    from ditserve.models.flux import flux_example_inputs
    from ditserve.config import EngineConfig
    from ditserve.loader import load_transformer

    settings = json.loads(args.child_settings)
    engine = EngineConfig(device=args.device, dtype=args.dtype, load_format=args.load_format, compile=True,
                          kernels=args.kernels.split(",")[0])
    cfg = replace(CompileConfig.for_engine(engine), **settings.get("compile", {}))
    t0 = time.perf_counter()
    if cfg.prewarm:  # as load_pipeline does: the compile workers start before the weights load
        warm_compile_workers(device=args.device)
    model, _ = load_transformer(args.model, engine)
    clock = Clock(torch.device(args.device))
    clock.sync()
    load_s = time.perf_counter() - t0
    inputs = flux_example_inputs(model.config, args.size, args.size, text_len=args.text_len, device=args.device,
                                 dtype=next(model.parameters()).dtype)
    compile_model(model, cfg)
    t1 = time.perf_counter()
    with torch.inference_mode(), inductor_config.patch(settings.get("inductor", {})):
        model(**inputs)
    clock.sync()
    first_s = time.perf_counter() - t1
    with torch.inference_mode():
        second_s = clock.seconds(lambda: model(**inputs))
    from torch._dynamo.utils import compilation_time_metrics

    phases = sorted(((k, sum(v)) for k, v in compilation_time_metrics.items()), key=lambda kv: -kv[1])
    # compile_s: dynamo + inductor time of every frame compiled (the first forward's compile work proper); the
    # rest of the first forward beyond a second forward is first-call work outside it (CUDA libraries' setup,
    # Triton kernels' first launch and config benchmarking).
    print(json.dumps({"load_s": round(load_s, 2), "compile_first_forward_s": round(first_s, 2),
                      "compile_s": round(sum(compilation_time_metrics.get("_compile.compile_inner", [])), 2),
                      "second_forward_s": round(second_s, 3), "process_s": round(time.perf_counter() - t0, 2),
                      "compile_phases_s": {k: round(v, 2) for k, v in phases[:12]}}))
    return 0


def cold_start(args, settings: dict | None = None, warm: bool = True) -> dict:
    """Two child processes sharing one fresh compile-cache folder: cold, then (with `warm`) warm (artefacts
    reused).

    Both are CPU-bound (dynamo, inductor, Triton's compiler) and noisy: at d26445d two pairs run one after the
    other on one H100 machine measured 15.9 and 19.0 s of compile (cold) and 8.3 and 10.3 s (warm); 6400126 on
    another machine 19.7 and 5.2 s. A priming process (imports and one small compile first) changed nothing."""
    out = {}
    with tempfile.TemporaryDirectory(prefix="ditserve-cold-") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=os.path.join(cache, "inductor"),
                   TRITON_CACHE_DIR=os.path.join(cache, "triton"))
        for which in ("cold", "warm_second_process")[:2 if warm else 1]:
            cmd = [sys.executable, __file__, "--child-cold-start", "--model", args.model, "--size", str(args.size),
                   "--text-len", str(args.text_len), "--device", args.device, "--dtype", args.dtype,
                   "--load-format", args.load_format, "--kernels", args.kernels,
                   "--child-settings", json.dumps(settings or {})]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                out[which] = {"error": proc.stderr.strip().splitlines()[-1:]}
                log(f"cold start ({which}) failed:\n{proc.stderr[-2000:]}")
                continue
            rec = json.loads(proc.stdout.strip().splitlines()[-1])
            rec["wall_s"] = round(time.perf_counter() - t0, 2)
            out[which] = rec
            log(f"{which:22s} load {rec['load_s']} s, compile + first forward {rec['compile_first_forward_s']} s, "
                f"process wall {rec['wall_s']} s")
    return out


# ------------------------------------------------------------------------------------------ main


def diffusers_twin(ours, device: torch.device, dtype: torch.dtype):
    """diffusers' FluxTransformer2DModel with ours' architecture and exactly ours' weights."""
    from dataclasses import asdict

    from diffusers import FluxTransformer2DModel

    cfg = asdict(ours.config)
    with torch.device("meta"):
        ref = FluxTransformer2DModel(**cfg)
    ref = ref.to_empty(device=device).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for buf in ref.buffers():  # none in 0.42; kept so a future buffer is not left uninitialised
            buf.zero_()
    ref.load_state_dict(_reference_state(ours, ref))
    return ref


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def psnr(a, b) -> float:
    """PSNR (dB) between two PIL images."""
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return 999.0 if mse == 0 else 10 * math.log10(255**2 / mse)  # 999: identical (JSON has no inf)


def fp8_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="flux.1-dev", help="preset (with --load-format dummy) or model folder")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--size", type=int, default=1024, help="square image size")
    ap.add_argument("--text-len", type=int, default=512)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--steps", type=int, default=28, help="end-to-end denoising steps")
    ap.add_argument("--kernels", default="auto",
                    help="comma-separated kernels modes to time (auto, native, triton); the first is the "
                         "default reported as ratio_vs_diffusers_compiled, and the one whose memory is measured")
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--skip-fullgraph-diffusers", action="store_true", help="skip diffusers' whole-model compile")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--skip-cold-start", action="store_true")
    ap.add_argument("--only-cold-start", action="store_true", help="measure the cold start only (JSON line: it)")
    ap.add_argument("--levers", nargs="?", const="all", default=None, metavar="NAME,...",
                    help=f"also measure these levers (bench/flux_levers.py; GPU and compile only), or all: "
                         f"{', '.join(LEVERS)}")
    ap.add_argument("--ab", type=int, default=0, metavar="N",
                    help="with --levers: inductor-setting levers also measure N alternating pairs of fresh default "
                         "and lever models (the ms is then the median of the lever's, against the default's)")
    ap.add_argument("--child-cold-start", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-settings", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        log("bench/flux_step.py: no CUDA GPU here (use --device cpu for a smoke run)")
        return 2
    if args.child_cold_start:
        return child_cold_start(args)
    cuda = dev.type == "cuda"
    compile_on = not args.skip_compile
    try:
        lever_names = select(args.levers)
    except ValueError as e:
        ap.error(str(e))
    if lever_names and not (cuda and compile_on):
        ap.error("--levers needs a CUDA GPU and compilation (no --skip-compile)")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    import diffusers

    from ditserve.compile import CompileConfig, compile_model
from ditserve.models.flux import flux_example_inputs
    from ditserve.config import EngineConfig
    from ditserve.cuda_graphs import GraphedForward
    from ditserve.loader import load_transformer

    clock = Clock(dev)
    rec: dict = {"bench": "flux_step", "model": args.model, "load_format": args.load_format,
                 "gpu": torch.cuda.get_device_name(dev) if cuda else "cpu", "torch": torch.__version__,
                 "triton": _version("triton"), "diffusers": diffusers.__version__, "height": args.size,
                 "width": args.size, "text_len": args.text_len, "kernels": args.kernels,
                 "commit": commit()}

    # 0. cold start, in child processes, before this one holds any GPU memory.
    if compile_on and not args.skip_cold_start:
        rec["cold_start"] = cold_start(args)
    if compile_on and not args.skip_cold_start:  # cold-start levers: default and lever alternate, twice
        for name in (n for n in lever_names if n in COLD_START_LEVERS):
            rounds = [{"default": cold_start(args, warm=False),
                       "lever": cold_start(args, COLD_START_LEVERS[name], warm=False)} for _ in range(2)]
            rec.setdefault("cold_start_levers", {})[name] = {"settings": COLD_START_LEVERS[name], "rounds": rounds}
    if args.only_cold_start:
        print(json.dumps(rec))
        return 0

    # 1. ceilings.
    gemm_rate = gemm_rate_tflops(clock, dev, dtype)
    rec["gemm_tflops"] = round(gemm_rate, 1)
    log(f"GEMM rate ({args.dtype}): {rec['gemm_tflops']} TFLOP/s")

    # 2. ditserve's DiT alone, then diffusers' twin with the same weights.
    kernels0 = args.kernels.split(",")[0]
    engine = EngineConfig(device=args.device, dtype=args.dtype, load_format=args.load_format, kernels=kernels0)
    free_memory()
    reset_peak(dev)
    t0 = time.perf_counter()
    ours, _ = load_transformer(args.model, engine)
    clock.sync()
    rec["ditserve_load_s"] = round(time.perf_counter() - t0, 2)
    rec["ditserve_params_b"] = round(sum(p.numel() for p in ours.parameters()) / 1e9, 4)
    rec["ditserve_load_peak_gib"] = peak_gib(dev)
    c = ours.config
    if cuda:
        rec["sdpa_tflops"] = sdpa_rates_tflops(clock, c.num_attention_heads, args.size**2 // 256 + args.text_len,
                                               c.attention_head_dim)
        log(f"SDPA rates at this attention shape (TFLOP/s): {rec['sdpa_tflops']}")
    inputs = flux_example_inputs(c, args.size, args.size, batch=1, text_len=args.text_len, device=dev, dtype=dtype)

    def run(model, **kw):
        with torch.inference_mode():
            return model(**inputs, **kw)

    # ditserve's forward as the engine runs each step: its conditioning (every block's modulation vectors)
    # computed once per request for all steps (FluxTransformer.precompute_conditioning). That per-request cost,
    # divided by the steps, is added to every ditserve row (`conditioning_ms_included`).
    g = inputs.get("guidance")

    def precompute(n: int):
        with torch.inference_mode():
            return ours.precompute_conditioning(inputs["timestep"][None].expand(n, -1), inputs["pooled_projections"],
                                                None if g is None else g[None].expand(n, -1))

    cond = precompute(1)[0]
    rec["conditioning_precompute_ms_per_request"] = round(clock.ms(lambda: precompute(args.steps), args.iters), 3)
    step_share = rec["conditioning_precompute_ms_per_request"] / args.steps

    def run_ours(model):
        with torch.inference_mode():
            return model(**inputs, conditioning=cond)

    reset_peak(dev)
    out_bf16 = run_ours(ours)
    rec["ditserve_forward_peak_gib"] = peak_gib(dev)
    log(f"ditserve load {rec['ditserve_load_s']} s, load peak {rec['ditserve_load_peak_gib']} GiB, forward peak "
        f"{rec['ditserve_forward_peak_gib']} GiB")
    ref = diffusers_twin(ours, dev, dtype)
    rec["rel_err_vs_diffusers"] = rel_err(out_bf16, run(ref, return_dict=False)[0])
    log(f"relative error ours vs diffusers ({args.dtype}): {rec['rel_err_vs_diffusers']:.4f}")
    flops = count_flops(lambda: run_ours(ours))
    rec["tflop_per_forward"] = {k: round(v, 3) for k, v in flops.items()}
    tflop = flops["total"]
    rows: dict[str, dict] = {}

    def measure(name, fn, compile_s=None, add_ms=0.0, **extra):
        ms = clock.ms(fn, args.iters) + add_ms
        rows[name] = {"ms": round(ms, 2), "tflops": round(tflop / ms * 1e3, 1),
                      "frac_of_gemm_rate": round(tflop / ms * 1e3 / gemm_rate, 3), **extra}
        if add_ms:
            rows[name]["conditioning_ms_included"] = round(add_ms, 3)
        if compile_s is not None:
            rows[name]["compile_s"] = round(compile_s, 1)
        log(f"{name:40s} {ms:9.2f} ms  {tflop / ms * 1e3:7.1f} TFLOP/s"
            + ("" if compile_s is None else f"  (compile {compile_s:.1f} s)"))
        return ms

    # 3. forward timings. diffusers: eager, whole-model fullgraph compile, regional compile.
    measure("diffusers_eager", lambda: run(ref, return_dict=False))
    if compile_on:
        if not args.skip_fullgraph_diffusers:
            whole = torch.compile(ref, fullgraph=True)  # a wrapper: `ref` itself stays eager
            c_s = clock.seconds(lambda: run(whole, return_dict=False))
            measure("diffusers_fullgraph_compile", lambda: run(whole, return_dict=False), c_s)
            del whole
            torch._dynamo.reset()
        ref.compile_repeated_blocks(fullgraph=True)
        c_s = clock.seconds(lambda: run(ref, return_dict=False))
        measure("diffusers_regional_compile", lambda: run(ref, return_dict=False), c_s)

    # ditserve, per kernels mode, eager and compiled. Op paths are bound at construction (and "auto" picks
    # differently for a model that will be compiled), so each row gets a fresh model with the same weights;
    # dynamo's cache is dropped first so each compiled row pays its own compile.
    ref_sd = ref.state_dict()

    def fresh(kernels=kernels0, compiled=False):
        nonlocal ours
        torch._dynamo.reset()
        ours = None
        free_memory()
        model, _ = load_transformer(args.model, replace(engine, kernels=kernels, compile=compiled))
        model.load_diffusers_state_dict(ref_sd)
        ours = model
        return model

    def measure_graphed(name, model, add_ms, **extra):
        """The same forward through the engine's CUDA graphs (`--cuda-graphs auto`, what the denoise loop runs):
        the plain call warms up, the second captures, the rest replay. Checks the replay against a plain call."""
        if not cuda:
            return None
        graphed = GraphedForward(model)

        def run_graphed():
            with torch.inference_mode():
                return graphed(**inputs, conditioning=cond)

        for _ in range(3):
            out = run_graphed()
        exact = bool(torch.equal(out, run_ours(model)))
        measure(name, run_graphed, add_ms=add_ms, replay_equals_plain_call=exact, **extra)
        graphed.graphs.clear()  # the graph's memory pool goes with it
        return exact

    first = True
    for kernels in args.kernels.split(","):
        for compiled in ((False, True) if compile_on else (False,)):
            if not first:
                model = None  # the previous row's model is freed before the next one is loaded
            model = ours if first else fresh(kernels, compiled)
            first = False
            if compiled:
                compile_model(model, CompileConfig.for_engine(engine))
                c_s = clock.seconds(lambda: run_ours(model))
                measure(f"ditserve_compiled[{kernels}]", lambda: run_ours(model), c_s, add_ms=step_share)
                measure_graphed(f"ditserve_compiled_graphs[{kernels}]", model, step_share)
            else:
                measure(f"ditserve_eager[{kernels}]", lambda: run_ours(model), add_ms=step_share)

    # fp8 tier (lossy): same weights, quantised; error against the bf16 output.
    if fp8_supported(dev):
        # "_attn" rows: --fp8-attention too (cuDNN's fp8 attention, when its frontend is importable);
        # "_fp32acc" rows: --fp8-fast-accum off (the tier's default accumulates fast).
        variants = ("", "_attn", "_fp32acc") if fp8_attention_available() else ("", "_fp32acc")
        rec["fp8_attention"] = "measured" if "_attn" in variants else "skipped: nvidia-cudnn-frontend missing"
        for kernels in args.kernels.split(","):  # "native" lets inductor fuse the quantisation into the norms
            for variant in variants:
                model = None
                model = fp8_model(fresh(kernels, compile_on), variant == "_attn", kernels, compile_on,
                                  fast_accum=variant != "_fp32acc")
                if compile_on:
                    compile_model(model, CompileConfig.for_engine(engine))
                c_s = clock.seconds(lambda: run_ours(model)) if compile_on else None
                err = rel_err(run_ours(model), out_bf16)
                tier = "_compiled" if compile_on else "_eager"
                measure(f"ditserve_fp8{variant}{tier}[{kernels}]", lambda: run_ours(model), c_s,
                        add_ms=step_share, rel_l2_vs_bf16=round(err, 4))
                measure_graphed(f"ditserve_fp8{variant}{tier}_graphs[{kernels}]", model, step_share,
                                rel_l2_vs_bf16=round(err, 4))
    else:
        rec["fp8"] = "skipped: no fp8 on this device"

    # Levers (bench/flux_levers.py), each on a fresh model with the same weights; the previous row's model is
    # dropped first (two FLUX DiTs beside diffusers' would not fit).
    if lever_names:
        model = None
        rec["levers"] = run_levers(lever_names, LeverBench(
            fresh=fresh, run=run_ours, run_per_step=run, step_share_ms=step_share, measure=measure, clock=clock,
            rows=rows, kernels0=kernels0, inputs=inputs, steps=args.steps, out_bf16=out_bf16,
            compile_cfg=CompileConfig.for_engine(engine), ab_rounds=args.ab))

    # The engine's defaults: bf16 compiled without CUDA graphs (--cuda-graphs auto graphs the fp8 tier only,
    # whose fastest row is its graphed one).
    default_row = f"ditserve_compiled[{kernels0}]" if compile_on else f"ditserve_eager[{kernels0}]"
    rec["default_row"] = default_row
    if compile_on:
        best_ref = min(rows[k]["ms"] for k in rows if k.startswith("diffusers_") and "compile" in k)
        rec["diffusers_best_compiled_ms"] = best_ref
        rec["ratio_vs_diffusers_compiled"] = round(rows[default_row]["ms"] / best_ref, 3)
        for key, prefix in (("fp8_ratio_vs_diffusers_compiled", "ditserve_fp8_compiled"),
                            ("fp8_attention_ratio_vs_diffusers_compiled", "ditserve_fp8_attn_compiled")):
            fp8_rows = [k for k in rows if k.startswith(prefix)]
            if fp8_rows:
                rec[key] = round(min(rows[k]["ms"] for k in fp8_rows) / best_ref, 3)

    # 4. where the time goes: profiler traces of the default compiled forward (rebuilt: levers replaced it)
    # and of the fastest fp8 row.
    if cuda:
        gemm_floor = flops["gemm"] / gemm_rate * 1e3
        attn_rate = (rec.get("sdpa_tflops") or {}).get("default") or gemm_rate
        attn_floor = flops["attention"] / attn_rate * 1e3
        floors = {"gemm": gemm_floor, "attention": attn_floor}
        def fastest_fp8(attention: bool) -> str | None:  # the fastest fp8 row, with or without fp8 attention
            named = sorted((k for k in rows if k.startswith("ditserve_fp8") and ("_attn" in k) == attention),
                           key=lambda k: rows[k]["ms"])
            return named[0] if named else None

        for key, row_name, quantised in (("profile", default_row, False),
                                         ("profile_fp8", fastest_fp8(False), True),
                                         ("profile_fp8_attention", fastest_fp8(True), True)):
            if row_name is None:
                continue
            model = None
            kernels = row_name.split("[")[1].rstrip("]")
            model = fresh(kernels, compile_on)
            if quantised:
                model = fp8_model(model, "_attn" in row_name, kernels, compile_on)
            if compile_on:
                compile_model(model, CompileConfig.for_engine(engine))
            fam, gpu_ms = profile_families(lambda: run_ours(model))
            f = {} if quantised else floors  # (fp8 GEMMs have another rate: no floor given)
            rec[key] = {
                "row": row_name, "gpu_ms_per_forward": gpu_ms,
                "floor_ms": None if quantised else round(gemm_floor + attn_floor, 2),
                "by_family": {fam_name: {"ms": ms, "floor_ms": round(f.get(fam_name, 0.0), 2),
                                         "above_floor_ms": round(ms - f.get(fam_name, 0.0), 2)}
                              for fam_name, ms in fam.items()}}
            log(f"profile of {row_name}: GPU {gpu_ms} ms/forward"
                + ("" if quantised else f", floor {rec[key]['floor_ms']} ms (GEMM {gemm_floor:.1f} at "
                                        f"{gemm_rate:.0f} TFLOP/s + attention {attn_floor:.1f} at {attn_rate})"))
            for fam_name, v in rec[key]["by_family"].items():
                log(f"    {fam_name:34s} {v['ms']:8.2f} ms   floor {v['floor_ms']:7.2f}   "
                    f"above {v['above_floor_ms']:7.2f}")
    rec["forward"] = rows

    # 5. end to end.
    if not args.skip_e2e:
        ours = model = None
        torch._dynamo.reset()
        free_memory()
        rec["e2e"] = end_to_end(args, engine, ref, clock, compile_on)
    rec["peak_gib_all"] = peak_gib(dev)
    print(json.dumps(rec))
    return 0


def end_to_end(args, engine, ref, clock: Clock, compile_on: bool) -> dict:
    """`steps`-step generate, ditserve vs diffusers' FluxPipeline on shared dummy components."""
    from diffusers import FluxPipeline as DiffusersFlux

    from ditserve.config import SamplingParams
    from ditserve.loader import load_model
    from ditserve.pipelines.flux import compile_vae_decoder
    from ditserve.registry import pipeline_class

    dev = torch.device(args.device)
    e_engine = replace(engine, compile=compile_on)
    t0 = time.perf_counter()
    loaded = load_model(args.model, e_engine)
    load_s = time.perf_counter() - t0
    comps = loaded.components
    ref.load_state_dict(_reference_state(comps["transformer"], ref))  # same DiT weights as ours
    pipe_cls = pipeline_class(loaded.pipeline_class)
    pipe = pipe_cls(comps, e_engine, pipe_cls.spec_for(loaded.name, comps))
    theirs = DiffusersFlux(scheduler=comps["scheduler"], vae=comps["vae"], text_encoder=comps["text_encoder"],
                           tokenizer=comps["tokenizer"], text_encoder_2=comps["text_encoder_2"],
                           tokenizer_2=comps["tokenizer_2"], transformer=ref)
    theirs.set_progress_bar_config(disable=True)
    prompt = "a red circle on a blue background"
    params = SamplingParams(prompt=prompt, height=args.size, width=args.size, steps=args.steps, seed=0,
                            max_sequence_length=args.text_len)

    def ours_gen():
        return pipe.generate(params, progress=False)

    def theirs_gen():
        return theirs(prompt=prompt, height=args.size, width=args.size, num_inference_steps=args.steps,
                      guidance_scale=3.5, max_sequence_length=args.text_len,
                      generator=torch.Generator(dev).manual_seed(0)).images

    out: dict = {"steps": args.steps, "ditserve_load_s": round(load_s, 2)}
    out["ditserve_first_call_s"] = round(clock.seconds(ours_gen), 2)  # includes the compile
    out["diffusers_first_call_s"] = round(clock.seconds(theirs_gen), 2)
    n = 3
    ours_s = sorted(clock.seconds(ours_gen) for _ in range(n))[n // 2]
    theirs_s = sorted(clock.seconds(theirs_gen) for _ in range(n))[n // 2]
    result = ours_gen()
    out.update(ditserve_s=round(ours_s, 3), diffusers_s=round(theirs_s, 3), ratio=round(ours_s / theirs_s, 3),
               ditserve_stages_s={k: round(v, 3) for k, v in result.timings.items()})
    log(f"end to end {args.steps} steps: ditserve {ours_s:.3f} s vs diffusers {theirs_s:.3f} s "
        f"({ours_s / theirs_s:.3f}x); stages {out['ditserve_stages_s']}")
    img_ours, img_theirs = result.images[0], theirs_gen()[0]
    out["psnr_ditserve_vs_diffusers_db"] = round(psnr(img_ours, img_theirs), 2)

    # Stage by stage: syncs in the denoise loop, peak memory of denoise and of decode.
    with torch.inference_mode():
        p = pipe.resolve(params)
        text = pipe.encode_prompt([prompt], 1, p.max_sequence_length)
        latents = pipe.prepare_latents(1, p.height, p.width, p.seed)
        schedule = pipe.timesteps(p.steps, latents.latents.shape[1])
        clock.sync()
        reset_peak(dev)
        if dev.type == "cuda":
            out["denoise_syncs"] = count_syncs(lambda: pipe.denoise(latents, text, schedule, p.guidance,
                                                                    progress=False))
            schedule = pipe.timesteps(p.steps, latents.latents.shape[1])
            torch.cuda.set_sync_debug_mode("error")  # any synchronising call in the loop raises
            try:
                final = pipe.denoise(latents, text, schedule, p.guidance, progress=False)
                out["sync_debug_mode_error_raised"] = False
            except RuntimeError as e:
                out["sync_debug_mode_error_raised"] = str(e).splitlines()[0][:200]
                final = None
            finally:
                torch.cuda.set_sync_debug_mode("default")
            if final is None:
                schedule = pipe.timesteps(p.steps, latents.latents.shape[1])
                final = pipe.denoise(latents, text, schedule, p.guidance, progress=False)
        else:
            final = pipe.denoise(latents, text, schedule, p.guidance, progress=False)
        clock.sync()
        out["denoise_peak_gib"] = peak_gib(dev)
        reset_peak(dev)
        default = pipe.decode(final, p.height, p.width)  # the engine's default decode (streamed on CUDA)
        out["decode_peak_gib"] = peak_gib(dev)
        out["decode_streamed"] = pipe.vae_streaming
        saved_streaming = pipe.vae_streaming
        pipe.vae_streaming = False  # diffusers' whole-image decode (as --vae-streaming off)
        reset_peak(dev)
        whole = pipe.decode(final, p.height, p.width)
        out["whole_decode_peak_gib"] = peak_gib(dev)
        out["whole_decode_s"] = round(clock.seconds(lambda: pipe.decode(final, p.height, p.width)), 3)
        pipe.vae_streaming = saved_streaming
        out["default_vs_whole_decode_psnr_db"] = round(psnr(default[0], whole[0]), 2)
        saved_tiling = pipe.vae_tiling
        pipe.vae_tiling = "on"  # the same latents, decoded in tiles (as --vae-tiling on)
        reset_peak(dev)
        tiled = pipe.decode(final, p.height, p.width)
        out["tiled_decode_peak_gib"] = peak_gib(dev)
        out["tiled_decode_s"] = round(clock.seconds(lambda: pipe.decode(final, p.height, p.width)), 3)
        pipe.vae_tiling = saved_tiling
        out["decode_s"] = round(clock.seconds(lambda: pipe.decode(final, p.height, p.width)), 3)
        out["tiled_vs_whole_decode_psnr_db"] = round(psnr(tiled[0], whole[0]), 2)
        if dev.type == "cuda":  # --compile-vae: the same latents through the channels-last compiled decoder
            compile_vae_decoder(pipe.vae)
            pipe.vae_streaming = False  # (the compiled decoder is diffusers' whole decode)
            out["compiled_vae_first_decode_s"] = round(clock.seconds(lambda: pipe.decode(final, p.height, p.width)), 2)
            reset_peak(dev)
            fast = pipe.decode(final, p.height, p.width)
            out["compiled_vae_decode_peak_gib"] = peak_gib(dev)
            out["compiled_vae_decode_s"] = round(clock.seconds(lambda: pipe.decode(final, p.height, p.width)), 3)
            out["compiled_vae_vs_whole_decode_psnr_db"] = round(psnr(fast[0], whole[0]), 2)
            pipe.vae.decoder._compiled_call_impl = None  # back to the plain decoder for the fp8 rows below
            pipe.vae.to(memory_format=torch.contiguous_format)
            pipe.vae_streaming = saved_streaming
    out["request_peak_gib"] = round(result.peak_memory_bytes / 2**30, 2) if result.peak_memory_bytes else None
    log(f"syncs in the denoise loop: {out.get('denoise_syncs')}, sync-debug error: "
        f"{out.get('sync_debug_mode_error_raised')}; peak denoise {out['denoise_peak_gib']} GiB, decode "
        f"{out['decode_peak_gib']} GiB (streamed: {out['decode_streamed']}, {out['decode_s']} s, PSNR vs whole "
        f"{out['default_vs_whole_decode_psnr_db']} dB; whole {out['whole_decode_peak_gib']} GiB, "
        f"{out['whole_decode_s']} s; tiled {out['tiled_decode_peak_gib']} GiB, PSNR vs whole "
        f"{out['tiled_vs_whole_decode_psnr_db']} dB), request {out['request_peak_gib']} GiB")

    # fp8 tier, end to end: time and image PSNR against bf16 on the same seed.
    if fp8_supported(dev):
        try:
            from ditserve.ops.fp8 import apply_fp8
        except ImportError:
            pass
        else:
            torch._dynamo.reset()
            apply_fp8(pipe.transformer)
            pipe.engine = replace(pipe.engine, quantization="fp8")
            pipe.bind_forward()  # the fp8 tier's forward: CUDA graphs (--cuda-graphs auto), of the quantised model
            for variant in ("fp8", "fp8_attention") if fp8_attention_available() else ("fp8",):
                if variant == "fp8_attention":
                    torch._dynamo.reset()
                    pipe.transformer.use_fp8_attention(pipe.transformer.double_blocks[0].norm1.ops)
                    pipe.engine = replace(pipe.engine, fp8_attention=True)
                    pipe.bind_forward()
                clock.seconds(ours_gen)  # recompile for the quantised layers
                fp8_s = sorted(clock.seconds(ours_gen) for _ in range(n))[n // 2]
                out[f"{variant}_s"] = round(fp8_s, 3)
                out[f"{variant}_ratio_vs_diffusers"] = round(fp8_s / theirs_s, 3)
                out[f"{variant}_psnr_vs_bf16_db"] = round(psnr(ours_gen().images[0], img_ours), 2)
                log(f"{variant} end to end {fp8_s:.3f} s ({fp8_s / theirs_s:.3f}x diffusers), image PSNR vs bf16 "
                    f"{out[f'{variant}_psnr_vs_bf16_db']} dB")
    return out


def fp8_attention_available() -> bool:
    from ditserve.kernels.attention_fp8 import CUDNN_REGISTERED

    return CUDNN_REGISTERED


def fp8_model(model, attention: bool, kernels: str, compiled: bool, fast_accum: bool = True):
    """`model` in the fp8 tier (`apply_fp8`), with --fp8-attention when `attention`, with the GEMMs' fast
    accumulation unless `fast_accum` is False (--fp8-fast-accum off)."""
    from ditserve.ops import OpsConfig
    from ditserve.ops.fp8 import apply_fp8

    apply_fp8(model, fast_accum=fast_accum)
    if attention:
        model.use_fp8_attention(OpsConfig(device="cuda", dtype=torch.bfloat16, kernels=kernels, compiled=compiled))
    return model


def _reference_state(ours, ref) -> dict[str, torch.Tensor]:
    """diffusers state dict holding `ours`' weights (through ours' weight map)."""
    params = dict(ours.named_parameters())
    sd = {}
    for key, (name, start, stop) in ours.weight_map().items():
        sd[key] = params[name] if start is None else params[name][start:stop]
    for key, value in ref.state_dict().items():
        sd.setdefault(key, value)
    return sd


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    sys.exit(main())
