"""LoRA on FLUX.1-dev (dummy weights, bf16, CUDA): the compiled DiT's step time with no adapter, with one rank-R
adapter unfused (selected, and with no adapter selected: zero slots), and fused; adapter load and swap times.
Both unfused layouts (`LoRAConfig.unfused_impl`: "concat", the default, keys without a suffix; "separate", keys
`*_separate*`). One JSON line last.

    python bench/lora.py [--size 1024] [--rank 64] [--iters 20] [--no-compile] [--fp8]
    python bench/lora.py --interleave 8 [--iters 10]

`--interleave R` is the per-step overhead measured so that GPU clock and power drift cancel: three compiled models
live at once (no adapter; the adapter fused; the adapter unfused in the default layout), timed in R rounds,
each round timing every model once (--iters calls, median) in a rotated order. It reports each model's median over
the rounds and the overhead of each round's pair (unfused / no adapter - 1, fused / no adapter - 1): their median,
min and max. (Separate runs of separately built models differed by several percent for the same GEMMs.)

The adapter is random, in diffusers' format (`transformer.<module>.lora_A/B.weight`, bf16), on the layers
trainers usually adapt: every attention projection and MLP Linear of both block kinds (the modulation Linears
are left out). Step = one transformer forward at batch 1 with the step's conditioning precomputed, as the
denoise loop calls it (CUDA events, median). Load = `LoRAManager.load` (read, map, move to the GPU, check);
swap = `LoRAManager.activate` between two selections (the in-place slot writes), synchronised. `--fp8`: the
same on the fp8 tier (fused: merged before quantisation, in a model of its own; unfused: bf16 side products).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from benchutil import commit, cuda_median_ms, flux_step_inputs, log

from ditserve.config import EngineConfig
from ditserve.lora import LoRAConfig, LoRASpec

PRESET = "flux.1-dev"


def write_adapter(folder: Path, model, rank: int, seed: int) -> Path:
    """A random rank-`rank` adapter for `model` (ours; its weight map gives the diffusers names and shapes)."""
    from safetensors.torch import save_file

    from ditserve.lora.adapters import model_targets

    wanted = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
              "ff_context.net.2", "proj_mlp", "proj_out")
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, t in model_targets(model).items():
        if "blocks." not in name or not name.endswith(wanted):
            continue
        n_in = modules[t.linear].in_features
        sd[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, n_in, generator=g) / n_in**0.5).bfloat16()
        sd[f"transformer.{name}.lora_B.weight"] = (torch.randn(t.stop - t.start, rank, generator=g) * 0.01).bfloat16()
    file = folder / f"adapter{seed}.safetensors"
    save_file(sd, str(file))
    log(f"adapter {file.name}: {len(sd) // 2} modules, {file.stat().st_size / 2**20:.0f} MiB")
    return file


def build(engine: EngineConfig, compile_: bool):
    from ditserve.loader import load_transformer

    model, _ = load_transformer(PRESET, engine)
    if compile_:
        from ditserve.compile import CompileConfig, compile_model

        compile_model(model, CompileConfig.for_engine(engine))
    return model


def step_ms(model, size: int, iters: int) -> float:
    inputs, cond = flux_step_inputs(model, size)

    def fn():
        with torch.inference_mode():
            model(**inputs, conditioning=cond)

    return cuda_median_ms(fn, iters=iters, warmup=3)


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(args, base: EngineConfig, out: dict) -> None:
    """See the module docstring: three models alive at once, timed round by round."""
    import statistics

    with tempfile.TemporaryDirectory() as tmp:
        models = {"none": build(base, args.compile)}
        file = write_adapter(Path(tmp), models["none"], args.rank, 1)
        out["adapter_mib"] = round(file.stat().st_size / 2**20, 1)
        cfg = LoRAConfig((LoRASpec(str(file), 1.0, name="a"),), mode="fuse")
        models["fused"] = build(dataclasses.replace(base, lora=cfg), args.compile)
        unfused = dataclasses.replace(cfg, mode="unfused")
        out["unfused_impl"] = unfused.unfused_impl
        models["unfused"] = build(dataclasses.replace(base, lora=unfused), args.compile)
        names = list(models)
        rounds: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.interleave):
            order = names[r % 3:] + names[:r % 3]
            for n in order:
                rounds[n].append(step_ms(models[n], args.size, args.iters))
            log(f"round {r}: " + ", ".join(f"{n} {rounds[n][-1]:.2f} ms" for n in names))
    out["rounds_ms"] = {n: [round(x, 3) for x in v] for n, v in rounds.items()}
    for n in names:
        out[f"{n}_median_ms"] = round(statistics.median(rounds[n]), 3)
    for n in ("fused", "unfused"):
        pairs = [a / b - 1 for a, b in zip(rounds[n], rounds["none"])]
        out[f"{n}_overhead"] = {"median": round(statistics.median(pairs), 4), "min": round(min(pairs), 4),
                                "max": round(max(pairs), 4)}
        log(f"{n}: overhead per round median {statistics.median(pairs):+.2%} (min {min(pairs):+.2%}, "
            f"max {max(pairs):+.2%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--fp8", action="store_true", help="the fp8 tier (--quantization fp8)")
    ap.add_argument("--interleave", type=int, default=0, metavar="R",
                    help="R interleaved rounds of three live models (see above) instead of the sequential run")
    args = ap.parse_args()
    base = EngineConfig(device="cuda", dtype="bf16", load_format="dummy", compile=args.compile,
                        quantization="fp8" if args.fp8 else None)
    out: dict = dict(bench="lora", commit=commit(), preset=PRESET, size=args.size, rank=args.rank,
                     compiled=args.compile, quantization=base.quantization, device=torch.cuda.get_device_name(),
                     torch=torch.__version__)
    if args.interleave:
        out["mode"] = "interleaved"
        interleaved(args, base, out)
        print(json.dumps(out))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = build(base, args.compile)
        files = [write_adapter(Path(tmp), model, args.rank, seed) for seed in (1, 2)]
        out["adapter_mib"] = round(files[0].stat().st_size / 2**20, 1)
        out["no_adapter_ms"] = round(step_ms(model, args.size, args.iters), 3)
        log(f"no adapter: {out['no_adapter_ms']} ms a step")

        # fuse: bf16, merged into the same (already compiled) model's weights, nothing recompiles; fp8: merged
        # before quantisation, in a model built for it
        from ditserve.lora.adapters import LoRAManager

        cfg = LoRAConfig((LoRASpec(str(files[0]), 1.0, name="a"),), mode="fuse")
        if args.fp8:
            del model
            torch.cuda.empty_cache()
            out["fuse_load_s"] = None
            model = build(dataclasses.replace(base, lora=cfg), args.compile)
        else:
            out["fuse_load_s"] = round(timed(lambda: LoRAManager.attach(model, cfg)), 3)
        out["fused_ms"] = round(step_ms(model, args.size, args.iters), 3)
        log(f"fused: {out['fused_ms']} ms a step (merge {out['fuse_load_s']} s)")
        del model
        torch.cuda.empty_cache()

        # unfused, each layout: slots for adapter a's layers at its rank, adapter b loaded later (same layers)
        for impl in ("concat", "separate"):
            key = "" if impl == "concat" else f"_{impl}"  # the default layout's keys carry no suffix
            engine = dataclasses.replace(base, lora=dataclasses.replace(cfg, mode="unfused", unfused_impl=impl))
            model = build(engine, args.compile)
            lora = model.lora
            out[f"unfused{key}_ms"] = round(step_ms(model, args.size, args.iters), 3)
            out[f"load{key}_s"] = round(timed(lambda: lora.load("b", str(files[1]))), 3)
            swaps = []
            for sel in ((("b", 0.8),), (("a", 1.0),)) * 3:
                swaps.append(timed(lambda: lora.activate(sel)))
            out[f"swap{key}_s"] = round(sorted(swaps)[len(swaps) // 2], 4)
            lora.activate(())
            out[f"unfused{key}_none_ms"] = round(step_ms(model, args.size, args.iters), 3)
            out[f"unfused{key}_overhead"] = round(out[f"unfused{key}_ms"] / out["no_adapter_ms"] - 1, 4)
            log(f"unfused ({impl}): {out[f'unfused{key}_ms']} ms a step with the adapter, "
                f"{out[f'unfused{key}_none_ms']} ms with none selected; load {out[f'load{key}_s']} s, "
                f"swap {out[f'swap{key}_s']} s")
            del model, lora
            torch.cuda.empty_cache()
    out["fused_overhead"] = round(out["fused_ms"] / out["no_adapter_ms"] - 1, 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
