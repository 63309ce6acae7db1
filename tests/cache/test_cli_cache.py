"""The CLI: --cache in generate (stats in the summary line, clear errors) and compile-report --cache."""

import json

from ditserve.cli import main
from ditserve.loader import DEFAULT_MODEL_DIR


def test_generate_with_cache_reports_stats(tmp_path, capsys):
    out = tmp_path / "x.png"
    assert main(["generate", "--prompt", "a red circle", "--steps", "6", "--seed", "1", "--output", str(out),
                 "--no-progress", "--cache", "fbcache:threshold=inf,warmup=2,max_consecutive=2"]) == 0
    assert out.is_file()
    err = capsys.readouterr().err
    assert "| cache fbcache: 3 computed, 3 cached |" in err


def test_generate_bad_cache_is_one_line_error(capsys):
    assert main(["generate", "--prompt", "x", "--cache", "fbcache:fn=zero"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fn must be an integer, got 'zero'" in err[0]
    assert main(["generate", "--prompt", "x", "--cache", "fbcache:fn=40"]) == 2  # more than the model's blocks
    config = json.loads((DEFAULT_MODEL_DIR / "transformer" / "config.json").read_text())
    blocks = config["num_layers"] + config["num_single_layers"]
    assert f"must be below the {blocks} blocks of FluxTransformer" in capsys.readouterr().err


def test_compile_report_with_cache(capsys):
    assert main(["compile-report", "--backend", "eager", "--cache", "fbcache:threshold=0.5,warmup=2",
                 "--height", "128", "--width", "128"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["graph_breaks"] == 0 and report["recompiles"] == 0
    cache = report["cache"]
    assert cache["settings"].startswith("fbcache:fn=1,bn=0,threshold=0.5,warmup=2")
    # Per size: 2 warmup calls, then the repeated inputs are cached up to the cap (3), then computed again.
    assert cache["cached"] >= 2 and cache["computed"] >= 4 and cache["host_syncs"] >= cache["cached"]
