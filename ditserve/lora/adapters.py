"""LoRA adapters at run time: reading files, mapping them through a model's weight map, fusing, and the unfused
mode's slots and manager (the package docstring, `ditserve.lora`, describes formats, modes and the engine API).
This module imports torch; `ditserve.lora` itself (the settings) does not."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.errors import ConfigError
from ditserve.lora import LoRAConfig, LoRASpec
from ditserve.ops.fp8 import Fp8Linear
from ditserve.ops.linear import Linear

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes into a folder
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Key prefixes of the DiT's entries: diffusers' pipeline files, PEFT's save_pretrained, original checkpoints.
_PREFIXES = ("transformer.", "base_model.model.", "model.diffusion_model.", "diffusion_model.")
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
_TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te")


# ---------------------------------------------------------------------------------------------- reading files


def _resolve_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / DIFFUSERS_FILE).is_file():
            return p / DIFFUSERS_FILE
        found = sorted(p.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise ConfigError(f"--lora {path}: a folder must hold {DIFFUSERS_FILE} or exactly one .safetensors file "
                          f"(found {len(found)})")
    if p.suffix.lower() in _PICKLE_SUFFIXES:
        raise ConfigError(f"--lora {path}: a pickle file ({p.suffix}); ditserve reads LoRA adapters as safetensors "
                          f"only (unpickling can run arbitrary code)")
    if not p.is_file():
        raise ConfigError(f"--lora {path}: no such file")
    return p


def read_lora_file(path: str | Path, device: torch.device | str = "cpu"
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors on `device`, in the file's dtype; the file's string metadata) of a LoRA safetensors file.
    ConfigError for a pickle file, a missing file or one that is not safetensors."""
    from safetensors import SafetensorError, safe_open

    file = _resolve_file(path)
    try:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"--lora {path}: not a readable safetensors file ({e})") from None


# ------------------------------------------------------------------------------------------- the model's names


@dataclass(frozen=True)
class Target:
    """Where a diffusers module lands: our Linear `linear` (module name), output rows [start, stop)."""

    linear: str
    start: int
    stop: int


def model_targets(model: nn.Module) -> dict[str, Target]:
    """Every diffusers Linear module name of `model`'s weight map -> its Target (only weights that fill the
    weight of one of our Linear layers, or of the fp8 tier's `Fp8Linear` that replaced one)."""
    out = {}
    modules = dict(model.named_modules())
    for key, (param, start, stop) in model.weight_map().items():
        if not (key.endswith(".weight") and param.endswith(".weight")):
            continue
        linear = param[: -len(".weight")]
        layer = modules.get(linear)
        if not isinstance(layer, (Linear, Fp8Linear)):
            continue
        rows = layer.out_features
        out[key[: -len(".weight")]] = Target(linear, 0 if start is None else start, rows if stop is None else stop)
    return out


def _aliases(model: nn.Module) -> dict[str, tuple[str, ...]]:
    fn = getattr(model, "lora_aliases", None)
    return dict(fn()) if fn is not None else {}


# ------------------------------------------------------------------------------------------------- adapters


@dataclass
class Factor:
    """One low-rank update of one row piece: rows [start, stop) of Linear `linear` get + scale * up @ down,
    with down (r, in) and up (stop - start, r) as the file holds them (its dtype) and `scale` the adapter's own
    (alpha / r, or alpha / sqrt(r) for rsLoRA). `key` is the file's key it came from (for messages)."""

    linear: str
    start: int
    stop: int
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    key: str

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class LoRAAdapter:
    """A parsed adapter: its `name`, `path`, `format` ("diffusers" or "kohya") and its factors."""

    name: str
    path: str
    format: str
    factors: list[Factor] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)  # rank, layers, bytes as parsed, for listings

    @property
    def rank(self) -> int:
        """The largest rank this adapter uses on any one row piece."""
        ranks: dict[tuple[str, int], int] = {}
        for f in self.factors:
            ranks[(f.linear, f.start)] = ranks.get((f.linear, f.start), 0) + f.rank
        return max(ranks.values(), default=0)

    @property
    def linears(self) -> set[str]:
        return {f.linear for f in self.factors}

    @property
    def nbytes(self) -> int:
        return sum(f.down.nbytes + f.up.nbytes for f in self.factors)

    def to(self, device: torch.device, dtype: torch.dtype) -> "LoRAAdapter":
        for f in self.factors:
            f.down, f.up = f.down.to(device, dtype), f.up.to(device, dtype)
        return self


def _strip(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


# Key endings of what is not a plain LoRA pair (refused, naming the key).
_UNSUPPORTED = ((".lora_mid.weight", "LoCon / LyCORIS mid weights"), (".dora_scale", "DoRA"),
                (".lora_magnitude_vector", "DoRA"), (".lora_magnitude_vector.weight", "DoRA"),
                (".diff", "full weight differences"), (".diff_b", "bias differences"), (".lora_B.bias", "LoRA biases"),
                (".lora_up.bias", "LoRA biases"))
_UNSUPPORTED_PARTS = ((".lokr_", "LoKr"), (".hada_", "LoHa"))


def _metadata_alphas(metadata: dict[str, str], where: str) -> tuple[float | None, dict[str, float], bool]:
    """(lora_alpha, alpha_pattern, use_rslora) of diffusers' `lora_adapter_metadata` (keys prefixed
    'transformer.' in a pipeline's file, bare in a model's), or (None, {}, False)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, {}, False
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise ConfigError(f"{where}: its lora_adapter_metadata is not valid JSON") from None
    meta = {k[len("transformer."):] if k.startswith("transformer.") else k: v for k, v in meta.items()}
    if meta.get("use_dora"):
        raise ConfigError(f"{where}: a DoRA adapter (use_dora in its metadata); only plain LoRA is supported")
    alpha = meta.get("lora_alpha")
    return (None if alpha is None else float(alpha)), dict(meta.get("alpha_pattern") or {}), bool(
        meta.get("use_rslora"))


def _pattern_value(module: str, pattern: dict[str, float]) -> float | None:
    """PEFT's pattern lookup: the first entry whose key (a regular expression) matches a '.'-bounded suffix of
    the module name."""
    for key, value in pattern.items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", module) is not None
        except re.error:
            hit = module == key or module.endswith("." + key)
        if hit:
            return float(value)
    return None


def parse_adapter(tensors: dict[str, torch.Tensor], metadata: dict[str, str], model: nn.Module, name: str,
                  path: str = "") -> LoRAAdapter:
    """Map a LoRA state dict onto `model` (its weight map and optional `lora_aliases`) -> a LoRAAdapter whose
    factors are views of `tensors`. Raises ConfigError naming the first key that cannot apply; nothing is applied."""
    where = f"--lora {path or name}"
    if not tensors:
        raise ConfigError(f"{where}: the file holds no tensors")
    for key in tensors:
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            raise ConfigError(f"{where}: key {key!r} is a text-encoder LoRA; ditserve applies LoRA to the DiT only")
        what = next((w for end, w in _UNSUPPORTED if key.endswith(end)), None) or next(
            (w for part, w in _UNSUPPORTED_PARTS if part in key), None)
        if what is not None:
            raise ConfigError(f"{where}: key {key!r} holds {what}; only plain LoRA (A/B or down/up) is supported")
    kohya = any(k.endswith(".lora_down.weight") for k in tensors)
    targets, aliases = model_targets(model), _aliases(model)
    modules = {layer.linear: layer for layer in targets.values()}
    linear_inputs = {n: m.in_features for n, m in model.named_modules() if n in modules}
    adapter = LoRAAdapter(name=name, path=str(path), format="kohya" if kohya else "diffusers")
    pairs = _kohya_pairs(tensors, aliases, targets, where) if kohya else _diffusers_pairs(tensors, metadata, where)
    for module, key, down, up, scale in pairs:
        pieces = _pieces(module, targets, aliases, key, where)
        in_features = linear_inputs[pieces[0].linear]
        rows = sum(p.stop - p.start for p in pieces)
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != up.shape[1]:
            raise ConfigError(f"{where}: key {key!r}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a "
                              f"LoRA pair (r, in) / (out, r)")
        if down.shape[1] != in_features or up.shape[0] != rows:
            raise ConfigError(f"{where}: key {key!r}: shapes down {tuple(down.shape)}, up {tuple(up.shape)} do not "
                              f"fit module {module!r} (in {in_features}, out {rows}): an adapter for another "
                              f"model or size")
        row = 0
        for p in pieces:  # a fused source (kohya qkv) splits its up rows over the pieces, sharing down
            n = p.stop - p.start
            adapter.factors.append(Factor(p.linear, p.start, p.stop, down, up[row:row + n], scale, key))
            row += n
    seen: dict[tuple[str, int], str] = {}
    for f in adapter.factors:
        other = seen.setdefault((f.linear, f.start), f.key)
        if other != f.key:
            raise ConfigError(f"{where}: keys {other!r} and {f.key!r} both adapt the same weight ({f.linear} rows "
                              f"{f.start}:{f.stop})")
    adapter.stats = dict(rank=adapter.rank, layers=len(adapter.linears), bytes=adapter.nbytes)
    return adapter


def _diffusers_pairs(tensors, metadata, where):
    """(diffusers module, key, down, up, scale) of a diffusers / PEFT state dict."""
    lora_alpha, alpha_pattern, rslora = _metadata_alphas(metadata, where)
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = _strip(key)
        for suffix, part in ((".lora_A.weight", "A"), (".lora_B.weight", "B"), (".lora_A.default.weight", "A"),
                             (".lora_B.default.weight", "B"), (".alpha", "alpha")):
            if k.endswith(suffix):
                entry = modules.setdefault(k[: -len(suffix)], {})
                entry[part] = t
                if part == "A" or "key" not in entry:  # messages name the module's lora_A key
                    entry["key"] = key
                break
        else:
            raise ConfigError(f"{where}: key {key!r} is not a LoRA weight (expected <module>.lora_A.weight, "
                              f".lora_B.weight or .alpha, or kohya's .lora_down/.lora_up)")
    out = []
    for module, parts in modules.items():
        if "A" not in parts or "B" not in parts:
            raise ConfigError(f"{where}: key {parts['key']!r}: module {module!r} lacks its "
                              f"{'lora_B' if 'A' in parts else 'lora_A'} weight")
        r = parts["A"].shape[0]
        if "alpha" in parts:
            alpha = float(parts["alpha"])
        else:
            alpha = _pattern_value(module, alpha_pattern)
            alpha = lora_alpha if alpha is None else alpha
        scale = 1.0 if alpha is None else alpha / (math.sqrt(r) if rslora else r)
        out.append((module, parts["key"], parts["A"], parts["B"], scale))
    return out


def _kohya_pairs(tensors, aliases, targets, where):
    """(module name: diffusers or alias, key, down, up, scale) of a kohya / sd-scripts state dict. Module names
    come with '_' for '.' (`lora_unet_double_blocks_0_img_attn_qkv`) or dotted (`diffusion_model.layers.0.
    attention.qkv`), in diffusers' naming or the original checkpoint's (the family's `lora_aliases`)."""
    dotted = {*targets, *aliases}
    names = {m.replace(".", "_"): m for m in dotted}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        part = next((p for p in ("lora_down.weight", "lora_up.weight", "alpha") if key.endswith("." + p)), None)
        if part is None:
            raise ConfigError(f"{where}: key {key!r} is not a kohya LoRA weight (.lora_down.weight, "
                              f".lora_up.weight, .alpha)")
        base = key[: -len(part) - 1]
        modules.setdefault(base, {"key": f"{base}.lora_down.weight"})[part] = t
    out = []
    for base, parts in modules.items():
        stem = _strip(base).replace(".default", "")
        for prefix in _KOHYA_PREFIXES:
            if stem.startswith(prefix):
                stem = stem[len(prefix):]
                break
        module = stem if stem in dotted else names.get(stem)
        if module is None:
            raise ConfigError(f"{where}: key {parts['key']!r} names module {stem!r}, which this model does not have")
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ConfigError(f"{where}: key {parts['key']!r}: module {stem!r} lacks its lora_down or lora_up weight")
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if down.dim() == 4:  # kohya saves 1x1 convs for some Linear layers
            down, up = down.flatten(1), up.flatten(1)
        r = down.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(r)
        out.append((module, parts["key"], down, up, alpha / r))
    return out


def _pieces(module: str, targets: dict[str, Target], aliases: dict[str, tuple[str, ...]], key: str,
            where: str) -> list[Target]:
    """The Targets a module's output rows land on, in order (an alias: its diffusers modules' concatenation)."""
    names = aliases.get(module, (module,))
    missing = [n for n in names if n not in targets]
    if missing:
        raise ConfigError(f"{where}: key {key!r} names module {missing[0]!r}, which this model does not have "
                          f"(or which is not a Linear layer)")
    pieces = [targets[n] for n in names]
    if len({p.linear for p in pieces}) > 1:
        raise ConfigError(f"{where}: key {key!r}: module {module!r} spans several of this model's layers")
    return pieces


def load_adapter(spec: LoRASpec, model: nn.Module, device: torch.device | str = "cpu") -> LoRAAdapter:
    """Read and map `spec`'s file onto `model` (factors on `device`, in the file's dtype)."""
    tensors, metadata = read_lora_file(spec.path, device)
    return parse_adapter(tensors, metadata, model, spec.name, spec.path)


# --------------------------------------------------------------------------------------------- fuse mode


@torch.no_grad()
def fuse_adapters(model: nn.Module, adapters: list[tuple[LoRAAdapter, float]]) -> None:
    """W[rows] += sum over factors of weight * scale * up @ down, for every row piece any factor of any
    (adapter, weight) touches: one piece at a time (its stacked factors in one fp32 product on the weight's
    device, then cast once), so only one piece's fp32 delta exists at a time. Every adapter was checked when
    parsed, so this cannot fail half-way on a user error."""
    modules = dict(model.named_modules())
    pieces: dict[tuple[str, int, int], list[tuple[Factor, float]]] = {}
    for adapter, weight in adapters:
        for f in adapter.factors:
            pieces.setdefault((f.linear, f.start, f.stop), []).append((f, weight))
    for (linear, start, stop), factors in pieces.items():
        rows = modules[linear].weight[start:stop]  # (stop - start, in)
        f32 = dict(device=rows.device, dtype=torch.float32)
        up = torch.cat([f.up.to(**f32) * (w * f.scale) for f, w in factors], dim=1)  # (stop - start, sum r)
        down = torch.cat([f.down.to(**f32) for f, _ in factors])  # (sum r, in)
        rows.copy_(rows.float().addmm_(up, down))


# ------------------------------------------------------------------------------------------- unfused mode


class LoRASlot(nn.Module):
    """The run-time low-rank product of one Linear: `pieces` are its output row ranges (start, stop), sorted and
    disjoint (a fused QKV Linear has three); `down` (P * R, in) stacks each piece's down projection; `ups[p]`
    (stop - start, R) is piece p's up projection (scale and adapter weight folded in). Written in place only
    (`LoRAManager.activate`), so compiled graphs and CUDA graphs read the new values.

    Two layouts (`LoRAConfig.unfused_impl`):
    - "separate": the ups are buffers of their own; `delta(x)` -> (..., out) is added to the layer's output
      (zero on rows no piece covers). Costs the up products' outputs and an add over the layer's output.
    - "concat": the Linear's weight becomes the first `in` columns of `weight_aug` (out, in + P * R) and the ups
      are blocks of its other columns (piece p: rows start:stop, columns in + p R .. in + (p + 1) R), so the
      layer computes [x | down x] @ weight_aug^T in one GEMM: the update costs P * R more columns of K and a
      copy of x, and no pass over the layer's output.
    """

    def __init__(self, layer: nn.Module, pieces: list[tuple[int, int]], rank: int, device: torch.device,
                 dtype: torch.dtype, concat: bool):
        super().__init__()
        n_in, n_out = layer.in_features, layer.out_features
        self.in_features, self.out_features, self.rank, self.concat = n_in, n_out, rank, concat
        self.pieces = tuple(pieces)
        self.register_buffer("down", torch.zeros(len(pieces) * rank, n_in, device=device, dtype=dtype))
        if concat:
            aug = torch.zeros(n_out, n_in + len(pieces) * rank, device=device, dtype=dtype)
            aug[:, :n_in].copy_(layer.weight.detach())
            self.register_buffer("weight_aug", aug)
            layer.weight = nn.Parameter(aug[:, :n_in], requires_grad=False)  # (out, in) view: one copy
        else:
            for p, (start, stop) in enumerate(pieces):
                self.register_buffer(f"up{p}", torch.zeros(stop - start, rank, device=device, dtype=dtype))

    @property
    def ups(self) -> list[torch.Tensor]:
        """Each piece's up projection (stop - start, R): a buffer ("separate") or a block of `weight_aug`."""
        if not self.concat:
            return [getattr(self, f"up{p}") for p in range(len(self.pieces))]
        n, R = self.in_features, self.rank
        return [self.weight_aug[start:stop, n + p * R:n + (p + 1) * R] for p, (start, stop) in enumerate(self.pieces)]

    @torch.no_grad()
    def clear(self) -> None:
        """No adapter: the down and up projections zeroed (the layer's own weight is kept)."""
        self.down.zero_()
        for up in self.ups:
            up.zero_()

    def widen(self, x: torch.Tensor) -> torch.Tensor:
        """ "concat": x (..., in) -> [x | down x] (..., in + P * R), the input of `weight_aug`."""
        return torch.cat((x, F.linear(x, self.down)), dim=-1)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """ "separate": x (..., in) -> the update of the layer's output (..., out)."""
        R = self.rank
        h = F.linear(x, self.down)  # (..., P * R)
        parts, pos = [], 0
        for p, (start, stop) in enumerate(self.pieces):
            if start > pos:
                parts.append(x.new_zeros(*x.shape[:-1], start - pos))
            parts.append(F.linear(h[..., p * R:(p + 1) * R], getattr(self, f"up{p}")))  # (..., stop - start)
            pos = stop
        if pos < self.out_features:
            parts.append(x.new_zeros(*x.shape[:-1], self.out_features - pos))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (..., out)


def _hook(layer: nn.Module, slot: LoRASlot) -> None:
    """Make `layer` add `slot`'s update to its output, before any activation it carries.

    Linear, "concat": its bound path (`_impl`) becomes one GEMM of [x | down x] with `weight_aug` (LinearGELU:
    its GELU after it, in the GEMM's epilogue where the layer's own path has it there). Linear, "separate": its
    own output plus `delta(x)` (LinearGELU: the GELU after both). Fp8Linear (the fp8 tier, always "separate"):
    its `product` (the fp8 GEMM of quantised rows, which each of its paths calls before the bias and the
    activation) gets the delta of the rows it read, dequantised to the compute dtype: a bf16 side product of the
    GEMM's own input."""
    layer.lora_slot = slot
    if isinstance(layer, Fp8Linear):
        product = layer.product

        def fp8_product(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            x = (q.float() * scale).to(layer.out_dtype)  # (M, K): the rows the GEMM reads
            return product(q, scale) + slot.delta(x)  # (M, N)

        layer.product = fp8_product
        return
    activation = getattr(layer, "activation", None)
    if activation not in (None, "gelu_tanh"):
        raise ConfigError(f"LoRA: a Linear with activation {activation!r} cannot take an unfused adapter")
    base_impl = layer._impl

    def bias_for(x: torch.Tensor) -> torch.Tensor | None:
        return layer.bias.to(x.dtype) if layer.bias is not None else None

    if slot.concat and activation == "gelu_tanh" and layer.path == "cuda":
        def forward(x: torch.Tensor) -> torch.Tensor:  # the layer's GELU_BIAS epilogue, on the widened GEMM
            xa = slot.widen(x).reshape(-1, slot.weight_aug.shape[1])  # (M, in + P R)
            y = torch._addmm_activation(layer.bias, xa, slot.weight_aug.t(), use_gelu=True)  # (M, out)
            return y.reshape(*x.shape[:-1], layer.out_features)
    elif slot.concat:
        def forward(x: torch.Tensor) -> torch.Tensor:
            y = F.linear(slot.widen(x), slot.weight_aug, bias_for(x))  # (..., out)
            return F.gelu(y, approximate="tanh") if activation else y
    elif activation:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return F.gelu(F.linear(x, layer.weight, bias_for(x)) + slot.delta(x), approximate="tanh")
    else:
        def forward(x: torch.Tensor) -> torch.Tensor:
            return base_impl(x) + slot.delta(x)
    layer._impl = forward


class LoRAManager:
    """The adapters of one DiT (`Engine.lora`): loaded adapters by name, the mode, and in unfused mode the
    slots and which adapters are active. See the module docstring."""

    def __init__(self, model: nn.Module, config: LoRAConfig, adapters: list[LoRAAdapter]):
        self.model = model
        self.config = config
        self.mode = config.mode
        self.adapters: dict[str, LoRAAdapter] = {a.name: a for a in adapters}
        self.default: tuple[tuple[str, float], ...] = tuple((s.name, float(s.weight)) for s in config.adapters)
        # what the slots hold (None: unknown, e.g. after the active adapter was unloaded)
        self.active: tuple[tuple[str, float], ...] | None = ()
        self.slots: dict[str, LoRASlot] = {}
        self.rank = 0
        # the compute dtype: that of the floating-point weights wider than a byte (fp8 ones are not)
        param = next(p for p in model.parameters() if p.is_floating_point() and p.element_size() > 1)
        self.device, self.dtype = param.device, param.dtype

    # ------------------------------------------------------------------------------------- building

    @classmethod
    def attach(cls, model: nn.Module, config: LoRAConfig) -> "LoRAManager":
        """Load `config`'s adapters onto a loaded, not yet compiled `model`: merge them (fuse: before the fp8
        tier quantises it) or install slots and select them (unfused: after, on the layers it will run). Every
        file is read and checked before the model is touched."""
        if config.mode == "fuse" and any(isinstance(m, Fp8Linear) for m in model.modules()):
            raise ConfigError("--lora-mode fuse merges adapters before quantisation: this model's layers are fp8 "
                              "already (the loader merges first; or use --lora-mode unfused)")
        device = next(model.parameters()).device
        adapters = [load_adapter(spec, model, device) for spec in config.adapters]
        manager = cls(model, config, adapters)
        if config.mode == "fuse":
            fuse_adapters(model, [(a, s.weight) for a, s in zip(adapters, config.adapters)])
            manager.active = manager.default
            for a in adapters:  # merged: the factors are no longer needed
                a.factors = []
        else:
            manager._install_slots()
            for a in adapters:
                a.to(manager.device, manager.dtype)
            manager.activate(manager.default)
        return manager

    def _install_slots(self) -> None:
        targets = model_targets(self.model)
        if self.config.targets == "all":
            linears = {t.linear for t in targets.values()}
        else:
            linears = set().union(*(a.linears for a in self.adapters.values()))
        self.rank = self.config.max_rank or sum(a.rank for a in self.adapters.values())
        modules = dict(self.model.named_modules())
        pieces: dict[str, set[tuple[int, int]]] = {}
        for t in targets.values():  # every row piece of a targeted Linear (others' adapters may touch them)
            if t.linear in linears:
                pieces.setdefault(t.linear, set()).add((t.start, t.stop))
        for name, ranges in sorted(pieces.items()):
            layer = modules[name]
            concat = self.config.unfused_impl == "concat" and not isinstance(layer, Fp8Linear)
            slot = LoRASlot(layer, sorted(ranges), self.rank, self.device, self.dtype, concat)
            _hook(layer, slot)
            self.slots[name] = slot

    # ------------------------------------------------------------------------------------- adapters

    def load(self, name: str, path: str) -> LoRAAdapter:
        """Load an adapter under `name` (unfused mode) so requests can select it. ConfigError if the name is
        taken, the file cannot apply, or it needs a slot the engine does not have."""
        if self.mode != "unfused":
            raise ConfigError("loading LoRA adapters after start needs --lora-mode unfused (fuse merges the start "
                              "adapters into the weights)")
        if name in self.adapters:
            raise ConfigError(f"a LoRA adapter named {name!r} is already loaded")
        adapter = load_adapter(LoRASpec(path, 1.0, name), self.model, self.device)
        self._check_fits([(adapter, 1.0)])
        self.adapters[name] = adapter.to(self.device, self.dtype)
        return adapter

    def unload(self, name: str) -> None:
        """Forget adapter `name`, loaded with `load`. The adapters the engine started with stay (requests that
        name none use them). The slots are not touched here (a batch may be running on them): if it was active,
        the next batch writes its own selection whatever it is."""
        if name not in self.adapters:
            raise ConfigError(f"no LoRA adapter named {name!r}; loaded: {', '.join(sorted(self.adapters)) or 'none'}")
        if any(n == name for n, _ in self.default):
            raise ConfigError(f"LoRA adapter {name!r} was given at start (--lora): it stays loaded")
        del self.adapters[name]
        if self.active is not None and any(n == name for n, _ in self.active):
            self.active = None  # unknown: never equal to a selection, so the next `activate` writes

    def _check_fits(self, chosen: list[tuple[LoRAAdapter, float]]) -> None:
        used: dict[tuple[str, int], int] = {}
        for adapter, _ in chosen:
            for f in adapter.factors:
                slot = self.slots.get(f.linear)
                if slot is None or (f.start, f.stop) not in slot.pieces:
                    raise ConfigError(f"LoRA adapter {adapter.name!r}: key {f.key!r} adapts {f.linear}, which has no "
                                      f"LoRA slot in this engine (start it with an adapter that touches it, or with "
                                      f"LoRA targets 'all')")
                k = (f.linear, f.start)
                used[k] = used.get(k, 0) + f.rank
                if used[k] > self.rank:
                    raise ConfigError(f"LoRA adapter {adapter.name!r}: key {f.key!r} needs rank {used[k]} on "
                                      f"{f.linear} (with the other adapters selected), the engine's slots hold "
                                      f"{self.rank} (LoRAConfig.max_rank)")

    # ------------------------------------------------------------------------------------- requests

    def selection(self, extra: dict[str, Any]) -> tuple[tuple[str, float], ...]:
        """The (name, weight) pairs a request selects (`extra["lora"]`; absent: the start adapters), checked.
        A hashable value: part of the batch key."""
        if "lora" not in extra or extra["lora"] is None:
            return self.default
        items = extra["lora"]
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"lora must be a list of {{name, weight}} entries, got {type(items).__name__}")
        out = []
        for item in items:
            if isinstance(item, dict):
                name, weight = item.get("name"), item.get("weight", 1.0)
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                name, weight = item
            elif isinstance(item, str):
                name, weight = item, 1.0
            else:
                raise ConfigError(f"lora: each entry is {{name, weight}}, got {item!r}")
            if name not in self.adapters:
                raise ConfigError(f"lora: no adapter named {name!r}; loaded: "
                                  f"{', '.join(sorted(self.adapters)) or 'none'}")
            try:
                weight = float(weight)
            except (TypeError, ValueError):
                raise ConfigError(f"lora: the weight of {name!r} must be a number, got {weight!r}") from None
            if not math.isfinite(weight):
                raise ConfigError(f"lora: the weight of {name!r} must be finite, got {weight}")
            out.append((name, weight))
        if len({n for n, _ in out}) != len(out):
            raise ConfigError("lora: an adapter is named twice in one request")
        selection = tuple(out)
        if self.mode == "fuse" and selection != self.default:
            raise ConfigError(f"lora: the engine merged {list(self.default)} into its weights (--lora-mode fuse); "
                              f"choosing adapters per request needs --lora-mode unfused")
        if self.mode == "unfused":
            self._check_fits([(self.adapters[n], w) for n, w in selection])
        return selection

    @torch.no_grad()
    def activate(self, selection: tuple[tuple[str, float], ...]) -> None:
        """Write the selected adapters into the slots, in place (no-op if they are already active)."""
        selection = tuple(selection)
        if selection == self.active or self.mode == "fuse":
            return
        chosen = [(self.adapters[n], w) for n, w in selection]
        self._check_fits(chosen)
        for slot in self.slots.values():
            slot.clear()
        used: dict[tuple[str, int], int] = {}
        for adapter, weight in chosen:
            for f in adapter.factors:
                slot = self.slots[f.linear]
                p = slot.pieces.index((f.start, f.stop))
                off = used.get((f.linear, p), 0)
                r = f.rank
                slot.down[p * slot.rank + off:p * slot.rank + off + r].copy_(f.down)
                up = slot.ups[p]
                up[:, off:off + r].copy_(f.up)
                up[:, off:off + r].mul_(weight * f.scale)
                used[(f.linear, p)] = off + r
        self.active = selection

    def info(self) -> list[dict[str, Any]]:
        """One dict per loaded adapter (name, path, format, rank, layers touched, bytes as parsed, mode, active): for
        listings."""
        return [dict(name=a.name, path=a.path, format=a.format, **a.stats, mode=self.mode,
                     active=any(n == a.name for n, _ in self.active or ()))
                for a in self.adapters.values()]


def attach(model: nn.Module, config: LoRAConfig) -> None:
    """The loader's hook: set `model.lora` to a LoRAManager of `config` (see `LoRAManager.attach`)."""
    model.lora = LoRAManager.attach(model, config)
