"""Cache settings: the knobs of the block cache, named presets, and the parser of `--cache NAME[:k=v,...]`.

Every preset is lossy (a cached step reuses the residual of an earlier step instead of computing it), so the
names say the tier: "-safe" keeps images close to the uncached ones, "-fast" trades more quality for speed.
The measured speed and PSNR of each preset are in the README's "## Caching" section.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ditserve.errors import ConfigError


@dataclass(frozen=True)
class CacheSettings:
    """How the block cache decides, per denoising step and CFG branch, whether to compute the middle blocks.

    fn: the first `fn` blocks are computed at every step; the change of their output residual (relative L1
        against the step at which the middle blocks were last computed) is the signal of how much the step
        differs. fn=1 is First-Block Cache.
    bn: the last `bn` blocks are computed at every step too (Dual-Block Cache when > 0); they refine what the
        cached middle residual gives.
    threshold: a step whose signal is below it reuses the cached residual of the middle blocks. 0 never caches;
        inf caches every step that warmup and max_consecutive allow: a fixed step mask, decided without
        reading the signal (no host sync), the same speed-up on every model.
    warmup: the first `warmup` steps of each request are always computed (the trajectory changes fastest there).
    max_consecutive: at most this many cached steps in a row, then one is computed; 0 means no cap.
    taylorseer: 0 reuses the last computed residual as is; 1 or 2 extrapolates it from the last 2 or 3
        computed steps (TaylorSeer, as Newton divided differences over the step index).
    name: the preset or policy name it was parsed from (for reports).
    """

    fn: int = 1
    bn: int = 0
    threshold: float = 0.12
    warmup: int = 3
    max_consecutive: int = 2
    taylorseer: int = 0
    name: str = "fbcache"

    def __post_init__(self):
        for k in ("fn", "bn", "warmup", "max_consecutive", "taylorseer"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int):
                raise ConfigError(f"cache knob {k} must be an integer, got {v!r}")
        if self.fn < 1:
            raise ConfigError(f"cache knob fn must be >= 1 (the first blocks give the change signal), got {self.fn}")
        for k in ("bn", "warmup", "max_consecutive"):
            if getattr(self, k) < 0:
                raise ConfigError(f"cache knob {k} must be >= 0, got {getattr(self, k)}")
        if self.taylorseer not in (0, 1, 2):
            raise ConfigError(f"cache knob taylorseer must be 0 (off), 1 or 2 (extrapolation order), "
                              f"got {self.taylorseer}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or math.isnan(t) or t < 0:
            raise ConfigError(f"cache knob threshold must be a number >= 0 (or inf), got {t!r}")

    def check_model(self, num_blocks: int, model_name: str) -> None:
        """Raise ConfigError unless fn + bn leaves at least one block of `num_blocks` to cache."""
        if self.fn + self.bn >= num_blocks:
            raise ConfigError(f"cache {self.spec()}: fn + bn = {self.fn + self.bn} must be below the "
                              f"{num_blocks} blocks of {model_name}, so that some blocks can be cached")

    def spec(self) -> str:
        """The settings as a `--cache` string that parses back to them."""
        knobs = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in asdict(self).items() if k != "name")
        return f"{self.name}:{knobs}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# Policy names and tiered presets. "fbcache" / "dbcache" are the two policies with their usual defaults
# (First-Block Cache: fn=1; Dual-Block Cache, cache-dit's F8B0 default: 8 first blocks) for knob tuning. The
# tiered presets were chosen on the trained testbed model (bench/cache.py quality, 16 prompts, 28 and 50 steps;
# README "## Caching"): -safe keeps the mean PSNR near 39 dB against the uncached image, -fast computes about
# half of the 28 steps (>= 2x) at a mean PSNR above 38 dB. Thresholds are model-specific: re-measure on yours.
PRESETS: dict[str, CacheSettings] = {
    "fbcache": CacheSettings(name="fbcache"),  # the dataclass defaults
    "dbcache": CacheSettings(fn=8, bn=0, threshold=0.12, warmup=4, max_consecutive=3, name="dbcache"),
    "fbcache-safe": CacheSettings(fn=1, bn=0, threshold=0.12, warmup=3, max_consecutive=2, name="fbcache-safe"),
    "fbcache-fast": CacheSettings(fn=1, bn=0, threshold=0.25, warmup=3, max_consecutive=2, taylorseer=1,
                                  name="fbcache-fast"),
    "dbcache-safe": CacheSettings(fn=2, bn=1, threshold=0.12, warmup=3, max_consecutive=2, name="dbcache-safe"),
    "dbcache-fast": CacheSettings(fn=2, bn=1, threshold=0.2, warmup=3, max_consecutive=2, taylorseer=1,
                                  name="dbcache-fast"),
    # A fixed step mask (threshold inf: no signal, no host sync): the steps computed do not depend on the model,
    # so its speed carries over from any benchmark: 2.45x at 28 steps on FLUX.1-dev (H100,
    # bench/results/cache-speed-2026-11-21-160bd01-h100.json), 33.6 dB mean PSNR on the testbed.
    "fbcache-mask-fast": CacheSettings(fn=1, bn=0, threshold=float("inf"), warmup=3, max_consecutive=2,
                                       taylorseer=1, name="fbcache-mask-fast"),
}

KNOBS = tuple(f.name for f in fields(CacheSettings) if f.name != "name")


def _parse_value(knob: str, text: str, spec: str) -> int | float:
    try:
        return float(text) if knob == "threshold" else int(text)
    except ValueError:
        kind = "a number" if knob == "threshold" else "an integer"
        raise ConfigError(f"--cache {spec!r}: {knob} must be {kind}, got {text!r}") from None


def parse_cache(spec: str | CacheSettings | None) -> CacheSettings | None:
    """`--cache` text -> CacheSettings. None or "" or "none" -> None (no cache).

    Grammar: NAME or NAME:KNOB=VALUE,KNOB=VALUE,... with NAME a key of PRESETS and KNOB one of KNOBS; knobs
    override the preset's values. Unknown names or knobs, repeated knobs and bad values raise ConfigError
    with the valid choices.
    """
    if spec is None or isinstance(spec, CacheSettings):
        return spec
    text = spec.strip()
    if text in ("", "none"):
        return None
    name, _, rest = text.partition(":")
    name = name.strip()
    if name not in PRESETS:
        raise ConfigError(f"--cache {spec!r}: unknown cache {name!r}; valid: {', '.join(PRESETS)} "
                          f"(knobs: NAME:{'=...,'.join(KNOBS)}=...)")
    overrides: dict[str, int | float] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = (part.strip() for part in item.partition("="))
            if not eq or not key or not value:
                raise ConfigError(f"--cache {spec!r}: expected KNOB=VALUE, got {item.strip()!r}")
            if key not in KNOBS:
                raise ConfigError(f"--cache {spec!r}: unknown knob {key!r}; valid: {', '.join(KNOBS)}")
            if key in overrides:
                raise ConfigError(f"--cache {spec!r}: knob {key!r} given twice")
            overrides[key] = _parse_value(key, value, spec)
    elif ":" in text:
        raise ConfigError(f"--cache {spec!r}: nothing after ':'; give KNOB=VALUE pairs or just the name")
    try:
        return replace(PRESETS[name], **overrides)
    except ConfigError as e:
        raise ConfigError(f"--cache {spec!r}: {e}") from None
