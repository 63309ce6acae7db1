"""Wan 2.1 / 2.2: the video DiT of Alibaba's Wan team, built on `ditserve.ops`.

Numerically this is diffusers' `WanTransformer3DModel` (0.42.x) for Wan2.1 T2V (1.3B, 14B), Wan2.1 I2V (CLIP
image embeddings through `image_embedder` and added key/value projections in the cross-attention), Wan2.2
TI2V-5B (per-token timesteps) and each expert of Wan2.2 A14B: same weights (loaded from a diffusers state dict
through `WanTransformer.weight_map`), same positions, same fp32 islands. The layout differs where it is faster:
the self-attention's q/k/v are one Linear, the cross-attention's k/v (and the image k/v) are one Linear each, the
FFN's input projection carries its tanh-GELU (`LinearGELU`), and Wan's fp32 LayerNorm + modulation runs as
ditserve's fused ops: `NormScaleShift` before the self-attention, `ResidualNormScaleShift` for the gated
residual add + the cross-attention's affine norm, and again for the ungated add + the FFN's modulated norm.

The model, as diffusers runs it:
  - video latents (B, C, F, h, w) cut into (pt, ph, pw) patches by a Conv3d (here: a Linear on the flattened
    patch, features ordered (C, pt, ph, pw) as the conv's weight), tokens in (f, r, c) order;
  - timestep t (B,) raw in [0, 1000] (or (B, L) per token, TI2V-5B) -> sinusoidal features (cos | sin) -> MLP
    (fp32 in diffusers' bf16 models, `_keep_in_fp32_modules`) -> temb (D) -> Linear(silu(temb)) -> 6 modulation
    vectors per block, each added to the block's learned `scale_shift_table` in fp32;
  - text features (B, T, text_dim) -> Linear, tanh-GELU, Linear -> (B, T, D); image features (I2V) (B, I,
    image_dim) -> LayerNorm, Linear, GELU, Linear, LayerNorm -> (B, I, D);
  - each block: self-attention with q/k RMSNorm over all heads together and 3-axis RoPE (interleaved channel
    pairs; frame/row/column axes of head_dim - 4 (Dh // 6), 2 (Dh // 6), 2 (Dh // 6) channels), a gated residual;
    cross-attention to the text (plus, for I2V, a second attention to the image tokens, added); the FFN, gated;
  - the final LayerNorm with (shift, scale) from the final `scale_shift_table` + temb, the output Linear and
    unpatchify.

Notation in shape comments: B batch, C channels, F latent frames, h x w latent size, (pt, ph, pw) the patch,
L = (F/pt)(h/ph)(w/pw) video tokens, T text tokens, I image tokens, D = heads * head_dim, H heads, Dh head_dim,
Fd the FFN width.
"""

from __future__ import annotations

import math
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
    Attention, Linear, LinearGELU, NormScaleShift, OpsConfig, ResidualNormScaleShift, RMSNorm, Rotary,
    axial_rope_cos_sin,
)
from ditserve.ops.functional import timestep_features

ROPE_THETA = 10000.0
IMAGE_NORM_EPS = 1e-5  # the image embedder's LayerNorms (nn.LayerNorm's default eps in diffusers)
VAE_SCALE_SPATIAL, VAE_SCALE_TEMPORAL = 8, 4  # the Wan2.1 VAE (Wan2.2's VAE: 16 spatially, see presets)


# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class WanConfig:
    """Architecture of a Wan transformer. Field names and defaults are diffusers' `WanTransformer3DModel`
    constructor arguments."""

    patch_size: tuple[int, ...] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    # diffusers 0.42 builds the q/k RMSNorms over all heads whatever this says; only its released value is taken.
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None  # Wan2.1 FLF2V (first and last frame) only

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if len(self.patch_size) != 3 or any(p < 1 for p in self.patch_size):
            raise ConfigError(f"Wan transformer: patch_size must be 3 positive ints (t, h, w), got "
                              f"{list(self.patch_size)}")
        if self.qk_norm != "rms_norm_across_heads":
            raise ConfigError(f"Wan transformer: qk_norm must be 'rms_norm_across_heads', got {self.qk_norm!r}")
        if self.pos_embed_seq_len is not None:
            raise ConfigError("Wan transformer: pos_embed_seq_len (Wan2.1 FLF2V) is not supported")
        if (self.image_dim is None) != (self.added_kv_proj_dim is None):
            raise ConfigError(f"Wan transformer: image_dim and added_kv_proj_dim are set together (I2V) or not at "
                              f"all, got {self.image_dim} and {self.added_kv_proj_dim}")
        if self.added_kv_proj_dim is not None and self.added_kv_proj_dim != self.dim:
            raise ConfigError(f"Wan transformer: added_kv_proj_dim must equal the inner dim {self.dim} (the image "
                              f"embedder's output), got {self.added_kv_proj_dim}")
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "out_channels", "text_dim",
                     "freq_dim", "ffn_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"Wan transformer: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_layers < 0:
            raise ConfigError(f"Wan transformer: num_layers must be >= 0, got {self.num_layers}")
        if self.freq_dim % 2 or self.attention_head_dim % 2 or self.rope_dims[0] <= 0 or self.rope_dims[0] % 2:
            raise ConfigError(f"Wan transformer: freq_dim and attention_head_dim must be even with a positive even "
                              f"frame RoPE axis, got freq_dim {self.freq_dim}, head dim {self.attention_head_dim}")

    @property
    def dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def rope_dims(self) -> tuple[int, int, int]:
        """Channels of the (frame, row, column) RoPE axes: h = w = 2 * (Dh // 6), the frame axis the rest."""
        hw = 2 * (self.attention_head_dim // 6)
        return self.attention_head_dim - 2 * hw, hw, hw

    @property
    def patch_features(self) -> int:
        return self.in_channels * math.prod(self.patch_size)

    @property
    def out_features(self) -> int:
        return self.out_channels * math.prod(self.patch_size)

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> "WanConfig":
        """From a diffusers `WanTransformer3DModel` config.json dict; an unknown key raises ConfigError
        (`ditserve.models.config_from_diffusers`)."""
        return config_from_diffusers(cls, d, "WanTransformer3DModel")


# ------------------------------------------------------------------------------------------------ embedders


def rope_tables(frames: int, rows: int, cols: int, rope_dims: Sequence[int], device=None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of Wan's 3-axis RoPE for a (frames, rows, cols) token grid in (f, r, c) order -> (L, Dh/2) fp32
    each (angles in float64, as diffusers' `WanRotaryPosEmbed` builds its tables)."""
    f = torch.arange(frames, device=device)
    r = torch.arange(rows, device=device)
    c = torch.arange(cols, device=device)
    ids = torch.stack(torch.meshgrid(f, r, c, indexing="ij"), dim=-1).reshape(-1, 3)  # (L, 3)
    return axial_rope_cos_sin(ids, rope_dims, ROPE_THETA)


class PatchEmbed(nn.Module):
    """diffusers' patch Conv3d (kernel = stride = the patch) as a Linear on flattened patches: x (B, L, C*pt*ph*pw),
    features ordered (C, pt, ph, pw) -> (B, L, D). The weight keeps the conv's shape (D, C, pt, ph, pw), so a
    checkpoint's tensor streams in unchanged."""

    def __init__(self, in_channels: int, patch: tuple[int, int, int], dim: int, device=None, dtype=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, in_channels, *patch, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.flatten(1), self.bias)


class Table(nn.Module):
    """A learned fp32 tensor (`weight`) whatever the model's dtype: Wan's modulation tables and the cross-attention
    norm's bias, which diffusers keeps in fp32. (A submodule, registered after a block's layers, so that a model's
    first parameter, which callers read its dtype from, is one of its compute-dtype weights.)"""

    def __init__(self, *shape: int, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(*shape, device=device, dtype=torch.float32))


class TimeEmbedder(nn.Module):
    """linear_2(silu(linear_1(x))): sinusoidal features (N, freq_dim) -> (N, D). fp32 weights whatever the
    model's dtype (diffusers keeps `time_embedder` in fp32)."""

    def __init__(self, freq_dim: int, dim: int, ops: OpsConfig, device=None):
        super().__init__()
        self.linear_1 = Linear(freq_dim, dim, ops=ops, device=device, dtype=torch.float32)
        self.linear_2 = Linear(dim, dim, ops=ops, device=device, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class ImageEmbedder(nn.Module):
    """I2V: CLIP image features (B, I, image_dim) -> LayerNorm -> Linear -> GELU (exact) -> Linear -> LayerNorm
    -> (B, I, D). The LayerNorms (affine, eps 1e-5) run in fp32, as diffusers' FP32LayerNorm."""

    def __init__(self, image_dim: int, dim: int, ops: OpsConfig, device=None, dtype=None):
        super().__init__()
        lin = dict(ops=ops, device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(image_dim, eps=IMAGE_NORM_EPS, device=device, dtype=dtype)
        self.proj_in = Linear(image_dim, image_dim, **lin)  # diffusers' FeedForward(mult=1): inner = image_dim
        self.proj_out = Linear(image_dim, dim, **lin)
        self.norm2 = nn.LayerNorm(dim, eps=IMAGE_NORM_EPS, device=device, dtype=dtype)

    @staticmethod
    def _fp32_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(),
                            norm.eps).to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._fp32_norm(self.norm1, x)  # (B, I, image_dim)
        x = self.proj_out(F.gelu(self.proj_in(x)))  # (B, I, image_dim) -> (B, I, D)
        return self._fp32_norm(self.norm2, x)


# ------------------------------------------------------------------------------------------------- blocks


class WanBlock(nn.Module):
    """One Wan block. forward(x (B, L, D), context (B, T, D), image_context (B, I, D) or None, mod (B, 6, D) or
    (B, L, 6, D) fp32 (the time projection, per sample or per token), cos, sin (L, Dh/2) fp32) -> (B, L, D):

        shift1, scale1, gate1, shift3, scale3, gate3 = scale_shift_table + mod            (fp32)
        x = x + gate1 * self_attn(norm1(x) * (1 + scale1) + shift1)                       (added in fp32)
        x = x + cross_attn(norm2(x), context[, image_context])                            (norm2: affine)
        x = x + gate3 * ffn(norm3(x) * (1 + scale3) + shift3)                             (added in fp32)

    norm1/norm3: LayerNorm without affine, norm2 with (or none, cross_attn_norm False), all in fp32.
    """

    def __init__(self, c: WanConfig, ops: OpsConfig, attention: str, device=None, dtype=None):
        super().__init__()
        D, H = c.dim, c.num_attention_heads
        self.heads, self.head_dim = H, c.attention_head_dim
        lin = dict(ops=ops, device=device, dtype=dtype)
        self.norm1 = NormScaleShift(D, eps=c.eps, norm="layer", ops=ops)
        # self-attention: q/k RMSNorm over all H * Dh channels, then RoPE
        self.qkv = Linear(D, 3 * D, **lin)  # [q | k | v]
        self.norm_q = RMSNorm(D, eps=c.eps, **lin)
        self.norm_k = RMSNorm(D, eps=c.eps, **lin)
        self.rotary = Rotary(interleaved=True, ops=ops)
        self.attn = Attention(attention)
        # Sequence parallelism (`WanTransformer.enable_sequence_parallel`): the self-attention's sequence-parallel
        # op; the cross-attention keeps `attn` (this rank's queries against the whole text: no exchange needed).
        self.sp_attn: nn.Module | None = None
        self.attn_out = Linear(D, D, **lin)
        # cross-attention: norm2 (affine LayerNorm) fused with the gated residual add before it
        self.cross_attn_norm = c.cross_attn_norm
        if c.cross_attn_norm:
            self.norm2 = ResidualNormScaleShift(D, eps=c.eps, norm="layer", elementwise_affine=True, ops=ops,
                                                device=device, dtype=torch.float32)
        self.cross_q = Linear(D, D, **lin)
        self.cross_kv = Linear(D, 2 * D, **lin)  # [k | v] of the text
        self.cross_norm_q = RMSNorm(D, eps=c.eps, **lin)
        self.cross_norm_k = RMSNorm(D, eps=c.eps, **lin)
        self.has_image = c.added_kv_proj_dim is not None
        if self.has_image:
            self.image_kv = Linear(D, 2 * D, **lin)  # [k | v] of the image tokens
            self.image_norm_k = RMSNorm(D, eps=c.eps, **lin)
        self.cross_out = Linear(D, D, **lin)
        # FFN: the ungated residual add of the cross-attention fused with norm3's modulation
        self.norm3 = ResidualNormScaleShift(D, eps=c.eps, norm="layer", ops=ops)
        self.ffn_in = LinearGELU(D, c.ffn_dim, ops=ops, device=device, dtype=dtype)
        self.ffn_out = Linear(c.ffn_dim, D, **lin)
        # fp32 in half-precision models too, as diffusers keeps them: the block's modulation table, norm2's bias
        self.scale_shift_table = Table(1, 6, D, device=device)
        if c.cross_attn_norm:
            self.norm2_bias = Table(D, device=device)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, self.head_dim))  # (B, N, D) -> (B, N, H, Dh)

    def self_attention(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """h (B, L, D) -> (B, L, D)."""
        q, k, v = self.qkv(h).chunk(3, dim=-1)  # (B, L, D) each
        q = self.rotary(self._heads(self.norm_q(q)), cos, sin)  # (B, L, H, Dh)
        k = self.rotary(self._heads(self.norm_k(k)), cos, sin)
        attn = self.attn if self.sp_attn is None else self.sp_attn
        return self.attn_out(attn(q, k, self._heads(v)).flatten(2))  # (B, L, D)

    def cross_attention(self, h: torch.Tensor, context: torch.Tensor,
                        image_context: torch.Tensor | None) -> torch.Tensor:
        """h (B, L, D) attends to the text (B, T, D) (and, I2V, separately to the image tokens (B, I, D), the two
        results added) -> (B, L, D)."""
        q = self._heads(self.cross_norm_q(self.cross_q(h)))  # (B, L, H, Dh)
        k, v = self.cross_kv(context).chunk(2, dim=-1)  # (B, T, D) each
        out = self.attn(q, self._heads(self.cross_norm_k(k)), self._heads(v))  # (B, L, H, Dh)
        if self.has_image:
            k_img, v_img = self.image_kv(image_context).chunk(2, dim=-1)  # (B, I, D) each
            out = out + self.attn(q, self._heads(self.image_norm_k(k_img)), self._heads(v_img))
        return self.cross_out(out.flatten(2))  # (B, L, D)

    def forward(self, x: torch.Tensor, context: torch.Tensor, image_context: torch.Tensor | None,
                mod: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if mod.ndim == 4:  # per-token modulation (B, L, 6, D): six (B, L, D)
            shift1, scale1, gate1, shift3, scale3, gate3 = (self.scale_shift_table.weight.unsqueeze(0) + mod).unbind(2)
        else:  # (B, 6, D): six (B, 1, D)
            shift1, scale1, gate1, shift3, scale3, gate3 = (self.scale_shift_table.weight + mod).chunk(6, dim=1)
        h = self.norm1(x, scale1, shift1)  # (B, L, D) in x's dtype
        a = self.self_attention(h, cos, sin)
        if self.cross_attn_norm:  # x + gate1 * a in fp32, then norm2's affine LayerNorm (scale 0, shift = bias)
            bias = self.norm2_bias.weight
            h, x = self.norm2(a, x, gate1, torch.zeros_like(bias), bias)
        else:
            x = (x.float() + a.float() * gate1).to(x.dtype)
            h = x
        c = self.cross_attention(h, context, image_context)
        h, x = self.norm3(c, x, None, scale3, shift3)  # x = x + c; h = norm3(x) * (1 + scale3) + shift3
        f = self.ffn_out(self.ffn_in(h))  # (B, L, D)
        return (x.float() + f.float() * gate3).to(x.dtype)


# -------------------------------------------------------------------------------------------------- model


@dataclass
class WanBlockContext:
    """What every block of one forward takes besides the hidden states, and what `finish` needs."""

    context: torch.Tensor  # (B, T, D) embedded text
    image_context: torch.Tensor | None  # (B, I, D) embedded image tokens (I2V) or None
    mod: torch.Tensor  # (B, 6, D) or (B, L, 6, D) fp32: the time projection
    temb: torch.Tensor  # (B, D) or (B, L, D): the time embedding (the final layer's modulation)
    cos: torch.Tensor  # (L, Dh/2) fp32 RoPE tables
    sin: torch.Tensor
    grid: tuple[int, int, int]  # (F/pt, h/ph, w/pw) token grid


class WanTransformer(nn.Module):
    """The Wan transformer. Inputs and conventions are diffusers' `WanTransformer3DModel.forward`:

    hidden_states (B, C, F, h, w) latents (for I2V: the noise channels and the condition's, concatenated by the
    pipeline); timestep (B,) raw in [0, 1000], or (B, L) per token (Wan2.2 TI2V-5B); encoder_hidden_states
    (B, T, text_dim); encoder_hidden_states_image (B, I, image_dim) CLIP image features (I2V checkpoints only).
    Returns (B, out_channels, F, h, w) in the model's dtype.

    Host-side decisions (shapes, the RoPE tables) are made in `prepare`, which runs eagerly; the blocks are the
    compiled regions.
    """

    repeated_blocks = ("blocks",)
    # The block-cache interface (`ditserve.cache`): `prepare` -> `run_blocks` over ranges of `blocks` -> `finish`;
    # the state between ranges is (x (B, L, D),).
    block_cache = None
    # Sequence parallelism (`ditserve.parallel.sharding`): the video tokens sharded over the ranks in the blocks;
    # the text (and I2V image) context is replicated, as cross-attention's keys.
    sharder = None
    # The fp8 tier (`ditserve.ops.fp8.apply_fp8`): each block's token-wise GEMMs (the image k/v of I2V too).
    fp8_linears = (("blocks", ("qkv", "attn_out", "cross_q", "cross_kv", "cross_out", "ffn_in", "ffn_out")),)
    # Video: tens of thousands of tokens a sequence (32,760 at 480x832 x 81 frames), where `--attention auto`
    # picks FlashAttention-3 when it is installed (`ditserve.ops.attention.resolve_backend`).
    LONG_SEQUENCES = True

    def __init__(self, config: WanConfig, ops: OpsConfig | None = None, attention: str = "sdpa", device=None,
                 dtype=None):
        super().__init__()
        if ops is None:
            device_type = torch.device(device).type if device is not None else None
            ops = OpsConfig(device=None if device_type == "meta" else device_type,
                            dtype=dtype or torch.get_default_dtype())
        self.config = c = config
        D = c.dim
        lin = dict(ops=ops, device=device, dtype=dtype)
        self.patch_embedding = PatchEmbed(c.in_channels, c.patch_size, D, device=device, dtype=dtype)
        self.time_embedder = TimeEmbedder(c.freq_dim, D, ops, device=device)
        self.time_proj = Linear(D, 6 * D, **lin)
        self.text_in = LinearGELU(c.text_dim, D, ops=ops, device=device, dtype=dtype)
        self.text_out = Linear(D, D, **lin)
        self.image_embedder = ImageEmbedder(c.image_dim, D, ops, device, dtype) if c.image_dim is not None else None
        self.blocks = nn.ModuleList(WanBlock(c, ops, attention, device=device, dtype=dtype)
                                    for _ in range(c.num_layers))
        self.scale_shift_table = Table(1, 2, D, device=device)  # the final (shift, scale) table, fp32
        self.norm_out = NormScaleShift(D, eps=c.eps, norm="layer", ops=ops)
        self.proj_out = Linear(D, c.out_features, **lin)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None) -> torch.Tensor:
        state, ctx = self.prepare(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)
        return self.finish(run_all_blocks(self, state, ctx), ctx)

    # ----------------------------------------------------------------------------------- block interface

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _check_inputs(self, hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image) -> None:
        c = self.config
        if hidden_states.ndim != 5 or hidden_states.shape[1] != c.in_channels:
            raise ValueError(f"hidden_states must be (B, {c.in_channels}, F, h, w), got {tuple(hidden_states.shape)}")
        B, _, Fr, h, w = hidden_states.shape
        pt, ph, pw = c.patch_size
        if Fr % pt or h % ph or w % pw or 0 in (Fr, h, w):
            raise ValueError(f"latent frames, height and width must be positive multiples of the patch "
                             f"{list(c.patch_size)}, got {Fr} x {h} x {w}")
        grid = (Fr // pt, h // ph, w // pw)
        if max(grid) > c.rope_max_seq_len:
            raise ValueError(f"a token grid of {list(grid)} exceeds the RoPE table length rope_max_seq_len="
                             f"{c.rope_max_seq_len}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != B or \
                encoder_hidden_states.shape[2] != c.text_dim:
            raise ValueError(f"encoder_hidden_states must be ({B}, T, {c.text_dim}), got "
                             f"{tuple(encoder_hidden_states.shape)}")
        L = math.prod(grid)
        if timestep.shape not in ((B,), (B, L)):
            raise ValueError(f"timestep must be ({B},) or ({B}, {L}) per token, got {tuple(timestep.shape)}")
        if (encoder_hidden_states_image is None) != (self.image_embedder is None):
            need = "needs" if self.image_embedder is not None else "takes no"
            raise ValueError(f"this Wan transformer {need} encoder_hidden_states_image (image embeddings)")
        if encoder_hidden_states_image is not None and (encoder_hidden_states_image.ndim != 3 or
                                                        encoder_hidden_states_image.shape[0] != B or
                                                        encoder_hidden_states_image.shape[2] != c.image_dim):
            raise ValueError(f"encoder_hidden_states_image must be ({B}, I, {c.image_dim}), got "
                             f"{tuple(encoder_hidden_states_image.shape)}")

    def prepare(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_image: torch.Tensor | None = None
                ) -> tuple[tuple[torch.Tensor], WanBlockContext]:
        """Everything before the blocks (arguments as `forward`): patch, time, text and image embeddings and the
        RoPE tables -> ((x (B, L, D),), the per-forward constants every block takes)."""
        self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_hidden_states_image)
        c = self.config
        B, C, Fr, h, w = hidden_states.shape
        pt, ph, pw = c.patch_size
        grid = (Fr // pt, h // ph, w // pw)
        L, D = math.prod(grid), c.dim

        # Patches: (B, C, F, h, w) -> (B, L, C*pt*ph*pw), tokens (f, r, c), features (C, pt, ph, pw) as the conv's.
        x = hidden_states.view(B, C, grid[0], pt, grid[1], ph, grid[2], pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, L, c.patch_features)
        x = self.patch_embedding(x)  # (B, L, D)

        # Time: fp32 MLP, the embedding in the model's dtype, its projection to 6 modulation vectors per block.
        per_token = timestep.ndim == 2
        t_feat = timestep_features(timestep.flatten(), c.freq_dim)  # (B or B*L, freq_dim) fp32
        temb = self.time_embedder(t_feat).to(x.dtype)  # (N, D)
        mod = self.time_proj(F.silu(temb)).float()  # (N, 6D) fp32 (added to the fp32 tables)
        if per_token:
            temb = temb.view(B, L, D)
            mod = mod.view(B, L, 6, D)
        else:
            mod = mod.view(B, 6, D)

        context = self.text_out(self.text_in(encoder_hidden_states))  # (B, T, D)
        image_context = None
        if self.image_embedder is not None:
            image_context = self.image_embedder(encoder_hidden_states_image)  # (B, I, D)

        cos, sin = rope_tables(*grid, c.rope_dims, device=x.device)  # (L, Dh/2) each
        if self.sharder is not None:  # this rank's tokens (B, Ls, D), their tables and per-token modulation
            sh = self.sharder
            sh.current_mask = sh.key_mask(L, B, None, x.device)  # (B, sp*Ls) or None
            x, cos, sin = sh.shard(x), sh.shard(cos, 0), sh.shard(sin, 0)
            if per_token:
                mod = sh.shard(mod)  # (B, Ls, 6, D); temb stays whole for `finish`, after the gather
        return (x,), WanBlockContext(context=context, image_context=image_context, mod=mod, temb=temb, cos=cos,
                                     sin=sin, grid=grid)

    def run_blocks(self, state: tuple[torch.Tensor, ...], ctx: WanBlockContext, start: int,
                   stop: int) -> tuple[torch.Tensor]:
        """Blocks [start, stop) on state (x (B, L, D),) -> (x,)."""
        (x,) = state
        for block in self.blocks[start:stop]:
            x = block(x, ctx.context, ctx.image_context, ctx.mod, ctx.cos, ctx.sin)  # (B, L, D)
        return (x,)

    def finish(self, state: tuple[torch.Tensor, ...], ctx: WanBlockContext) -> torch.Tensor:
        """The final norm + modulation, the output projection and unpatchify: (x (B, L, D),) -> (B, C_out, F, h, w).
        In a dummy run (`ditserve.dummy_run`) a zero broadcast view of the output's shape is returned."""
        (x,) = state
        c = self.config
        B = x.shape[0]
        (gf, gh, gw), (pt, ph, pw) = ctx.grid, c.patch_size
        if in_dummy_run():
            return x.new_zeros(()).expand(B, c.out_channels, gf * pt, gh * ph, gw * pw)
        if self.sharder is not None:
            x = self.sharder.gather(x, gf * gh * gw)  # (B, L, D), the same on every rank
        if ctx.temb.ndim == 3:  # per token: (B, L, D) -> shift, scale (B, L, D)
            shift, scale = (self.scale_shift_table.weight.unsqueeze(0) + ctx.temb.unsqueeze(2)).unbind(2)
        else:  # (B, D) -> (B, 1, D) each
            shift, scale = (self.scale_shift_table.weight + ctx.temb.unsqueeze(1)).chunk(2, dim=1)
        x = self.proj_out(self.norm_out(x, scale, shift))  # (B, L, C_out*pt*ph*pw)
        x = x.view(B, gf, gh, gw, pt, ph, pw, c.out_channels).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(B, c.out_channels, gf * pt, gh * ph, gw * pw)

    def enable_sequence_parallel(self, state) -> None:
        """Run the blocks on this rank's shard of the video tokens (`ditserve.parallel.sharding`; state: a
        `ParallelState` with a sequence-parallel degree above 1): self-attention sequence-parallel, cross-attention
        local."""
        from ditserve.parallel.attention import SequenceParallelAttention
        from ditserve.parallel.sharding import SequenceSharder

        self.sharder = SequenceSharder(state)
        for block in self.blocks:
            block.sp_attn = SequenceParallelAttention(block.attn, state, self.sharder)

    # ------------------------------------------------------------------------------------- weight loading

    def weight_map(self) -> dict[str, tuple[str, int | None, int | None]]:
        """Every key of a diffusers `WanTransformer3DModel` state dict -> (our parameter name, start, stop): the
        tensor goes into rows [start:stop] (dim 0) of our parameter, (None, None) meaning the whole parameter.
        """
        c = self.config
        D = c.dim
        m: dict[str, tuple[str, int | None, int | None]] = {}

        def linear(src: str, dst: str, start: int | None = None, stop: int | None = None) -> None:
            m[f"{src}.weight"] = (f"{dst}.weight", start, stop)
            m[f"{src}.bias"] = (f"{dst}.bias", start, stop)

        def param(src: str, dst: str) -> None:
            m[src] = (dst, None, None)

        linear("patch_embedding", "patch_embedding")  # the Conv3d's (D, C, pt, ph, pw) weight, as is
        ce = "condition_embedder"
        linear(f"{ce}.time_embedder.linear_1", "time_embedder.linear_1")
        linear(f"{ce}.time_embedder.linear_2", "time_embedder.linear_2")
        linear(f"{ce}.time_proj", "time_proj")
        linear(f"{ce}.text_embedder.linear_1", "text_in")
        linear(f"{ce}.text_embedder.linear_2", "text_out")
        if c.image_dim is not None:
            ie = f"{ce}.image_embedder"
            linear(f"{ie}.norm1", "image_embedder.norm1")
            linear(f"{ie}.ff.net.0.proj", "image_embedder.proj_in")
            linear(f"{ie}.ff.net.2", "image_embedder.proj_out")
            linear(f"{ie}.norm2", "image_embedder.norm2")
        for i in range(c.num_layers):
            b = f"blocks.{i}"
            param(f"{b}.scale_shift_table", f"{b}.scale_shift_table.weight")
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                linear(f"{b}.attn1.{name}", f"{b}.qkv", j * D, (j + 1) * D)
            param(f"{b}.attn1.norm_q.weight", f"{b}.norm_q.weight")
            param(f"{b}.attn1.norm_k.weight", f"{b}.norm_k.weight")
            linear(f"{b}.attn1.to_out.0", f"{b}.attn_out")
            linear(f"{b}.attn2.to_q", f"{b}.cross_q")
            linear(f"{b}.attn2.to_k", f"{b}.cross_kv", 0, D)
            linear(f"{b}.attn2.to_v", f"{b}.cross_kv", D, 2 * D)
            param(f"{b}.attn2.norm_q.weight", f"{b}.cross_norm_q.weight")
            param(f"{b}.attn2.norm_k.weight", f"{b}.cross_norm_k.weight")
            if c.added_kv_proj_dim is not None:
                linear(f"{b}.attn2.add_k_proj", f"{b}.image_kv", 0, D)
                linear(f"{b}.attn2.add_v_proj", f"{b}.image_kv", D, 2 * D)
                param(f"{b}.attn2.norm_added_k.weight", f"{b}.image_norm_k.weight")
            linear(f"{b}.attn2.to_out.0", f"{b}.cross_out")
            if c.cross_attn_norm:
                param(f"{b}.norm2.weight", f"{b}.norm2.weight")
                param(f"{b}.norm2.bias", f"{b}.norm2_bias.weight")
            linear(f"{b}.ffn.net.0.proj", f"{b}.ffn_in")
            linear(f"{b}.ffn.net.2", f"{b}.ffn_out")
        param("scale_shift_table", "scale_shift_table.weight")
        linear("proj_out", "proj_out")
        return m

    def expected_diffusers_keys(self) -> list[str]:
        """The keys a diffusers `WanTransformer3DModel` state dict of this config has, sorted."""
        return sorted(self.weight_map())

    def load_diffusers_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy a full diffusers `WanTransformer3DModel` state dict into this model through `weight_map`,
        everything checked before anything is written (`ditserve.loader.weights.copy_state_dict`)."""
        from ditserve.loader.weights import copy_state_dict

        copy_state_dict(self, sd, self.weight_map(), "diffusers Wan")

    # ------------------------------------------------------------------------------------------ examples

    @staticmethod
    def example_inputs(config: WanConfig, height: int, width: int, *, text_len: int, num_frames: int = 81,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 1,
                       seed: int = 0, vae_scale_spatial: int = VAE_SCALE_SPATIAL,
                       vae_scale_temporal: int = VAE_SCALE_TEMPORAL, image_len: int = 257) -> dict[str, Any]:
        """Forward kwargs for a `num_frames` x `height` x `width` video (latents (F-1)/4+1 frames of height/8 x
        width/8 with the Wan2.1 VAE) with `text_len` text tokens: random (seeded, drawn on the CPU) latents and
        features, timestep 500; I2V configs also get `image_len` CLIP image tokens."""
        pt, ph, pw = config.patch_size
        multiple = vae_scale_spatial * max(ph, pw)
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % multiple:
                raise ConfigError(f"{name} must be a positive multiple of {multiple}, got {v}")
        if num_frames < 1 or (num_frames - 1) % vae_scale_temporal:
            raise ConfigError(f"num_frames must be {vae_scale_temporal}k + 1, got {num_frames}")
        if text_len < 1:
            raise ConfigError(f"text_len must be >= 1, got {text_len}")
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        frames = (num_frames - 1) // vae_scale_temporal + 1
        inputs = dict(
            hidden_states=rand(batch, config.in_channels, frames, height // vae_scale_spatial,
                               width // vae_scale_spatial),
            timestep=torch.full((batch,), 500.0, device=device, dtype=dtype),
            encoder_hidden_states=rand(batch, text_len, config.text_dim),
        )
        if config.image_dim is not None:
            inputs["encoder_hidden_states_image"] = rand(batch, image_len, config.image_dim)
        return inputs


# ------------------------------------------------------------------------------------------------ presets
# Component configs of the released checkpoints (docs: /work/shared/reference/model-configs.md, section 6); the
# ModelSpec presets are assembled from them in `ditserve.pipelines.wan`.

_WAN_COMMON: dict[str, Any] = {
    "patch_size": [1, 2, 2], "attention_head_dim": 128, "text_dim": 4096, "freq_dim": 256, "cross_attn_norm": True,
    "qk_norm": "rms_norm_across_heads", "eps": 1e-06, "image_dim": None, "added_kv_proj_dim": None,
    "rope_max_seq_len": 1024, "pos_embed_seq_len": None,
}
WAN21_T2V_1_3B_TRANSFORMER: dict[str, Any] = {**_WAN_COMMON, "num_attention_heads": 12, "in_channels": 16,
                                              "out_channels": 16, "ffn_dim": 8960, "num_layers": 30}
WAN21_T2V_14B_TRANSFORMER: dict[str, Any] = {**_WAN_COMMON, "num_attention_heads": 40, "in_channels": 16,
                                             "out_channels": 16, "ffn_dim": 13824, "num_layers": 40}
# I2V-14B: 16 noise + 20 condition channels (4 of first-frame mask + 16 of the encoded condition video), CLIP
# ViT-H/14 penultimate features (1280) through the image embedder.
WAN21_I2V_14B_TRANSFORMER: dict[str, Any] = {**WAN21_T2V_14B_TRANSFORMER, "in_channels": 36, "image_dim": 1280,
                                             "added_kv_proj_dim": 5120}
WAN22_TI2V_5B_TRANSFORMER: dict[str, Any] = {**_WAN_COMMON, "num_attention_heads": 24, "in_channels": 48,
                                             "out_channels": 48, "ffn_dim": 14336, "num_layers": 30}
WAN22_T2V_A14B_TRANSFORMER: dict[str, Any] = dict(WAN21_T2V_14B_TRANSFORMER)  # each of the two experts

WAN21_VAE: dict[str, Any] = {
    "base_dim": 96, "decoder_base_dim": None, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
    "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0,
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.916],
    "is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None,
    "scale_factor_temporal": 4, "scale_factor_spatial": 8,
}
WAN22_VAE: dict[str, Any] = {
    "base_dim": 160, "decoder_base_dim": 256, "z_dim": 48, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2,
    "attn_scales": [], "temperal_downsample": [False, True, True], "dropout": 0.0,
    "is_residual": True, "in_channels": 12, "out_channels": 12, "patch_size": 2,
    "scale_factor_temporal": 4, "scale_factor_spatial": 16,
    "latents_mean": [-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542,
                     0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109,
                     0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899,
                     -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
                     0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667],
    "latents_std": [0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344,
                    0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804,
                    0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999,
                    0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
                    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744],
}

# google/umt5-xxl's encoder (transformers UMT5Config), loaded as UMT5EncoderModel.
UMT5_XXL_TEXT: dict[str, Any] = {
    "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
    "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "dropout_rate": 0.1,
    "layer_norm_epsilon": 1e-06, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True,
    "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}


def wan_scheduler(flow_shift: float) -> dict[str, Any]:
    """The UniPC flow-matching scheduler config of the released Wan checkpoints (other arguments default)."""
    return {"num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
            "flow_shift": float(flow_shift), "solver_order": 2, "solver_type": "bh2", "lower_order_final": True,
            "final_sigmas_type": "zero"}
