"""ditserve.media: what the CLI writes. An MP4 opens in an independent decoder (PyAV's FFmpeg decoder) with the
frame count, size and fps written; animated GIF / WebP keep their frames; DIR/ gets numbered lossless PNGs; a
failure leaves no file behind; an image model cannot write a video and the reverse."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ditserve import media
from ditserve.config import SamplingParams
from ditserve.engine.request import Output
from ditserve.errors import ConfigError

F, H, W = 9, 48, 64


def video_output(n: int = 1, frames: int = F, fps: float = 16.0) -> Output:
    """n videos of `frames` frames: a bright square moving right over a gradient (uint8 (n, F, H, W, 3))."""
    v = np.zeros((n, frames, H, W, 3), np.uint8)
    v[..., 0] = np.linspace(0, 255, W, dtype=np.uint8)[None, None, None, :]
    for i in range(frames):
        v[:, i, 16:32, 4 * i:4 * i + 16] = (250, 250, 40)
    v[:, :, :, :, 2] = np.arange(n, dtype=np.uint8)[:, None, None, None] * 60
    return Output(kind="video", frames=v, timings={}, peak_memory_bytes=None, params=SamplingParams(prompt="x"),
                  fps=fps)


def image_output(n: int = 2) -> Output:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    return Output(kind="image", frames=frames, timings={}, peak_memory_bytes=None, params=SamplingParams(prompt="x"))


def write(output: Output, path, n: int | None = None) -> list[Path]:
    targets = media.output_targets(str(path), len(output.frames) if n is None else n)
    media.check_kind(targets, output.kind, str(path))
    return media.write_outputs(output, targets)


def test_mp4_opens_in_an_independent_decoder(tmp_path):
    import av

    out = video_output(fps=24.0)
    [path] = write(out, tmp_path / "clip.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert float(stream.average_rate) == 24.0
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == F and decoded[0].shape == (H, W, 3)
    # H.264 at CRF 18 in yuv420p: close to the frames written, and each decoded frame is its own frame.
    err = [np.abs(d.astype(int) - f.astype(int)).mean() for d, f in zip(decoded, out.frames[0])]
    assert max(err) < 6
    assert np.abs(decoded[0].astype(int) - out.frames[0][-1].astype(int)).mean() > 10


def test_mp4_keeps_a_fractional_fps(tmp_path):
    import av

    [path] = write(video_output(frames=5, fps=23.976), tmp_path / "ntsc.mp4")
    with av.open(str(path)) as container:
        assert abs(float(container.streams.video[0].average_rate) - 23.976) < 1e-3


@pytest.mark.parametrize("suffix", [".gif", ".webp"])
def test_animated_gif_and_webp_keep_every_frame(tmp_path, suffix):
    out = video_output(fps=10.0)
    [path] = write(out, tmp_path / f"clip{suffix}")
    with Image.open(path) as img:
        assert img.is_animated and img.n_frames == F and img.size == (W, H)
        img.seek(F - 1)
        img.load()
        assert img.info["duration"] == 100  # ms per frame at 10 fps
        last = np.asarray(img.convert("RGB"), int)
    tol = 0 if suffix == ".webp" else 40  # WebP: lossless; GIF: a 256-colour palette
    assert np.abs(last - out.frames[0][-1].astype(int)).mean() <= max(tol, 0.5)


def test_frame_folder_is_lossless(tmp_path):
    out = video_output()
    [folder] = write(out, f"{tmp_path / 'frames'}/")
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"frame_{i:05d}.png" for i in range(F)]
    for i in (0, F - 1):
        assert np.array_equal(np.asarray(Image.open(folder / names[i])), out.frames[0][i])


def test_several_videos_are_numbered(tmp_path):
    out = video_output(n=2, frames=3)
    paths = write(out, tmp_path / "v.gif")
    assert [p.name for p in paths] == ["v-0.gif", "v-1.gif"]
    [folder] = write(out, f"{tmp_path / 'dir'}/")
    assert sorted(p.name for p in folder.iterdir()) == ["video_0", "video_1"]
    assert len(list((folder / "video_1").iterdir())) == 3


def test_images_to_files_and_folder(tmp_path):
    out = image_output(2)
    paths = write(out, tmp_path / "img.gif")
    assert [p.name for p in paths] == ["img-0.gif", "img-1.gif"]
    (tmp_path / "existing").mkdir()
    write(out, tmp_path / "existing")  # an existing folder, no trailing slash
    assert np.array_equal(np.asarray(Image.open(tmp_path / "existing" / "image_00001.png")), out.frames[1])


def test_kind_and_suffix_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="unsupported format '.avi'"):
        media.output_targets(str(tmp_path / "x.avi"), 1)
    with pytest.raises(ConfigError, match="this model makes videos; use .mp4"):
        media.check_kind(media.output_targets(str(tmp_path / "x.png"), 1), "video", "x.png")
    with pytest.raises(ConfigError, match="this model makes images"):
        media.check_kind(media.output_targets(str(tmp_path / "x.mp4"), 1), "image", "x.mp4")
    media.check_kind(media.output_targets(str(tmp_path / "x.gif"), 1), "image", "x.gif")  # both kinds


def test_a_failure_leaves_no_file(tmp_path, monkeypatch):
    """The second output fails while encoding: neither the first (complete) nor the second appears, and no
    temporary file is left."""
    calls = []
    real = media.save_animation

    def failing(frames, fps, path):
        calls.append(path)
        if len(calls) == 2:
            path.write_bytes(b"half a gif")
            raise OSError("disk full")
        real(frames, fps, path)

    monkeypatch.setattr(media, "save_animation", failing)
    with pytest.raises(OSError, match="disk full"):
        write(video_output(n=2, frames=3), tmp_path / "v.gif")
    assert list(tmp_path.iterdir()) == []


def test_abort_pending_deletes_temporary_files(tmp_path):
    """What the Ctrl-C handler calls: files being written under their temporary names are removed."""
    temp = media._track(media._temp_name(tmp_path / "x.mp4"))
    temp.write_bytes(b"partial")
    assert temp.name.startswith(".x.partial-") and temp.suffix == ".mp4"
    media.abort_pending()
    assert not temp.exists()
