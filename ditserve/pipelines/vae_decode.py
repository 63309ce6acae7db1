"""Exact, memory-lean ("streamed") VAE decode for diffusers' `AutoencoderKL`, the VAE of FLUX.1.

Why. `vae.decode` of a 1024x1024 FLUX.1 image in bf16 allocates 2428 MiB on an H100 beyond the weights and its
output (1.5 GiB of it op outputs, the rest mostly cuDNN's workspaces), more than a denoise step of the
transformer: the decode was a request's memory peak (bench/flux_step.py's end to end: 56.12 GiB against the
denoise's 54.23). Diffusers' tiled decode bounds memory but is lossy (GroupNorm statistics per tile: 37.3 dB PSNR
against the whole decode). `streamed_decode` computes the same function as `vae.decode(z, return_dict=False)[0]`
with 431 MiB (see Memory; figures from `python3 bench/vae_decode.py`, 58f1cea).

Method. The decoder is [post_quant_conv] -> conv_in -> mid_block -> up blocks (resnets, then nearest-2x upsample +
3x3 conv) -> GroupNorm -> SiLU -> conv_out. Past the mid block (whose attention runs at the small latent
resolution) all of it but GroupNorm is local in space:
  - a 3x3 conv's output rows [a, b) need only its input rows [a - 1, b + 1), zero rows beyond the border;
  - a nearest-2x upsample's output row r is input row r // 2.
So a feature map can be produced as horizontal strips of rows (all samples, channels and columns), each from a
strip of its input and a few "halo" rows more. GroupNorm needs each sample's per-group mean and variance over the
whole map: a pass over the map's strips gathers them (`_GroupStats`) before a later pass applies them.

A feature map after the mid block is either materialised (a tensor) or virtual (a `_Rows` that computes any range
of its rows on demand, from materialised maps). `_plan` picks each step's mode from shapes alone: the first one in
this list whose feature maps held at once fit in `materialize_bytes` (the last one if none does):

  resnet    "whole"            diffusers' own module (the early, low-resolution blocks).
            "stream"           pass 1: GN1 statistics of the input x. Pass 2: h = conv1(silu(GN1(x))) streamed into
                               a new buffer, GN2 statistics gathered on the way. Pass 3: out = shortcut(x) +
                               conv2(silu(GN2(h))) streamed over h. Holds x and h; computes nothing twice.
            "stream_in_place"  (identity shortcut, x and h do not fit together) pass 1 as above; pass 2: conv1
                               strips computed for the GN2 statistics only, then dropped; pass 3: conv1 recomputed
                               (1 halo row each side) and conv2, out = x + ..., written over x. Holds x only.
  upsample  "whole"            diffusers' module.
            "stream"           its output streamed into a new buffer. Holds its input and output.
            "fuse"             not materialised: the next resnet reads its rows as conv(upsample(x)), computed from
                               x in each of its 3 passes (with halo rows). Holds x only.
  output    "whole" / "stream" GroupNorm statistics, then silu(GroupNorm) + conv_out streamed into the image.

Writing over a map that the strips still read (pass 3 of both resnet modes) lags one strip behind: strip k is
written once strip k + 1 is computed, as strip k + 1 reads the last rows of strip k as its halo (at most 2 rows,
fewer than MIN_STRIP_ROWS). Strips are as tall as `strip_bytes` allows for the step's widest map, plus a share of
whatever its held maps leave of `materialize_bytes` (STRIP_TEMPORARIES): fewer strips, fewer kernel launches. A
batch is decoded in groups of samples: the largest group whose plan holds at most `materialize_bytes` (all of a
batch of small images, one 1024^2 image at a time); samples are independent (GroupNorm and attention act per
sample).

Exactness. Each output element comes from the same operations on the same values as in `vae.decode`: a conv over
a strip sees the same inputs (zero padding only at the true border), upsampling copies, residual adds and SiLU run
in the activation dtype as in diffusers. GroupNorm's statistics are the same sums in another order (per strip in
fp32, combined in fp64), applied in fp32 as x * (rstd * weight) + (bias - mean * rstd * weight) (the form of
PyTorch's own kernels) and rounded once to the activation dtype, as `nn.GroupNorm` does for bf16 input.
Differences come from summation order only. Measured, random weights: fp32 max |diff| ~1e-6 x max |output| on the
CPU (tests/pipelines/test_streamed_decode.py); bf16 at 1024^2 on an H100: 50.5 dB PSNR against the whole decode.

Memory, FLUX.1's VAE at 1024x1024 in bf16, one image, the default budgets. The plan: up blocks at 128^2 and 256^2
whole (<= 256 MiB); the 256^2 -> 512^2 upsample streamed into a 256 MiB buffer; the 512^2 resnets streamed (the
first holds its 256 MiB input and 128 MiB h); the 512^2 -> 1024^2 upsample fused (256 channels at 1024^2 would be
512 MiB) into the first 1024^2 resnet (its 128 MiB source and 256 MiB h: 384 MiB, the least there for any scheme
that materialises its output); the other 1024^2 resnets in place (256 MiB); the output streamed. Peak of live
tensors (op outputs, traced on meta tensors by tests/pipelines/test_streamed_decode.py): 410 MiB, against 1536 MiB
for `vae.decode`. Peak CUDA allocation on an H100 beyond the weights and the output (cuDNN workspaces included):
431 MiB against 2428 MiB.

Compute. Beyond the whole decode's ~10.5 TFLOP per 1024^2 image, the fused upsample's conv (1.24 TFLOP) runs 3
times instead of once and conv1 of the two in-place resnets (0.31 TFLOP each) twice: ~+3.1 TFLOP (~+30%), plus
halo rows (2 per strip and conv). Statistics passes only read. On an H100 the decode is bound by kernel launches
(~350 strips of ~10 kernels): 129.6 ms against 91.8 ms for `vae.decode` (the fused step's strips are the
shortest, 16 rows: it holds the whole budget).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

MiB = 2**20

# Feature maps (whole tensors) that may be held at once. At FLUX.1's 1024x1024 in bf16 the first 1024^2 resnet
# holds its 128 MiB source (256 channels at 512^2) and its 256 MiB output (128 channels at 1024^2) in any case: a
# smaller budget would recompute more (fusing more upsamples) without lowering the peak.
DEFAULT_MATERIALIZE_BYTES = 384 * MiB
# One strip of a step's widest map (in the activation dtype) is at most this, where the step holds the whole
# budget: 16 rows of 256 channels at 1024 columns in bf16.
DEFAULT_STRIP_BYTES = 8 * MiB
# Strip-sized temporaries a streamed step holds at once, counted generously: op outputs (input strip with halo,
# its normalised copy, conv output, the strip waiting to be written: 3.25 strips at FLUX.1's first 1024^2 resnet)
# and on a GPU cuDNN's workspaces and layout copies, about as many again. A step holding less than
# materialize_bytes of feature maps gives each strip 1/STRIP_TEMPORARIES of the difference on top of strip_bytes.
STRIP_TEMPORARIES = 8
# The fewest rows of a strip, whatever the budget: more than the 2 halo rows that a strip written in place may
# still be read through by the next strip (see `_stream`), and not so few that halos dominate the compute.
MIN_STRIP_ROWS = 4


# --- what is supported -------------------------------------------------------------------------------------------

def _conv_problem(conv: nn.Module, name: str, kernel: int) -> str | None:
    """Why `conv` is not a plain kernel x kernel, stride-1, 'same'-padded nn.Conv2d, or None."""
    if type(conv) is not nn.Conv2d:
        return f"{name} is {type(conv).__name__}, not nn.Conv2d"
    same = kernel // 2
    if (conv.kernel_size != (kernel, kernel) or conv.stride != (1, 1) or conv.padding != (same, same)
            or conv.dilation != (1, 1) or conv.groups != 1 or conv.padding_mode != "zeros"):
        return (f"{name} is not a {kernel}x{kernel} conv with stride 1 and zero padding {same} (kernel "
                f"{conv.kernel_size}, stride {conv.stride}, padding {conv.padding}, dilation {conv.dilation}, "
                f"groups {conv.groups}, padding_mode {conv.padding_mode!r})")
    return None


def _norm_problem(norm: nn.Module, name: str) -> str | None:
    if type(norm) is not nn.GroupNorm:
        return f"{name} is {type(norm).__name__}, not nn.GroupNorm"
    return None


def _resnet_problem(resnet: nn.Module, name: str) -> str | None:
    from diffusers.models.resnet import ResnetBlock2D

    if type(resnet) is not ResnetBlock2D:
        return f"{name} is {type(resnet).__name__}, not ResnetBlock2D"
    if resnet.time_emb_proj is not None or resnet.time_embedding_norm == "scale_shift":
        return f"{name} takes a time embedding"
    if resnet.upsample is not None or resnet.downsample is not None:
        return f"{name} resamples"
    if type(resnet.nonlinearity) is not nn.SiLU:
        return f"{name}'s activation is {type(resnet.nonlinearity).__name__}, not SiLU"
    if resnet.training and resnet.dropout.p > 0:
        return f"{name}'s dropout is active (training mode)"
    return (_norm_problem(resnet.norm1, f"{name}.norm1") or _norm_problem(resnet.norm2, f"{name}.norm2")
            or _conv_problem(resnet.conv1, f"{name}.conv1", 3) or _conv_problem(resnet.conv2, f"{name}.conv2", 3)
            or (resnet.conv_shortcut is not None
                and _conv_problem(resnet.conv_shortcut, f"{name}.conv_shortcut", 1)) or None)


def _upsampler_conv(upsampler: nn.Module) -> nn.Module:
    return upsampler.conv if upsampler.name == "conv" else upsampler.Conv2d_0


def _upsampler_problem(upsampler: nn.Module, name: str) -> str | None:
    from diffusers.models.upsampling import Upsample2D

    if type(upsampler) is not Upsample2D:
        return f"{name} is {type(upsampler).__name__}, not Upsample2D"
    if upsampler.use_conv_transpose or not upsampler.use_conv or not upsampler.interpolate:
        return f"{name} is not a nearest-2x interpolation followed by a conv"
    if upsampler.norm is not None:
        return f"{name} normalises its input"
    return _conv_problem(_upsampler_conv(upsampler), f"{name}.conv", 3)


def streamed_decode_unsupported(vae) -> str | None:
    """None when `streamed_decode` can decode with `vae`; otherwise why not, in one line.

    Supported: diffusers' AutoencoderKL whose Decoder has GroupNorm output normalisation and UpDecoderBlock2D up
    blocks of plain ResnetBlock2Ds (3x3 convs, SiLU, no time embedding) and Upsample2Ds (nearest 2x + 3x3 conv),
    with no hook or patched forward on the decoder's modules (accelerate / diffusers offloading would be bypassed).
    The mid block may be anything: it runs as diffusers' module.
    """
    from diffusers import AutoencoderKL
    from diffusers.models.autoencoders.vae import Decoder
    from diffusers.models.unets.unet_2d_blocks import UpDecoderBlock2D

    if not isinstance(vae, AutoencoderKL) or type(vae)._decode is not AutoencoderKL._decode:
        return f"{type(vae).__name__} is not diffusers' AutoencoderKL"
    decoder = vae.decoder
    if type(decoder) is not Decoder:
        return f"the decoder is {type(decoder).__name__}, not diffusers' Decoder"
    modules = [("decoder", decoder)] + [(f"decoder.{n}", m) for n, m in decoder.named_modules() if n]
    if vae.post_quant_conv is not None:
        modules.append(("post_quant_conv", vae.post_quant_conv))
    for name, module in [("vae", vae)] + modules:
        if "forward" in vars(module) or hasattr(module, "_hf_hook") or hasattr(module, "_diffusers_hook"):
            return f"{name} has a hook or a patched forward, which a streamed decode would bypass"
    problem = _norm_problem(decoder.conv_norm_out, "decoder.conv_norm_out")  # SpatialNorm: a MoVQ-style decoder
    if problem:
        return problem
    if type(decoder.conv_act) is not nn.SiLU:
        return f"decoder.conv_act is {type(decoder.conv_act).__name__}, not SiLU"
    problem = _conv_problem(decoder.conv_out, "decoder.conv_out", 3)
    if problem:
        return problem
    for i, block in enumerate(decoder.up_blocks):
        name = f"decoder.up_blocks[{i}]"
        if type(block) is not UpDecoderBlock2D:
            return f"{name} is {type(block).__name__}, not UpDecoderBlock2D"
        for j, resnet in enumerate(block.resnets):
            problem = _resnet_problem(resnet, f"{name}.resnets[{j}]")
            if problem:
                return problem
        for j, upsampler in enumerate(block.upsamplers or ()):
            problem = _upsampler_problem(upsampler, f"{name}.upsamplers[{j}]")
            if problem:
                return problem
    return None


# --- the plan ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Step:
    """One step after the mid block. `held_bytes`: feature maps held at once while it runs (for "whole", an
    estimate of diffusers' module's peak)."""

    kind: str  # "resnet", "upsample" or "output"
    module: nn.Module  # the ResnetBlock2D, the Upsample2D, or the Decoder (for "output")
    mode: str  # "whole", "stream", "stream_in_place" (resnet), "fuse" (upsample): see the module docstring
    held_bytes: int
    rows: int = 0  # strip height (streamed modes)
    stats_rows: int = 0  # strip height of the first statistics pass, which holds only the input: taller strips


@dataclass(frozen=True)
class _Plan:
    group: int  # samples decoded together
    steps: tuple[_Step, ...]

    @property
    def held_bytes(self) -> int:
        return max(step.held_bytes for step in self.steps)


def _plan_steps(decoder, n: int, h: int, w: int, itemsize: int, strip_bytes: int,
                budget: int) -> tuple[_Step, ...]:
    """Modes for a group of `n` samples of latent size h x w (see the module docstring)."""
    def nbytes(channels: int, rows: int, cols: int) -> int:
        return n * channels * rows * cols * itemsize

    def strip_rows(channels: int, rows: int, cols: int, held: int) -> int:
        # A strip of the widest map is strip_bytes, plus a share of what the maps held leave of the budget.
        strip = strip_bytes + max(0, budget - held) // STRIP_TEMPORARIES
        return min(rows, max(MIN_STRIP_ROWS, strip // (n * channels * cols * itemsize)))

    steps = []
    c, rows, cols = decoder.conv_in.out_channels, h, w  # the mid block's output
    held, virtual = nbytes(c, rows, cols), False  # bytes held for the current map (a fused upsample's: its input)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            c_out = resnet.conv2.out_channels
            x, out = held, nbytes(c_out, rows, cols)
            whole = max(3 * x, x + 3 * out)  # input + norm + silu, or input + hidden + shortcut + sum
            if not virtual and whole <= budget:
                steps.append(_Step("resnet", resnet, "whole", whole))
            else:
                if x + out <= budget or virtual or resnet.conv_shortcut is not None:
                    mode, need = "stream", x + out  # (over budget where nothing holds less)
                else:
                    mode, need = "stream_in_place", x
                steps.append(_Step("resnet", resnet, mode, need, rows=strip_rows(max(c, c_out), rows, cols, need),
                                   stats_rows=strip_rows(c, rows, cols, x)))
            c, held, virtual = c_out, out, False
        for upsampler in block.upsamplers or ():
            c_out, rows, cols = _upsampler_conv(upsampler).out_channels, 2 * rows, 2 * cols
            x, out = held, nbytes(c_out, rows, cols)
            if not virtual and x + 2 * out <= budget:  # input + interpolated + conv output
                steps.append(_Step("upsample", upsampler, "whole", x + 2 * out))
                held = out
            elif x + out <= budget:
                steps.append(_Step("upsample", upsampler, "stream", x + out,
                                   rows=strip_rows(max(c, c_out), rows, cols, x + out)))
                held = out
            else:  # computed by the next step (its strip heights)
                steps.append(_Step("upsample", upsampler, "fuse", x))
                virtual = True
            c = c_out
    image = nbytes(decoder.conv_out.out_channels, rows, cols)
    if not virtual and 3 * held + image <= budget:
        steps.append(_Step("output", decoder, "whole", 3 * held + image))
    else:
        steps.append(_Step("output", decoder, "stream", held + image,
                           rows=strip_rows(c, rows, cols, held + image), stats_rows=strip_rows(c, rows, cols, held)))
    return tuple(steps)


def _plan(vae, batch: int, h: int, w: int, dtype: torch.dtype, *, strip_bytes: int = DEFAULT_STRIP_BYTES,
          materialize_bytes: int = DEFAULT_MATERIALIZE_BYTES) -> _Plan:
    """The plan for a batch of `batch` latents of size h x w: the largest group of samples whose steps hold at most
    `materialize_bytes` (at least 1), and its steps."""
    for group in range(batch, 0, -1):
        steps = _plan_steps(vae.decoder, group, h, w, dtype.itemsize, strip_bytes, materialize_bytes)
        plan = _Plan(group, steps)
        if plan.held_bytes <= materialize_bytes or group == 1:
            return plan
    raise ValueError("empty batch")


# --- feature maps read by rows -----------------------------------------------------------------------------------

def _strips(height: int, rows: int):
    """[a, b) row ranges of `rows` rows covering [0, height); the last may be shorter."""
    for a in range(0, height, rows):
        yield a, min(a + rows, height)


class _Rows:
    """A feature map of shape (B, C, H, W) read by ranges of rows: rows(a, b) -> (B, C, b - a, W), 0 <= a < b <= H."""

    shape: tuple[int, int, int, int]
    dtype: torch.dtype
    device: torch.device

    @property
    def height(self) -> int:
        return self.shape[2]

    def rows(self, a: int, b: int) -> torch.Tensor:
        raise NotImplementedError

    def empty(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=self.device)


class _Materialised(_Rows):
    def __init__(self, x: torch.Tensor):
        self.x = x  # (B, C, H, W)
        self.shape, self.dtype, self.device = tuple(x.shape), x.dtype, x.device

    def rows(self, a: int, b: int) -> torch.Tensor:
        return self.x[:, :, a:b]  # (B, C, b - a, W), a view


def _as_rows(x: torch.Tensor | _Rows) -> _Rows:
    return x if isinstance(x, _Rows) else _Materialised(x)


class _Upsampled(_Rows):
    """Nearest-2x upsample of `source` (as diffusers' Upsample2D interpolates): output row r is source row r // 2."""

    def __init__(self, source: _Rows):
        self.source = source
        B, C, H, W = source.shape
        self.shape, self.dtype, self.device = (B, C, 2 * H, 2 * W), source.dtype, source.device

    def rows(self, a: int, b: int) -> torch.Tensor:
        lo, hi = a // 2, (b + 1) // 2  # source rows [lo, hi) -> output rows [2 lo, 2 hi), which hold [a, b)
        up = F.interpolate(self.source.rows(lo, hi), scale_factor=2.0, mode="nearest")  # (B, C, 2 (hi - lo), 2 W)
        return up[:, :, a - 2 * lo:b - 2 * lo]  # (B, C, b - a, 2 W)


class _NormSiLU:
    """silu(GroupNorm(x)) with given per-sample statistics: x * scale + shift in fp32 (scale = rstd * weight,
    shift = bias - mean * scale, per sample and channel, as PyTorch's GroupNorm kernels compute it), cast to x's
    dtype, then SiLU in that dtype (as diffusers applies it)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor):
        self.scale, self.shift = scale, shift  # (B, C, 1, 1) fp32 each

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, rows, W) -> same shape and dtype
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        torch.addcmul(self.shift, x, self.scale, out=y)  # computed in fp32 (the inputs' common dtype), rounded once
        return F.silu(y, inplace=True)


class _GroupStats:
    """Per-sample, per-group mean and variance of a feature map seen strip by strip: each strip's in fp32
    (`torch.var_mean`), combined at the end in fp64 by the parallel formula (Chan et al.): with strip i's count
    n_i, mean m_i and variance v_i, mean = sum n_i m_i / N and variance = (sum n_i v_i + sum n_i (m_i - mean)^2) / N.
    Per strip that is two kernels (fp32 copy, var_mean): strips are many, kernel launches count."""

    def __init__(self, norm: nn.GroupNorm):
        self.norm = norm
        self.counts: list[int] = []  # elements per (sample, group) in each strip
        self.means: list[torch.Tensor] = []  # (B, G) fp32 each
        self.variances: list[torch.Tensor] = []  # (B, G) fp32 each

    def add(self, strip: torch.Tensor) -> None:  # (B, C, rows, W)
        C, groups = strip.shape[1], self.norm.num_groups
        grouped = strip.float().unflatten(1, (groups, C // groups))  # (B, G, C / G, rows, W) fp32
        var, mean = torch.var_mean(grouped, dim=(2, 3, 4), correction=0)  # (B, G) each
        self.counts.append(grouped[0, 0].numel())
        self.means.append(mean)
        self.variances.append(var)

    def norm_silu(self) -> _NormSiLU:
        norm = self.norm
        counts = torch.tensor(self.counts, dtype=torch.float64, device=self.means[0].device)  # (S,) strips
        total = counts.sum()
        means = torch.stack(self.means, dim=-1).double()  # (B, G, S)
        variances = torch.stack(self.variances, dim=-1).double()  # (B, G, S)
        mean = (means * counts).sum(-1) / total  # (B, G)
        var = ((variances + (means - mean[..., None]).square()) * counts).sum(-1) / total  # (B, G), biased
        rstd = (var + norm.eps).rsqrt()  # (B, G) fp64
        per_group = norm.num_channels // norm.num_groups
        scale = rstd.repeat_interleave(per_group, dim=1)  # (B, C)
        shift = -mean.repeat_interleave(per_group, dim=1) * scale  # (B, C)
        if norm.affine:
            weight, bias = norm.weight.detach().double(), norm.bias.detach().double()
            scale, shift = scale * weight, shift * weight + bias
        return _NormSiLU(scale.float()[:, :, None, None], shift.float()[:, :, None, None])


def _statistics(source: _Rows, norm: nn.GroupNorm, rows: int) -> _NormSiLU:
    """One pass over `source`: its GroupNorm statistics, as the normalisation + SiLU that applies them."""
    stats = _GroupStats(norm)
    for a, b in _strips(source.height, rows):
        stats.add(source.rows(a, b))
    return stats.norm_silu()


class _Conv3x3(_Rows):
    """conv(norm_silu(source)) for a 3x3, stride-1, zero-padded conv; norm_silu is optional."""

    def __init__(self, source: _Rows, conv: nn.Conv2d, norm_silu: _NormSiLU | None = None):
        self.source, self.conv, self.norm_silu = source, conv, norm_silu
        B, _, H, W = source.shape
        self.shape, self.dtype, self.device = (B, conv.out_channels, H, W), source.dtype, source.device

    def rows(self, a: int, b: int) -> torch.Tensor:
        lo, hi = max(a - 1, 0), min(b + 1, self.height)  # input rows [a - 1, b + 1) inside the map
        x = self.source.rows(lo, hi)  # (B, C_in, hi - lo, W)
        if self.norm_silu is not None:
            x = self.norm_silu(x)
        if lo > a - 1 or hi < b + 1:  # the conv's zero padding above the first row / below the last
            x = F.pad(x, (0, 0, lo - (a - 1), (b + 1) - hi))  # (B, C_in, b - a + 2, W)
        return F.conv2d(x, self.conv.weight, self.conv.bias, padding=(0, 1))  # (B, C_out, b - a, W)


class _ResnetOutput(_Rows):
    """ResnetBlock2D's output, (shortcut(x) + hidden) / output_scale_factor, with hidden = conv2(silu(GN2(h)))."""

    def __init__(self, resnet: nn.Module, x: _Rows, hidden: _Conv3x3):
        self.resnet, self.x, self.hidden = resnet, x, hidden
        self.shape, self.dtype, self.device = hidden.shape, hidden.dtype, hidden.device

    def rows(self, a: int, b: int) -> torch.Tensor:
        hidden = self.hidden.rows(a, b)  # (B, C_out, b - a, W)
        shortcut = self.x.rows(a, b)  # (B, C_in, b - a, W)
        if self.resnet.conv_shortcut is not None:
            shortcut = self.resnet.conv_shortcut(shortcut)  # 1x1 conv: (B, C_out, b - a, W)
        out = shortcut + hidden
        if self.resnet.output_scale_factor != 1:
            out = out / self.resnet.output_scale_factor
        return out


def _stream(source: _Rows, out: torch.Tensor, rows: int, *, overwrites_input: bool = False,
            stats: _GroupStats | None = None) -> None:
    """Write `source` into `out` strip by strip (accumulating `stats` of the strips, if given).

    overwrites_input: `out` is a map that `source` reads, up to 2 halo rows beyond the strip asked for. Strip k is
    then written only after strip k + 1 has been computed, which reads the last rows of strip k. Strip k + 2 reads
    from 2 rows above its start, which is strip k + 1's end: past strip k, as strips have MIN_STRIP_ROWS > 2 rows
    (but the last).
    """
    pending = None  # (a, b, strip) computed but not yet written
    for a, b in _strips(source.height, rows):
        strip = source.rows(a, b)  # (B, C, b - a, W)
        if stats is not None:
            stats.add(strip)
        if not overwrites_input:
            out[:, :, a:b] = strip
            continue
        if pending is not None:
            out[:, :, pending[0]:pending[1]] = pending[2]
        pending = (a, b, strip)
    if pending is not None:
        out[:, :, pending[0]:pending[1]] = pending[2]


# --- the steps ---------------------------------------------------------------------------------------------------

def _run_resnet(step: _Step, x: torch.Tensor | _Rows) -> torch.Tensor:
    resnet, rows = step.module, step.rows
    if step.mode == "whole":
        return resnet(x, None)
    source = _as_rows(x)
    conv1 = _Conv3x3(source, resnet.conv1, _statistics(source, resnet.norm1, step.stats_rows))  # pass 1
    stats2 = _GroupStats(resnet.norm2)
    if step.mode == "stream":
        out = conv1.empty()  # h, then the output over it
        _stream(conv1, out, rows, stats=stats2)  # pass 2: h materialised
        hidden = _Materialised(out)
    else:  # "stream_in_place": identity shortcut, the output over the input
        assert step.mode == "stream_in_place" and resnet.conv_shortcut is None
        out = source.x
        for a, b in _strips(conv1.height, rows):  # pass 2: GN2 statistics of h, its strips dropped
            stats2.add(conv1.rows(a, b))
        hidden = conv1  # pass 3 recomputes h (1 halo row each side)
    output = _ResnetOutput(resnet, source, _Conv3x3(hidden, resnet.conv2, stats2.norm_silu()))
    _stream(output, out, rows, overwrites_input=True)  # pass 3
    return out


def _run_upsample(step: _Step, x: torch.Tensor | _Rows) -> torch.Tensor | _Rows:
    upsampler = step.module
    if step.mode == "whole":
        return upsampler(x)
    upsampled = _Conv3x3(_Upsampled(_as_rows(x)), _upsampler_conv(upsampler))
    if step.mode == "fuse":
        return upsampled  # virtual: computed by the next step, strip by strip
    out = upsampled.empty()
    _stream(upsampled, out, step.rows)
    return out


def _run_output(step: _Step, x: torch.Tensor | _Rows) -> torch.Tensor:
    decoder = step.module
    if step.mode == "whole":
        return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(x)))
    source = _as_rows(x)
    image = _Conv3x3(source, decoder.conv_out, _statistics(source, decoder.conv_norm_out, step.stats_rows))
    out = image.empty()  # (B, 3, H, W)
    _stream(image, out, step.rows)
    return out


_RUN = {"resnet": _run_resnet, "upsample": _run_upsample, "output": _run_output}


def _decode_group(vae, z: torch.Tensor, steps: tuple[_Step, ...]) -> torch.Tensor:
    decoder = vae.decoder
    x = z if vae.post_quant_conv is None else vae.post_quant_conv(z)
    x = decoder.mid_block(decoder.conv_in(x), None)  # (B, C, h, w): the latent resolution, whole
    for step in steps:
        x = _RUN[step.kind](step, x)
    return x  # (B, 3, H, W)


@torch.no_grad()
def streamed_decode(vae, z: torch.Tensor, *, strip_bytes: int = DEFAULT_STRIP_BYTES,
                    materialize_bytes: int = DEFAULT_MATERIALIZE_BYTES) -> torch.Tensor:
    """`vae.decode(z, return_dict=False)[0]`, computed in strips of rows (see the module docstring).

    z: (B, latent_channels, h, w), scaled and shifted, in the VAE's dtype and on its device. Returns
    (B, 3, 8 h, 8 w) (for FLUX.1's 8x VAE) in the VAE's dtype. `materialize_bytes` bounds the feature maps held
    at once (wherever one sample's plan allows), `strip_bytes` a strip temporary. Raises ValueError for a VAE that
    `streamed_decode_unsupported` rejects.
    """
    reason = streamed_decode_unsupported(vae)
    if reason is not None:
        raise ValueError(f"streamed_decode does not support this VAE: {reason}")
    B, _, h, w = z.shape
    plan = _plan(vae, B, h, w, z.dtype, strip_bytes=strip_bytes, materialize_bytes=materialize_bytes)
    if plan.group == B:
        return _decode_group(vae, z, plan.steps)
    out = None
    for start in range(0, B, plan.group):
        part = z[start:start + plan.group]
        steps = plan.steps if len(part) == plan.group else _plan_steps(
            vae.decoder, len(part), h, w, z.dtype.itemsize, strip_bytes, materialize_bytes)
        image = _decode_group(vae, part, steps)  # (group, 3, H, W)
        if out is None:
            out = image.new_empty((B, *image.shape[1:]))
        out[start:start + len(part)] = image
    return out
