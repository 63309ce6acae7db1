"""`--cache-backend cache-dit`: a clear error without the package; with it, cache-dit's DBCache on our FLUX."""

import pytest
import torch

from ditserve.cache import cache_dit, parse_cache
from ditserve.cli import main
from ditserve.config import ConfigError, EngineConfig

from .conftest import denoise_outputs, tiny_transformer


def test_clear_error_when_cache_dit_is_missing(monkeypatch, capsys):
    monkeypatch.setattr(cache_dit.importlib.util, "find_spec", lambda name: None)
    assert not cache_dit.available()
    with pytest.raises(ConfigError, match="cache-dit package is not installed"):
        cache_dit.mount(tiny_transformer(), parse_cache("fbcache"))
    assert main(["generate", "--prompt", "x", "--cache", "fbcache", "--cache-backend", "cache-dit",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cache-dit package is not installed" in err[0]


def test_backend_needs_a_cache(capsys):
    assert main(["generate", "--prompt", "x", "--cache-backend", "cache-dit"]) == 2
    assert "give the cache to mount with --cache" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="unknown cache backend"):
        EngineConfig(cache="fbcache", cache_backend="nope")


def test_model_without_patterns_is_refused():
    pytest.importorskip("cache_dit")
    with pytest.raises(ConfigError, match="declares no `cache_dit_block_patterns`"):
        cache_dit.mount(torch.nn.Linear(2, 2), parse_cache("fbcache"))


def test_cache_dit_on_our_flux():
    pytest.importorskip("cache_dit")
    ref = denoise_outputs(tiny_transformer(), 6)
    model = tiny_transformer()
    cache = cache_dit.mount(model, parse_cache("fbcache:threshold=0,warmup=1"))
    cache.reset(6)
    out = denoise_outputs(model, 6)
    assert cache.stats().as_dict() == {"computed": 6, "cached": 0, "host_syncs": 0}
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(out, ref))
    cache.settings = parse_cache("fbcache:threshold=inf,warmup=2,max_consecutive=0")
    cache.reset(6)
    out = denoise_outputs(model, 6)
    assert cache.stats().as_dict() == {"computed": 2, "cached": 4, "host_syncs": 0}
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(out[:2], ref[:2]))
    assert not torch.allclose(out[-1], ref[-1], rtol=1e-3, atol=1e-4)
