"""`--cache` parsing, presets and the checks against a model."""

import pytest

from ditserve.cache import KNOBS, PRESETS, CacheSettings, parse_cache
from ditserve.config import ConfigError, EngineConfig


def test_parse_name_and_knobs():
    s = parse_cache("dbcache:fn=8,bn=0,threshold=0.12,warmup=4,taylorseer=1")
    assert (s.fn, s.bn, s.threshold, s.warmup, s.taylorseer, s.name) == (8, 0, 0.12, 4, 1, "dbcache")
    assert s.max_consecutive == PRESETS["dbcache"].max_consecutive  # not given: the preset's
    assert parse_cache("fbcache") == PRESETS["fbcache"]
    assert parse_cache(" fbcache-fast : threshold = 0.2 ").threshold == 0.2
    for off in (None, "", "none"):
        assert parse_cache(off) is None


def test_spec_round_trips():
    for name in PRESETS:
        s = parse_cache(name)
        assert parse_cache(s.spec()) == s
    s = parse_cache("fbcache:threshold=0.125,max_consecutive=0")
    assert parse_cache(s.spec()) == s


def test_presets_are_named_by_tier():
    tiered = [n for n in PRESETS if n not in ("fbcache", "dbcache")]
    assert tiered and all(n.endswith(("-safe", "-fast")) for n in tiered)


@pytest.mark.parametrize("spec, message", [
    ("teacache", "unknown cache 'teacache'; valid: fbcache, dbcache"),
    ("fbcache:foo=1", "unknown knob 'foo'; valid: " + ", ".join(KNOBS)),
    ("fbcache:fn=x", "fn must be an integer, got 'x'"),
    ("fbcache:fn=1.5", "fn must be an integer"),
    ("fbcache:threshold=abc", "threshold must be a number"),
    ("fbcache:threshold=-0.1", "threshold must be a number >= 0 (or inf)"),
    ("fbcache:threshold=nan", "threshold must be a number >= 0 (or inf)"),
    ("fbcache:fn=0", "fn must be >= 1"),
    ("fbcache:warmup=-1", "warmup must be >= 0"),
    ("fbcache:taylorseer=3", "taylorseer must be 0 (off), 1 or 2"),
    ("fbcache:fn=1,fn=2", "knob 'fn' given twice"),
    ("fbcache:fn", "expected KNOB=VALUE, got 'fn'"),
    ("fbcache:fn=", "expected KNOB=VALUE"),
    ("fbcache:", "nothing after ':'"),
])
def test_bad_specs_are_clear_errors(spec, message):
    with pytest.raises(ConfigError) as e:
        parse_cache(spec)
    assert message in str(e.value)
    assert str(e.value).startswith(f"--cache {spec!r}")


def test_engine_config_validates_cache():
    assert EngineConfig(cache="fbcache-safe").cache == "fbcache-safe"
    with pytest.raises(ConfigError, match="unknown cache"):
        EngineConfig(cache="nope")
    with pytest.raises(ConfigError, match="unknown cache backend"):
        EngineConfig(cache="fbcache", cache_backend="teacache")


def test_check_model_needs_a_block_to_cache():
    CacheSettings(fn=3, bn=1).check_model(5, "M")
    with pytest.raises(ConfigError, match="fn \\+ bn = 5 must be below the 5 blocks of M"):
        CacheSettings(fn=4, bn=1).check_model(5, "M")
