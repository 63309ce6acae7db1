"""Safetensors weights: finding a component's files and streaming them into a preallocated model.

ditserve never unpickles a checkpoint: a component folder that holds only .bin/.pt/.ckpt/.pth files is refused
by file name, before anything is opened. Weights are copied tensor by tensor from `safetensors.safe_open`
straight into the model's parameters (on the target device), so no second full state dict ever exists.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ditserve.errors import ConfigError

# Single-file weights, in the order diffusers and transformers name them.
SINGLE_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")
INDEX_SUFFIX = ".safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# weight_map value: (our parameter name, start, stop) along dim 0; (name, None, None) = the whole tensor.
WeightMap = dict[str, tuple[str, "int | None", "int | None"]]


def find_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of one component folder.

    Looks for `diffusion_pytorch_model.safetensors` / `model.safetensors`, then a sharded checkpoint's index
    (`*.safetensors.index.json`, whose `weight_map` names the shard files). Raises ConfigError if the folder
    holds only pickle checkpoints (they are never opened) or no weights at all.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"component folder {folder} does not exist")
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name]
    indexes = sorted(p for p in folder.iterdir() if p.name.endswith(INDEX_SUFFIX))
    standard = [p for p in indexes if p.name in (n + ".index.json" for n in SINGLE_FILES)]
    if standard or len(indexes) == 1:
        return _shards(standard[0] if standard else indexes[0])
    if len(indexes) > 1:
        raise ConfigError(f"{folder} holds several shard indexes ({', '.join(p.name for p in indexes)}); "
                          f"expected one of {', '.join(n + '.index.json' for n in SINGLE_FILES)}")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ConfigError(
            f"{folder} has only pickle checkpoints ({', '.join(pickles)}); ditserve refuses pickle checkpoints "
            f"(unpickling can run arbitrary code): convert them to safetensors "
            f"(e.g. safetensors.torch.save_file(state_dict, '{SINGLE_FILES[0]}'))")
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    hint = f"; found only {', '.join(others)} (variant files are not loaded)" if others else ""
    raise ConfigError(f"{folder} has no safetensors weights: expected {' or '.join(SINGLE_FILES)} "
                      f"or a *{INDEX_SUFFIX}{hint}")


def _shards(index_file: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{index_file} is not a valid safetensors index (no 'weight_map'): {e}") from e
    shards = [index_file.parent / name for name in sorted(set(weight_map.values()))]
    missing = [p.name for p in shards if not p.is_file()]
    if missing:
        raise ConfigError(f"{index_file} names shard files that are missing: {', '.join(missing)}")
    return shards


def _few(names, n: int = 5) -> str:
    names = sorted(names)
    more = f", ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


@torch.no_grad()
def stream_into(model: nn.Module, files: list[Path], weight_map: WeightMap, device: torch.device | str) -> None:
    """Copy the tensors of `files` into `model`'s parameters (and persistent buffers), one tensor at a time.

    `weight_map` maps each checkpoint key to (our parameter name, start, stop): the tensor fills rows
    [start, stop) of dim 0 of that parameter (None, None: all of it), so fused parameters (e.g. one QKV
    projection) are filled piecewise. Each tensor is read with `safe_open(device=device)` (the model's device)
    and cast to the parameter's dtype by `copy_`.

    Raises ConfigError on a shape mismatch (naming the key, expected vs found shape), on checkpoint keys the
    model does not know (unexpected), and on parameters (or rows of them) no key wrote (missing).
    """
    targets: dict[str, torch.Tensor] = dict(model.named_parameters())
    targets.update(model.named_buffers())  # non-persistent buffers are never in a weight map: harmless
    bad = sorted({name for name, _, _ in weight_map.values() if name not in targets})
    if bad:
        raise RuntimeError(f"{type(model).__name__}.weight_map() names parameters it does not have: {_few(bad)}")

    written: dict[str, list[tuple[int, int]]] = {}  # parameter name -> row ranges written
    seen_keys: set[str] = set()
    unexpected: list[str] = []
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():
                if key not in weight_map:
                    unexpected.append(key)
                    continue
                name, start, stop = weight_map[key]
                param = targets[name]
                if start is None:
                    start, stop = 0, (param.shape[0] if param.dim() else None)
                dst = param if stop is None else param.narrow(0, start, stop - start)
                found = tuple(f.get_slice(key).get_shape())  # from the header: nothing read yet
                if found != tuple(dst.shape):
                    raise ConfigError(f"{file.name}: tensor {key!r} has shape {found}, but the model expects "
                                      f"{tuple(dst.shape)} for {name}"
                                      f"{f'[{start}:{stop}]' if dst is not param else ''}")
                dst.copy_(f.get_tensor(key))
                seen_keys.add(key)
                written.setdefault(name, []).append((start, stop))

    if unexpected:
        raise ConfigError(f"checkpoint has {len(unexpected)} keys the model does not know: {_few(unexpected)} "
                          f"(in {', '.join(p.name for p in files)}); is it the right model class and config?")
    missing_keys = set(weight_map) - seen_keys
    unwritten = [name for name, p in model.named_parameters() if not _covers(written.get(name, []), p)]
    if missing_keys or unwritten:
        raise ConfigError(f"checkpoint is missing {len(missing_keys)} keys: {_few(missing_keys)}; "
                          f"{len(unwritten)} model parameters left unset: {_few(unwritten)}")


def _covers(ranges: list[tuple[int, int | None]], param: torch.Tensor) -> bool:
    """Whether the row ranges written cover all of dim 0 of `param` (a 0-dim tensor: written at all)."""
    if param.dim() == 0:
        return bool(ranges)
    end = 0
    for start, stop in sorted(ranges):
        if start > end:
            return False
        end = max(end, stop)
    return end >= param.shape[0]


def copy_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], weight_map: WeightMap, what: str) -> None:
    """Copy a full in-memory state dict `sd` into `model` through `weight_map` (each tensor cast to its
    parameter's dtype and device, fused pieces written to their rows). Everything is checked before anything is
    written: missing keys, unexpected keys and shape mismatches raise ValueError naming them; `what` names the
    checkpoint kind in the message (e.g. "diffusers FLUX.1"). Tests and benches use it; the loader streams
    files with `stream_into` instead."""
    params = dict(model.named_parameters())
    missing = sorted(set(weight_map) - set(sd))
    unexpected = sorted(set(sd) - set(weight_map))
    if missing or unexpected:
        unwritten = sorted({weight_map[k][0] for k in missing})
        raise ValueError(
            f"{what} state dict does not match this model's config: "
            f"{len(missing)} missing keys {missing} (parameters not fully written: {unwritten}); "
            f"{len(unexpected)} unexpected keys {unexpected}")
    targets = {}
    for key, tensor in sd.items():
        name, start, stop = weight_map[key]
        dst = params[name] if start is None else params[name][start:stop]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(f"shape mismatch for {key!r} -> {name}[{start}:{stop}]: checkpoint "
                             f"{tuple(tensor.shape)}, model {tuple(dst.shape)}")
        targets[key] = dst
    with torch.no_grad():
        for key, tensor in sd.items():
            targets[key].copy_(tensor)
