"""Where a model's files are: the packaged default, a local diffusers-format folder, or a hub id.

`resolve_model(model)` turns the user's `--model` string into a local folder holding `model_index.json` and the
component subfolders. Hub downloads fetch only configs, tokenizer files and safetensors of the components the
model index names: never pickle checkpoints (.bin/.pt/.ckpt), never the single-file checkpoints some repos keep
at their root (FLUX.1-dev's 23 GB `flux1-dev.safetensors`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ditserve
from ditserve.errors import ConfigError

DEFAULT_MODEL_DIR = Path(ditserve.__file__).parent / "assets" / "default-model"
MODEL_INDEX = "model_index.json"

# "org/name": the shape of a Hugging Face repo id (names: letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

# Files fetched from each component subfolder of a hub repo: configs, tokenizer files, safetensors weights.
_COMPONENT_FILE_PATTERNS = ("*.json", "*.txt", "*.model", "*.safetensors")


def is_hub_id(model: str) -> bool:
    """Whether `model` has the shape of a hub repo id ("org/name"). Says nothing about whether it exists."""
    return bool(_HUB_ID.match(model))


def check_model_folder(path: Path) -> Path:
    """Return `path` if it is a diffusers-format model folder (has model_index.json), else raise ConfigError."""
    if not (path / MODEL_INDEX).is_file():
        from ditserve.loader.weights import PICKLE_SUFFIXES

        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        also = (f"; it holds pickle checkpoints ({', '.join(pickles)}), which ditserve never opens (unpickling "
                f"can run arbitrary code): use the model's safetensors release in diffusers format") if pickles else ""
        raise ConfigError(
            f"{path} is not a diffusers-format model folder: it has no {MODEL_INDEX} "
            f"(expected {MODEL_INDEX} plus one subfolder per component, each with config.json and safetensors){also}")
    return path


def resolve_model(model: str | None, weights: bool = True) -> Path:
    """The local folder of `model`.

    None -> the packaged default model; an existing folder -> itself (it must hold model_index.json); a hub id
    ("org/name") that is not a local path -> a snapshot downloaded (or found in the hub cache) with
    huggingface_hub, without the safetensors when `weights` is False (`--load-format dummy` needs only the
    configs and tokenizers); anything else -> ConfigError.
    """
    if model is None:
        return check_model_folder(DEFAULT_MODEL_DIR)
    path = Path(model).expanduser()
    if path.is_dir():
        return check_model_folder(path)
    if path.exists():
        raise ConfigError(f"--model {model!r} is a file; give a diffusers-format model folder or a hub id")
    if is_hub_id(model):
        return _download(model, weights)
    raise ConfigError(f"--model {model!r}: no such folder (and it is not a hub id of the form 'org/name')")


def _download(repo_id: str, weights: bool) -> Path:
    """Download model_index.json, then each component's configs, tokenizer files and (if `weights`)
    safetensors."""
    import huggingface_hub
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, LocalEntryNotFoundError

    hub_errors = (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError, OSError)
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=[MODEL_INDEX]))
        if not (folder / MODEL_INDEX).is_file():
            raise ConfigError(f"hub repo {repo_id!r} has no {MODEL_INDEX}: it is not a diffusers-format model")
        components = read_model_index(folder).components
        kinds = [p for p in _COMPONENT_FILE_PATTERNS if weights or p != "*.safetensors"]
        patterns = [MODEL_INDEX] + [f"{c}/{p}" for c in components for p in kinds]
        folder = Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns))
    except hub_errors as e:
        first_line = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else "no details"
        raise ConfigError(
            f"--model {repo_id!r} is not a local folder, and fetching it from the Hugging Face hub failed "
            f"({type(e).__name__}: {first_line}). Check the id, your network (HF_HUB_OFFLINE), and access "
            f"rights (HF_TOKEN for gated repos), or pass a local diffusers-format folder.") from e
    return check_model_folder(folder)


@dataclass(frozen=True)
class ModelIndex:
    """The parsed model_index.json of a diffusers-format folder.

    pipeline_class: `_class_name`, e.g. "FluxPipeline".
    components: component name -> (library, class name), e.g. "vae" -> ("diffusers", "AutoencoderKL"), in file
        order; null entries (`[null, null]`, an optional component left out) and non-component keys are skipped.
    options: the pipeline's own settings beside the components (diffusers passes them to the pipeline's
        constructor), e.g. "boundary_ratio": 0.875 of a two-expert model; `_`-prefixed metadata left out.
    """

    pipeline_class: str
    components: dict[str, tuple[str, str]]
    options: dict[str, Any] = field(default_factory=dict)


def read_model_index(folder: Path) -> ModelIndex:
    """Parse `folder/model_index.json`. Raises ConfigError if it is missing or malformed."""
    index_file = check_model_folder(folder) / MODEL_INDEX
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{index_file} is not valid JSON: {e}") from e
    if not isinstance(index, dict) or not isinstance(index.get("_class_name"), str):
        raise ConfigError(f"{index_file} has no '_class_name' (the pipeline class)")
    components, options = {}, {}
    for name, entry in index.items():
        if name.startswith("_"):
            continue  # metadata ("_diffusers_version")
        if not isinstance(entry, list):
            options[name] = entry  # a pipeline option ("force_zeros_for_empty_prompt", "boundary_ratio")
            continue
        if len(entry) != 2:
            raise ConfigError(f"{index_file}: entry {name!r} must be [library, class name], got {entry!r}")
        if entry[0] is None or entry[1] is None:
            continue
        components[name] = (str(entry[0]), str(entry[1]))
    return ModelIndex(index["_class_name"], components, options)
