"""LoRA adapters on any family's DiT: read the files people download, map them through the model's weight map,
merge them into the weights (`fuse`) or run them as low-rank side products chosen per request (`unfused`).

Formats (safetensors only; a pickle file is refused by name, before it is opened):

- diffusers / PEFT: `<module>.lora_A.weight` (r, in) and `<module>.lora_B.weight` (out, r), as
  `save_lora_weights` writes `pytorch_lora_weights.safetensors` (keys prefixed `transformer.`; PEFT's own
  `base_model.model.` prefix is accepted too). The scale is alpha / r with alpha from the file's
  `lora_adapter_metadata` (lora_alpha, alpha_pattern, use_rslora: alpha / sqrt(r)) or from `<module>.alpha`
  keys; with neither, 1 (diffusers' convention).
- kohya / sd-scripts: `lora_unet_<module with '_' for '.'>.lora_down.weight` / `.lora_up.weight` / `.alpha`
  (scale alpha / r, alpha defaulting to r). The module is a diffusers module name, or one of the names the
  family's original checkpoint uses (the model's optional `lora_aliases()`: original module -> the diffusers
  modules whose outputs it concatenates, e.g. a fused qkv -> to_q, to_k, to_v).

Mapping: a diffusers module `m` lands where the model's `weight_map()` puts `m.weight`: (our Linear's weight,
rows start:stop), so a LoRA on to_q / to_k / to_v lands on the right rows of a fused QKV Linear. A module the
model lacks, a wrong shape, a text-encoder key, or anything that is not a plain LoRA (DoRA, LoCon mid weights,
biases, full diffs) is refused with one ConfigError naming the key; everything is checked before anything is
applied.

Modes (`LoRAConfig.mode`):

- "fuse": W[rows] += weight * scale * B @ A for every adapter, once at load, in fp32 then cast to the weight's
  dtype (exact up to that rounding; no per-step cost). With `--quantization fp8` the merge happens before
  quantisation (the loader calls `attach` between the weight stream and `apply_fp8`). The adapters are fixed
  for the life of the engine.
- "unfused": each targeted Linear gets a `LoRASlot`: fixed-size buffers, a stacked down projection
  (P * R, in) and one up projection (rows_p, R) per row piece p of its output (a fused QKV Linear has three
  pieces), R the slot rank; piece p of the output gets + up_p @ (down_p @ x), before the activation of a Linear
  that carries one. By default ("separate") a side product is added to the output; "concat" makes the up
  projections extra columns of the Linear's own weight, so one GEMM computes [x | down x] @ [W | ups]^T. Selecting adapters writes their factors into the buffers in place
  (weights and scales folded into the up projections; several adapters stack along R), so a compiled model or
  a captured CUDA graph reads the new adapter with nothing recompiled. No adapter selected: the buffers are
  zero and the side products still run (their cost is the mode's cost). With `--quantization fp8` the slots
  are installed after quantisation: an fp8 layer's side product is a bf16 product of the rows its fp8 GEMM
  reads, dequantised (the adapter itself is not quantised).

Engine API (`Engine.lora`, a `ditserve.lora.adapters.LoRAManager`, None without LoRA): `load(name, path)`,
`unload(name)`, `info()`, `adapters` (name -> `LoRAAdapter`), and per request `SamplingParams.extra["lora"]`: a
list of (name, weight) pairs or {"name": ..., "weight": ...} dicts; absent: the adapters the engine started with,
[] none. Requests that select different adapters never share a batch (`selection` is part of the pipeline's batch
key). Only the pipeline's "transformer" component is adapted (`LORA_COMPONENT`).

What a family provides: nothing beyond its `weight_map()` (every diffusers key -> our parameter and rows) and
`ditserve.ops` Linear layers; optionally `lora_aliases()` for kohya files that use its original checkpoint's
module names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ditserve.errors import ConfigError

__all__ = ["LORA_COMPONENT", "LORA_MODES", "LORA_TARGETS", "LoRAConfig", "LoRASpec"]

LORA_MODES = ("fuse", "unfused")
LORA_TARGETS = ("auto", "all")
UNFUSED_IMPLS = ("concat", "separate")
# The model_index.json component LoRA files adapt (diffusers' `load_lora_weights` default); other DiTs of a
# pipeline (a second expert) get none.
LORA_COMPONENT = "transformer"


# ------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class LoRASpec:
    """One adapter as the engine is started with it: `path` (a .safetensors file, or a folder holding
    pytorch_lora_weights.safetensors), its `weight`, and a `name` (default: the file's stem) requests use."""

    path: str
    weight: float = 1.0
    name: str | None = None

    def __post_init__(self):
        if not math.isfinite(self.weight):
            raise ConfigError(f"--lora {self.path}: the weight must be a finite number, got {self.weight}")
        if self.name is None:
            p = Path(self.path)
            object.__setattr__(self, "name", p.stem if p.suffix else p.name)

    @classmethod
    def parse(cls, text: str) -> "LoRASpec":
        """`PATH[:WEIGHT]` (the CLI's --lora): a trailing `:number` is the weight, default 1."""
        path, sep, tail = text.rpartition(":")
        if sep and path:
            try:
                return cls(path, float(tail))
            except ValueError:
                pass  # a ':' inside the path (no weight given)
        return cls(text)


@dataclass(frozen=True)
class LoRAConfig:
    """The engine's LoRA settings (`EngineConfig.lora`).

    adapters: the adapters loaded at start (and selected by requests that name none), stacked with their weights.
    mode: "fuse" (merged into the weights at load: no per-step cost, fixed for the engine's life) or "unfused"
        (low-rank side products, adapters chosen per request; see the module docstring).
    max_rank: (unfused) the rank R of every slot; None: the sum of the start adapters' ranks (all of them active
        at once). A later adapter whose rank (stacked with the others of a request) exceeds it is refused.
    targets: (unfused) which Linear layers get slots: "auto" those the start adapters touch, "all" every Linear
        the weight map fills (for adapters loaded later that touch others).
    unfused_impl: (unfused) how a Linear adds its update (`ditserve.lora.adapters.LoRASlot`): "separate"
        (default: a side product added to the layer's output; measured faster on an H200, bench/results) or
        "concat" (one GEMM of [x | A x] against [W | B], the update inside the layer's own GEMM, whose fused
        projections carry zero-padded columns). The fp8 tier's layers always use "separate".
    """

    adapters: tuple[LoRASpec, ...] = ()
    mode: str = "fuse"
    max_rank: int | None = None
    targets: str = "auto"
    unfused_impl: str = "separate"

    def __post_init__(self):
        object.__setattr__(self, "adapters", tuple(self.adapters))
        if self.mode not in LORA_MODES:
            raise ConfigError(f"unknown --lora-mode {self.mode!r}; valid: {', '.join(LORA_MODES)}")
        if self.targets not in LORA_TARGETS:
            raise ConfigError(f"unknown LoRA targets {self.targets!r}; valid: {', '.join(LORA_TARGETS)}")
        if self.unfused_impl not in UNFUSED_IMPLS:
            raise ConfigError(f"unknown LoRA unfused_impl {self.unfused_impl!r}; valid: {', '.join(UNFUSED_IMPLS)}")
        if self.max_rank is not None and self.max_rank < 1:
            raise ConfigError(f"LoRA max_rank must be >= 1, got {self.max_rank}")
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"--lora: two adapters named {dupes[0]!r}; give files of different names")
        if self.mode == "unfused" and not self.adapters and (self.max_rank is None or self.targets != "all"):
            raise ConfigError("--lora-mode unfused with no --lora adapter at start needs LoRAConfig max_rank and "
                              "targets='all' (the slots adapters loaded later are written into)")
