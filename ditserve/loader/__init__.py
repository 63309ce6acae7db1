"""Model loading: diffusers-format folders, hub ids, safetensors streaming, dummy (random) weights."""

from ditserve.loader.components import (
    LoadedModel, build_dit, dummy_component, load_component, load_model, load_transformer, random_init_,
)
from ditserve.loader.source import DEFAULT_MODEL_DIR, ModelIndex, read_model_index, resolve_model
from ditserve.loader.weights import find_weight_files, stream_into

__all__ = [
    "DEFAULT_MODEL_DIR", "LoadedModel", "ModelIndex", "build_dit", "dummy_component", "find_weight_files",
    "load_component", "load_model", "load_transformer", "random_init_", "read_model_index", "resolve_model",
    "stream_into",
]
