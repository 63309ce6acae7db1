"""Pipelines: a model family's stages, from a request to images or videos. `base.py` holds what every family
shares (the denoise loop, batching, engine features, VAE decode); one file per family. Family pipelines are
looked up by their diffusers class name through `ditserve.registry.pipeline_class`, so importing this package
imports no model code.
"""

from __future__ import annotations

from typing import Any

from ditserve.engine.request import Output

GenerationResult = Output  # (the name this type had before the engine interface)


def load_pipeline(model: str | None, engine) -> tuple[str, Any]:
    """Load `model` for `engine` (see `ditserve.loader.load_model`) and build its family's pipeline, with the
    checkpoint's sampling defaults: (model name, pipeline). `ditserve.engine.Engine.load` is built on it."""
    from ditserve.loader import load_model
    from ditserve.loader.source import read_model_index
    from ditserve.registry import pipeline_class

    if engine.compile and engine.compile_prewarm:  # compile workers start while the weights load (ditserve.compile)
        from ditserve.compile import warm_compile_workers

        warm_compile_workers(device=engine.torch_device)
    loaded = load_model(model, engine)
    cls = pipeline_class(loaded.pipeline_class)
    if engine.offload_text_encoder and not getattr(cls, "OFFLOADS_TEXT_ENCODER", False):
        from ditserve.errors import ConfigError

        raise ConfigError(f"--offload-text-encoder is not supported by {cls.FAMILY}: its pipeline keeps the text "
                          f"encoder on the device")
    components = dict(loaded.components)
    if loaded.path is not None:  # model_index.json's pipeline options travel with the components, as diffusers
        components.update(read_model_index(loaded.path).options)  # passes both to a pipeline's constructor
    return loaded.name, cls(components, engine, cls.spec_for(loaded.name, components))
