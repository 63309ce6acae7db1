"""`ditserve generate` end to end on tiny Wan checkpoints (`save_pretrained` by diffusers): a frames folder compared
frame by frame with diffusers' WanPipeline (Wan 2.1, and Wan 2.2 with two experts and --guidance-2), and an .mp4
of the same run decoded independently (PyAV) with the right frame count, size and fps."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ditserve.cli import main
from ditserve.testing_wan import build_tiny_wan_pipeline, reference_wan

H, W, F = 64, 80, 5


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def generate(model, out, *extra) -> None:
    args = ["generate", "--model", str(model), "--prompt", "a photo of a cat", "--negative-prompt", "blurry",
            "--num-frames", str(F), "--height", str(H), "--width", str(W), "--steps", "2", "--guidance", "4",
            "--seed", "3", "--output", str(out), "--no-progress", "--device", "cpu", *extra]
    assert main(args) == 0


@pytest.mark.parametrize("two_experts", [False, True], ids=["wan2.1", "wan2.2-a14b"])
def test_generate_frames_folder_matches_diffusers(tmp_path, two_experts):
    model = build_tiny_wan_pipeline(tmp_path / "model", seed=2, two_experts=two_experts, boundary_ratio=0.9)
    extra = ["--guidance-2", "2.5"] if two_experts else []
    generate(model, f"{tmp_path}/frames/", *extra)
    files = sorted((tmp_path / "frames").glob("*.png"))
    assert [f.name for f in files] == [f"frame_{i:05d}.png" for i in range(F)]
    ours = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    ref = reference_wan(model, "a photo of a cat", negative_prompt="blurry", height=H, width=W, num_frames=F,
                        steps=2, guidance=4.0, guidance_2=2.5 if two_experts else None, seed=3)[0]
    assert ours.shape == ref.shape == (F, H, W, 3)
    assert min(psnr(a, b) for a, b in zip(ours, ref)) >= 40


def test_generate_mp4_decodes_independently(tmp_path):
    import av

    model = build_tiny_wan_pipeline(tmp_path / "model", seed=2)
    generate(model, tmp_path / "clip.mp4", "--fps", "12")
    with av.open(str(tmp_path / "clip.mp4")) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        assert float(stream.average_rate) == 12
    assert len(frames) == F and frames[0].shape == (H, W, 3)
    ref = reference_wan(model, "a photo of a cat", negative_prompt="blurry", height=H, width=W, num_frames=F,
                        steps=2, guidance=4.0, seed=3)[0]
    assert min(psnr(a, b) for a, b in zip(frames, ref)) >= 25  # H.264 in yuv420p: lossy, but the same video


def test_bad_frame_count_exits_2(tmp_path, capsys):
    model = build_tiny_wan_pipeline(tmp_path / "model", seed=2)
    assert main(["generate", "--model", str(model), "--prompt", "x", "--num-frames", "6", "--height", str(H),
                 "--width", str(W), "--steps", "1", "--output", str(tmp_path / "o.mp4"), "--device", "cpu"]) == 2
    assert "num-frames" in capsys.readouterr().err
