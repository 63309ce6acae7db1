"""DiT caching: reuse the residual of most transformer blocks on steps where the first blocks barely change.

    settings = parse_cache("dbcache:fn=8,bn=0,threshold=0.12,warmup=4,taylorseer=1")
    cache = mount_cache(transformer, settings)   # before compiling; the pipeline does this for EngineConfig.cache
    cache.reset(num_steps)                       # per request (the pipeline does it in `denoise`)
    cache.stats()                                # computed / cached steps since the reset

`policy` holds the settings, presets and the `--cache` parser; `block_cache` the runtime (First-Block and
Dual-Block Cache, warmup, a cap on consecutive cached steps, TaylorSeer, per-CFG-branch state); `cache_dit`
mounts the cache-dit library instead (`--cache-backend cache-dit`); `quality` has PSNR / SSIM. All caching is
lossy and off by default.
"""

from typing import Any

from ditserve.cache.policy import KNOBS, PRESETS, CacheSettings, parse_cache

# The runtime (torch) is imported on first use, so that the CLI can parse `--cache` without importing torch.
_BLOCK_CACHE_NAMES = ("BlockCache", "BlockCacheable", "CacheStats", "TaylorSeer", "mount_cache", "relative_l1")


def __getattr__(name: str) -> Any:
    if name in _BLOCK_CACHE_NAMES:
        from ditserve.cache import block_cache

        return getattr(block_cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

CACHE_BACKENDS = ("ditserve", "cache-dit")


def mount_engine_cache(model, engine):
    """Mount the cache `engine.cache` asks for on `model` with `engine.cache_backend`, before any compile.
    Returns the mounted cache (it has `name`, `reset(num_steps)` and `stats()`), or None when the engine asks
    for none. Raises ConfigError where the cache cannot apply (see `mount_cache`, `cache_dit.mount`)."""
    settings = parse_cache(engine.cache)
    if settings is None:
        return None
    if engine.cache_backend == "cache-dit":
        from ditserve.cache import cache_dit

        return cache_dit.mount(model, settings)
    from ditserve.cache.block_cache import mount_cache

    return mount_cache(model, settings)

__all__ = ["BlockCache", "BlockCacheable", "CACHE_BACKENDS", "CacheSettings", "CacheStats", "KNOBS", "PRESETS",
           "TaylorSeer", "mount_cache", "mount_engine_cache", "parse_cache", "relative_l1"]
