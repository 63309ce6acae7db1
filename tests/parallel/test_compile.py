"""A sequence-parallel DiT compiles block by block with 0 graph breaks (the collectives are functional
collectives in the graph), does not recompile on the next forward, and computes what one process does."""

from __future__ import annotations

import torch

from ditserve.models.flux import FluxConfig, FluxTransformer, flux_example_inputs
from ditserve.parallel import ParallelConfig
from ditserve.parallel.state import launch

from .workers import compiled_flux_case

CONFIG = FluxConfig(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                    num_attention_heads=3, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
                    axes_dims_rope=(2, 2, 4))


def test_ulysses_flux_blocks_compile_whole_and_match_one_process():
    torch.manual_seed(0)
    model = FluxTransformer(CONFIG).eval()
    for p in model.parameters():  # no zero-initialised layer hides a wrong shard
        p.data.normal_(0, 0.3)
    inputs = flux_example_inputs(CONFIG, 80, 80, batch=1, text_len=13)  # 25 image and 13 text tokens: padded shards
    with torch.no_grad():
        want = model(**inputs)
    got, breaks = launch(compiled_flux_case, ParallelConfig(ulysses=2), "cpu",
                         (CONFIG, model.state_dict(), inputs), 120.0)
    assert breaks == [0, 0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
