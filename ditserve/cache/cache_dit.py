"""`--cache-backend cache-dit`: the cache-dit library's DBCache mounted on a ditserve DiT, for comparison.

cache-dit (pip install cache-dit) patches a transformer's block lists through its `BlockAdapter`; a model
names its block lists and their cache-dit `ForwardPattern` numbers in `cache_dit_block_patterns` (FLUX: double
blocks take and return (img, txt): Pattern_0; single blocks take and return the joint sequence: Pattern_3).
Our settings map onto cache-dit's `DBCacheConfig`: fn -> Fn_compute_blocks, bn -> Bn_compute_blocks, threshold ->
residual_diff_threshold, warmup -> max_warmup_steps, max_consecutive -> max_continuous_cached_steps (0: -1,
no cap), taylorseer -> a TaylorSeer calibrator of that order.

One difference in meaning: cache-dit applies Fn / Bn to every block list it is given, so on FLUX it computes the
first fn double blocks and the first fn single blocks (and the last bn of each), where ditserve's cache counts
fn and bn over the flat list of all blocks. Its state lives in cache-dit's context, refreshed per request.
"""

from __future__ import annotations

import importlib.util
import logging

from ditserve.cache.block_cache import CacheStats
from ditserve.cache.policy import CacheSettings
from ditserve.errors import ConfigError


def available() -> bool:
    """Whether the cache-dit package can be imported."""
    return importlib.util.find_spec("cache_dit") is not None


def check_available() -> None:
    """Raise ConfigError unless cache-dit is installed."""
    if not available():
        raise ConfigError("--cache-backend cache-dit: the cache-dit package is not installed "
                          "(pip install cache-dit), or use --cache-backend ditserve")


class CacheDitCache:
    """cache-dit mounted on one model; the same request API as `BlockCache` (name, reset, stats)."""

    def __init__(self, model, settings: CacheSettings):
        self.model = model
        self.settings = settings

    @property
    def name(self) -> str:
        return f"cache-dit:{self.settings.name}"

    def configs(self, num_steps: int | None = None):
        """(cache-dit DBCacheConfig, calibrator config or None) for our settings."""
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

        s = self.settings
        cache_config = DBCacheConfig(
            Fn_compute_blocks=s.fn, Bn_compute_blocks=s.bn, residual_diff_threshold=float(s.threshold),
            max_warmup_steps=s.warmup, max_continuous_cached_steps=s.max_consecutive or -1,
            enable_separate_cfg=False, num_inference_steps=num_steps)
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=s.taylorseer) if s.taylorseer else None
        return cache_config, calibrator

    def reset(self, num_steps: int | None = None) -> None:
        """A fresh cache-dit context for a request of `num_steps` steps."""
        import cache_dit

        cache_config, calibrator = self.configs(num_steps)
        kwargs = {"cache_config": cache_config}
        if calibrator is not None:
            kwargs["calibrator_config"] = calibrator
        cache_dit.refresh_context(self.model, **kwargs)

    def stats(self) -> CacheStats:
        """Steps of the current context: cached where cache-dit skipped the first block list's middle."""
        import cache_dit

        first = cache_dit.summary(self.model, logging=False)[0]
        executed = first.accumulated_transformer_executed_steps
        cached = first.accumulated_cached_steps
        return CacheStats(computed=executed - cached, cached=cached, host_syncs=0)


def _quiet() -> None:
    """cache-dit logs every context at INFO and warns that it was given no diffusers pipeline (we mount it on
    the transformer alone, on purpose): keep its errors only. Set when mounting, never on import."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("cache_dit"):
            logging.getLogger(name).setLevel(logging.ERROR)


def mount(model, settings: CacheSettings) -> CacheDitCache:
    """Mount cache-dit's DBCache on `model` with `settings`. Raises ConfigError when cache-dit is not installed
    or the model names no block lists for it."""
    check_available()
    patterns = getattr(type(model), "cache_dit_block_patterns", None)
    if not patterns:
        raise ConfigError(f"--cache-backend cache-dit: {type(model).__name__} declares no "
                          f"`cache_dit_block_patterns` (its block lists and cache-dit forward patterns)")
    import cache_dit
    from cache_dit import BlockAdapter, ForwardPattern

    _quiet()  # (after the import: cache-dit creates its loggers then)
    settings.check_model(min(len(getattr(model, name)) for name, _ in patterns), type(model).__name__)
    cache = CacheDitCache(model, settings)
    cache_config, calibrator = cache.configs()
    # cache-dit calls every block of a list with the same arguments: each block must get temb and compute its
    # own modulation (not the per-block vectors the model would otherwise pass).
    if hasattr(model, "use_per_block_modulation"):
        model.use_per_block_modulation()
    adapter = BlockAdapter(transformer=model, blocks=[getattr(model, name) for name, _ in patterns],
                           forward_pattern=[getattr(ForwardPattern, f"Pattern_{p}") for _, p in patterns],
                           has_separate_cfg=False)
    cache_dit.enable_cache(adapter, cache_config=cache_config, calibrator_config=calibrator)
    _quiet()  # loggers of modules imported by enable_cache
    return cache
