"""`ditserve bench`: runs the packaged model offline, reports one JSON line last; bad flags exit 2."""

from __future__ import annotations

import json

from ditserve.cli import main


def test_bench_default_model_reports_json(capsys):
    assert main(["bench", "--runs", "2", "--warmup", "1", "--steps", "2", "--num-images", "2"]) == 0
    out, err = capsys.readouterr()
    rec = json.loads(out.strip().splitlines()[-1])
    assert rec["bench"] == "ditserve-bench" and rec["model"] == "default-model"
    assert rec["runs"] == 2 and rec["warmup_requests"] == 1 and rec["steps"] == 2
    assert rec["images_per_request"] == 2
    lat = rec["latency_s"]
    assert 0 < lat["min"] <= lat["median"] <= lat["max"]
    stages = rec["stages_median_s"]
    assert set(stages) == {"text_encode_s", "denoise_s", "decode_s"}
    assert sum(stages.values()) <= lat["max"] * 1.01
    assert rec["images_per_s"] > 0 and rec["engine"]["vae_tiling"] == "auto"
    assert rec["device"] == rec["engine"]["device"] == "cpu"  # what was used, not the flags' None
    assert rec["dtype"] == rec["engine"]["dtype"] == "fp32"
    assert rec["cuda_graph_mib"] == 0  # CPU: no CUDA graphs
    assert rec["peak_memory_gib"] is None and rec["stage_peak_memory_gib"] is None  # CPU: not tracked
    assert rec["num_frames"] is None  # an image model
    assert "latency   median" in err and "run 2/2" in err


def test_bench_bad_values_exit_2(capsys):
    assert main(["bench", "--runs", "0"]) == 2
    assert "--runs must be >= 1" in capsys.readouterr().err
    assert main(["bench", "--warmup", "-1"]) == 2
    assert main(["bench", "--steps", "0"]) == 2
    assert main(["bench", "--height", "100"]) == 2  # not a multiple of 16


def test_bench_table_names_each_stage_peak_and_the_frames():
    """A video record's table says its frames and which stage set the peak."""
    from ditserve.bench import format_table

    rec = {"model": "wan", "gpu": "H200", "device": "cuda", "width": 832, "height": 480, "num_frames": 81,
           "steps": 2, "images_per_request": 1, "runs": 1, "latency_s": {"median": 1.0, "min": 1.0, "max": 1.0},
           "stages_median_s": {"text_encode_s": 0.1, "denoise_s": 0.5, "decode_s": 0.4}, "steps_per_s": 4.0,
           "images_per_s": 1.0, "peak_memory_gib": 30.5, "cuda_graph_mib": 0, "load_s": 1.0, "warmup_s": 0.0,
           "stage_peak_memory_gib": {"text_encode": 12.0, "denoise": 30.5, "decode": 25.25}}
    table = format_table(rec)
    assert "832x480 x 81 frames, 2 steps" in table
    assert "peak memory 30.50 GiB (text encode 12.00, denoise 30.50, decode 25.25)" in table
