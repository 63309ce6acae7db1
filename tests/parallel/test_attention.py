"""Sequence-parallel attention (Ulysses, ring, USP) on 2 and 4 gloo processes against one process, in fp32."""

from __future__ import annotations

import pytest
import torch

from ditserve.errors import ConfigError
from ditserve.parallel import ParallelConfig
from ditserve.parallel.attention import _math_lse, attention_lse, merge
from ditserve.parallel.state import launch

from .workers import attention_cases, reference_attention

TIMEOUT_S = 60.0  # a hung collective fails the test instead of hanging it


def _inputs(B, S, H, D, pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, S, H, D, generator=g) for _ in range(3))
    valid = None
    if pad:
        valid = torch.ones(B, S, dtype=torch.bool)
        valid[0, S - pad:] = False  # the sequence's padding (item 0 also has a shorter joint text)
        valid[-1, S - pad - 1:] = False
    return q, k, v, valid


# (plan, heads, sequence length, padded key positions at the end)
CASES = {
    2: [("ulysses=2", 4, 8, 0),
        ("ulysses=2", 3, 10, 1),  # heads and the real length (9) that 2 does not divide
        ("ring=2", 3, 10, 1)],
    4: [("ulysses=4", 30, 12, 3),  # Z-Image's 30 heads on 4 ranks
        ("ring=4", 2, 12, 2),
        ("ulysses=2,ring=2", 5, 16, 3)],
}


@pytest.mark.parametrize("world", [2, 4])
def test_sequence_parallel_attention_matches_one_process(world):
    """Every plan of the world size in one launch (a spawn costs seconds), each against one process."""
    inputs = [(plan, *_inputs(2, S, H, 8, pad)) for plan, H, S, pad in CASES[world]]
    cases = [(*x, False) for x in inputs]
    if world == 2:  # compiled whole (fullgraph): 0 graph breaks, the same output; a backend without masks
        cases += [(*inputs[1], True), (*inputs[2], True), (*inputs[1], False, True)]
    results = launch(attention_cases, ParallelConfig(ulysses=world), "cpu", (cases,), TIMEOUT_S)
    for (plan, q, k, v, valid, compiled, *_), (got, breaks) in zip(cases, results):
        want = reference_attention(q, k, v, valid)
        if valid is not None:  # padded queries are dropped by the model; compare the real ones
            got, want = got * valid[..., None, None], want * valid[..., None, None]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{plan}: {m}")
        assert breaks == (0 if compiled else None), plan


def test_merge_of_partials_is_the_whole_attention():
    q, k, v, _ = _inputs(1, 6, 2, 4, 0)
    valid = torch.tensor([[True, True, True, False, False, False]])  # the second half all masked
    out, lse = attention_lse(q, k[:, :3], v[:, :3], valid[:, :3])
    o2, l2 = attention_lse(q, k[:, 3:], v[:, 3:], valid[:, 3:])
    assert torch.isinf(l2).all() and not o2.isnan().any()
    out, lse = merge(out, lse, o2, l2)
    torch.testing.assert_close(out, reference_attention(q, k, v, valid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("text, message", [
    ("ulysses=0", "ulysses must be a positive integer"),
    ("ring=x", "ring must be a positive integer"),
    ("cfg=3", "cfg must be 1 or 2"),
    ("tensor=2", "unknown degree 'tensor'"),
    ("ulysses", "expected NAME=INT"),
    ("ring=2,ring=2", "ring given twice"),
])
def test_parallel_config_refuses_bad_plans(text, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig.parse(text)


def test_parallel_config_parses_plans():
    assert ParallelConfig.parse(None) == ParallelConfig()
    c = ParallelConfig.parse(" ring=2, cfg=2 ")
    assert (c.ulysses, c.ring, c.cfg, c.world_size, c.sp) == (1, 2, 2, 4, 2)


def test_fused_lse_matches_the_fp32_scores():
    """The fused kernel's (out, lse) equal the reference's, items with every key masked included."""
    q, k, v, _ = _inputs(3, 7, 2, 8, 0)
    valid = torch.ones(3, 7, dtype=torch.bool)
    valid[0, 4:] = False
    valid[2] = False  # every key of item 2 masked: out 0, lse -inf
    for mask in (None, valid):
        out, lse = attention_lse(q, k, v, mask)
        want_out, want_lse = _math_lse(q, k, v, mask)
        torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_lse_matches_the_fp32_scores(dtype):
    """On a GPU: the CUDA paths of attention_lse (FlashAttention-2 in bf16, the scores otherwise) against the
    fp32 reference, at a FLUX.1-like head size."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 300, 4, 128, generator=g).cuda().to(dtype) for _ in range(3))
    out, lse = attention_lse(q, k, v, None)
    want_out, want_lse = _math_lse(q, k, v, None)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out, want_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, want_lse, rtol=tol, atol=tol)


def test_sequence_parallelism_refuses_a_family_without_it_and_a_cache():
    from torch import nn

    from ditserve.models.flux import FluxConfig, FluxTransformer
    from ditserve.parallel.sharding import enable_sequence_parallel
    from ditserve.parallel.state import ParallelState

    state = ParallelState(ParallelConfig(ulysses=2), 0, 2, torch.device("cpu"), 0, 0, 0, None, None, None, None)
    with pytest.raises(ConfigError, match="Linear has no sequence parallelism"):
        enable_sequence_parallel(nn.Linear(2, 2), state)
    model = FluxTransformer(FluxConfig(num_layers=1, num_single_layers=1, attention_head_dim=8,
                                       num_attention_heads=2, joint_attention_dim=8, pooled_projection_dim=8,
                                       in_channels=4, axes_dims_rope=(2, 2, 4)))
    model.block_cache = object()
    with pytest.raises(ConfigError, match="cannot run with --cache"):
        enable_sequence_parallel(model, state)
