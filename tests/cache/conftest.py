"""Shared fixtures of the cache tests: a tiny FluxTransformer (5 blocks: 2 double, 3 single) driven through a
denoising-like loop, and a tiny diffusers-format FLUX.1-dev pipeline folder."""

from __future__ import annotations

import pytest
import torch

from ditserve.models.flux import flux_example_inputs
from ditserve.config import EngineConfig
from ditserve.models.flux import FluxConfig, FluxTransformer

TINY = FluxConfig(num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
ENGINE = EngineConfig(device="cpu", dtype="fp32")


def tiny_transformer(seed: int = 0) -> FluxTransformer:
    torch.manual_seed(seed)
    model = FluxTransformer(TINY).eval()
    with torch.no_grad():  # a conditioning path strong enough that steps differ visibly
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.ndim == 2:
                p.mul_(2.0)
    return model


@torch.no_grad()
def denoise_outputs(model, steps: int, seed: int = 0, size: int = 64) -> list[torch.Tensor]:
    """The model's outputs along an Euler flow-matching loop of `steps` steps from seeded noise."""
    inputs = flux_example_inputs(model.config, size, size, text_len=8, seed=seed)
    x = inputs.pop("hidden_states")
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist() + [0.0]
    outs = []
    for k in range(steps):
        inputs["timestep"] = torch.full((x.shape[0],), sigmas[k])
        v = model(hidden_states=x, **inputs)
        outs.append(v)
        x = x + (sigmas[k + 1] - sigmas[k]) * v
    return outs


def count_block_calls(model) -> list[int]:
    """A list that counts, per flat block index, the calls of each block from now on."""
    counts = [0] * model.num_blocks
    blocks = list(model.double_blocks) + list(model.single_blocks)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, args, i=i: counts.__setitem__(i, counts[i] + 1))
    return counts


@pytest.fixture(scope="session")
def tiny_dev_dir(tmp_path_factory):
    from ditserve.testing import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("cache-tiny-dev"), guidance_embeds=True, seed=3,
                                    sample_size=128)


def make_pipeline(path, **engine_kw):
    from dataclasses import replace

    from ditserve.loader import load_model
    from ditserve.pipelines.flux import FluxPipeline

    engine = replace(ENGINE, **engine_kw)
    loaded = load_model(str(path), engine)
    return FluxPipeline(loaded.components, engine, FluxPipeline.spec_for(loaded.name, loaded.components))
