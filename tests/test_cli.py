"""`ditserve generate` / `compile-report`: every flag, output formats, and one-line errors with exit status 2.

Runs `main([...])` in-process on a tiny checkpoint built by the test (64x64, 1-2 steps), plus one real
`python -m ditserve` subprocess on the packaged default model.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ditserve.cli import main
from ditserve.config import SamplingParams
from ditserve.testing import build_tiny_flux_pipeline

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny FLUX.1-dev-like checkpoint (guidance embedder: 28 steps, guidance 3.5, 512 text tokens)."""
    return str(build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-cli"), guidance_embeds=True, seed=3,
                                        sample_size=64))


@pytest.fixture(autouse=True)
def _fresh_log_handlers():
    """setup_logging attaches a handler bound to the sys.stderr of its time; capsys swaps sys.stderr per test."""
    yield
    logging.getLogger("ditserve").handlers.clear()


def generate(tiny, out, *extra) -> list[str]:
    return ["generate", "--model", tiny, "--prompt", PROMPT, "--height", "64", "--width", "64", "--steps", "2",
            "--seed", "1", "--no-progress", "--output", str(out), *extra]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_generate_png(tiny, tmp_path, capsys):
    out = tmp_path / "sub" / "img.png"  # the parent folder is created
    assert main(generate(tiny, out)) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [str(out)]
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
    summary = [line for line in captured.err.splitlines() if "denoise" in line]
    assert len(summary) == 1
    assert "2 steps" in summary[0] and "seed 1" in summary[0] and "peak memory n/a" in summary[0]
    assert "text encode" in summary[0] and "decode" in summary[0]
    assert "Traceback" not in captured.err


def test_same_seed_same_image_and_flags_change_it(tiny, tmp_path):
    """Each sampling flag reaches the pipeline: changing it changes the image; the same flags reproduce it."""
    base = tmp_path / "base.png"
    assert main(generate(tiny, base)) == 0
    again = tmp_path / "again.png"
    assert main(generate(tiny, again)) == 0
    assert np.array_equal(pixels(base), pixels(again))
    variants = {
        "seed": ["--seed", "2"],
        "steps": ["--steps", "1"],
        "guidance": ["--guidance", "1.0"],
        "prompt": ["--prompt", "a green tree under a dark sky"],
        "max_sequence_length": ["--max-sequence-length", "8"],
        "dummy_weights": ["--load-format", "dummy"],
    }
    for name, flags in variants.items():
        out = tmp_path / f"{name}.png"
        assert main(generate(tiny, out, *flags)) == 0, name
        assert not np.array_equal(pixels(out), pixels(base)), f"{name} did not change the image"


def test_size_flags(tiny, tmp_path):
    out = tmp_path / "wide.png"
    assert main(generate(tiny, out, "--height", "80", "--width", "128")) == 0
    assert Image.open(out).size == (128, 80)


def test_engine_flags(tiny, tmp_path, capsys):
    """--dtype/--device/--load-format/--kernels/--attention are accepted and used; fp32 and bf16 agree
    roughly, and the same fp32 settings through explicit flags give the default-flag image exactly."""
    ref = tmp_path / "ref.png"
    assert main(generate(tiny, ref)) == 0
    explicit = tmp_path / "explicit.png"
    assert main(generate(tiny, explicit, "--dtype", "fp32", "--device", "cpu", "--load-format", "safetensors",
                         "--kernels", "native", "--attention", "sdpa")) == 0
    assert np.array_equal(pixels(explicit), pixels(ref))
    bf16 = tmp_path / "bf16.png"
    assert main(generate(tiny, bf16, "--dtype", "bf16")) == 0
    diff = np.abs(pixels(bf16) - pixels(ref))
    assert 0 < diff.mean() < 10  # bf16 differs a little, not entirely
    assert "Traceback" not in capsys.readouterr().err


def test_numbered_outputs_jpeg_and_quiet(tiny, tmp_path, capsys):
    out = tmp_path / "img.jpg"
    assert main(generate(tiny, out, "--num-images", "3", "--quiet")) == 0
    captured = capsys.readouterr()
    paths = [tmp_path / f"img-{i}.jpg" for i in range(3)]
    assert captured.out.splitlines() == [str(p) for p in paths]
    assert not out.exists()
    assert captured.err == ""  # --quiet: no progress bar, no summary, no info logs
    for p in paths:
        with Image.open(p) as img:
            assert img.format == "JPEG" and img.size == (64, 64)
    assert np.abs(pixels(paths[0]) - pixels(paths[1])).mean() > 5  # each image has its own noise


def test_webp_jpeg_and_gif_suffixes(tiny, tmp_path):
    for name, fmt in (("a.webp", "WEBP"), ("b.JPEG", "JPEG"), ("c.png", "PNG"), ("d.gif", "GIF")):
        assert main(generate(tiny, tmp_path / name)) == 0
        with Image.open(tmp_path / name) as img:
            assert img.format == fmt


def test_verbose_logs_the_load(tiny, tmp_path, capsys):
    assert main(generate(tiny, tmp_path / "v.png")) == 0
    assert "loaded transformer" not in capsys.readouterr().err  # default: warnings and the summary only
    assert main(generate(tiny, tmp_path / "v.png", "--verbose")) == 0
    assert "loaded transformer" in capsys.readouterr().err


def test_progress_bar_on_stderr(tiny, tmp_path, capsys):
    args = [a for a in generate(tiny, tmp_path / "p.png") if a != "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "denoise" in err and "2/2" in err  # tqdm's bar reached the last step


def test_compile_flag_compiles_the_transformer(tiny, tmp_path, monkeypatch):
    """--compile goes through ditserve.compile.compile_model (here with the quick 'eager' backend) and the
    compiled transformer gives the uncompiled image."""
    import ditserve.compile as compile_mod

    calls = []
    real = compile_mod.compile_model

    def spy(model, cfg):
        calls.append((type(model).__name__, cfg))
        from dataclasses import replace
        return real(model, replace(cfg, backend="eager"))

    monkeypatch.setattr(compile_mod, "compile_model", spy)
    plain, compiled = tmp_path / "plain.png", tmp_path / "compiled.png"
    assert main(generate(tiny, plain)) == 0
    assert calls == []
    assert main(generate(tiny, compiled, "--compile")) == 0
    assert [name for name, _ in calls] == ["FluxTransformer"]
    assert calls[0][1].regional and calls[0][1].fullgraph
    assert np.abs(pixels(compiled) - pixels(plain)).max() <= 1


BAD = {
    "height not a multiple of 16": (["--height", "65"], "height"),
    "width too large": (["--width", "8192"], "width"),
    "zero steps": (["--steps", "0"], "steps"),
    "zero images": (["--num-images", "0"], "--num-images must be between 1 and 16"),
    "negative seed": (["--seed", "-1"], "seed"),
    "unknown suffix": (["--output", "out.bmp"], "unsupported format '.bmp'"),
    "no suffix": (["--output", "out"], "unsupported format '(no suffix)'"),
    "video suffix for an image model": (["--output", "out.mp4"], "this model makes images"),
    "missing input image": (["--image", "/no/such/picture.png"], "--image '/no/such/picture.png': no such file"),
    "frames for an image model": (["--num-frames", "9"], "num_frames is not supported by FLUX.1"),
    "second guidance for a one-expert model": (["--guidance-2", "2"], "guidance_2 is not supported by FLUX.1"),
    "dtype choice": (["--dtype", "fp64"], "invalid choice"),
    "load-format choice": (["--load-format", "pickle"], "invalid choice"),
    "kernels choice": (["--kernels", "cuda"], "invalid choice"),
    "not an int": (["--steps", "two"], "invalid int"),
    "bad device": (["--device", "nonsense"], "--device"),
    "too many text tokens": (["--max-sequence-length", "600"], "--max-sequence-length must be"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_arguments_exit_2_with_one_line(case, tiny, tmp_path, capsys):
    flags, needle = BAD[case]
    assert main(generate(tiny, tmp_path / "x.png", *flags)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("ditserve") and "error" in lines[0] and needle in lines[0]
    assert captured.out == ""
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("flags, needle", [
    (["--model", "/no/such/model"], "no such folder"),
    (["--attention", "sage"], "sageattention"),
    (["--attention", "fa4"], "flash-attn-4"),
])
def test_bad_model_or_engine_exit_2(flags, needle, tmp_path, capsys):
    if "--attention" in flags:
        from ditserve.ops.attention import attention_backend_available
        if attention_backend_available(flags[1]):
            pytest.skip(f"the {flags[1]} backend's package is installed here")
    argv = ["generate", "--prompt", PROMPT, "--height", "64", "--width", "64", "--steps", "1", "--no-progress",
            "--output", str(tmp_path / "x.png"), *flags]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in lines[0]


def test_guidance_without_guidance_embedder_exit_2(tmp_path_factory, tmp_path, capsys):
    """A schnell-like model (no guidance embedder) refuses a guidance scale in one line."""
    schnell = build_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-schnell"), guidance_embeds=False, seed=3,
                                       sample_size=64)
    argv = ["generate", "--model", str(schnell), "--prompt", "x", "--steps", "1", "--guidance", "3.5",
            "--no-progress", "--output", str(tmp_path / "x.png")]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "no guidance embedding" in lines[0] and "Traceback" not in lines[0]
    assert not (tmp_path / "x.png").exists()


def test_model_path_that_is_a_file_or_lacks_model_index(tmp_path, capsys):
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    for model in (tmp_path / "f.txt", tmp_path / "empty"):
        assert main(["generate", "--model", str(model), "--prompt", PROMPT, "--output",
                     str(tmp_path / "x.png")]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and str(model) in lines[0]


def test_folder_of_pickles_says_pickle(tmp_path, capsys):
    """A folder holding only a .bin (no model_index.json): the one line says why ditserve will not open it."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "pytorch_model.bin").write_bytes(b"\x80\x04not opened")
    assert main(["generate", "--model", str(tmp_path / "ckpt"), "--prompt", PROMPT]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "no model_index.json" in line and "pickle checkpoints (pytorch_model.bin)" in line


def test_missing_prompt_and_unknown_command(capsys):
    assert main(["generate"]) == 2
    assert "--prompt" in capsys.readouterr().err
    assert main(["paint"]) == 2
    assert main([]) == 2
    capsys.readouterr()
    assert main(["--help"]) == 0
    assert "generate" in capsys.readouterr().out


def test_compile_report_names_the_default_model_as_bench_and_serve_do(capsys):
    assert main(["compile-report", "--backend", "eager", "--text-len", "8"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["model"] == "default-model"


def test_compile_report_subcommand(tiny, capsys):
    argv = ["compile-report", "--model", tiny, "--backend", "eager", "--height", "64", "--width", "64",
            "--text-len", "8"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["graph_breaks"] == 0 and report["recompiles"] == 0
    assert main(["compile-report", "--model", tiny, "--height", "65"]) == 2


def test_python_dash_m_on_the_packaged_default_model(tmp_path):
    out = tmp_path / "default.png"
    proc = subprocess.run(
        [sys.executable, "-m", "ditserve", "generate", "--prompt", PROMPT, "--height", "64", "--width", "64",
         "--steps", "2", "--seed", "0", "--output", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [str(out)]
    assert "Traceback" not in proc.stderr
    assert "default-model" in proc.stderr  # the summary names the packaged model
    with Image.open(out) as img:
        assert img.size == (64, 64)


def test_dynamic_shapes_defaults_per_subcommand():
    """A generate / bench run makes one size (auto: the faster first compile); a server's requests vary in
    size (on: no request waits for a compile); compile-report checks dynamic shapes (on)."""
    from ditserve.cli import build_parser
    from ditserve.engine_args import engine_from_args

    parser = build_parser()
    required = {"generate": ["--prompt", PROMPT], "bench": ["--prompt", PROMPT]}

    def engine(cmd, *extra):
        return engine_from_args(parser.parse_args([cmd, *required.get(cmd, []), *extra]))

    defaults = {cmd: engine(cmd).dynamic_shapes for cmd in ("generate", "serve", "bench", "compile-report")}
    assert defaults == {"generate": "auto", "serve": "on", "bench": "auto", "compile-report": "on"}
    assert engine("generate", "--dynamic-shapes", "on").dynamic_shapes == "on"
    assert engine("serve", "--dynamic-shapes", "auto").dynamic_shapes == "auto"
    assert engine("generate").compile_prewarm and not engine("serve", "--no-compile-prewarm").compile_prewarm
    with pytest.raises(SystemExit):
        engine("generate", "--dynamic-shapes", "off")


def test_fa4_attention_refused_off_hopper_and_blackwell(monkeypatch):
    """--attention fa4 with its package installed, on a device its kernels do not run on: refused before loading."""
    from ditserve.config import ConfigError, EngineConfig
    from ditserve.engine_args import check_engine
    from ditserve.ops import attention as A

    monkeypatch.setattr(A, "attention_backend_available", lambda name: True)
    with pytest.raises(ConfigError, match=r"--attention fa4: .*capability 9.x or 10.x only, not on device 'cpu'"):
        check_engine(EngineConfig(device="cpu", attention="fa4"))
    check_engine(EngineConfig(device="cpu", attention="sdpa"))


def test_folder_output_writes_numbered_pngs(tiny, tmp_path, capsys):
    """--output DIR/ (a trailing slash, or an existing folder): DIR/image_00000.png, ... for every image."""
    assert main(generate(tiny, f"{tmp_path / 'new'}/", "--num-images", "2", "--quiet")) == 0
    assert capsys.readouterr().out.splitlines() == [f"{tmp_path / 'new'}"]
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["image_00000.png", "image_00001.png"]
    (tmp_path / "existing").mkdir()
    assert main(generate(tiny, tmp_path / "existing", "--quiet")) == 0
    with Image.open(tmp_path / "existing" / "image_00000.png") as img:
        assert img.format == "PNG" and img.size == (64, 64)


def test_unreadable_input_image_is_one_line(tiny, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    assert main(generate(tiny, tmp_path / "x.png", "--image", str(bad))) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"--image {str(bad)!r}: not an image" in lines[0]
    good = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(good)
    assert main(generate(tiny, tmp_path / "x.png", "--image", str(good))) == 2  # opened, then refused by the family
    assert "images: FLUX.1 takes no input images, got 1" in capsys.readouterr().err


def test_misspelt_flag_suggests_the_close_one(capsys):
    assert main(["generate", "--promt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ditserve generate: error: unrecognized argument --promt; did you mean --prompt? (see --help)"]
    assert main(["generate", "--prompt", "x", "--zzzz"]) == 2
    assert "unrecognized argument --zzzz (see --help)" in capsys.readouterr().err


def test_help_and_argument_errors_import_no_torch():
    """--help, an argument error and a bad value answer without importing torch (torch alone takes seconds)."""
    code = ("import sys\nfrom ditserve.cli import main\n"
            "codes = [main(a) for a in (['--help'], ['generate', '--help'], ['compile-report', '--help'], "
            "['generate'], ['generate', '--prompt', 'x', '--steps', 'two'], ['bench', '--height', '100'], "
            "['generate', '--prompt', 'x', '--output', 'x.bmp'])]\n"
            "print(codes, 'torch' in sys.modules, 'diffusers' in sys.modules, file=sys.stderr)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stderr.strip().splitlines()[-1] == "[0, 0, 0, 2, 2, 2, 2] False False", proc.stderr


def test_help_states_ranges_and_lists_only_used_flags(capsys):
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "in 64-4096" in text and "1-16" in text and ".gif" in text and ".mp4" in text
    assert main(["compile-report", "--help"]) == 0
    text = capsys.readouterr().out
    for unused in ("--vae-tiling", "--vae-streaming", "--compile-vae", "--cuda-graphs", "--cfg-mode",
                   "--cache-backend"):
        assert unused not in text  # the report runs the transformer alone
    assert "--cache " in text and "--quantization" in text


def test_torch_free_choice_lists_match_their_sources():
    from ditserve import compile as compile_mod
    from ditserve.compile_report import COMPILE_BACKENDS, COMPILE_MODES
    from ditserve.config import DTYPE_NAMES, DTYPES
    from ditserve.engine_args import ATTENTION_BACKENDS, ATTENTION_CHOICES
    from ditserve.ops.attention import BACKENDS

    assert ATTENTION_BACKENDS == tuple(BACKENDS) and ATTENTION_CHOICES == ("auto", *BACKENDS) and tuple(DTYPES) == DTYPE_NAMES
    assert COMPILE_BACKENDS == compile_mod.BACKENDS and COMPILE_MODES == compile_mod.MODES


def test_preflight_says_hopeless_work_far_sizes_and_unknown_words():
    from ditserve.config import EngineConfig
    from ditserve.engine import Engine
    from ditserve.preflight import preflight_warnings, suggested_sizes

    engine = Engine.load(None, EngineConfig(device="cpu"))
    ok = engine.resolve(SamplingParams(prompt=PROMPT, seed=0))
    assert preflight_warnings(engine, ok) == []
    huge = engine.resolve(SamplingParams(prompt="A photo of a red cat, 4k", height=4096, width=4096, seed=0))
    hopeless, far, words = preflight_warnings(engine, huge)
    assert "65,536 image tokens" in hopeless and "28 steps" in hopeless and "on cpu" in hopeless
    assert " h of denoising" in hopeless  # hours, not seconds
    assert "made for 64x64" in far and "4096x4096" in far
    assert "'photo', 'of', 'cat', '4k'" in words and "'red'" not in words
    assert suggested_sizes(64, 64)[:3] == ["64x64", "96x96", "128x128"]
    assert suggested_sizes(1024, 1024)[0] == "1024x1024" and "4096x4096" not in suggested_sizes(1024, 1024)


def test_video_model_writes_mp4_with_the_requested_frames_and_fps(tmp_path, monkeypatch, capsys):
    """generate's video path: --num-frames / --fps reach the request, the Output's frames go to an MP4 (decoded
    here by PyAV), and an image suffix is refused for a video model. The engine is a stand-in making videos."""
    import av

    from ditserve.engine import Capabilities, Engine, Output

    class VideoEngine:
        name = "tiny-video"
        capabilities = Capabilities(family="TinyVideo", guidance="cfg", output="video", frame_rule=(4, 1))

        def resolve(self, p):
            self.capabilities.check(p)
            return SamplingParams(**{**p.__dict__, "height": p.height or 64, "width": p.width or 96,
                                     "steps": p.steps or 2, "guidance": 0.0, "seed": p.seed or 0,
                                     "num_frames": p.num_frames or 5, "fps": p.fps or 16.0})

        def generate(self, p, progress=False):
            frames = np.zeros((p.num_images, p.num_frames, p.height, p.width, 3), np.uint8)
            frames[:, :, :, :, 1] = np.arange(p.num_frames, dtype=np.uint8)[None, :, None, None] * 20
            return Output(kind="video", frames=frames, timings=dict.fromkeys(
                ("text_encode_s", "denoise_s", "decode_s", "total_s"), 0.1), peak_memory_bytes=None, params=p,
                fps=p.fps)

    monkeypatch.setattr(Engine, "load", classmethod(lambda cls, model, config: VideoEngine()))
    out = tmp_path / "clip.mp4"
    argv = ["generate", "--prompt", "x", "--num-frames", "9", "--fps", "12", "--quiet", "--output", str(out)]
    assert main(argv) == 0
    assert capsys.readouterr().out.splitlines() == [str(out)]
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height, float(stream.average_rate)) == (96, 64, 12.0)
        assert sum(1 for _ in container.decode(video=0)) == 9
    assert main([*argv[:-1], str(tmp_path / "clip.png")]) == 2
    assert "this model makes videos; use .mp4" in capsys.readouterr().err
    assert main([*argv[:3], "--num-frames", "8", "--quiet", "--output", str(out)]) == 2
    assert "error: --num-frames must be 4n + 1 for TinyVideo, got 8" in capsys.readouterr().err
    assert not (tmp_path / "clip.png").exists()


def test_summary_names_each_stage_peak():
    """generate's summary line says which stage set the request's peak memory (GPU runs track it)."""
    from types import SimpleNamespace

    from ditserve.cli import _format_summary

    gib = 2**30
    result = SimpleNamespace(
        timings={"text_encode_s": 0.1, "denoise_s": 2.0, "decode_s": 0.5, "total_s": 2.6},
        peak_memory_bytes=30 * gib, cache_stats=None, params=SimpleNamespace(seed=7),
        stage_peak_memory_bytes={"text_encode": 12 * gib, "denoise": 30 * gib, "decode": 25 * gib})
    line = _format_summary(result, 2)
    assert "peak memory 30.00 GiB (text encode 12.00, denoise 30.00, decode 25.00)" in line
