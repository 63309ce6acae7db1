"""One DiT family's forward and end-to-end image: ditserve beside diffusers, in one process, same weights.

    python bench/family_step.py --family z-image [--size 1024] [--text-len 128] [--iters 10] [--steps 8]
    python bench/family_step.py --family flux.1-dev --text-len 512
    python bench/family_step.py --family wan --size 480 --width 832 --text-len 512 --steps 2 [--preset wan2.1-t2v-14b]
    python bench/family_step.py --family flux.1-dev --text-len 512 --sweep [--sizes 512,1360x768] [--batches 1,4]

For the family's preset (random weights at full size, bf16, GPU):
  0. cold start: a fresh child process with an empty inductor cache builds the dummy DiT, compiles it as the
     engine does (regional, dynamic shapes "auto") and runs one forward: "cold compile + first forward"
     (`--cold-runs N`: N such children, the median reported; `--only-cold`: nothing else;
     `--cold-variants engine,static_first,...`: alternating children per compile variant, see COLD_VARIANTS);
  1. diffusers' transformer class built from the preset's config, random weights, and ours loaded from its
     state dict (the loader's weight map): output relative error;
  2. one forward (CUDA events, median of --iters): diffusers eager, diffusers regional compile
     (`compile_repeated_blocks`), ditserve compiled (the engine's path), ditserve fp8 (`--quantization fp8`)
     compiled, each also replayed from a CUDA graph (`_graphs`);
  3. end to end: `Engine.load(preset, dummy, compile)` -> warmup -> a --steps image at --size (text encode,
     denoise, decode), the engine's default path and the fp8 tier.
For families whose engine computes every step's modulation vectors once per request (PRECOMPUTE: FLUX.1,
Qwen-Image), "step" rows time the forward as the denoise loop calls it, each with its share of that per-request
precompute (divided by the preset's default steps); diffusers computes them in every forward.
Prints one JSON line last (ratio_vs_diffusers_compiled = ditserve compiled ms / diffusers regional compile ms;
ratio_step_vs_diffusers_compiled = the step row the engine's default runs, graphed within AUTO_MAX_TOKENS / the same).

--sweep instead measures one forward at each size of --sizes and batch of --batches (both models compiled once,
dynamic shapes as each does by default): diffusers regional compile, the same replayed from a CUDA graph (a
manual capture of its compiled forward: the CUDA-graph path of `mode="reduce-overhead"` without a second compile),
ditserve's default (`--cuda-graphs auto`: graphed where `AUTO_MAX_TOKENS` admits the shape) and ditserve graphed
at every shape; ratio_vs_diffusers_compiled_by_size compares ditserve's default with the best diffusers row at
batch 1. At the smallest size it also sums the GPU time of the default forward's kernels (host work hidden when
the forward takes little more than that), and runs a --steps image end to end for the --e2e-preset preset.

A family is one adapter below: how to build diffusers' class and call both models on the same inputs.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import torch
from benchutil import commit, cuda_median_ms, log

# ------------------------------------------------------------------------------------------- adapters


# adapter(config, height, width, batch, text_len, device, dtype) -> (diffusers class, our forward's kwargs,
# call_ref(diffusers model) -> its output on the same inputs, shaped as ours)


def _flux_adapter(config: dict, height: int, width: int, batch: int, text_len: int, device, dtype):
    from diffusers import FluxTransformer2DModel

    from ditserve.models.flux import FluxConfig, flux_example_inputs

    ours_inputs = flux_example_inputs(FluxConfig.from_diffusers(config), height, width, batch=batch,
                                      text_len=text_len, device=device, dtype=dtype)

    def call_ref(model):
        return model(**ours_inputs, return_dict=False)[0]

    return FluxTransformer2DModel, ours_inputs, call_ref


def _z_image_adapter(config: dict, height: int, width: int, batch: int, text_len: int, device, dtype):
    from diffusers import ZImageTransformer2DModel

    from ditserve.models.z_image import ZImageConfig, ZImageTransformer

    ours_inputs = ZImageTransformer.example_inputs(ZImageConfig.from_diffusers(config), height, width,
                                                   text_len=text_len, device=device, dtype=dtype, batch=batch)
    x = list(ours_inputs["hidden_states"].unsqueeze(2).unbind(0))  # B x (C, 1, h, w)
    caps = list(ours_inputs["encoder_hidden_states"].unbind(0))  # B x (T, D)

    def call_ref(model):
        return torch.stack(model(x, ours_inputs["timestep"], caps, return_dict=False)[0]).squeeze(2)

    return ZImageTransformer2DModel, ours_inputs, call_ref


def _flux2_adapter(config: dict, height: int, width: int, batch: int, text_len: int, device, dtype):
    from diffusers import Flux2Transformer2DModel

    from ditserve.models.flux2 import Flux2Config, Flux2Transformer

    ours_inputs = Flux2Transformer.example_inputs(Flux2Config.from_diffusers(config), height, width,
                                                  text_len=text_len, device=device, dtype=dtype, batch=batch)

    def call_ref(model):  # the same kwargs: ids (N, 4), guidance only for dev
        return model(**ours_inputs, return_dict=False)[0]

    return Flux2Transformer2DModel, ours_inputs, call_ref


FAMILIES = {"flux.1-dev": _flux_adapter, "z-image": _z_image_adapter, "flux.2-dev": _flux2_adapter,
            "flux.2-klein-4b": _flux2_adapter}
PRESET = {"flux.1-dev": "flux.1-dev", "z-image": "z-image-turbo", "flux.2-dev": "flux.2-dev",
          "flux.2-klein-4b": "flux.2-klein-4b"}


WAN_FRAMES = 81  # Wan's default video length (21 latent frames)


def _wan_adapter(config: dict, height: int, width: int, batch: int, text_len: int, device, dtype):
    """Wan: a WAN_FRAMES-frame video, both CFG branches in one forward (2 * batch rows, the engine's batched CFG).
    480x832 with the 1.3B preset: 21 x 30 x 52 = 32,760 tokens a video."""
    from diffusers import WanTransformer3DModel

    from ditserve.models.wan import WanConfig, WanTransformer

    ours_inputs = WanTransformer.example_inputs(WanConfig.from_diffusers(config), height, width, text_len=text_len,
                                                num_frames=WAN_FRAMES, device=device, dtype=dtype, batch=2 * batch)

    def call_ref(model):
        return model(**ours_inputs, return_dict=False)[0]

    return WanTransformer3DModel, ours_inputs, call_ref


FAMILIES["wan"], PRESET["wan"] = _wan_adapter, "wan2.1-t2v-1.3b"


def _qwen_image_adapter(config: dict, height: int, width: int, batch: int, text_len: int, device, dtype):
    """Qwen-Image: one branch's forward (no text mask: every token real); diffusers takes img_shapes per sample."""
    from diffusers import QwenImageTransformer2DModel

    from ditserve.models.qwen_image import QwenImageConfig, QwenImageTransformer

    ours_inputs = QwenImageTransformer.example_inputs(QwenImageConfig.from_diffusers(config), height, width,
                                                      text_len=text_len, device=device, dtype=dtype, batch=batch)
    ref_inputs = dict(ours_inputs, img_shapes=[list(ours_inputs["img_shapes"])] * batch)

    def call_ref(model):
        return model(**ref_inputs, return_dict=False)[0]

    return QwenImageTransformer2DModel, ours_inputs, call_ref


FAMILIES["qwen-image"], PRESET["qwen-image"] = _qwen_image_adapter, "qwen-image"


# Families whose engine computes every step's conditioning (each block's modulation vectors) once per request, for
# all steps (`precompute_conditioning`), and hands each forward its step's entry: conditioning(model, inputs, n)
# -> n steps' conditioning objects for `inputs`' timestep. The "step" rows time the forward as the denoise loop
# calls it, plus the per-request precompute divided by the preset's default steps.
def _flux_conditioning(model, inputs: dict, n: int) -> list:
    g = inputs.get("guidance")
    return model.precompute_conditioning(inputs["timestep"][None].expand(n, -1), inputs["pooled_projections"],
                                         None if g is None else g[None].expand(n, -1))


def _qwen_image_conditioning(model, inputs: dict, n: int) -> list:
    return model.precompute_conditioning(inputs["timestep"][None].expand(n, -1))


PRECOMPUTE = {"flux.1-dev": _flux_conditioning, "qwen-image": _qwen_image_conditioning}


# ------------------------------------------------------------------------------------------ measures


# Cold-start variants (`--cold-variants`): lines run in the child after the model is built, before the clock
# starts, changing how it is compiled; "engine" is the engine's own way. "regions+NAME" also compiles the block
# list NAME (one the model leaves eager).
COLD_VARIANTS = {
    "engine": "",
    "no_prewarm": "cfg = dataclasses.replace(cfg, prewarm=False)",
    "dynamic_on": "cfg = dataclasses.replace(cfg, dynamic=True)",
    "static_first": "type(m).varying_shape_blocks = ()",
}


def _cold_variant_code(variant: str) -> str:
    if variant.startswith("regions+"):
        return f"type(m).repeated_blocks = tuple(type(m).repeated_blocks) + ({variant[len('regions+'):]!r},)"
    if variant not in COLD_VARIANTS:
        raise SystemExit(f"unknown cold-start variant {variant!r}: {', '.join(COLD_VARIANTS)} or regions+NAME")
    return COLD_VARIANTS[variant]


def cold_start(preset: str, size: int, text_len: int, variant: str = "engine") -> float:
    """Seconds for a fresh process with an empty compile cache to build, compile and run one forward."""
    code = f"""
import dataclasses, time, torch
from ditserve.config import EngineConfig
from ditserve.loader import load_transformer
from ditserve.compile import CompileConfig, compile_model
e = EngineConfig(device="cuda", dtype="bf16", load_format="dummy", compile=True)
m, _ = load_transformer({preset!r}, e)
inputs = m.example_inputs(m.config, {size}, {size}, text_len={text_len}, device="cuda", dtype=torch.bfloat16)
cfg = CompileConfig.for_engine(e)
{_cold_variant_code(variant)}
torch.cuda.synchronize(); t0 = time.perf_counter()
compile_model(m, cfg)
with torch.inference_mode():
    m(**inputs)
torch.cuda.synchronize(); print(time.perf_counter() - t0)
"""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, DITSERVE_CACHE_DIR=cache)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def graphed(fn):
    """fn replayed from a CUDA graph (captured after two warm calls)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def kernel_profile(fn, iters: int = 3) -> dict:
    """GPU time of fn's kernels by kind (GEMM, attention, Triton-generated, other) and the 10 costliest."""
    from benchutil import kernel_times

    rows = kernel_times(fn, iters)

    def kind(name: str) -> str:
        n = name.lower()
        if any(k in n for k in ("flash", "fmha", "attention", "attn", "sdpa", "cudnn")):
            return "attention"
        if any(k in n for k in ("gemm", "cutlass", "nvjet", "xmma", "cublas", "matmul", "_mm_", "sm90")):
            return "gemm"
        return "triton" if n.startswith("triton") else "other"

    by_kind: dict[str, float] = {}
    for name, (ms, _) in rows.items():
        by_kind[kind(name)] = by_kind.get(kind(name), 0.0) + ms
    top = sorted(rows.items(), key=lambda kv: -kv[1][0])[:10]
    return {"total_ms": round(sum(ms for ms, _ in rows.values()), 2),
            "by_kind_ms": {k: round(v, 2) for k, v in sorted(by_kind.items())},
            "launches": sum(n for _, n in rows.values()),
            "top": [[name[:90], round(ms, 3), n] for name, (ms, n) in top]}


def release() -> None:
    """Free what the last measurement left on the GPU before the next one allocates."""
    gc.collect()
    torch.cuda.empty_cache()


def diffusers_use_fa3(model) -> None:
    """diffusers' own FlashAttention-3 backend (`set_attention_backend("_flash_3")`) on the FA3 module ditserve
    finds: diffusers looks for flash-attention's hopper build (`flash_attn_interface`, distribution
    `flash_attn_3`); the forward-only fa3-fwd wheel has the same `flash_attn_func` under another name."""
    from diffusers.models import attention_dispatch as dispatch

    from ditserve.ops.attention import _fa3_module

    dispatch._CAN_USE_FLASH_ATTN_3 = True
    dispatch.flash_attn_3_func = _fa3_module().flash_attn_func
    model.set_attention_backend("_flash_3")


def time_compiled(model, engine, inputs: dict, iters: int) -> tuple[float, float]:
    """Compile `model` as the engine does, then (ms a forward, ms a forward replayed from a CUDA graph)."""
    from ditserve.compile import CompileConfig, compile_model

    compile_model(model, CompileConfig.for_engine(engine))

    def call():
        return model(**inputs)

    return cuda_median_ms(call, iters, 2), cuda_median_ms(graphed(call), iters, 2)


def time_step(family: str, model, inputs: dict, steps: int, iters: int) -> tuple[float, float, float]:
    """The forward of a compiled `model` as the engine's denoise loop calls it (PRECOMPUTE above): (ms a step,
    ms a step replayed from a CUDA graph, ms of the per-request precompute), each step including the precompute
    divided by `steps`."""
    conditioning = PRECOMPUTE[family]
    cond = conditioning(model, inputs, 1)[0]
    per_request = cuda_median_ms(lambda: conditioning(model, inputs, steps), iters, 2)

    def call():
        return model(**inputs, conditioning=cond)

    share = per_request / steps
    return cuda_median_ms(call, iters, 2) + share, cuda_median_ms(graphed(call), iters, 2) + share, per_request


def end_to_end(preset: str, size: int, steps: int, quantization: str | None, runs: int = 3,
               width: int | None = None) -> dict:
    from ditserve.config import EngineConfig, SamplingParams
    from ditserve.engine import Engine

    cfg = EngineConfig(device="cuda", dtype="bf16", load_format="dummy", compile=True, quantization=quantization)
    t0 = time.perf_counter()
    engine = Engine.load(preset, cfg)
    load_s = time.perf_counter() - t0
    width = width or size
    warm_s = engine.warmup(size, width, steps)
    req = SamplingParams(prompt="a red apple on a wooden table, studio light", height=size, width=width,
                         steps=steps, seed=0)
    first = engine.generate(req)
    outs = [engine.generate(req) for _ in range(runs)]
    totals = sorted(o.timings["total_s"] for o in outs)
    rec = {"load_s": round(load_s, 2), "warmup_s": round(warm_s, 2),
           "first_request_s": round(first.timings["total_s"], 4), "image_s": round(totals[len(totals) // 2], 4),
           "stages_s": {k: round(outs[-1].timings[k], 4) for k in ("text_encode_s", "denoise_s", "decode_s")},
           "peak_gib": round(max(o.peak_memory_bytes for o in outs) / 2**30, 2),
           "stage_peak_gib": {k: round(v / 2**30, 2) for k, v in (outs[-1].stage_peak_memory_bytes or {}).items()},
           "cuda_graph_mib": round(engine.pipeline.graph_memory_bytes / 2**20)}
    del engine
    release()
    return rec


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        w, _, h = item.partition("x")
        out.append((int(h or w), int(w)))  # (height, width)
    return out


def sweep(args, rec: dict, preset: str, config: dict, device, dtype) -> int:
    """--sweep: see the module docstring."""
    from benchutil import kernel_times

    from ditserve.config import EngineConfig
    from ditserve.cuda_graphs import AUTO_MAX_TOKENS, GraphedForward
    from ditserve.loader import load_transformer

    sizes, batches = _parse_sizes(args.sizes), [int(b) for b in args.batches.split(",")]
    ref_cls = FAMILIES[args.family](config, 64, 64, 1, 8, device, dtype)[0]
    with torch.device(device):
        ref = ref_cls.from_config(config).to(dtype).eval().requires_grad_(False)
    engine = EngineConfig(device="cuda", dtype="bf16", load_format="dummy", compile=True)
    ours, _ = load_transformer(preset, engine)
    ours.load_diffusers_state_dict(ref.state_dict())
    from ditserve.compile import CompileConfig, compile_model

    compile_model(ours, CompileConfig.for_engine(engine))
    ref.compile_repeated_blocks(fullgraph=True)
    rows, ratios = [], {}
    with torch.inference_mode():
        for (h, w) in sizes:
            for b in batches:
                _, inputs, call_ref = FAMILIES[args.family](config, h, w, b, args.text_len, device, dtype)
                run_ref = functools.partial(call_ref, ref)

                def run_ours():
                    return ours(**inputs)

                iters = args.iters if h * w * b <= 1024 * 1024 * 4 else max(3, args.iters // 3)
                row = {"height": h, "width": w, "batch": b, "tokens": (h // 16) * (w // 16) * b}
                t = {"diffusers_compiled": cuda_median_ms(run_ref, iters, 2)}
                t["diffusers_compiled_graph"] = cuda_median_ms(graphed(run_ref), iters, 2)
                release()
                default = GraphedForward(ours, admit=lambda: row["tokens"] <= AUTO_MAX_TOKENS)
                t["ditserve_default"] = cuda_median_ms(lambda: default(**inputs), iters, 3)
                row["default_graphed"] = bool(default.graphs)
                row["graph_mib"] = round(default.memory_bytes / 2**20)
                if default.graphs:
                    t["ditserve_graphs_on"] = t["ditserve_default"]
                else:
                    t["ditserve_graphs_on"] = cuda_median_ms(graphed(run_ours), iters, 2)
                t["ditserve_no_graphs"] = (cuda_median_ms(run_ours, iters, 2) if default.graphs
                                           else t["ditserve_default"])
                if (h, w) == sizes[0] and b == 1:  # the GPU time of the default forward's own kernels
                    row["kernel_sum_ms"] = round(sum(ms for ms, _ in kernel_times(lambda: default(**inputs), 3)
                                                     .values()), 2)
                del default
                release()
                best = min(t["diffusers_compiled"], t["diffusers_compiled_graph"])
                row["forward_ms"] = {k: round(v, 2) for k, v in t.items()}
                row["ratio_default_vs_best_diffusers"] = round(t["ditserve_default"] / best, 3)
                row["ratio_graphs_on_vs_best_diffusers"] = round(t["ditserve_graphs_on"] / best, 3)
                rows.append(row)
                if b == 1:
                    ratios[f"{w}x{h}"] = row["ratio_default_vs_best_diffusers"]
                log(f"{w}x{h} x{b}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items())
                    + f" ms | default/best diffusers {row['ratio_default_vs_best_diffusers']}"
                    + (f" | kernels {row['kernel_sum_ms']} ms" if "kernel_sum_ms" in row else ""))
    del ref, ours, run_ref, run_ours, inputs  # the closures hold the models too
    release()
    rec["sweep"] = rows
    rec["ratio_vs_diffusers_compiled_by_size"] = ratios
    if not args.skip_e2e:
        h, w = sizes[0]
        rec["e2e_smallest"] = end_to_end(args.e2e_preset or preset, h, args.steps, None, width=w)
        log(f"end to end {args.e2e_preset or preset} {w}x{h}, {args.steps} steps: {rec['e2e_smallest']}")
    print(json.dumps(rec))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--width", type=int, default=None, help="width if not --size (a non-square forward)")
    ap.add_argument("--preset", default=None, help="another preset of the family (e.g. wan2.1-t2v-14b)")
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--cold-runs", type=int, default=1, help="cold starts to run (the median is reported)")
    ap.add_argument("--only-cold", action="store_true", help="the cold start alone")
    ap.add_argument("--cold-variants", default=None,
                    help="cold starts of these compile variants, alternating (COLD_VARIANTS; regions+NAME); the "
                         "'engine' variant's median is the cold start the record reports")
    ap.add_argument("--profile", action="store_true", help="GPU time by kernel kind of both compiled forwards")
    ap.add_argument("--no-parity", action="store_true",
                    help="never hold both models at once (a DiT too large for two copies, e.g. FLUX.2-dev): "
                         "diffusers is timed and freed first, ditserve then runs its own random weights and "
                         "rel_err_vs_diffusers is not measured")
    ap.add_argument("--sweep", action="store_true", help="one forward at each of --sizes x --batches (see above)")
    ap.add_argument("--sizes", default="512,768,1024,1360x768,2048", help="--sweep sizes: S (square) or WxH")
    ap.add_argument("--batches", default="1,4", help="--sweep batch sizes")
    ap.add_argument("--ours-first", action="store_true",
                    help="with --no-parity: time ditserve before diffusers (the default order is diffusers first), "
                         "to see whether the GPU's clocks drift between the two")
    ap.add_argument("--skip-fp8", action="store_true", help="no fp8-tier rows (large models, short GPU time)")
    ap.add_argument("--attention", default=None, help="ditserve's attention backend (default: the engine's)")
    ap.add_argument("--fa3-rows", action="store_true",
                    help="also FlashAttention-3 on both sides (it must be installed): diffusers' `_flash_3` "
                         "backend (given the installed FA3 module) and ditserve with --attention fa3")
    ap.add_argument("--e2e-preset", default=None, help="--sweep: preset of the end-to-end image at the smallest "
                                                       "size (default: the family's)")
    args = ap.parse_args()

    from ditserve import registry
    from ditserve.config import EngineConfig
    from ditserve.loader import load_transformer

    device, dtype = torch.device("cuda"), torch.bfloat16
    preset = args.preset or PRESET[args.family]
    width = args.width or args.size
    rec: dict = {"bench": "family_step", "family": args.family, "preset": preset, "commit": commit(),
                 "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "size": args.size,
                 "text_len": args.text_len}
    import diffusers
    rec["diffusers"] = diffusers.__version__

    if not args.skip_cold:  # --cold-runs rounds of children, alternating the variants ("engine" alone by default)
        variants = (args.cold_variants or "engine").split(",")
        found: dict[str, list[float]] = {v: [] for v in variants}
        for _ in range(args.cold_runs):
            for v in variants:
                found[v].append(round(cold_start(preset, args.size, args.text_len, v), 2))
                log(f"cold start {v}: {found[v][-1]} s")
        medians = {v: sorted(r)[len(r) // 2] for v, r in found.items()}
        if "engine" in found:
            rec["cold_compile_first_forward_s"] = medians["engine"]
            if args.cold_runs > 1:
                rec["cold_compile_first_forward_runs_s"] = sorted(found["engine"])
        if args.cold_variants:
            rec["cold_variants_s"], rec["cold_variants_median_s"] = found, medians
        log(f"cold compile + first forward, medians: {medians}")
        if args.only_cold:
            print(json.dumps(rec))
            return 0

    spec = registry.preset(preset)
    class_name, config = spec.components["transformer"]
    if args.sweep:
        return sweep(args, rec, preset, config, device, dtype)
    if args.ours_first and not args.no_parity:
        raise SystemExit("--ours-first needs --no-parity (parity holds both models at once)")
    ref_cls, inputs, call_ref = FAMILIES[args.family](config, args.size, width, 1, args.text_len, device, dtype)

    def build_ref():
        with torch.device(device):
            return ref_cls.from_config(config).to(dtype).eval().requires_grad_(False)

    ref = None if args.ours_first else build_ref()
    engine = EngineConfig(device="cuda", dtype="bf16", load_format="dummy", compile=True,
                          **({"attention": args.attention} if args.attention else {}))
    rec["attention"] = engine.attention
    ours = None
    if not args.no_parity:
        ours, _ = load_transformer(preset, engine)
        ours.load_diffusers_state_dict(ref.state_dict())
    times = {}
    with torch.inference_mode():
        def measure_diffusers():
            nonlocal ref
            run_ref = functools.partial(call_ref, ref)
            if not args.no_parity:
                want, got = run_ref().float(), ours(**inputs).float()
                rec["rel_err_vs_diffusers"] = round(((got - want).norm() / want.norm()).item(), 5)
            times["diffusers_eager"] = cuda_median_ms(run_ref, args.iters, 2)
            ref.compile_repeated_blocks(fullgraph=True)
            t0 = time.perf_counter()
            run_ref()
            torch.cuda.synchronize()
            rec["diffusers_regional_compile_s"] = round(time.perf_counter() - t0, 2)
            times["diffusers_regional_compile"] = cuda_median_ms(run_ref, args.iters, 2)
            if args.profile:
                rec["profile_diffusers_compiled"] = kernel_profile(run_ref)
            if args.fa3_rows:
                diffusers_use_fa3(ref)
                times["diffusers_regional_compile_fa3"] = cuda_median_ms(run_ref, args.iters, 2)
            ref = run_ref = None
            release()

        def measure_ours():
            nonlocal ours
            if args.no_parity:
                ours, _ = load_transformer(preset, engine)
            times["ditserve_compiled"], times["ditserve_compiled_graphs"] = time_compiled(ours, engine, inputs,
                                                                                          args.iters)
            if args.family in PRECOMPUTE:
                times["ditserve_step"], times["ditserve_step_graphs"], per_request = time_step(
                    args.family, ours, inputs, spec.default_steps, args.iters)
                rec["conditioning_precompute_ms_per_request"] = round(per_request, 3)
            if args.profile:
                rec["profile_ditserve_compiled"] = kernel_profile(lambda: ours(**inputs))
            ours = None
            release()

        if args.ours_first:  # (--no-parity) the same rows in the other order: drift of the GPU's clocks shows
            measure_ours()
            ref = build_ref()
            measure_diffusers()
        else:
            measure_diffusers()
            measure_ours()
        rec["order"] = "ditserve first" if args.ours_first else "diffusers first"
        if args.profile:
            for who in ("diffusers", "ditserve"):
                log(f"{who} kernels: {json.dumps(rec[f'profile_{who}_compiled'])}")
        if args.fa3_rows:
            fa3 = replace(engine, attention="fa3")
            m, _ = load_transformer(preset, fa3)
            times["ditserve_compiled_fa3"], times["ditserve_compiled_fa3_graphs"] = time_compiled(m, fa3, inputs,
                                                                                              args.iters)
            del m
            release()
        if not args.skip_fp8:  # the fp8 tier (its own dummy weights: the speed does not depend on the values)
            fp8 = replace(engine, quantization="fp8")
            q, _ = load_transformer(preset, fp8)
            times["ditserve_fp8"], times["ditserve_fp8_graphs"] = time_compiled(q, fp8, inputs, args.iters)
            if args.family in PRECOMPUTE:
                times["ditserve_fp8_step"], times["ditserve_fp8_step_graphs"], _ = time_step(
                    args.family, q, inputs, spec.default_steps, args.iters)
            del q
            release()
    rec["forward_ms"] = {k: round(v, 2) for k, v in times.items()}
    base = times["diffusers_regional_compile"]
    rec["ratio_vs_diffusers_compiled"] = round(times["ditserve_compiled"] / base, 3)
    if "ditserve_fp8" in times:
        rec["ratio_fp8_vs_diffusers_compiled"] = round(times["ditserve_fp8"] / base, 3)
    if "ditserve_step" in times:  # the engine's step, graphed where its default (`--cuda-graphs auto`) graphs
        from ditserve.cuda_graphs import AUTO_MAX_TOKENS

        graphs = "_graphs" if (args.size // 16) * (width // 16) <= AUTO_MAX_TOKENS else ""
        rec["steps_amortising_precompute"] = spec.default_steps
        rec["ratio_step_vs_diffusers_compiled"] = round(times["ditserve_step" + graphs] / base, 3)
        if "ditserve_fp8_step" in times:
            rec["ratio_fp8_step_vs_diffusers_compiled"] = round(times["ditserve_fp8_step" + graphs] / base, 3)
    if args.fa3_rows:  # FA3 on both sides: ours against diffusers' best row
        best = min(base, times["diffusers_regional_compile_fa3"])
        rec["ratio_fa3_vs_diffusers_best"] = round(times["ditserve_compiled_fa3"] / best, 3)
    for k, v in rec["forward_ms"].items():
        log(f"{k:32s} {v:9.2f} ms  ({v / base:.3f}x diffusers compiled)")

    if not args.skip_e2e:
        rec["e2e_bf16"] = end_to_end(preset, args.size, args.steps, None, width=width)
        log(f"end to end bf16: {rec['e2e_bf16']}")
        rec["e2e_fp8"] = end_to_end(preset, args.size, args.steps, "fp8", width=width)
        log(f"end to end fp8: {rec['e2e_fp8']}")
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
