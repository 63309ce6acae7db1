"""`ditserve generate --parallel` on the CPU: ditserve spawns gloo workers, rank 0 writes the image, which is the
one-process image; bench reports once, from rank 0; serve refuses the flag; a failing rank ends the run with one
error line."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ditserve.cli import main
from ditserve.parallel.launch import run_workers
from ditserve.testing import build_tiny_z_image_pipeline

from .workers import rank_one_dies

ARGS = ["--prompt", "a cat", "--negative-prompt", "blurry", "--guidance", "3", "--height", "64", "--width", "64",
        "--steps", "2", "--seed", "7", "--device", "cpu", "--quiet"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_z_image_pipeline(tmp_path_factory.mktemp("tiny-z-image"), seed=0)


def test_generate_parallel_makes_the_one_process_image(folder, tmp_path, capfd):
    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert main(["generate", "--model", str(folder), *ARGS, "--output", str(one)]) == 0
    assert main(["generate", "--model", str(folder), *ARGS, "--output", str(two), "--parallel", "ulysses=2"]) == 0
    assert capfd.readouterr().out.split() == [str(one), str(two)]  # rank 0 alone printed its path
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (one, two))
    assert np.abs(a - b).max() <= 1


def test_a_failing_rank_ends_the_run_with_one_line(tmp_path, capfd):
    """The workers fail to load a model that is not there: one line naming the rank and the error, status 1."""
    code = main(["generate", "--model", str(tmp_path / "absent"), *ARGS, "--output", str(tmp_path / "x.png"),
                 "--parallel", "cfg=2"])
    err = [line for line in capfd.readouterr().err.splitlines() if "error:" in line]
    assert code == 1 and len(err) == 1, err
    assert "--parallel ulysses=1,ring=1,cfg=2: rank " in err[0] and "absent" in err[0], err
    assert not (tmp_path / "x.png").exists()


def test_a_dead_rank_ends_the_run_instead_of_hanging(capfd):
    """Rank 1 dies while rank 0 waits for it in a collective: the run ends at once with one line."""
    import time

    start = time.monotonic()
    assert run_workers(rank_one_dies, "ulysses=2", "cpu", ()) == 1
    assert time.monotonic() - start < 60
    assert "rank 1 died (exit status 3)" in capfd.readouterr().err


def test_bench_parallel_reports_once_from_rank_0(folder, capfd):
    import json

    argv = ["bench", "--model", str(folder), "--device", "cpu", "--height", "64", "--width", "64", "--steps", "2",
            "--runs", "1", "--warmup", "0", "--parallel", "ring=2"]
    assert main(argv) == 0
    records = [line for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    assert len(records) == 1, records
    assert json.loads(records[0])["engine"]["parallel"] == "ring=2"


def test_serve_refuses_parallel(capsys):
    assert main(["serve", "--parallel", "ulysses=2", "--device", "cpu"]) == 2
    assert "--parallel: serve runs on one process" in capsys.readouterr().err


def test_a_bad_plan_is_one_line(capsys):
    assert main(["generate", "--prompt", "a", "--parallel", "ulysses=two"]) == 2
    assert "--parallel: ulysses must be a positive integer, got 'two'" in capsys.readouterr().err
