"""Everything the CLI writes: still images and videos from an engine `Output`, never a partial file.

    targets = output_targets("clip.mp4", n=1)           # before loading: the suffix is one we can write
    check_kind(targets, "video", "clip.mp4")              # once the family is known: a video to .mp4/.webp/.gif/DIR
    paths = write_outputs(output, targets)                # temp names first, renamed when every file is complete

Images (`Output.kind == "image"`, frames uint8 (N, H, W, 3)): .png, .jpg/.jpeg, .webp, .gif, one file each, or
`DIR/` (a trailing slash or an existing folder): DIR/image_00000.png, ... for all N.

Videos (`kind == "video"`, frames uint8 (N, F, H, W, 3), `fps` set): .mp4 (H.264 in yuv420p through PyAV, which
bundles FFmpeg: no system ffmpeg needed), animated .webp (lossless) and .gif (Pillow), or `DIR/`: lossless
DIR/frame_00000.png, ... (several videos: DIR/video_0/frame_00000.png, ...). Several files (N > 1) are named
NAME-0.ext, NAME-1.ext, ...

Every file is written under a temporary name in its final folder and renamed once all outputs are complete;
`abort_pending()` (called on an error, and from the Ctrl-C handler of `ditserve.interrupt`) deletes the
temporary files, so an interrupted or failed run leaves no partial output behind.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from ditserve.errors import ConfigError

# Still-image suffix -> Pillow format name.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".gif": "GIF"}
# Video suffixes: H.264 MP4 (PyAV), animated WebP and GIF (Pillow).
VIDEO_FORMATS = (".mp4", ".webp", ".gif")
MP4_CRF = 18  # x264's constant-rate factor: visually lossless for generated frames


@dataclass(frozen=True)
class Target:
    """Where one output goes: a file (`folder=False`) or a folder of numbered PNGs (`folder=True`)."""

    path: Path
    folder: bool = False

    @property
    def suffix(self) -> str:
        return "" if self.folder else self.path.suffix.lower()


def _is_folder(output: str) -> bool:
    return output.endswith(("/", os.sep)) or Path(output).is_dir()


def output_targets(output: str, n: int) -> list[Target]:
    """The targets of `n` outputs for `--output output`: the path itself for one, NAME-i.ext / DIR-i/ for
    more. Raises ConfigError for a suffix nothing here can write (the kind check comes later: `check_kind`)."""
    if _is_folder(output):  # one folder for all outputs (see `write_outputs`)
        return [Target(Path(output), folder=True)]
    path = Path(output)
    suffix = path.suffix.lower()
    known = sorted(set(IMAGE_FORMATS) | set(VIDEO_FORMATS))
    if suffix not in known:
        raise ConfigError(f"--output {output!r}: unsupported format {path.suffix or '(no suffix)'!r}; use one of "
                          f"{', '.join(known)}, or a folder (DIR/) for numbered PNG files")
    if suffix == ".webp":
        from PIL import features

        if not features.check("webp"):
            raise ConfigError(f"--output {output!r}: this Pillow was built without WebP support; use .png or .gif")
    if n == 1:
        return [Target(path)]
    return [Target(path.with_name(f"{path.stem}-{i}{path.suffix}")) for i in range(n)]


def check_kind(targets: list[Target], kind: str, output: str) -> None:
    """Raise ConfigError where the model's output kind ("image" / "video") cannot go to these targets."""
    for t in targets:
        if t.folder:
            continue
        if kind == "video" and t.suffix not in VIDEO_FORMATS:
            raise ConfigError(f"--output {output!r}: this model makes videos; use .mp4, .webp, .gif or a folder "
                              f"(DIR/) for PNG frames")
        if kind == "image" and t.suffix not in IMAGE_FORMATS:
            raise ConfigError(f"--output {output!r}: this model makes images; use one of "
                              f"{', '.join(IMAGE_FORMATS)} or a folder (DIR/)")


# ------------------------------------------------------------------------------------------- temp files

_pending: set[Path] = set()  # temporary files written and not yet renamed or deleted
_pending_lock = threading.Lock()


def _temp_name(path: Path) -> Path:
    """A hidden name beside `path`, same suffix (encoders that look at it see the right one)."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


def _track(path: Path) -> Path:
    with _pending_lock:
        _pending.add(path)
    return path


def abort_pending() -> None:
    """Delete every temporary output file not yet renamed. Safe to call from another thread (Ctrl-C)."""
    with _pending_lock:
        paths = list(_pending)
        _pending.clear()
    for p in paths:
        try:
            p.unlink()
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------ encoders


def save_image(frame: np.ndarray, path: Path) -> None:
    """One uint8 (H, W, 3) frame to `path` in the format of its suffix (JPEG/WebP at quality 95)."""
    from PIL import Image

    fmt = IMAGE_FORMATS[path.suffix.lower()]
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    Image.fromarray(frame).save(path, format=fmt, **options)


def _fps_fraction(fps: float) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


def save_mp4(frames: np.ndarray, fps: float, path: Path) -> None:
    """uint8 (F, H, W, 3) frames to an H.264 MP4 (yuv420p, CRF `MP4_CRF`) at `fps`. H and W must be even."""
    import av

    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ConfigError(f"--output {str(path)!r}: H.264 needs an even width and height, got {width}x{height}")
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=_fps_fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(MP4_CRF)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder
            container.mux(packet)


def save_animation(frames: np.ndarray, fps: float, path: Path) -> None:
    """uint8 (F, H, W, 3) frames to an animated WebP (lossless) or GIF (Pillow's palette), looping forever."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    duration = max(1, round(1000 / fps))  # milliseconds per frame
    fmt = IMAGE_FORMATS[path.suffix.lower()]
    options = {"lossless": True} if fmt == "WEBP" else {}
    images[0].save(path, format=fmt, save_all=True, append_images=images[1:], duration=duration, loop=0,
                   **options)


def _write_folder(frames: np.ndarray, folder: Path, prefix: str) -> list[tuple[Path, Path]]:
    """Frames as lossless PNGs `prefix_00000.png`, ... in `folder`, under temporary names: (temp, final) pairs."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    moves = []
    for i, frame in enumerate(frames):
        final = folder / f"{prefix}_{i:05d}.png"
        temp = _track(_temp_name(final))
        Image.fromarray(frame).save(temp, format="PNG")
        moves.append((temp, final))
    return moves


def write_outputs(output: Any, targets: list[Target]) -> list[Path]:
    """Write `output` (an engine `Output`; N items) to `targets` (N of them); return the paths written (files,
    or folders). Nothing appears under a final name until every output is complete; on any error the
    temporary files are deleted and the error re-raised."""
    frames = output.frames
    if output.kind == "video" and not output.fps:
        raise ValueError("a video Output carries its fps (the family sets Output.fps)")
    folder = len(targets) == 1 and targets[0].folder
    if not folder and len(frames) != len(targets):
        raise ValueError(f"{len(frames)} outputs for {len(targets)} targets")
    moves: list[tuple[Path, Path]] = []
    try:
        if folder:  # images: DIR/image_00000.png, ...; one video: DIR/frame_*.png; several: DIR/video_0/frame_*.png
            root = targets[0].path
            if output.kind == "image":
                moves += _write_folder(frames, root, "image")
            for i, item in enumerate(frames if output.kind == "video" else []):
                moves += _write_folder(item, root if len(frames) == 1 else root / f"video_{i}", "frame")
        for item, target in zip(frames, [] if folder else targets):
            target.path.parent.mkdir(parents=True, exist_ok=True)
            temp = _track(_temp_name(target.path))
            if output.kind == "image":
                save_image(item, temp)
            elif target.suffix == ".mp4":
                save_mp4(item, output.fps, temp)
            else:
                save_animation(item, output.fps, temp)
            moves.append((temp, target.path))
        for temp, final in moves:
            os.replace(temp, final)
            with _pending_lock:
                _pending.discard(temp)
    except BaseException:
        abort_pending()
        raise
    return [t.path for t in targets]
