"""streamed_decode (ditserve.pipelines.vae_decode): the same images as AutoencoderKL.decode (random-weight VAEs,
every step mode, strips that do not divide the rows, batches decoded whole and in groups), a fraction of its
activation memory (the peak of live op outputs, traced by a dispatch mode: on CPU at a small image, and at FLUX.1's
real 1024x1024 in bf16 on meta tensors), and what it refuses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torch import nn

from ditserve.pipelines.vae_decode import (DEFAULT_MATERIALIZE_BYTES, DEFAULT_STRIP_BYTES, _plan, streamed_decode,
                                           streamed_decode_unsupported)
from ditserve.testing import LiveBytes

MiB = 2**20

# The tiny VAE of ditserve.testing.build_tiny_flux_pipeline, and FLUX.1's VAE architecture (its config.json).
TINY = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
FLUX = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
FLUX_LATENT = (128, 128)  # 1024x1024 pixels


def _vae(arch: dict, seed: int = 0, **overrides) -> AutoencoderKL:
    torch.manual_seed(seed)
    config = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16, use_quant_conv=False,
                  use_post_quant_conv=False, **arch)
    config.update(overrides)
    return AutoencoderKL(**config).eval()


def _latents(B: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, 16, h, w, generator=torch.Generator().manual_seed(seed))


def _whole(vae, z):
    with torch.no_grad():
        return vae.decode(z, return_dict=False)[0]


def _modes(plan) -> set[tuple[str, str]]:
    return {(step.kind, step.mode) for step in plan.steps}


def _peak(fn, *args, **kwargs) -> int:
    with torch.no_grad(), LiveBytes() as tracker:
        result = fn(*args, **kwargs)
    del result
    return tracker.peak


def test_live_bytes_tracker_sees_allocations_views_and_frees():
    with LiveBytes() as tracker:
        a = torch.empty(1000)  # 4000 bytes
        view = a[10:20]  # the same storage: nothing more
        b = torch.empty(2000)  # 8000
        assert tracker.live == 12000
        del a  # the view keeps the storage
        assert tracker.live == 12000
        del view
        assert tracker.live == 8000
        c = b.add_(1)  # in place: the same tensor
        d = torch.empty(500, device="meta")  # 2000, no data pointer
        assert tracker.live == 10000
        del b, c, d
        e = torch.empty(100)
        assert tracker.live == 400
        del e
    assert tracker.peak == 12000 and tracker.live == 0


# --- parity ------------------------------------------------------------------------------------------------------

# (strip_bytes, materialize_bytes) for the tiny VAE, batch 2, latent 6x5 (48x40 pixels), fp32. A row of 2 samples,
# 16 channels and 40 columns is 5120 bytes: strips of 5 rows at 48x40 (more where a step holds less than the budget).
TINY_CASES = {
    # 2 samples together: whole low-resolution blocks; streamed resnets; the last upsample fused into the next
    # resnet (with a 1x1 shortcut); an in-place resnet; a streamed output.
    "group_of_2": (25_600, 200_000),
    # groups of 1 sample: a streamed upsample.
    "group_of_1": (25_600, 160_000),
    # nothing fits: everything streamed, every upsample fused, every identity resnet in place.
    "all_streamed": (25_600, 1_000),
    "whole": (2**30, 2**30),
}
TINY_MODES = {
    "group_of_2": {("resnet", "whole"), ("upsample", "whole"), ("resnet", "stream"), ("upsample", "fuse"),
                   ("resnet", "stream_in_place"), ("output", "stream")},
    "group_of_1": {("resnet", "whole"), ("upsample", "whole"), ("upsample", "stream"), ("resnet", "stream"),
                   ("output", "stream")},
    "all_streamed": {("resnet", "stream"), ("upsample", "fuse"), ("resnet", "stream_in_place"),
                     ("output", "stream")},
    "whole": {("resnet", "whole"), ("upsample", "whole"), ("output", "whole")},
}


@pytest.fixture(scope="module")
def tiny_vae():
    return _vae(TINY)


@pytest.mark.parametrize("case", TINY_CASES)
def test_tiny_vae_parity(tiny_vae, case):
    strip_bytes, materialize_bytes = TINY_CASES[case]
    z = _latents(2, 6, 5)  # non-square latent, 2 samples
    plan = _plan(tiny_vae, 2, 6, 5, torch.float32, strip_bytes=strip_bytes, materialize_bytes=materialize_bytes)
    assert _modes(plan) == TINY_MODES[case]
    assert plan.group == (1 if case in ("group_of_1", "all_streamed") else 2)
    if case != "whole":  # strips of 5 to 20 rows at 48 rows: several, the last one shorter
        assert any(step.rows and 48 % step.rows and step.rows <= 10 for step in plan.steps)
    ref = _whole(tiny_vae, z)
    out = streamed_decode(tiny_vae, z, strip_bytes=strip_bytes, materialize_bytes=materialize_bytes)
    assert out.shape == ref.shape == (2, 3, 48, 40) and out.dtype == ref.dtype
    scale = ref.abs().max().item()
    assert scale > 0.1
    assert (out - ref).abs().max().item() <= 1e-5 * scale  # seen: 2e-6 x scale


def test_tiny_vae_batch_in_uneven_groups(tiny_vae):
    z = _latents(3, 6, 5)
    assert _plan(tiny_vae, 3, 6, 5, torch.float32, strip_bytes=25_600, materialize_bytes=200_000).group == 2
    ref = _whole(tiny_vae, z)
    out = streamed_decode(tiny_vae, z, strip_bytes=25_600, materialize_bytes=200_000)  # samples [0, 1], then [2]
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_tiny_vae_output_scale_factor_and_post_quant_conv():
    vae = _vae(TINY, use_post_quant_conv=True)
    vae.decoder.up_blocks[3].resnets[0].output_scale_factor = 2.0
    vae.decoder.up_blocks[2].resnets[1].output_scale_factor = 0.5
    z = _latents(1, 5, 7)
    ref = _whole(vae, z)
    out = streamed_decode(vae, z, strip_bytes=1, materialize_bytes=1)
    assert (out - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_tiny_vae_bf16():
    """In bf16, streamed and whole decodes round differently now and then, and the differences propagate; the
    streamed decode is as close to the fp32 decode as diffusers' bf16 decode is."""
    vae = _vae(TINY)
    z = _latents(2, 6, 5)
    ref32 = _whole(vae, z)
    vae = vae.to(torch.bfloat16)
    z = z.to(torch.bfloat16)
    whole = _whole(vae, z)
    out = streamed_decode(vae, z, strip_bytes=6_400, materialize_bytes=1_000)  # everything streamed
    assert out.dtype == whole.dtype == torch.bfloat16
    out, whole = out.float(), whole.float()

    def psnr(a, b):  # outputs clamped to [-1, 1], as images are: peak-to-peak 2
        return 10 * torch.log10(4 / (a.clamp(-1, 1) - b.clamp(-1, 1)).square().mean()).item()

    def rel_l2(a, b):
        return ((a - b).norm() / b.norm()).item()

    print(f"bf16: streamed vs whole PSNR {psnr(out, whole):.1f} dB, relative L2 {rel_l2(out, whole):.1e}; "
          f"against fp32: streamed {rel_l2(out, ref32):.2e}, whole {rel_l2(whole, ref32):.2e}")
    assert 40 < psnr(out, whole) < 200  # seen: 57 dB; < 200: the two do differ, this is no self-comparison
    assert rel_l2(out, ref32) < 1.25 * rel_l2(whole, ref32)  # seen: 2.28e-2 and 2.25e-2


# --- FLUX.1's architecture ---------------------------------------------------------------------------------------

# Latent 16x12 = 128x96 pixels, fp32. Budgets: the defaults (for 1024^2 in bf16) scaled by the bytes of a feature
# map here against there, so the plan makes FLUX.1's 1024^2 decisions (same modes at every step).
SMALL_LATENT = (16, 12)
SMALL_SCALE = (SMALL_LATENT[0] * SMALL_LATENT[1]) / (FLUX_LATENT[0] * FLUX_LATENT[1]) * (4 / 2)
SMALL_BUDGETS = dict(strip_bytes=int(DEFAULT_STRIP_BYTES * SMALL_SCALE),
                     materialize_bytes=int(DEFAULT_MATERIALIZE_BYTES * SMALL_SCALE))


@pytest.fixture(scope="module")
def flux_vae():
    return _vae(FLUX)


@pytest.fixture(scope="module")
def flux_small(flux_vae):
    """Both decodes of one 128x96 latent, with their peaks of live activation bytes."""
    z = _latents(1, *SMALL_LATENT)
    with torch.no_grad(), LiveBytes() as whole_bytes:
        ref = flux_vae.decode(z, return_dict=False)[0]
    with LiveBytes() as streamed_bytes:
        out = streamed_decode(flux_vae, z, **SMALL_BUDGETS)
    return ref, out, whole_bytes.peak, streamed_bytes.peak


def test_flux_plan_at_1024():
    """FLUX.1 at 1024^2 in bf16 with the default budgets (see the module docstring of vae_decode)."""
    with torch.device("meta"):
        vae = _vae(FLUX)
    plan = _plan(vae, 1, *FLUX_LATENT, torch.bfloat16)
    small = _plan(vae, 1, *SMALL_LATENT, torch.float32, **SMALL_BUDGETS)
    modes = [(step.kind, step.mode) for step in plan.steps]
    assert modes == [(step.kind, step.mode) for step in small.steps]
    assert modes == [("resnet", "whole")] * 3 + [("upsample", "whole")] + [("resnet", "whole")] * 3 + [
        ("upsample", "stream")] + [("resnet", "stream")] * 3 + [("upsample", "fuse"), ("resnet", "stream")] + [
        ("resnet", "stream_in_place")] * 2 + [("output", "stream")]
    assert plan.held_bytes == 384 * MiB
    # 4 samples: one at a time; at 256x256 all four together and whole.
    assert _plan(vae, 4, *FLUX_LATENT, torch.bfloat16).group == 1
    small_images = _plan(vae, 4, 32, 32, torch.bfloat16)
    assert small_images.group == 4 and _modes(small_images) == {("resnet", "whole"), ("upsample", "whole"),
                                                                ("output", "whole")}


def test_flux_parity(flux_small):
    ref, out, _, _ = flux_small
    assert out.shape == ref.shape == (1, 3, 128, 96)
    scale = ref.abs().max().item()
    err = (out - ref).abs().max().item()
    print(f"FLUX.1 architecture, 128x96 fp32: max |streamed - whole| = {err:.2e}, max |whole| = {scale:.2f}")
    assert scale > 0.1 and err <= 1e-4 * scale  # seen: 1.1e-6 x scale


def test_flux_memory_cpu(flux_small):
    """Peaks of live op outputs (LiveBytes) at 128x96 in fp32, budgets scaled to the image. At 1024^2 in bf16 (x 1 /
    SMALL_SCALE, measured directly by the next test) the whole decode holds 1536 MiB of op outputs (at the first
    1024^2 resnet: its 512 MiB input, GroupNorm's and SiLU's outputs); the H100's ~2.4 GiB also counts cuDNN
    workspaces. The streamed decode cannot hold less than 384 MiB there: the first 1024^2 resnet needs its
    materialised 128 MiB source and its 256 MiB output at once, 0.25x the whole decode's op outputs; strip
    temporaries come on top (relatively more here, where halo rows and MIN_STRIP_ROWS weigh more)."""
    _, _, whole, streamed = flux_small
    print(f"FLUX.1 architecture, 128x96 fp32: live activation peak whole {whole / MiB:.2f} MiB, streamed "
          f"{streamed / MiB:.2f} MiB ({streamed / whole:.2f}x); extrapolated to 1024^2 bf16: "
          f"{whole / SMALL_SCALE / MiB:.0f} and {streamed / SMALL_SCALE / MiB:.0f} MiB")
    assert whole == pytest.approx(1536 * MiB * SMALL_SCALE, rel=0.05)  # the tracker saw the activations
    assert streamed <= 0.3 * whole  # seen: 0.29x (0.27x at 1024^2)


def _flash_like_sdpa(real):
    """F.scaled_dot_product_attention in chunks of 1024 queries: the memory of the flash / memory-efficient kernel
    that runs the mid block's attention on a GPU (the math fallback on meta and CPU holds 16384^2 fp32 scores)."""
    def sdpa(query, key, value, *args, **kwargs):
        chunks = [real(query[..., i:i + 1024, :], key, value, *args, **kwargs)
                  for i in range(0, query.shape[-2], 1024)]
        return torch.cat(chunks, dim=-2)
    return sdpa


def test_flux_memory_at_1024_bf16_meta(monkeypatch):
    """The true size, measured without computing: FLUX.1's VAE in bf16 on meta tensors, one 1024x1024 image."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", _flash_like_sdpa(F.scaled_dot_product_attention))
    with torch.device("meta"):
        vae = _vae(FLUX).to(torch.bfloat16)
    z = torch.empty(1, 16, *FLUX_LATENT, device="meta", dtype=torch.bfloat16)
    whole = _peak(vae.decode, z, return_dict=False)
    streamed = _peak(streamed_decode, vae, z)
    print(f"FLUX.1 VAE, 1024^2 bf16: live activation peak whole {whole / MiB:.0f} MiB, streamed {streamed / MiB:.0f} "
          f"MiB ({streamed / whole:.2f}x)")
    assert whole == 1536 * MiB
    assert 384 * MiB < streamed <= (384 + 32) * MiB  # the plan's 384 MiB of feature maps + strips; seen: 410 MiB


# --- what is refused ---------------------------------------------------------------------------------------------

def test_flux_architecture_is_supported(flux_vae):
    assert streamed_decode_unsupported(flux_vae) is None


def _attention_up_block_vae():
    return _vae(TINY, up_block_types=("UpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D",
                                      "UpDecoderBlock2D"))


def _one_by_one_upsample_conv_vae():
    vae = _vae(TINY)
    vae.decoder.up_blocks[1].upsamplers[0].conv = nn.Conv2d(16, 16, 1)
    return vae


def _patched_forward_vae():
    vae = _vae(TINY)
    resnet = vae.decoder.up_blocks[2].resnets[0]
    resnet.forward = lambda x, temb=None, _forward=resnet.forward: _forward(x, temb) * 2
    return vae


def _training_dropout_vae():
    vae = _vae(TINY).train()
    vae.decoder.up_blocks[0].resnets[1].dropout.p = 0.1
    return vae


@pytest.mark.parametrize("make, reason", [
    (_attention_up_block_vae, r"up_blocks\[1\] is AttnUpDecoderBlock2D, not UpDecoderBlock2D"),
    (_one_by_one_upsample_conv_vae, r"up_blocks\[1\]\.upsamplers\[0\]\.conv is not a 3x3 conv"),
    (_patched_forward_vae, r"up_blocks\.2\.resnets\.0 has a hook or a patched forward"),
    (_training_dropout_vae, r"dropout is active"),
])
def test_unsupported_vaes_are_refused(make, reason):
    vae = make()
    found = streamed_decode_unsupported(vae)
    assert found is not None and "\n" not in found
    pytest.raises(ValueError, streamed_decode, vae, _latents(1, 4, 4)).match(reason)


# ------------------------------------------------------------------------------ the pipeline's use (vae_streaming)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from ditserve.testing import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("streaming"), guidance_embeds=False, seed=4)


def _pipeline(folder, **engine_kw):
    from ditserve.config import EngineConfig
    from ditserve.loader import load_model
    from ditserve.pipelines.flux import FluxPipeline

    engine = EngineConfig(device="cpu", dtype="fp32", **engine_kw)
    loaded = load_model(str(folder), engine)
    return FluxPipeline(loaded.components, engine, FluxPipeline.spec_for(loaded.name, loaded.components))


def test_pipeline_streams_when_asked_and_decodes_the_same(tiny_folder, monkeypatch):
    from ditserve.config import SamplingParams
    from ditserve.pipelines import base as pipeline_base

    on, off, auto = (_pipeline(tiny_folder, vae_streaming=v) for v in ("on", "off", "auto"))
    assert on.vae_streaming and not off.vae_streaming
    assert not auto.vae_streaming  # auto streams on CUDA only
    calls = []
    real = pipeline_base.streamed_decode
    monkeypatch.setattr(pipeline_base, "streamed_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    latents = torch.randn(1, (128 // 16) * (96 // 16), 64, generator=torch.Generator().manual_seed(0))
    size = SamplingParams(prompt="", height=128, width=96)
    streamed, whole = on.decode_latents(latents, size), off.decode_latents(latents, size)
    assert calls == [1] and streamed.shape == whole.shape == (1, 3, 128, 96)
    assert (streamed - whole).abs().max().item() <= 1e-5 * whole.abs().max().item()


def test_pipeline_refuses_streaming_it_cannot_do(tiny_folder):
    from ditserve.config import ConfigError

    with pytest.raises(ConfigError, match="--vae-streaming on cannot apply: --compile-vae"):
        _pipeline(tiny_folder, vae_streaming="on", compile_vae=True)
    assert not _pipeline(tiny_folder, vae_streaming="auto", compile_vae=True).vae_streaming


def test_flag():
    from ditserve.cli import build_parser
    from ditserve.config import ConfigError, EngineConfig
    from ditserve.engine_args import engine_from_args

    args = build_parser().parse_args(["generate", "--prompt", "p", "--vae-streaming", "off"])
    assert engine_from_args(args).vae_streaming == "off"
    with pytest.raises(ConfigError, match="vae_streaming"):
        EngineConfig(vae_streaming="maybe")
