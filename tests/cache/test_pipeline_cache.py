"""The cache in the FLUX pipeline: per-request reset, stats in the result, the compile order (mount, compile,
warm up) with no compilation in the first real request, and the dummy-run mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ditserve.compile import CompileConfig, compile_model, warmup
from ditserve.compile_report import _record_compiles
from ditserve.config import SamplingParams
from ditserve.dummy_run import dummy_run, in_dummy_run

from .conftest import make_pipeline

CACHE = "fbcache:threshold=1e9,warmup=2,max_consecutive=2"  # caches every step it may: a visible effect


def _request(prompt="a red circle on a blue background", seed=1, steps=6):
    return SamplingParams(prompt=prompt, height=128, width=128, steps=steps, seed=seed, max_sequence_length=16)


def _pixels(result):
    return [np.asarray(im) for im in result.images]


def test_stats_in_result_and_reset_between_requests(tiny_dev_dir):
    pipe = make_pipeline(tiny_dev_dir, cache=CACHE)
    a = pipe.generate(_request(steps=6), progress=False)
    # 6 steps: C C (warmup) K K C K
    assert a.cache_stats == {"policy": "fbcache", "computed": 3, "cached": 3, "host_syncs": 3}
    b = pipe.generate(_request("a green square on a white background", seed=7, steps=9), progress=False)
    assert b.cache_stats["computed"] + b.cache_stats["cached"] == 9  # this request's steps only
    fresh = make_pipeline(tiny_dev_dir, cache=CACHE).generate(
        _request("a green square on a white background", seed=7, steps=9), progress=False)
    assert all(np.array_equal(x, y) for x, y in zip(_pixels(b), _pixels(fresh)))
    uncached = make_pipeline(tiny_dev_dir).generate(_request(), progress=False)
    assert uncached.cache_stats is None
    assert not np.array_equal(_pixels(a)[0], _pixels(uncached)[0])  # the cache did reuse something


def test_threshold_zero_pipeline_equals_uncached(tiny_dev_dir):
    cached = make_pipeline(tiny_dev_dir, cache="dbcache:fn=1,bn=1,threshold=0").generate(_request(), progress=False)
    plain = make_pipeline(tiny_dev_dir).generate(_request(), progress=False)
    assert np.array_equal(_pixels(cached)[0], _pixels(plain)[0])
    assert cached.cache_stats["cached"] == 0


@pytest.mark.parametrize("do_warmup", [True, False])
def test_no_compilation_in_the_first_request_after_warmup(tiny_dev_dir, do_warmup):
    """Mount (the pipeline, from EngineConfig.cache), compile regionally with fullgraph=True (a graph break
    would raise), warm up in dummy-run mode at the request's size and steps: the first real request then
    compiles nothing, although it takes the cached path. Without the warmup it would compile (control)."""
    pipe = make_pipeline(tiny_dev_dir, cache=CACHE)
    compile_model(pipe.transformer, CompileConfig(backend="eager"))
    if do_warmup:
        info = warmup(pipe, _request("warmup", seed=0))
        assert info["cache_stats"]["computed"] > 0
    with _record_compiles() as compiles:
        if do_warmup:
            with torch.compiler.set_stance("fail_on_recompile"):
                result = pipe.generate(_request(), progress=False)
            assert compiles == []
            assert result.cache_stats["cached"] > 0 and len(result.images) == 1
        else:
            pipe.generate(_request(), progress=False)
            assert len(compiles) == 2  # one graph per block class: what the warmup takes off the request


def test_mounting_after_a_regional_compile_keeps_the_compiled_path(tiny_dev_dir):
    """The regions are the blocks, so a cache mounted after a (warm) regional compile runs the same graphs."""
    from ditserve.cache import mount_cache, parse_cache

    pipe = make_pipeline(tiny_dev_dir)
    compile_model(pipe.transformer, CompileConfig(backend="eager"))
    warmup(pipe, _request("warmup", seed=0))
    pipe.cache = mount_cache(pipe.transformer, parse_cache(CACHE))
    with torch.compiler.set_stance("fail_on_recompile"):
        result = pipe.generate(_request(), progress=False)
    assert result.cache_stats["cached"] > 0


def test_dummy_run_skips_projection_and_decode(tiny_dev_dir):
    pipe = make_pipeline(tiny_dev_dir, cache=CACHE)
    calls = {"proj_out": 0, "decode": 0}
    pipe.transformer.proj_out.register_forward_pre_hook(
        lambda m, a: calls.__setitem__("proj_out", calls["proj_out"] + 1))
    decode = pipe.vae.decode

    def counting_decode(*args, **kwargs):
        calls["decode"] += 1
        return decode(*args, **kwargs)

    pipe.vae.decode = counting_decode
    before = pipe.generate(_request(), progress=False)
    assert calls == {"proj_out": 6, "decode": 1}
    with dummy_run():
        assert in_dummy_run()
        result = pipe.generate(_request(), progress=False)
        x = torch.zeros(1, 64, 64)
        out = pipe.transformer(hidden_states=x, encoder_hidden_states=torch.zeros(1, 16, 32),
                               pooled_projections=torch.zeros(1, 32), timestep=torch.ones(1),
                               img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(16, 3), guidance=torch.ones(1))
    assert not in_dummy_run()
    assert calls == {"proj_out": 6, "decode": 1}  # neither ran in the dummy run
    assert result.images == [] and result.timings["denoise_s"] > 0
    assert out.shape == (1, 64, 64) and not out.any()
    after = pipe.generate(_request(), progress=False)  # normal runs are unaffected
    assert calls == {"proj_out": 12, "decode": 2}
    assert np.array_equal(_pixels(before)[0], _pixels(after)[0])


def test_dummy_run_nests_and_restores_on_error():
    with dummy_run():
        with dummy_run():
            pass
        assert in_dummy_run()
    with pytest.raises(KeyError):
        with dummy_run():
            raise KeyError
    assert not in_dummy_run()
