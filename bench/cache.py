"""DiT cache presets: denoise speed on the GPU, image quality on a trained model. One JSON line last on stdout.

speed (GPU): FLUX.1-dev with dummy (random, full-size) weights, 1024x1024, bf16, regionally compiled once; the
    denoise loop (the pipeline's own `denoise`, scheduler included) timed at 28 and 50 steps uncached and with
    each preset, plus each preset's ceiling (threshold inf: every step its warmup and cap allow is cached,
    the speed a model whose steps change little would get; random weights say nothing about how often a
    real model's steps pass the threshold). Reports compile and warmup seconds, denoise seconds, speedups
    over uncached and computed/cached steps. With --cache-dit, cache-dit's DBCache with the same settings on
    the same model, side by side (speed; latent PSNR against the uncached run, meaningless for quality on
    random weights but the same measure for both).

quality (CPU is enough): a small FLUX trained by scripts/train_cache_testbed.py (learned dynamics); for >= 16
    prompts and seeds, PSNR and SSIM of each preset's image against the uncached image, at 28 and 50 steps,
    with computed/cached steps and the CPU denoise speedup. Baseline: PSNR/SSIM between two seeds' uncached
    images of the same prompt (what "a different picture" scores). With --cache-dit, cache-dit beside ours.

    python bench/cache.py speed --cache-dit                                       # GPU, ~3 min on an H100
    python scripts/train_cache_testbed.py && python bench/cache.py quality --model /tmp/ditserve-cache-testbed
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from statistics import mean

import torch
from benchutil import commit, log

PRESET_NAMES = ("fbcache-safe", "fbcache-fast", "dbcache-safe", "dbcache-fast")
CEILING_THRESHOLD = math.inf  # cache every step the warmup and cap allow



def latent_psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of latents in dB, with the reference's peak-to-peak range as the data range."""
    x, ref = x.float(), ref.float()
    mse = float(((x - ref) ** 2).mean())
    rng = float(ref.max() - ref.min())
    return math.inf if mse == 0 else 10 * math.log10(rng**2 / mse)


def build_pipeline(model: str, engine):
    from ditserve.loader import load_model
    from ditserve.pipelines.flux import FluxPipeline

    loaded = load_model(model, engine)
    return FluxPipeline(loaded.components, engine, FluxPipeline.spec_for(loaded.name, loaded.components))


def use_cache(pipe, settings, backend: str = "ditserve"):
    """Use `settings` (None: no cache) with `backend` for the pipeline's next requests; returns the cache.
    cache-dit is mounted once per pipeline (it patches the model for good): later calls swap its settings,
    which the pipeline's per-request reset loads into a fresh cache-dit context."""
    from ditserve.cache import cache_dit, mount_cache

    mount_cache(pipe.transformer, None)  # ours off
    if backend == "cache-dit":
        cd = getattr(pipe, "_bench_cache_dit", None)
        if cd is None:
            cd = pipe._bench_cache_dit = cache_dit.mount(pipe.transformer, settings)
        cd.settings = settings
        pipe.cache = cd
    else:
        if getattr(pipe, "_bench_cache_dit", None) is not None:
            raise RuntimeError("cache-dit is mounted on this pipeline's model: run ditserve's configs first")
        pipe.cache = mount_cache(pipe.transformer, settings)
    return pipe.cache


# ------------------------------------------------------------------------------------------------ speed


def speed(args) -> dict:
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("bench/cache.py speed needs a CUDA GPU (or --device cpu for a smoke run)")
    from dataclasses import replace

    from ditserve.cache import parse_cache
    from ditserve.config import EngineConfig

    engine = EngineConfig(device=args.device, dtype="bf16" if cuda else "fp32", load_format="dummy",
                          compile=not args.no_compile)
    t0 = time.perf_counter()
    pipe = build_pipeline(args.model, engine)
    rec: dict = {"load_s": round(time.perf_counter() - t0, 1)}
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with torch.inference_mode():
        text = pipe.encode_prompt(["a red circle on a blue background"], 1, pipe.spec.max_sequence_length)
        latents = pipe.prepare_latents(1, args.height, args.width, seed=0)
        L = latents.latents.shape[1]
        guidance = pipe.spec.default_guidance

        def run(steps: int) -> tuple[float, torch.Tensor]:
            schedule = pipe.timesteps(steps, L)
            sync()
            start = time.perf_counter()
            out = pipe.denoise(latents, text, schedule, guidance, progress=False)
            sync()
            return time.perf_counter() - start, out

        # Compile (first forward), then a full warm run at the first step count: what a server's warmup does.
        steps_list = [int(s) for s in args.steps.split(",")]
        rec["compile_and_warmup_s"] = round(run(steps_list[0])[0], 2)
        configs = [("uncached", None, "ditserve")]
        for name in args.presets.split(";"):
            s = parse_cache(name)
            configs.append((name, s, "ditserve"))
            if not args.no_ceiling and s.threshold != math.inf:
                configs.append((f"{name}:ceiling", replace(s, threshold=CEILING_THRESHOLD), "ditserve"))
        if args.cache_dit:
            for name in args.presets.split(";"):
                configs.append((f"cache-dit:{name}", parse_cache(name), "cache-dit"))
        rows, ref = [], {}
        for label, settings, backend in configs:
            first_cache_dit = backend == "cache-dit" and getattr(pipe, "_bench_cache_dit", None) is None
            cache = use_cache(pipe, settings, backend)  # (cache-dit rows come last: it stays mounted)
            if first_cache_dit:  # an untimed run: whatever cache-dit's first call compiles or sets up
                rec["cache_dit_first_run_s"] = round(run(steps_list[0])[0], 2)
            for steps in steps_list:
                seconds, out = run(steps)
                row = {"config": label, "backend": backend, "steps": steps, "denoise_s": round(seconds, 3)}
                if cache is not None:
                    row.update(settings=settings.spec(), **cache.stats().as_dict())
                if settings is None:
                    ref[steps] = (seconds, out)
                else:
                    row["speedup"] = round(ref[steps][0] / seconds, 3)
                    row["latent_psnr_db"] = round(latent_psnr(out, ref[steps][1]), 2)
                rows.append(row)
                log(json.dumps(row))
    rec["rows"] = rows
    if cuda:
        rec["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return rec


# ---------------------------------------------------------------------------------------------- quality


def quality(args) -> dict:
    from dataclasses import replace

    from ditserve.cache import parse_cache
    from ditserve.cache.quality import psnr, ssim
    from ditserve.config import EngineConfig, SamplingParams

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from train_cache_testbed import TEXT_LEN, all_prompts

    info_file = Path(args.model) / "testbed.json"
    info = json.loads(info_file.read_text()) if info_file.is_file() else {}
    size = int(info.get("image_size", 128))
    prompts = all_prompts()
    prompts = [prompts[i * len(prompts) // args.prompts] for i in range(args.prompts)]  # spread over the set
    engine = EngineConfig(device=args.device, dtype="fp32")
    pipe = build_pipeline(args.model, engine)
    cd_pipe = build_pipeline(args.model, engine) if args.cache_dit else None
    steps_list = [int(s) for s in args.steps.split(",")]

    def request(prompt: str, seed: int, steps: int) -> SamplingParams:
        return SamplingParams(prompt=prompt, height=size, width=size, steps=steps, seed=seed,
                              max_sequence_length=TEXT_LEN)

    configs = [(name, parse_cache(name), "ditserve") for name in args.presets.split(";")]
    if not args.no_ceiling:
        configs += [(f"{name}:ceiling", replace(parse_cache(name), threshold=CEILING_THRESHOLD), "ditserve")
                    for name in args.presets.split(";")]
    if args.cache_dit:
        configs += [(f"cache-dit:{name}", parse_cache(name), "cache-dit") for name in args.presets.split(";")]
    rows, baseline = [], {}
    for steps in steps_list:
        use_cache(pipe, None)
        refs, ref_s = [], 0.0
        for i, prompt in enumerate(prompts):
            r = pipe.generate(request(prompt, i, steps), progress=False)
            refs.append(r.images[0])
            ref_s += r.timings["denoise_s"]
        other = [pipe.generate(request(p, 1000 + i, steps), progress=False).images[0] for i, p in enumerate(prompts)]
        baseline[steps] = {"psnr_mean": round(mean(psnr(a, b) for a, b in zip(other, refs)), 2),
                           "ssim_mean": round(mean(ssim(a, b) for a, b in zip(other, refs)), 4)}
        log(f"{steps} steps: uncached denoise {ref_s:.2f} s; two seeds of a prompt: {baseline[steps]}")
        for label, settings, backend in configs:
            p = cd_pipe if backend == "cache-dit" else pipe
            use_cache(p, settings, backend)
            ps, ss, secs, computed, cached = [], [], 0.0, 0, 0
            for i, prompt in enumerate(prompts):
                r = p.generate(request(prompt, i, steps), progress=False)
                ps.append(psnr(r.images[0], refs[i]))
                ss.append(ssim(r.images[0], refs[i]))
                secs += r.timings["denoise_s"]
                computed += r.cache_stats["computed"]
                cached += r.cache_stats["cached"]
            finite = [x for x in ps if math.isfinite(x)]
            row = {"config": label, "backend": backend, "steps": steps, "settings": settings.spec(),
                   "psnr_mean": round(mean(finite), 2) if finite else math.inf,
                   "psnr_min": round(min(ps), 2), "identical_images": len(ps) - len(finite),
                   "ssim_mean": round(mean(ss), 4), "ssim_min": round(min(ss), 4),
                   "computed_per_image": round(computed / len(prompts), 2),
                   "cached_per_image": round(cached / len(prompts), 2),
                   "cpu_denoise_speedup": round(ref_s / secs, 3)}
            rows.append(row)
            log(json.dumps(row))
    return {"model": str(args.model), "testbed": info, "prompts": len(prompts), "image_size": size,
            "baseline_two_seeds": baseline, "rows": rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["speed", "quality"])
    ap.add_argument("--model", default=None,
                    help="speed: a preset for dummy weights (default flux.1-dev); quality: the trained testbed "
                         "folder (default /tmp/ditserve-cache-testbed)")
    ap.add_argument("--steps", default="28,50", help="comma-separated step counts")
    ap.add_argument("--presets", default=";".join(PRESET_NAMES), help="semicolon-separated --cache specs")
    ap.add_argument("--no-ceiling", action="store_true", help="no threshold-inf ceiling run per preset")
    ap.add_argument("--cache-dit", action="store_true", help="also run cache-dit with the same settings")
    ap.add_argument("--height", type=int, default=1024, help="speed: image height")
    ap.add_argument("--width", type=int, default=1024, help="speed: image width")
    ap.add_argument("--no-compile", action="store_true", help="speed: eager instead of regional compile")
    ap.add_argument("--prompts", type=int, default=16, help="quality: prompts (one seed each)")
    ap.add_argument("--device", default=None, help="device (default: cuda for speed, cpu for quality)")
    ap.add_argument("--out", default=None, help="also write the JSON record to this file")
    args = ap.parse_args()
    if args.model is None:
        args.model = "flux.1-dev" if args.mode == "speed" else "/tmp/ditserve-cache-testbed"
    if args.device is None:
        args.device = "cuda" if args.mode == "speed" else "cpu"

    import diffusers

    start = time.perf_counter()
    rec = {"bench": f"cache-{args.mode}", "commit": commit(), "torch": torch.__version__,
           "diffusers": diffusers.__version__,
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
           "steps": args.steps, "presets": args.presets}
    rec.update(speed(args) if args.mode == "speed" else quality(args))
    rec["wall_s"] = round(time.perf_counter() - start, 1)
    line = json.dumps(rec)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
