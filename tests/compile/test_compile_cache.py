"""The persistent compile-artefact cache: where it is, that a user's choice wins, and that a second process
reuses the first one's compiled artefacts (AOTAutograd cache hits, which hold inductor's compiled graph,
instead of a fresh compile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ditserve.compile import compile_cache_dir, set_process_compiler_flags


def test_cache_dir_from_ditserve_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DITSERVE_CACHE_DIR", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "torch-compile"


def test_cache_dir_default_under_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("DITSERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache_dir() == tmp_path / "ditserve" / "torch-compile"


def test_flags_point_inductor_at_the_persistent_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("DITSERVE_CACHE_DIR", str(tmp_path))
    set_process_compiler_flags()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch-compile")


def test_inductors_import_time_default_is_replaced(monkeypatch, tmp_path):
    """Importing inductor writes its /tmp default into the variable: that is not a user's choice."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    monkeypatch.setenv("DITSERVE_CACHE_DIR", str(tmp_path))
    set_process_compiler_flags()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torch-compile")


def test_users_inductor_folder_wins(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("DITSERVE_CACHE_DIR", str(tmp_path / "ditserve"))
    set_process_compiler_flags()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


_CHILD = textwrap.dedent("""
    import json, torch
    from torch._dynamo.utils import counters
    from ditserve.compile import CompileConfig, compile_model

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)
        def forward(self, x):
            return torch.nn.functional.gelu(self.lin(x)) * 2 + x

    class Tiny(torch.nn.Module):
        repeated_blocks = ("blocks",)
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(), Block()])
        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    torch.manual_seed(0)
    model = compile_model(Tiny(), CompileConfig())
    with torch.inference_mode():
        model(torch.randn(2, 5, 16))
    print(json.dumps({"hit": counters["aot_autograd"]["autograd_cache_hit"],
                      "miss": counters["aot_autograd"]["autograd_cache_miss"]}))
""")


@pytest.mark.slow
def test_second_process_reuses_compiled_artefacts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["DITSERVE_CACHE_DIR"] = str(tmp_path)

    def run() -> dict:
        proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first, second = run(), run()
    assert first["miss"] >= 1 and first["hit"] == 0  # compiled from nothing, into the folder ditserve chose
    assert any((tmp_path / "torch-compile").iterdir())
    assert second["hit"] >= 1 and second["miss"] == 0  # the second process compiled nothing new
