"""The block cache on a tiny FluxTransformer (2 double + 3 single blocks) and on a toy model with known
residuals: what runs, what is reused, and that it stays exact where it should."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ditserve.cache import CacheSettings, TaylorSeer, mount_cache, parse_cache
from ditserve.compile import CompileConfig, compile_model
from ditserve.models.flux import flux_example_inputs
from ditserve.config import ConfigError

from .conftest import count_block_calls, denoise_outputs, tiny_transformer

HUGE = 1e9  # a threshold every step passes


def test_threshold_zero_is_exactly_uncached():
    ref = denoise_outputs(tiny_transformer(), 8)
    for spec in ("fbcache:threshold=0,warmup=0", "dbcache:fn=3,bn=1,threshold=0,warmup=0,taylorseer=2"):
        model = tiny_transformer()
        cache = mount_cache(model, parse_cache(spec))
        out = denoise_outputs(model, 8)
        for a, b in zip(out, ref):
            assert torch.equal(a, b)
        assert cache.stats().as_dict() == {"computed": 8, "cached": 0, "host_syncs": 0}


def test_huge_threshold_skips_the_middle_blocks_after_warmup():
    model = tiny_transformer()
    counts = count_block_calls(model)
    cache = mount_cache(model, CacheSettings(fn=1, bn=1, threshold=HUGE, warmup=2, max_consecutive=0))
    denoise_outputs(model, 7)
    # 2 warmup steps compute everything; the 5 others only block 0 (fn=1) and block 4 (bn=1).
    assert counts == [7, 2, 2, 2, 7]
    assert cache.stats().as_dict() == {"computed": 2, "cached": 5, "host_syncs": 5}


def test_cached_steps_reuse_and_so_change_the_output():
    ref = denoise_outputs(tiny_transformer(), 8)
    model = tiny_transformer()
    mount_cache(model, CacheSettings(fn=1, bn=0, threshold=HUGE, warmup=2, max_consecutive=0))
    out = denoise_outputs(model, 8)
    assert all(torch.equal(a, b) for a, b in zip(out[:2], ref[:2]))  # warmup: computed
    assert not any(torch.equal(a, b) for a, b in zip(out[2:], ref[2:]))  # lossy (how lossy: bench/cache.py)


def test_consecutive_cap():
    model = tiny_transformer()
    counts = count_block_calls(model)
    cache = mount_cache(model, CacheSettings(fn=1, bn=0, threshold=HUGE, warmup=1, max_consecutive=2))
    denoise_outputs(model, 9)
    # Steps: C K K C K K C K K -> the middle blocks run at steps 0, 3 and 6.
    assert counts == [9, 3, 3, 3, 3]
    assert cache.stats().as_dict() == {"computed": 3, "cached": 6, "host_syncs": 6}


def test_blocks_counted_across_the_double_single_boundary():
    model = tiny_transformer()
    counts = count_block_calls(model)
    mount_cache(model, CacheSettings(fn=3, bn=0, threshold=HUGE, warmup=1, max_consecutive=0))
    denoise_outputs(model, 4)
    assert counts == [4, 4, 4, 1, 1]


def test_cache_that_cannot_apply_is_an_error():
    model = tiny_transformer()
    with pytest.raises(ConfigError, match="must be below the 5 blocks"):
        mount_cache(model, CacheSettings(fn=4, bn=1))
    with pytest.raises(ConfigError, match="does not declare the block-cache interface"):
        mount_cache(torch.nn.Linear(2, 2), CacheSettings())
    whole = tiny_transformer()
    compile_model(whole, CompileConfig(backend="eager", regional=False))
    with pytest.raises(ConfigError, match="compiled whole"):
        mount_cache(whole, CacheSettings())
    cached = tiny_transformer()
    mount_cache(cached, CacheSettings())
    with pytest.raises(ConfigError, match="block cache mounted"):
        compile_model(cached, CompileConfig(backend="eager", regional=False))
    assert mount_cache(cached, None) is None and cached.block_cache is None


class _CountSyncs(TorchDispatchMode):
    """Counts device->host scalar reads (`.item()` and friends): aten._local_scalar_dense."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_at_most_one_host_sync_per_step():
    model = tiny_transformer()
    mount_cache(model, CacheSettings(fn=1, bn=1, threshold=HUGE, warmup=2, max_consecutive=2))
    inputs = flux_example_inputs(model.config, 64, 64, text_len=8)
    syncs = []
    for _ in range(6):
        with _CountSyncs() as counter:
            model(**inputs)
        syncs.append(counter.n)
    # Warmup steps and the step after the cap decide nothing; the others read one scalar.
    assert syncs == [0, 0, 1, 1, 0, 1]


class _Toy(torch.nn.Module):
    """The block interface with known residuals: block i adds w_i * t to img and 2 w_i * t to txt, where t is
    the per-step context. So the middle residual is linear in t."""

    block_cache = None

    def __init__(self, n: int = 4):
        super().__init__()
        self.w = torch.arange(1.0, n + 1)

    @property
    def num_blocks(self) -> int:
        return len(self.w)

    def run_blocks(self, state, ctx, start, stop):
        img, txt = state
        for i in range(start, stop):
            img, txt = img + self.w[i] * ctx, txt + 2 * self.w[i] * ctx
        return img, txt

    def forward(self, img, txt, t):
        if self.block_cache is None:
            return self.run_blocks((img, txt), t, 0, self.num_blocks)
        return self.block_cache.run(self, (img, txt), t)


def _toy_run(model, ts):
    img, txt = torch.ones(1, 3, 2), torch.zeros(1, 2, 2)
    return [model(img, txt, t) for t in ts]


@pytest.mark.parametrize("order, ts", [(1, [0.5 + 0.25 * k for k in range(8)]),
                                       (2, [0.1 * k * k - 0.3 * k + 1 for k in range(8)])])
def test_taylorseer_recovers_polynomial_residuals(order, ts):
    ref = _toy_run(_Toy(), ts)
    for taylorseer, exact in ((order, True), (0, False)):
        model = _Toy()
        cache = mount_cache(model, CacheSettings(fn=1, bn=1, threshold=HUGE, warmup=order + 1, max_consecutive=0,
                                                 taylorseer=taylorseer))
        out = _toy_run(model, ts)
        assert cache.stats().cached == len(ts) - (order + 1)
        close = all(torch.allclose(a, b, atol=1e-5) for pa, pb in zip(out, ref) for a, b in zip(pa, pb))
        assert close == exact


def test_taylorseer_divided_differences_with_uneven_steps():
    a, b, c = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)

    def f(k):  # quadratic in the step
        return (a + b * k + c * k * k, 2 * a - c * k)

    seer = TaylorSeer(2)
    for k in (0, 1, 4):
        seer.update(k, f(k))
    for k in (5, 7):
        for got, want in zip(seer.predict(k), f(k)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    seer.update(5, f(5))  # the oldest sample (step 0) drops out; still exact
    torch.testing.assert_close(seer.predict(9)[0], f(9)[0], rtol=1e-5, atol=1e-3)
    first = TaylorSeer(1)
    first.update(2, f(2))
    assert first.predict(6)[0] is f(2)[0] or torch.equal(first.predict(6)[0], f(2)[0])  # one sample: constant


def test_cfg_branches_keep_separate_state():
    """Interleaving two branches on one cache gives each branch what a cache of its own gives."""
    ts_cond = [1.0 - 0.1 * k for k in range(6)]
    ts_uncond = [2.0 - 0.3 * k * k for k in range(6)]
    settings = CacheSettings(fn=1, bn=1, threshold=HUGE, warmup=2, max_consecutive=2, taylorseer=1)
    alone = {}
    for key, ts in (("cond", ts_cond), ("uncond", ts_uncond)):
        model = _Toy()
        mount_cache(model, settings)
        alone[key] = _toy_run(model, ts)
    model = _Toy()
    cache = mount_cache(model, settings)
    img, txt = torch.ones(1, 3, 2), torch.zeros(1, 2, 2)
    both = {"cond": [], "uncond": []}
    for tc, tu in zip(ts_cond, ts_uncond):
        both["cond"].append(model(img, txt, tc))
        with cache.branch("uncond"):
            both["uncond"].append(model(img, txt, tu))
    for key in both:
        for pa, pb in zip(both[key], alone[key]):
            assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    assert cache.stats().computed + cache.stats().cached == 12


def test_state_restarts_after_num_steps_and_on_a_new_shape():
    model = tiny_transformer()
    cache = mount_cache(model, CacheSettings(fn=1, bn=0, threshold=HUGE, warmup=2, max_consecutive=0))
    cache.reset(num_steps=4)
    denoise_outputs(model, 4, seed=1)
    assert cache.stats().as_dict()["computed"] == 2
    first = denoise_outputs(model, 4, seed=2)  # no reset: the branch restarts after 4 steps
    fresh = tiny_transformer()
    mount_cache(fresh, cache.settings)
    ref = denoise_outputs(fresh, 4, seed=2)
    assert all(torch.equal(a, b) for a, b in zip(first, ref))
    cache.reset()  # no step count: only a new shape restarts the branch
    denoise_outputs(model, 3, size=64)
    denoise_outputs(model, 3, size=96)
    assert cache.stats().as_dict()["computed"] == 4  # 2 warmup steps at each size


@torch.no_grad()
def test_infinite_threshold_is_a_fixed_step_mask_without_syncs():
    model = tiny_transformer()
    counts = count_block_calls(model)
    cache = mount_cache(model, parse_cache("fbcache:threshold=inf,warmup=3,max_consecutive=2"))
    inputs = flux_example_inputs(model.config, 64, 64, text_len=8)
    with _CountSyncs() as counter:
        for _ in range(9):
            model(**inputs)
    assert counter.n == 0
    assert counts[1] == 5  # steps 0, 1, 2 (warmup), 5, 8 computed
    assert cache.stats().as_dict() == {"computed": 5, "cached": 4, "host_syncs": 0}
