"""Qwen-Image (and its edit models): the 20B dual-stream MMDiT of Alibaba's Qwen team, built on `ditserve.ops`.

Numerically this is diffusers' `QwenImageTransformer2DModel` (0.42.x) in the configurations of Qwen-Image,
Qwen-Image-2512 and the Edit models (-Edit, -2509, and -2511 with `zero_cond_t`: the input images' tokens
modulated as at t = 0), not the Layered model's (additional timestep condition, layered RoPE): same inputs, same
weights (loaded from a diffusers state dict through `QwenImageTransformer.weight_map`), same positions and
masking. The layout differs where it is faster: q/k/v of each stream come from one fused Linear, the two
streams' AdaLN modulations are one Linear, the MLPs' input projections carry their GELU (`LinearGELU`), and the
q/k RMSNorms and RoPE run as one op (`RMSNormRotary`).

The model, as diffusers runs it:
  - timestep: t (B,) in [0, 1], rounded to the model dtype -> sinusoidal features of t x 1000 (fp32) -> MLP
    256 -> D -> D: `temb`, the AdaLN input of every block and of the output norm;
  - image: packed latents (B, L, in_channels) (2x2 patches of 16 latent channels, packed by the pipeline) ->
    Linear -> (B, L, D); an edit model appends the input image's packed latents to the same sequence;
  - text: Qwen2.5-VL hidden states (B, T, joint_attention_dim) -> RMSNorm (`txt_norm`) -> Linear (`txt_in`);
    an optional text mask (B, T) (True = a real token) masks padded keys out of the joint attention;
  - blocks: dual-stream (separate weights per stream), one joint attention over [text, image] with per-head
    q/k RMSNorm and RoPE, AdaLN (shift, scale, gate) pre-norms and gated residuals, GELU-tanh MLPs (4x);
  - RoPE over 3 axes (frame, row, column; interleaved channel pairs, angles in fp32 as diffusers builds them):
    image k (0-based, of `img_shapes`) token (f, r, c) at (k + f, r - ceil(h/2), c - ceil(w/2)) (centred); text
    token j at (m + j, m + j, m + j) with m = max over images of max(h // 2, w // 2) (h, w in tokens);
  - output: AdaLN-continuous LayerNorm, Linear -> (B, L, p*p*out_channels), for every image token (an edit
    pipeline keeps the first image's).

Notation in shape comments: B batch, L image tokens (all images), T text tokens, S = T + L, D = hidden, H heads,
Dh head_dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.cache.block_cache import run_all_blocks
from ditserve.config import ConfigError
from ditserve.models import config_from_diffusers
from ditserve.dummy_run import in_dummy_run
from ditserve.ops import (
    Attention, Fp8Linear, Linear, LinearGELU, MulAdd, NormScaleShift, OpsConfig, ResidualNormScaleShift, RMSNorm,
    RMSNormRotary,
)
from ditserve.ops.functional import timestep_features

ROPE_THETA = 10000  # diffusers' QwenEmbedRope(theta=10000)
ROPE_TABLE_LEN = 4096  # diffusers' tables hold positions -4096 .. 4095 on each axis
TIME_FREQ_DIM = 256  # sinusoidal timestep features
TIME_SCALE = 1000.0  # Timesteps(scale=1000): the pipeline passes t / 1000
NORM_EPS = 1e-6  # the blocks' LayerNorms and q/k RMSNorms, the output norm and txt_norm
FP16_MAX = 65504.0
VAE_SCALE = 8  # pixels per latent row/column (the Qwen-Image VAE)


# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class QwenImageConfig:
    """Architecture of a Qwen-Image transformer. Field names and defaults are diffusers'
    `QwenImageTransformer2DModel` constructor arguments (the defaults are Qwen-Image's)."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    zero_cond_t: bool = False
    use_additional_t_cond: bool = False
    use_layer3d_rope: bool = False

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.guidance_embeds:
            raise ConfigError("Qwen-Image transformer: guidance_embeds=True is not supported (no released "
                              "checkpoint has a guidance embedding; diffusers 0.42 cannot run one either)")
        for name in ("use_additional_t_cond", "use_layer3d_rope"):
            if getattr(self, name):
                raise ConfigError(f"Qwen-Image transformer: {name}=True (Qwen-Image-Layered) is not supported; "
                                  f"Qwen-Image, -2512 and the Edit models (-Edit, -2509, -2511) are")
        for name in ("patch_size", "in_channels", "out_channels", "num_attention_heads", "attention_head_dim",
                     "joint_attention_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"Qwen-Image transformer: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_layers < 0:
            raise ConfigError(f"Qwen-Image transformer: num_layers must be >= 0, got {self.num_layers}")
        if len(self.axes_dims_rope) != 3 or any(a <= 0 or a % 2 for a in self.axes_dims_rope):
            raise ConfigError(f"Qwen-Image transformer: axes_dims_rope needs 3 even positive entries (frame, row, "
                              f"column), got {list(self.axes_dims_rope)}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ConfigError(f"Qwen-Image transformer: sum(axes_dims_rope) = {sum(self.axes_dims_rope)} must equal "
                              f"attention_head_dim {self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_features(self) -> int:
        return self.patch_size * self.patch_size * self.out_channels

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> "QwenImageConfig":
        """From a diffusers `QwenImageTransformer2DModel` config.json dict; an unknown key raises ConfigError
        (`ditserve.models.config_from_diffusers`)."""
        return config_from_diffusers(cls, d, "QwenImageTransformer2DModel")


# ------------------------------------------------------------------------------------------------ embedders


def rope_cos_sin(pos: torch.Tensor, axes_dims: Sequence[int], theta: float = ROPE_THETA
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of Qwen-Image's 3-axis RoPE: pos (N, 3) integer positions -> (N, Dh/2) fp32 each.

    Axis i contributes axes_dims[i] / 2 channel pairs with frequencies 1 / theta^(2j / axes_dims[i]), all in
    fp32 as diffusers' `QwenEmbedRope.rope_params` builds its tables (angle = position x frequency rounded to
    fp32, then cos/sin in fp32).
    """
    angles = []
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / torch.pow(theta, torch.arange(0, d, 2, device=pos.device).to(torch.float32).div(d))  # (d/2,)
        angles.append(pos[:, i : i + 1].to(torch.float32) * freqs[None, :])  # (N, d/2) fp32
    ang = torch.cat(angles, dim=-1)  # (N, Dh/2)
    return ang.cos(), ang.sin()


def rope_positions(img_shapes: Sequence[tuple[int, int, int]], text_len: int,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE positions of the text tokens (T, 3) and of the image tokens (L, 3) (int64), as diffusers'
    `QwenEmbedRope` (scale_rope=True) assigns them: image k's token (f, r, c) at (k + f, r - (h - h // 2),
    c - (w - w // 2)) (rows and columns centred on 0), text token j at m + j on every axis, m = the largest
    h // 2 or w // 2 of any image. img_shapes: (frames, h, w) in tokens per image, in sequence order."""
    parts, m = [], 0
    for k, (f, h, w) in enumerate(img_shapes):
        frame = torch.arange(k, k + f, device=device)
        rows = torch.arange(h, device=device) - (h - h // 2)
        cols = torch.arange(w, device=device) - (w - w // 2)
        grid = torch.stack(torch.meshgrid(frame, rows, cols, indexing="ij"), dim=-1)  # (f, h, w, 3)
        parts.append(grid.reshape(f * h * w, 3))
        m = max(m, h // 2, w // 2)
    txt = (m + torch.arange(text_len, device=device))[:, None].expand(text_len, 3)  # (T, 3)
    return txt, torch.cat(parts)


class TimestepEmbedder(nn.Module):
    """out_layer(silu(in_layer(x))): sinusoidal features (B, 256) -> temb (B, D) (diffusers' TimestepEmbedding)."""

    def __init__(self, dim: int, ops: OpsConfig, device=None, dtype=None):
        super().__init__()
        self.in_layer = Linear(TIME_FREQ_DIM, dim, ops=ops, device=device, dtype=dtype)
        self.out_layer = Linear(dim, dim, ops=ops, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


# ------------------------------------------------------------------------------------------------- blocks


class QwenImageBlock(nn.Module):
    """Dual-stream block: separate weights per stream, one joint attention over [txt, img].

    forward(img (B, L, D), txt (B, T, D), mod (B, 12D), mask (B, 1, 1, S) bool or None, cos, sin (S, Dh/2) fp32,
    ref_mod, ref_tokens) -> (img, txt), same shapes. `mod` is the block's AdaLN vectors,
    `self.modulation(silu(temb))`: [img: shift1, scale1, gate1, shift2, scale2, gate2 | txt: the same], each (B, D).
    With `zero_cond_t`
    (Edit-2511), ref_mod (B or 1, 6D) is the image half of the vectors at t = 0 and the image tokens where
    ref_tokens (1, L, 1) is True (the input images') take it instead.
        x = x + gate1 * attn(norm1(x) * (1 + scale1) + shift1)       (per stream; attention is joint)
        x = x + gate2 * mlp(norm2(x) * (1 + scale2) + shift2)
    """

    def __init__(self, dim: int, heads: int, head_dim: int, ops: OpsConfig, attention: str, clamp_fp16: bool,
                 device=None, dtype=None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.clamp_fp16 = clamp_fp16
        lin = dict(ops=ops, device=device, dtype=dtype)
        norm = dict(eps=NORM_EPS, ops=ops, device=device, dtype=dtype)
        self.mod = Linear(dim, 12 * dim, **lin)  # [img_mod | txt_mod], each 6D
        self.norm1 = NormScaleShift(dim, eps=NORM_EPS, norm="layer", ops=ops)
        self.img_qkv = Linear(dim, 3 * dim, **lin)  # [q | k | v]
        self.txt_qkv = Linear(dim, 3 * dim, **lin)
        # The q/k RMSNorms hold their weights (the checkpoint's names); `norm_rotary` applies them and RoPE in one op.
        self.img_q_norm = RMSNorm(head_dim, **norm)
        self.img_k_norm = RMSNorm(head_dim, **norm)
        self.txt_q_norm = RMSNorm(head_dim, **norm)
        self.txt_k_norm = RMSNorm(head_dim, **norm)
        self.norm_rotary = RMSNormRotary(head_dim, eps=NORM_EPS, interleaved=True, ops=ops)
        self.attn = Attention(attention)
        self.img_attn_out = Linear(dim, dim, **lin)
        self.txt_attn_out = Linear(dim, dim, **lin)
        self.norm2 = ResidualNormScaleShift(dim, eps=NORM_EPS, norm="layer", ops=ops)
        self.img_mlp_in = LinearGELU(dim, 4 * dim, **lin)  # gelu_tanh(Linear)
        self.img_mlp_out = Linear(4 * dim, dim, **lin)
        self.txt_mlp_in = LinearGELU(dim, 4 * dim, **lin)
        self.txt_mlp_out = Linear(4 * dim, dim, **lin)
        self.gated_add = MulAdd(k=0.0, ops=ops)  # gated_add(y, gate, r) = r + gate * y

    def modulation(self, silu_temb: torch.Tensor) -> torch.Tensor:
        """silu(temb) (B, D) -> the block's AdaLN vectors (B, 12D)."""
        return self.mod(silu_temb)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, mod: torch.Tensor, mask: torch.Tensor | None,
                cos: torch.Tensor, sin: torch.Tensor, ref_mod: torch.Tensor | None = None,
                ref_tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        T = txt.shape[1]
        img_mod, txt_mod = mod.unsqueeze(1).chunk(2, dim=-1)  # (B, 1, 6D) each
        img_params = img_mod.chunk(6, dim=-1)  # (B, 1, D) each
        if ref_mod is not None:  # zero_cond_t: the tokens where ref_tokens (1, L, 1) is True take t = 0's vectors
            ref_params = ref_mod.unsqueeze(1).chunk(6, dim=-1)  # (B or 1, 1, D) each
            img_params = [torch.where(ref_tokens, r, t) for t, r in zip(img_params, ref_params)]  # (B, L, D) each
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = img_params
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = txt_mod.chunk(6, dim=-1)

        # Joint attention over [txt, img]. (fp8 tier: the norms hand the projections their input already quantised.)
        img_h = self.norm1(img, img_scale1, img_shift1, quantize=self.img_qkv.takes_fp8)  # (B, L, D)
        txt_h = self.norm1(txt, txt_scale1, txt_shift1, quantize=self.txt_qkv.takes_fp8)  # (B, T, D)
        qkv_shape = (3, self.heads, self.head_dim)
        img_q, img_k, img_v = self.img_qkv(img_h).unflatten(-1, qkv_shape).unbind(2)  # (B, L, H, Dh) each
        txt_q, txt_k, txt_v = self.txt_qkv(txt_h).unflatten(-1, qkv_shape).unbind(2)  # (B, T, H, Dh) each
        # q, k: each stream RMS-normed with its own weight, joined as [txt, img], rotated: (B, S, H, Dh)
        q = self.norm_rotary((txt_q, img_q), (self.txt_q_norm.weight, self.img_q_norm.weight), cos, sin)
        k = self.norm_rotary((txt_k, img_k), (self.txt_k_norm.weight, self.img_k_norm.weight), cos, sin)
        v = torch.cat((txt_v, img_v), dim=1)  # (B, S, H, Dh)
        attn = self.attn(q, k, v, mask).flatten(2)  # (B, S, D)
        txt_attn, img_attn = attn[:, :T], attn[:, T:]  # (B, T, D), (B, L, D)

        # Image stream: gated residual + AdaLN, then the MLP with a gated residual.
        img_h, img = self.norm2(self.img_attn_out(img_attn), img, img_gate1, img_scale2, img_shift2,
                                quantize=self.img_mlp_in.takes_fp8)  # (B, L, D) x2
        img = self.gated_add(self.mlp(self.img_mlp_in, self.img_mlp_out, img_h), img_gate2, img)  # (B, L, D)
        # Text stream: the same with its own weights.
        txt_h, txt = self.norm2(self.txt_attn_out(txt_attn), txt, txt_gate1, txt_scale2, txt_shift2,
                                quantize=self.txt_mlp_in.takes_fp8)  # (B, T, D) x2
        txt = self.gated_add(self.mlp(self.txt_mlp_in, self.txt_mlp_out, txt_h), txt_gate2, txt)  # (B, T, D)
        if self.clamp_fp16:  # as diffusers: keep fp16 activations finite
            img, txt = img.clamp(-FP16_MAX, FP16_MAX), txt.clamp(-FP16_MAX, FP16_MAX)
        return img, txt

    @staticmethod
    def mlp(mlp_in: nn.Module, mlp_out: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """mlp_out(gelu_tanh(mlp_in(x))): x (B, N, D) -> (B, N, D). In the fp8 tier, mlp_in's bias and GELU and
        mlp_out's input quantisation run as one pass over the (B, N, 4D) hidden state."""
        if isinstance(mlp_out, Fp8Linear):
            return mlp_out.forward_after_gelu(None, mlp_in.matmul(x), mlp_in.pending_bias())
        return mlp_out(mlp_in(x))


# -------------------------------------------------------------------------------------------------- model


@dataclass
class QwenImageConditioning:
    """The timestep conditioning of one forward: temb and every block's AdaLN modulation vectors. The vectors are
    products of silu(temb) with each block's `mod` weights: M = batch GEMMs that only read weights (13.6 GB a forward
    for Qwen-Image in bf16). A pipeline knows every step's timestep before the loop, so
    `QwenImageTransformer.precompute_conditioning` computes them for all steps at once (one pass over those weights
    per request) and passes one of these to each forward."""

    temb: torch.Tensor  # (B, D) model dtype
    mods: tuple[torch.Tensor, ...]  # per block: (B, 12D)
    ref_mods: tuple[torch.Tensor, ...] | None = None  # zero_cond_t: per block (1, 6D), the image half at t = 0


# A pytree node (its fields are leaves): so `ditserve.cuda_graphs.GraphedForward` copies its tensors into a graph.
torch.utils._pytree.register_dataclass(QwenImageConditioning)


@dataclass
class QwenImageBlockContext:
    """What every block of one forward takes besides the hidden states, and what `finish` needs."""

    temb: torch.Tensor  # (B, D) the AdaLN input, model dtype
    mods: tuple[torch.Tensor, ...]  # per block: (B, 12D) its AdaLN vectors
    ref_mods: tuple[torch.Tensor, ...] | None  # zero_cond_t: per block (1, 6D), the input images' tokens' (t = 0)
    ref_tokens: torch.Tensor | None  # zero_cond_t: (1, L, 1) bool, True for the input images' tokens
    mask: torch.Tensor | None  # (B, 1, 1, S) bool, True = attend (padded text keys False); None: no padding
    cos: torch.Tensor  # (S, Dh/2) fp32 RoPE table of the joint sequence [txt, img]
    sin: torch.Tensor  # (S, Dh/2) fp32
    image_tokens: int = 0  # L before sequence-parallel padding (0: not sharded)


class QwenImageTransformer(nn.Module):
    """The Qwen-Image transformer. Inputs and conventions are diffusers' `QwenImageTransformer2DModel.forward`:

    hidden_states (B, L, in_channels) packed latents (an edit model: the target's tokens, then the input images');
    encoder_hidden_states (B, T, joint_attention_dim) text states; encoder_hidden_states_mask (B, T) (True/1 = a
    real token) or None (every token real); timestep (B,) in [0, 1] (the pipeline's t / 1000); img_shapes: the
    (frames, h, w) token grid of each image in the sequence, shared by the batch (diffusers: a list per sample,
    of which it reads the first). Returns (B, L, p*p*out_channels) in the model's dtype. One more argument, ours:
    `conditioning`, this step's entry of `precompute_conditioning` (then `timestep` is not read again).

    Inputs are expected in the model's dtype. The mask is used as given (no data-dependent check): pass None
    when no row is padded, so attention runs without one. Host-side work (positions, tables) is in `prepare`,
    which runs eagerly; the blocks are the compiled regions.
    """

    repeated_blocks = ("transformer_blocks",)

    # The block-cache interface (see `ditserve.cache`): `prepare` -> `run_blocks` over ranges of the blocks ->
    # `finish`. The state between ranges is (img (B, L, D), txt (B, T, D)).
    block_cache = None
    # Sequence parallelism (`ditserve.parallel.sharding`): the image and the text tokens are each sharded over the
    # ranks (split, not replicated); each rank's joint sequence is [its text shard, its image shard].
    sharder = None
    # The fp8 tier (`ditserve.ops.fp8.apply_fp8`): the token-wise GEMMs of each block, and each block's modulation
    # `mod` (M = batch x steps, once per request: few FLOPs, but 6.8B of the model's 20.4B weights, so left in bf16
    # the tier would not halve the DiT's memory). Left out: the embedders, the output norm's modulation, proj_out.
    fp8_linears = (
        ("transformer_blocks", ("img_qkv", "txt_qkv", "img_attn_out", "txt_attn_out", "img_mlp_in", "img_mlp_out",
                                "txt_mlp_in", "txt_mlp_out", "mod")),
    )
    # fp8 layers whose output feeds an op their bias add cannot fuse into (q/k norm + RoPE, attention through a
    # concatenation, the residual norm): the bias goes in the GEMM's epilogue.
    fp8_bias_in_gemm = ("img_qkv", "txt_qkv", "img_attn_out", "txt_attn_out")

    def __init__(self, config: QwenImageConfig, ops: OpsConfig | None = None, attention: str = "sdpa", device=None,
                 dtype=None):
        super().__init__()
        if ops is None:
            device_type = torch.device(device).type if device is not None else None
            # A model built on "meta" (to be materialised by the loader) picks its paths for the best device.
            ops = OpsConfig(device=None if device_type == "meta" else device_type,
                            dtype=dtype or torch.get_default_dtype())
        self.config = c = config
        D, H, Dh = c.inner_dim, c.num_attention_heads, c.attention_head_dim
        clamp_fp16 = (dtype or torch.get_default_dtype()) == torch.float16
        lin = dict(ops=ops, device=device, dtype=dtype)

        self.time_embedder = TimestepEmbedder(D, **lin)
        self.txt_norm = RMSNorm(c.joint_attention_dim, eps=NORM_EPS, **lin)
        self.txt_in = Linear(c.joint_attention_dim, D, **lin)
        self.img_in = Linear(c.in_channels, D, **lin)
        self.transformer_blocks = nn.ModuleList(
            QwenImageBlock(D, H, Dh, ops, attention, clamp_fp16, device=device, dtype=dtype)
            for _ in range(c.num_layers))
        self.norm_out_mod = Linear(D, 2 * D, **lin)  # (scale, shift): AdaLayerNormContinuous's order
        self.norm_out = NormScaleShift(D, eps=NORM_EPS, norm="layer", ops=ops)
        self.proj_out = Linear(D, c.out_features, **lin)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                img_shapes: Sequence[tuple[int, int, int]], encoder_hidden_states_mask: torch.Tensor | None = None,
                conditioning: QwenImageConditioning | None = None) -> torch.Tensor:
        state, ctx = self.prepare(hidden_states, encoder_hidden_states, timestep, img_shapes,
                                  encoder_hidden_states_mask, conditioning)
        return self.finish(run_all_blocks(self, state, ctx), ctx)

    # ----------------------------------------------------------------------------------- block interface

    @property
    def num_blocks(self) -> int:
        return len(self.transformer_blocks)

    def _check_inputs(self, hidden_states, encoder_hidden_states, timestep, img_shapes, mask) -> list:
        """Validate shapes and positions (host only); -> img_shapes as a list of int triples."""
        c = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[2] != c.in_channels:
            raise ValueError(f"hidden_states must be (B, L, {c.in_channels}), got {tuple(hidden_states.shape)}")
        B, L = hidden_states.shape[:2]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != B or \
                encoder_hidden_states.shape[2] != c.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states must be ({B}, T, {c.joint_attention_dim}), got "
                             f"{tuple(encoder_hidden_states.shape)}")
        T = encoder_hidden_states.shape[1]
        if mask is not None and tuple(mask.shape) != (B, T):
            raise ValueError(f"encoder_hidden_states_mask must be ({B}, {T}), got {tuple(mask.shape)}")
        if timestep.shape != (B,):
            raise ValueError(f"timestep must be ({B},), got {tuple(timestep.shape)}")
        shapes = [tuple(int(n) for n in s) for s in img_shapes]
        if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
            raise ValueError(f"img_shapes must be a non-empty list of (frames, h, w) triples, got {img_shapes}")
        if sum(f * h * w for f, h, w in shapes) != L:
            raise ValueError(f"img_shapes {shapes} hold {sum(f * h * w for f, h, w in shapes)} tokens, "
                             f"hidden_states has {L}")
        m = max(max(h // 2, w // 2) for _, h, w in shapes)
        if m + T > ROPE_TABLE_LEN or any(max(h, w) > ROPE_TABLE_LEN for _, h, w in shapes):
            raise ValueError(f"positions out of diffusers' RoPE tables ({ROPE_TABLE_LEN} per axis): images "
                             f"{shapes} with {T} text tokens")
        return shapes

    def prepare(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                img_shapes: Sequence[tuple[int, int, int]], encoder_hidden_states_mask: torch.Tensor | None = None,
                conditioning: QwenImageConditioning | None = None
                ) -> tuple[tuple[torch.Tensor, torch.Tensor], QwenImageBlockContext]:
        """Everything before the blocks (arguments as `forward`) -> the state (img (B, L, D), txt (B, T, D)) and
        the per-forward constants every block takes."""
        shapes = self._check_inputs(hidden_states, encoder_hidden_states, timestep, img_shapes,
                                    encoder_hidden_states_mask)
        device = hidden_states.device
        B, L = hidden_states.shape[:2]
        T = encoder_hidden_states.shape[1]
        if conditioning is None:
            conditioning = self.precompute_conditioning(timestep[None])[0]
        elif conditioning.temb.shape[0] != B:
            raise ValueError(f"conditioning was computed for a batch of {conditioning.temb.shape[0]}, "
                             f"hidden_states has a batch of {B}")

        img = self.img_in(hidden_states)  # (B, L, D)
        txt = self.txt_in(self.txt_norm(encoder_hidden_states))  # (B, T, D)

        txt_pos, img_pos = rope_positions(shapes, T, device)
        cos, sin = rope_cos_sin(torch.cat((txt_pos, img_pos)), self.config.axes_dims_rope)  # (S, Dh/2) each
        mask = None
        if encoder_hidden_states_mask is not None:
            img_valid = torch.ones(B, L, dtype=torch.bool, device=device)
            mask = torch.cat((encoder_hidden_states_mask.to(torch.bool), img_valid), dim=1)[:, None, None, :]
        ref_tokens = None
        if conditioning.ref_mods is not None:  # zero_cond_t: every image after the first is a reference image
            f, h, w = shapes[0]
            ref_tokens = (torch.arange(L, device=device) >= f * h * w)[None, :, None]  # (1, L, 1)
        if self.sharder is not None:  # this rank's shards (B, Lt, D), (B, Li, D), tables, masks to match
            sh = self.sharder
            text_mask = None if mask is None else mask[:, 0, 0, :T]  # (B, T)
            mask = sh.joint_key_mask([(T, text_mask), (L, None)], B, device)  # (B, sp*(Lt+Li)) or None
            mask = None if mask is None else mask[:, None, None, :]
            cos, sin = (torch.cat((sh.shard(t[:T], 0), sh.shard(t[T:], 0))) for t in (cos, sin))  # (Lt+Li, Dh/2)
            if ref_tokens is not None:
                ref_tokens = sh.shard(ref_tokens)  # (1, Li, 1)
            img, txt = sh.shard(img), sh.shard(txt)
        return (img, txt), QwenImageBlockContext(temb=conditioning.temb, mods=conditioning.mods,
                                                 ref_mods=conditioning.ref_mods, ref_tokens=ref_tokens, mask=mask,
                                                 cos=cos, sin=sin, image_tokens=L)

    def precompute_conditioning(self, timesteps: torch.Tensor) -> list[QwenImageConditioning]:
        """The conditioning of N forwards at once: timesteps (N, B) in [0, 1] (each row as `forward`'s `timestep`)
        -> N QwenImageConditioning, one per step. Every block's modulation Linear runs once with M = N x B rows.
        As diffusers: the timestep rounded to the model dtype, its features in fp32, the MLP's input in the model
        dtype."""
        N, B = timesteps.shape
        dtype = self.img_in.weight.dtype  # the compute dtype (the embedders are never quantised)
        t = timesteps.reshape(N * B).to(dtype)
        temb = self.time_embedder(timestep_features(t, TIME_FREQ_DIM, scale=TIME_SCALE).to(dtype))  # (N*B, D)
        silu = F.silu(temb)
        mods = [block.modulation(silu).unflatten(0, (N, B)) for block in self.transformer_blocks]  # (N, B, 12D)
        temb = temb.unflatten(0, (N, B))  # (N, B, D)
        ref_mods = None
        if self.config.zero_cond_t:  # the image half of every block's vectors at t = 0 (the same for every step)
            t0 = torch.zeros(1, dtype=dtype, device=timesteps.device)
            t0_freq = timestep_features(t0, TIME_FREQ_DIM, scale=TIME_SCALE).to(dtype)  # (1, 256)
            silu0 = F.silu(self.time_embedder(t0_freq))  # (1, D)
            D6 = 6 * self.config.inner_dim
            ref_mods = tuple(block.modulation(silu0)[:, :D6] for block in self.transformer_blocks)  # (1, 6D) each
        return [QwenImageConditioning(temb=temb[i], mods=tuple(m[i] for m in mods), ref_mods=ref_mods)
                for i in range(N)]

    def run_blocks(self, state: tuple[torch.Tensor, torch.Tensor], ctx: QwenImageBlockContext, start: int,
                   stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks [start, stop) on the state (img (B, L, D), txt (B, T, D)) -> (img, txt)."""
        img, txt = state
        for i, block in enumerate(self.transformer_blocks[start:stop], start):
            ref_mod = None if ctx.ref_mods is None else ctx.ref_mods[i]
            img, txt = block(img, txt, ctx.mods[i], ctx.mask, ctx.cos, ctx.sin, ref_mod, ctx.ref_tokens)
        return img, txt

    def finish(self, state: tuple[torch.Tensor, torch.Tensor], ctx: QwenImageBlockContext) -> torch.Tensor:
        """The output norm and projection: the state's img (B, L, D) -> (B, L, p*p*out_channels). In a dummy run
        (`ditserve.dummy_run`) they are skipped and a zero tensor of the output's shape (a broadcast view: no
        memory) is returned."""
        img = state[0]
        if in_dummy_run():
            return img.new_zeros(()).expand(img.shape[0], ctx.image_tokens, self.config.out_features)
        if self.sharder is not None:
            img = self.sharder.gather(img, ctx.image_tokens)  # (B, L, D), the same on every rank
        scale, shift = self.norm_out_mod(F.silu(ctx.temb)).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        return self.proj_out(self.norm_out(img, scale, shift))  # (B, L, p*p*out_channels)

    def enable_sequence_parallel(self, state) -> None:
        """Run every block on this rank's shards of the text and the image tokens (`ditserve.parallel.sharding`;
        state: a `ParallelState` with a sequence-parallel degree above 1)."""
        from ditserve.parallel.sharding import SequenceSharder, swap_attention

        self.sharder = SequenceSharder(state)
        swap_attention(self.transformer_blocks, state, self.sharder)

    # ------------------------------------------------------------------------------------- weight loading

    def weight_map(self) -> dict[str, tuple[str, int | None, int | None]]:
        """Every key of a diffusers `QwenImageTransformer2DModel` state dict -> (our parameter name, start, stop).

        The tensor goes into rows [start:stop] (dim 0) of our parameter; (None, None) means the whole parameter.
        Each piece lands independently, so tensors can be streamed one at a time into a model already allocated
        on its device.
        """
        D = self.config.inner_dim
        m: dict[str, tuple[str, int | None, int | None]] = {}

        def linear(src: str, dst: str, start: int | None = None, stop: int | None = None) -> None:
            m[f"{src}.weight"] = (f"{dst}.weight", start, stop)
            m[f"{src}.bias"] = (f"{dst}.bias", start, stop)

        linear("img_in", "img_in")
        linear("txt_in", "txt_in")
        m["txt_norm.weight"] = ("txt_norm.weight", None, None)
        linear("time_text_embed.timestep_embedder.linear_1", "time_embedder.in_layer")
        linear("time_text_embed.timestep_embedder.linear_2", "time_embedder.out_layer")
        for i in range(self.config.num_layers):
            src, dst = f"transformer_blocks.{i}", f"transformer_blocks.{i}"
            linear(f"{src}.img_mod.1", f"{dst}.mod", 0, 6 * D)
            linear(f"{src}.txt_mod.1", f"{dst}.mod", 6 * D, 12 * D)
            for j, (img_name, txt_name) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"),
                                                      ("to_v", "add_v_proj"))):
                linear(f"{src}.attn.{img_name}", f"{dst}.img_qkv", j * D, (j + 1) * D)
                linear(f"{src}.attn.{txt_name}", f"{dst}.txt_qkv", j * D, (j + 1) * D)
            for theirs, ours in (("norm_q", "img_q_norm"), ("norm_k", "img_k_norm"), ("norm_added_q", "txt_q_norm"),
                                 ("norm_added_k", "txt_k_norm")):
                m[f"{src}.attn.{theirs}.weight"] = (f"{dst}.{ours}.weight", None, None)
            linear(f"{src}.attn.to_out.0", f"{dst}.img_attn_out")
            linear(f"{src}.attn.to_add_out", f"{dst}.txt_attn_out")
            for stream in ("img", "txt"):
                linear(f"{src}.{stream}_mlp.net.0.proj", f"{dst}.{stream}_mlp_in")
                linear(f"{src}.{stream}_mlp.net.2", f"{dst}.{stream}_mlp_out")
        linear("norm_out.linear", "norm_out_mod")
        linear("proj_out", "proj_out")
        return m

    def expected_diffusers_keys(self) -> list[str]:
        """The keys a diffusers `QwenImageTransformer2DModel` state dict of this config has, sorted."""
        return sorted(self.weight_map())

    def load_diffusers_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy a full diffusers `QwenImageTransformer2DModel` state dict into this model through `weight_map`,
        everything checked before anything is written (`ditserve.loader.weights.copy_state_dict`)."""
        from ditserve.loader.weights import copy_state_dict

        copy_state_dict(self, sd, self.weight_map(), "diffusers Qwen-Image")

    # ------------------------------------------------------------------------------------------ examples

    @staticmethod
    def example_inputs(config: QwenImageConfig, height: int, width: int, *, text_len: int,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 1,
                       seed: int = 0) -> dict[str, Any]:
        """Forward kwargs for a `height` x `width` pixel image (the 8x VAE, 2x2 packing: (height/16) x (width/16)
        tokens) with `text_len` text tokens per item: random (seeded, drawn on the CPU) latents and text states,
        timestep 0.5, no text mask (every token real)."""
        multiple = VAE_SCALE * 2
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % multiple:
                raise ConfigError(f"{name} must be a positive multiple of {multiple}, got {v}")
        if text_len < 1:
            raise ConfigError(f"text_len must be >= 1, got {text_len}")
        gen = torch.Generator().manual_seed(seed)
        h, w = height // multiple, width // multiple

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        return dict(
            hidden_states=rand(batch, h * w, config.in_channels),
            encoder_hidden_states=rand(batch, text_len, config.joint_attention_dim),
            timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
            img_shapes=[(1, h, w)],
            encoder_hidden_states_mask=None,
        )


# ------------------------------------------------------------------------------------------------ presets
# Component configs of Qwen/Qwen-Image (docs: /work/shared/reference/model-configs.md, section 7); Qwen-Image-Edit
# (and -Edit-2509) have the same transformer, VAE and text encoder. The ModelSpec presets are assembled in the
# pipeline's module.

QWEN_IMAGE_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False,
    "axes_dims_rope": [16, 56, 56], "zero_cond_t": False, "use_additional_t_cond": False,
    "use_layer3d_rope": False,
}

QWEN_IMAGE_VAE: dict[str, Any] = {
    "base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
    "temperal_downsample": [False, True, True], "dropout": 0.0, "input_channels": 3,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
}

# Qwen/Qwen2.5-VL-7B-Instruct (transformers Qwen2_5_VLConfig, the checkpoint's flat form), loaded as the bare
# Qwen2_5_VLModel (no LM head); the pipelines read the language model's final hidden state.
QWEN2_5_VL_7B: dict[str, Any] = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 128000,
    "max_window_layers": 28, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "attention_dropout": 0.0,
    "use_sliding_window": False, "sliding_window": 32768, "tie_word_embeddings": False,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "bos_token_id": 151643, "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "image_token_id": 151655, "video_token_id": 151656,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_channels": 3, "out_hidden_size": 3584, "patch_size": 14,
                      "spatial_merge_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
                      "tokens_per_second": 2, "temporal_patch_size": 2},
}

QWEN_IMAGE_SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
