"""Wan image-to-video against diffusers' own `WanImageToVideoPipeline` on tiny checkpoints `save_pretrained` wrote:
Wan2.1 I2V (CLIP image tokens + the encoded first frame concatenated to the noise) and Wan 2.2 TI2V-5B's
conditioning (expand_timesteps: latent frame 0 replaced by the image's, its tokens at timestep 0); every frame
>= 40 dB; the input image matters; requests without exactly one image are refused.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ditserve.config import EngineConfig, SamplingParams
from ditserve.engine.engine import Engine
from ditserve.errors import ConfigError
from ditserve.testing_wan import build_tiny_wan_i2v_pipeline, reference_wan_i2v

VIDEO = dict(height=64, width=80, num_frames=5, steps=3, seed=0)


def psnr(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = ((a - b) ** 2).mean()
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def random_image(seed: int, size=(70, 50)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("expand_timesteps", [False, True], ids=["wan21-i2v", "ti2v"])
def test_i2v_matches_diffusers(tmp_path, expand_timesteps):
    path = build_tiny_wan_i2v_pipeline(tmp_path / "i2v", seed=0, expand_timesteps=expand_timesteps)
    engine = Engine.load(str(path), EngineConfig(device="cpu"))
    image = random_image(0)
    image_file = tmp_path / "in.png"
    image.save(image_file)
    [out] = engine.generate([SamplingParams(prompt="a photo of a cat", negative_prompt="blurry", guidance=4.0,
                                            images=[str(image_file)], **VIDEO)])
    ref = reference_wan_i2v(path, image, "a photo of a cat", negative_prompt="blurry", guidance=4.0, **VIDEO)
    assert out.frames.shape == ref.shape == (1, 5, 64, 80, 3)
    assert min(psnr(out.frames[0, f], ref[0, f]) for f in range(5)) >= 40
    # another image, another video
    [other] = engine.generate([SamplingParams(prompt="a photo of a cat", negative_prompt="blurry", guidance=4.0,
                                              images=[random_image(1)], **VIDEO)])
    assert psnr(other.frames, out.frames) < 38
    # exactly one input image
    for images in ([], [image, image]):
        with pytest.raises(ConfigError, match="images"):
            engine.generate([SamplingParams(prompt="x", images=images, **VIDEO)])
    with pytest.raises(ConfigError, match="cannot read"):
        engine.generate([SamplingParams(prompt="x", images=[str(tmp_path / "missing.png")], **VIDEO)])
