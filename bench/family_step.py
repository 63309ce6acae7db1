"""One DiT family's forward and end-to-end image: ditserve beside diffusers, in one process, same weights.

    python bench/family_step.py --family z-image [--size 1024] [--text-len 128] [--iters 10] [--steps 8]
    python bench/family_step.py --family flux.1-dev --text-len 512

For the family's preset (random weights at full size, bf16, GPU):
  0. cold start: a fresh child process with an empty inductor cache builds the dummy DiT, compiles it as the
     engine does (regional, dynamic shapes "auto") and runs one forward: "cold compile + first forward";
  1. diffusers' transformer class built from the preset's config, random weights, and ours loaded from its
     state dict (the loader's weight map): output relative error;
  2. one forward (CUDA events, median of --iters): diffusers eager, diffusers regional compile
     (`compile_repeated_blocks`), ditserve compiled (the engine's path), ditserve fp8 (`--quantization fp8`)
     compiled, each also replayed from a CUDA graph (`_graphs`);
  3. end to end: `Engine.load(preset, dummy, compile)` -> warmup -> a --steps image at --size (text encode,
     denoise, decode), the engine's default path and the fp8 tier.
Prints one JSON line last (ratio_vs_diffusers_compiled = ditserve compiled ms / diffusers regional compile ms).
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


def _flux_adapter(config: dict, size: int, text_len: int, device, dtype):
    from diffusers import FluxTransformer2DModel

    from ditserve.models.flux import FluxConfig, flux_example_inputs

    ours_inputs = flux_example_inputs(FluxConfig.from_diffusers(config), size, size, text_len=text_len,
                                      device=device, dtype=dtype)

    def call_ref(model):
        return model(**ours_inputs, return_dict=False)[0]

    return FluxTransformer2DModel, ours_inputs, call_ref


def _z_image_adapter(config: dict, size: int, text_len: int, device, dtype):
    from diffusers import ZImageTransformer2DModel

    from ditserve.models.z_image import ZImageConfig, ZImageTransformer

    ours_inputs = ZImageTransformer.example_inputs(ZImageConfig.from_diffusers(config), size, size,
                                                   text_len=text_len, device=device, dtype=dtype)
    x = list(ours_inputs["hidden_states"].unsqueeze(2).unbind(0))  # B x (C, 1, h, w)
    caps = list(ours_inputs["encoder_hidden_states"].unbind(0))  # B x (T, D)

    def call_ref(model):
        return torch.stack(model(x, ours_inputs["timestep"], caps, return_dict=False)[0]).squeeze(2)

    return ZImageTransformer2DModel, ours_inputs, call_ref


FAMILIES = {"flux.1-dev": _flux_adapter, "z-image": _z_image_adapter}
PRESET = {"flux.1-dev": "flux.1-dev", "z-image": "z-image-turbo"}


# ------------------------------------------------------------------------------------------ measures


def cold_start(preset: str, size: int, text_len: int) -> float:
    """Seconds for a fresh process with an empty compile cache to build, compile and run one forward."""
    code = f"""
import time, torch
from ditserve.config import EngineConfig
from ditserve.loader import load_transformer
from ditserve.compile import CompileConfig, compile_model
e = EngineConfig(device="cuda", dtype="bf16", load_format="dummy", compile=True)
m, _ = load_transformer({preset!r}, e)
inputs = m.example_inputs(m.config, {size}, {size}, text_len={text_len}, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize(); t0 = time.perf_counter()
compile_model(m, CompileConfig.for_engine(e))
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


def release() -> None:
    """Free what the last measurement left on the GPU before the next one allocates."""
    gc.collect()
    torch.cuda.empty_cache()


def time_compiled(model, engine, inputs: dict, iters: int) -> tuple[float, float]:
    """Compile `model` as the engine does, then (ms a forward, ms a forward replayed from a CUDA graph)."""
    from ditserve.compile import CompileConfig, compile_model

    compile_model(model, CompileConfig.for_engine(engine))

    def call():
        return model(**inputs)

    return cuda_median_ms(call, iters, 2), cuda_median_ms(graphed(call), iters, 2)


def end_to_end(preset: str, size: int, steps: int, quantization: str | None, runs: int = 3) -> dict:
    from ditserve.config import EngineConfig, SamplingParams
    from ditserve.engine import Engine

    cfg = EngineConfig(device="cuda", dtype="bf16", load_format="dummy", compile=True, quantization=quantization)
    t0 = time.perf_counter()
    engine = Engine.load(preset, cfg)
    load_s = time.perf_counter() - t0
    warm_s = engine.warmup(size, size, steps)
    req = SamplingParams(prompt="a red apple on a wooden table, studio light", height=size, width=size,
                         steps=steps, seed=0)
    first = engine.generate(req)
    outs = [engine.generate(req) for _ in range(runs)]
    totals = sorted(o.timings["total_s"] for o in outs)
    rec = {"load_s": round(load_s, 2), "warmup_s": round(warm_s, 2),
           "first_request_s": round(first.timings["total_s"], 4), "image_s": round(totals[len(totals) // 2], 4),
           "stages_s": {k: round(outs[-1].timings[k], 4) for k in ("text_encode_s", "denoise_s", "decode_s")},
           "peak_gib": round(max(o.peak_memory_bytes for o in outs) / 2**30, 2)}
    del engine
    release()
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), required=True)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--text-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()

    from ditserve import registry
    from ditserve.config import EngineConfig
    from ditserve.loader import load_transformer

    device, dtype = torch.device("cuda"), torch.bfloat16
    preset = PRESET[args.family]
    rec: dict = {"bench": "family_step", "family": args.family, "preset": preset, "commit": commit(),
                 "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "size": args.size,
                 "text_len": args.text_len}
    import diffusers
    rec["diffusers"] = diffusers.__version__

    if not args.skip_cold:
        rec["cold_compile_first_forward_s"] = round(cold_start(preset, args.size, args.text_len), 2)
        log(f"cold compile + first forward: {rec['cold_compile_first_forward_s']} s")

    spec = registry.preset(preset)
    class_name, config = spec.components["transformer"]
    ref_cls, inputs, call_ref = FAMILIES[args.family](config, args.size, args.text_len, device, dtype)
    with torch.device(device):
        ref = ref_cls.from_config(config).to(dtype).eval().requires_grad_(False)
    engine = EngineConfig(device="cuda", dtype="bf16", load_format="dummy", compile=True)
    ours, _ = load_transformer(preset, engine)
    ours.load_diffusers_state_dict(ref.state_dict())
    times = {}
    with torch.inference_mode():
        run_ref = functools.partial(call_ref, ref)
        want, got = run_ref().float(), ours(**inputs).float()
        rec["rel_err_vs_diffusers"] = round(((got - want).norm() / want.norm()).item(), 5)
        times["diffusers_eager"] = cuda_median_ms(run_ref, args.iters, 2)
        ref.compile_repeated_blocks(fullgraph=True)
        t0 = time.perf_counter()
        run_ref()
        torch.cuda.synchronize()
        rec["diffusers_regional_compile_s"] = round(time.perf_counter() - t0, 2)
        times["diffusers_regional_compile"] = cuda_median_ms(run_ref, args.iters, 2)
        del ref, run_ref
        release()
        times["ditserve_compiled"], times["ditserve_compiled_graphs"] = time_compiled(ours, engine, inputs, args.iters)
        del ours
        release()
        # the fp8 tier (its own dummy weights: the speed does not depend on the values)
        fp8 = replace(engine, quantization="fp8")
        q, _ = load_transformer(preset, fp8)
        times["ditserve_fp8"], times["ditserve_fp8_graphs"] = time_compiled(q, fp8, inputs, args.iters)
        del q
        release()
    rec["forward_ms"] = {k: round(v, 2) for k, v in times.items()}
    base = times["diffusers_regional_compile"]
    rec["ratio_vs_diffusers_compiled"] = round(times["ditserve_compiled"] / base, 3)
    rec["ratio_fp8_vs_diffusers_compiled"] = round(times["ditserve_fp8"] / base, 3)
    for k, v in rec["forward_ms"].items():
        log(f"{k:32s} {v:9.2f} ms  ({v / base:.3f}x diffusers compiled)")

    if not args.skip_e2e:
        rec["e2e_bf16"] = end_to_end(preset, args.size, args.steps, None)
        log(f"end to end bf16: {rec['e2e_bf16']}")
        rec["e2e_fp8"] = end_to_end(preset, args.size, args.steps, "fp8")
        log(f"end to end fp8: {rec['e2e_fp8']}")
    print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
