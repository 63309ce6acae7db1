"""Z-Image (Turbo): the single-stream DiT of Alibaba's Tongyi-MAI, built on `ditserve.ops`.

Numerically this is diffusers' `ZImageTransformer2DModel` (0.42.x) in its basic mode (one image and one
caption per item; no Omni / SigLIP conditioning, no controlnet): same weights (loaded from a diffusers state
dict through `ZImageTransformer.weight_map`), same padding, positions and masking. The layout differs where it
is faster: q/k/v of each block come from one fused Linear, the SwiGLU's two input projections (w1, w3) are one
Linear, and the q/k RMSNorms and the RoPE rotation run as one op (`RMSNormRotary`).

The model, as diffusers runs it:
  - timestep: t (B,) in [0, 1] -> sinusoidal features of t * t_scale -> MLP 256 -> 1024 -> min(dim, 256): the
    AdaLN input `adaln` of every modulated block and of the final layer;
  - image: latents (B, C, h, w) cut into p x p patches (features ordered (pH, pW, C)), embedded, padded to a
    multiple of 32 tokens with the learned `x_pad_token`;
  - caption: text features (B, T, cap_feat_dim), item i has len_i real tokens; RMSNorm + Linear, then padded per
    item to P_i = len_i rounded up to 32 with the learned `cap_pad_token` (the pad tokens take part in attention:
    they are not masked);
  - `noise_refiner` blocks (with AdaLN) on the image tokens, `context_refiner` blocks (without) on the caption
    tokens, then the main `layers` on the per-item sequence [image (padded), caption (padded)];
  - RoPE over 3 axes (interleaved channel pairs): caption token j at (j + 1, 0, 0), image token (r, c) at
    (P_i + 1, r, c), image pad tokens at (0, 0, 0);
  - only batch padding (rows beyond an item's P_i, where the batch's longest padded caption is longer) is masked
    out of attention; when every item has the same P_i there is no mask at all (SDPA's fastest kernels run).

Notation in shape comments: B batch, C latent channels, h x w latent size, p patch size, L = (h/p)(w/p) image
tokens, Lp = L rounded up to 32, P = the batch's longest padded caption, S = Lp + P, D = dim, H heads,
Dh = D / H head_dim, A = min(D, 256) the AdaLN width, F = int(D / 3 * 8) the FFN hidden width.
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
from ditserve.ops import Attention, LayerNorm, Linear, NormTanhGate, OpsConfig, RMSNorm, RMSNormRotary
from ditserve.ops.functional import timestep_features

SEQ_MULTI_OF = 32  # image and caption token counts are padded to a multiple of this, per item
ADALN_EMBED_DIM = 256  # the AdaLN input width is min(dim, this)
TIME_FREQ_DIM = 256  # sinusoidal timestep features
TIME_MID_DIM = 1024  # hidden width of the timestep MLP
QK_NORM_EPS = 1e-5  # the per-head q/k RMSNorms (diffusers' Attention default; the block norms use norm_eps)
FINAL_NORM_EPS = 1e-6  # the final layer's LayerNorm
VAE_SCALE = 8  # pixels per latent row/column (the FLUX.1 VAE)


def _round_up(n: int, m: int = SEQ_MULTI_OF) -> int:
    return -(-n // m) * m


# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ZImageConfig:
    """Architecture of a Z-Image transformer. Field names and defaults are diffusers'
    `ZImageTransformer2DModel` constructor arguments (the defaults are the class's; the released Z-Image-Turbo
    differs in axes_lens, see `Z_IMAGE_TURBO_TRANSFORMER`)."""

    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    in_channels: int = 16
    dim: int = 3840
    n_layers: int = 30
    n_refiner_layers: int = 2
    n_heads: int = 30
    # diffusers 0.42 passes this to its blocks and ignores it there: attention is always full multi-head
    # (n_heads key/value heads), so it is accepted and ignored here too.
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True
    cap_feat_dim: int = 2560
    siglip_feat_dim: int | None = None  # Z-Image-Omni only
    rope_theta: float = 256.0
    t_scale: float = 1000.0
    axes_dims: tuple[int, ...] = (32, 48, 48)
    axes_lens: tuple[int, ...] = (1024, 512, 512)

    def __post_init__(self):
        for name in ("all_patch_size", "all_f_patch_size", "axes_dims", "axes_lens"):
            object.__setattr__(self, name, tuple(int(a) for a in getattr(self, name)))
        if self.siglip_feat_dim is not None:
            raise ConfigError("Z-Image-Omni is not supported (siglip_feat_dim is set); only the basic Z-Image "
                              "transformer (e.g. Z-Image-Turbo) is")
        if len(self.all_patch_size) != 1 or len(self.all_f_patch_size) != 1:
            raise ConfigError(f"Z-Image transformer: exactly one patch size is supported, got all_patch_size="
                              f"{list(self.all_patch_size)}, all_f_patch_size={list(self.all_f_patch_size)}")
        if self.patch_size < 1:
            raise ConfigError(f"Z-Image transformer: patch size must be >= 1, got {self.patch_size}")
        if self.f_patch_size != 1:
            raise ConfigError(f"Z-Image transformer: the frame patch size must be 1 (single images), got "
                              f"{self.f_patch_size}")
        if not self.qk_norm:
            raise ConfigError("Z-Image transformer: qk_norm=False is not supported")
        for name in ("in_channels", "dim", "n_heads", "cap_feat_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"Z-Image transformer: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("n_layers", "n_refiner_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"Z-Image transformer: {name} must be >= 0, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ConfigError(f"Z-Image transformer: dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if len(self.axes_dims) != 3 or len(self.axes_lens) != 3:
            raise ConfigError(f"Z-Image transformer: axes_dims and axes_lens need 3 entries (frame/caption, row, "
                              f"column), got {list(self.axes_dims)} and {list(self.axes_lens)}")
        if any(a <= 0 or a % 2 for a in self.axes_dims):
            raise ConfigError(f"Z-Image transformer: every axes_dims entry must be even and positive, got "
                              f"{list(self.axes_dims)}")
        if sum(self.axes_dims) != self.head_dim:
            raise ConfigError(f"Z-Image transformer: sum(axes_dims) = {sum(self.axes_dims)} must equal the head "
                              f"dim dim / n_heads = {self.head_dim}")

    @property
    def patch_size(self) -> int:
        return self.all_patch_size[0]

    @property
    def f_patch_size(self) -> int:
        return self.all_f_patch_size[0]

    @property
    def out_channels(self) -> int:
        return self.in_channels

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def adaln_dim(self) -> int:
        return min(self.dim, ADALN_EMBED_DIM)

    @property
    def ffn_hidden(self) -> int:
        return int(self.dim / 3 * 8)  # diffusers' expression, float arithmetic included

    @property
    def patch_features(self) -> int:
        return self.f_patch_size * self.patch_size * self.patch_size * self.in_channels

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> "ZImageConfig":
        """From a diffusers `ZImageTransformer2DModel` config.json dict; an unknown key raises ConfigError
        (`ditserve.models.config_from_diffusers`)."""
        return config_from_diffusers(cls, d, "ZImageTransformer2DModel")


# ------------------------------------------------------------------------------------------------ embedders


def rope_cos_sin(ids: torch.Tensor, axes_dims: Sequence[int], theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of Z-Image's 3-axis RoPE: ids (..., N, 3) integer positions -> (..., N, Dh/2) fp32 each.

    Axis i contributes axes_dims[i] / 2 channel pairs with frequencies theta^(-2j / axes_dims[i]). As diffusers'
    `RopeEmbedder` (and the original Z-Image code) computes them: the angle in float64, rounded to float32, then
    cos/sin in float32. (`ditserve.ops.axial_rope_cos_sin` takes cos/sin in float64; at Z-Image's caption
    positions, up to ~1500, the fp32 rounding of the angle moves the tables by up to ~6e-5, which this model was
    trained with.)
    """
    pos = ids.to(torch.float64)
    angles = []
    for i, d in enumerate(axes_dims):
        freqs = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d))  # (d/2,)
        angles.append((pos[..., i : i + 1] * freqs).float())  # (..., N, d/2) fp32
    ang = torch.cat(angles, dim=-1)  # (..., N, Dh/2)
    return ang.cos(), ang.sin()


class TimestepEmbedder(nn.Module):
    """out_layer(silu(in_layer(x))): sinusoidal features (B, 256) -> (B, A)."""

    def __init__(self, out_dim: int, ops: OpsConfig, device=None, dtype=None):
        super().__init__()
        self.in_layer = Linear(TIME_FREQ_DIM, TIME_MID_DIM, ops=ops, device=device, dtype=dtype)
        self.out_layer = Linear(TIME_MID_DIM, out_dim, ops=ops, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


# ------------------------------------------------------------------------------------------------- blocks


class _ZImageBlockBase(nn.Module):
    """What both block kinds share: self-attention (fused q/k/v, per-head q/k RMSNorm + RoPE, output projection)
    and the SwiGLU FFN, plus the four sandwich-norm weights (attn_norm1/2, ffn_norm1/2)."""

    def __init__(self, dim: int, heads: int, ffn_hidden: int, norm_eps: float, ops: OpsConfig, attention: str,
                 device=None, dtype=None):
        super().__init__()
        self.dim, self.heads, self.head_dim, self.ffn_hidden = dim, heads, dim // heads, ffn_hidden
        lin = dict(bias=False, ops=ops, device=device, dtype=dtype)
        norm = dict(ops=ops, device=device, dtype=dtype)
        self.qkv = Linear(dim, 3 * dim, **lin)  # [q | k | v]
        # The q/k RMSNorms hold their weights (the checkpoint's names); `norm_rotary` applies them and RoPE in one op.
        self.q_norm = RMSNorm(self.head_dim, eps=QK_NORM_EPS, **norm)
        self.k_norm = RMSNorm(self.head_dim, eps=QK_NORM_EPS, **norm)
        self.norm_rotary = RMSNormRotary(self.head_dim, eps=QK_NORM_EPS, interleaved=True, ops=ops)
        self.attn = Attention(attention)
        self.attn_out = Linear(dim, dim, **lin)
        self.ffn_in = Linear(dim, 2 * ffn_hidden, **lin)  # [w1 (gate) | w3 (up)]
        self.ffn_out = Linear(ffn_hidden, dim, **lin)  # w2 (down)
        self.attn_norm1 = RMSNorm(dim, eps=norm_eps, **norm)
        self.ffn_norm1 = RMSNorm(dim, eps=norm_eps, **norm)

    def attention(self, h: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor,
                  sin: torch.Tensor) -> torch.Tensor:
        """Self-attention of h (B, N, D) with RoPE tables cos, sin ((N, Dh/2) or (B, N, Dh/2) fp32) and an optional
        key mask (B, 1, 1, N) bool (True = attend) -> (B, N, D)."""
        q, k, v = self.qkv(h).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)  # (B, N, H, Dh) each
        q = self.norm_rotary((q,), (self.q_norm.weight,), cos, sin)  # RMS-normed, rotated: (B, N, H, Dh)
        k = self.norm_rotary((k,), (self.k_norm.weight,), cos, sin)
        return self.attn_out(self.attn(q, k, v, mask).flatten(2))  # (B, N, H, Dh) -> (B, N, D)

    def ffn(self, h: torch.Tensor) -> torch.Tensor:
        """SwiGLU: w2(silu(w1 h) * w3 h). h (B, N, D) -> (B, N, F) -> (B, N, D)."""
        gate, up = self.ffn_in(h).split(self.ffn_hidden, dim=-1)  # (B, N, F) each
        return self.ffn_out(F.silu(gate) * up)


class ZImageBlock(_ZImageBlockBase):
    """A modulated block (`noise_refiner` and the main `layers`): AdaLN scales on the pre-norms and tanh gates
    on the sandwich post-norms.

    forward(x (B, N, D), mask (B, 1, 1, N) bool or None, cos, sin ((N, Dh/2) or (B, N, Dh/2) fp32),
    adaln (B, A)) -> (B, N, D):
        scale_a, gate_a, scale_f, gate_f = mod(adaln)
        x = x + tanh(gate_a) * attn_norm2(attention(attn_norm1(x) * (1 + scale_a)))
        x = x + tanh(gate_f) * ffn_norm2(ffn(ffn_norm1(x) * (1 + scale_f)))
    """

    def __init__(self, dim: int, heads: int, ffn_hidden: int, norm_eps: float, adaln_dim: int, ops: OpsConfig,
                 attention: str, device=None, dtype=None):
        super().__init__(dim, heads, ffn_hidden, norm_eps, ops, attention, device=device, dtype=dtype)
        self.mod = Linear(adaln_dim, 4 * dim, ops=ops, device=device, dtype=dtype)  # diffusers' adaLN_modulation.0
        # x + tanh(gate) * rms_norm(y) * weight: the post-norms with their gated residual add, one op each.
        self.attn_norm2 = NormTanhGate(dim, eps=norm_eps, norm="rms", elementwise_affine=True, ops=ops,
                                       device=device, dtype=dtype)
        self.ffn_norm2 = NormTanhGate(dim, eps=norm_eps, norm="rms", elementwise_affine=True, ops=ops,
                                      device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                adaln: torch.Tensor) -> torch.Tensor:
        scale_a, gate_a, scale_f, gate_f = self.mod(adaln).unsqueeze(1).chunk(4, dim=-1)  # (B, 1, D) each
        h = self.attn_norm1(x) * (1.0 + scale_a)  # (B, N, D)
        x = self.attn_norm2(self.attention(h, mask, cos, sin), gate_a, x)  # (B, N, D)
        h = self.ffn_norm1(x) * (1.0 + scale_f)
        return self.ffn_norm2(self.ffn(h), gate_f, x)  # (B, N, D)


class ZImageContextBlock(_ZImageBlockBase):
    """An unmodulated block (`context_refiner`, on the caption tokens).

    forward(x (B, N, D), mask (B, 1, 1, N) bool or None, cos, sin (N, Dh/2) fp32) -> (B, N, D):
        x = x + attn_norm2(attention(attn_norm1(x)))
        x = x + ffn_norm2(ffn(ffn_norm1(x)))
    """

    def __init__(self, dim: int, heads: int, ffn_hidden: int, norm_eps: float, ops: OpsConfig, attention: str,
                 device=None, dtype=None):
        super().__init__(dim, heads, ffn_hidden, norm_eps, ops, attention, device=device, dtype=dtype)
        norm = dict(ops=ops, device=device, dtype=dtype)
        self.attn_norm2 = RMSNorm(dim, eps=norm_eps, **norm)
        self.ffn_norm2 = RMSNorm(dim, eps=norm_eps, **norm)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_norm2(self.attention(self.attn_norm1(x), mask, cos, sin))  # (B, N, D)
        return x + self.ffn_norm2(self.ffn(self.ffn_norm1(x)))  # (B, N, D)


# -------------------------------------------------------------------------------------------------- model


@dataclass
class ZImageBlockContext:
    """What every main block of one forward takes besides the hidden states, and what `finish` needs."""

    adaln: torch.Tensor  # (B, A) the AdaLN input (timestep embedding), model dtype
    cos: torch.Tensor  # (S, Dh/2) fp32 RoPE table of the sequence [image (Lp), caption (P)]; (B, S, Dh/2) when
    sin: torch.Tensor  # the items' padded caption lengths differ (image positions depend on them)
    mask: torch.Tensor | None  # (B, 1, 1, S) bool, True = attend: masks batch padding; None when there is none
    image_tokens: int  # L: the real image tokens, at the start of the sequence
    height: int  # latent height h
    width: int  # latent width w
    tokens: int = 0  # S, the unified sequence's length before sequence-parallel padding (0: not sharded)


class ZImageTransformer(nn.Module):
    """The Z-Image transformer. Inputs and conventions are diffusers' `ZImageTransformer2DModel.forward` in basic
    mode, batched:

    hidden_states (B, C, h, w) latents (diffusers: a list of (C, 1, h, w)); timestep (B,) in [0, 1], diffusers'
    `t` (the model multiplies by t_scale); encoder_hidden_states (B, T, cap_feat_dim) text features, rows
    batch-padded to a common T; encoder_lens: the real token count of each item (host ints; None: all T tokens
    of every item are real) (diffusers: a list of (len_i, cap_feat_dim)). Returns (B, C, h, w) in the model's
    dtype: diffusers' output list stacked (not negated: the pipeline negates it).

    Inputs are expected in the model's dtype. Host-side decisions (padding, positions, whether a mask is needed)
    are all made in `prepare`, which runs eagerly; the blocks are the compiled regions.
    """

    # Compiled regions (`ditserve.compile`). The context refiner is left out: two blocks on the caption tokens
    # (~0.2% of a forward's GEMM FLOPs at 1024x1024 with 128 caption tokens), launched eagerly while the GPU works
    # through the noise refiner; not compiled, it spares every cold start one graph. The noise refiner and the
    # main layers are one block class run at two token counts in every forward (image tokens; image + caption
    # tokens): compiled with symbolic token counts from the first call (`varying_shape_blocks`), one graph serves
    # both, instead of a static graph for the refiner followed at once by a symbolic recompile for the main layers.
    repeated_blocks = ("noise_refiner", "layers")
    varying_shape_blocks = ("noise_refiner", "layers")

    # The block-cache interface (see `ditserve.cache`): `prepare` -> `run_blocks` over ranges of the main layers
    # -> `finish`. The state between ranges is (x (B, S, D),); the refiners run in `prepare`. A cache mounted in
    # `block_cache` decides which ranges run.
    block_cache = None
    # Sequence parallelism (`ditserve.parallel.sharding`): the unified sequence of the main layers is sharded
    # (image and caption tokens alike: split, not replicated); the refiners run whole on every rank.
    sharder = None
    # The fp8 tier (`ditserve.ops.fp8.apply_fp8`): per block list, the token-wise GEMMs it quantises. Left out:
    # each block's `mod` (M = batch, 256 inputs: 0.13B weights in all), the embedders and the final layer.
    fp8_linears = (
        ("layers", ("qkv", "attn_out", "ffn_in", "ffn_out")),
        ("noise_refiner", ("qkv", "attn_out", "ffn_in", "ffn_out")),
        ("context_refiner", ("qkv", "attn_out", "ffn_in", "ffn_out")),
    )

    def __init__(self, config: ZImageConfig, ops: OpsConfig | None = None, attention: str = "sdpa", device=None,
                 dtype=None):
        super().__init__()
        if ops is None:
            device_type = torch.device(device).type if device is not None else None
            # A model built on "meta" (to be materialised by the loader) picks its paths for the best device.
            ops = OpsConfig(device=None if device_type == "meta" else device_type,
                            dtype=dtype or torch.get_default_dtype())
        self.config = c = config
        D, A = c.dim, c.adaln_dim
        lin = dict(ops=ops, device=device, dtype=dtype)
        block = dict(dim=D, heads=c.n_heads, ffn_hidden=c.ffn_hidden, norm_eps=c.norm_eps, ops=ops,
                     attention=attention, device=device, dtype=dtype)

        self.t_embedder = TimestepEmbedder(A, **lin)
        self.cap_norm = RMSNorm(c.cap_feat_dim, eps=c.norm_eps, **lin)
        self.cap_embedder = Linear(c.cap_feat_dim, D, **lin)
        self.x_embedder = Linear(c.patch_features, D, **lin)
        self.x_pad_token = nn.Parameter(torch.zeros(1, D, device=device, dtype=dtype))
        self.cap_pad_token = nn.Parameter(torch.zeros(1, D, device=device, dtype=dtype))
        self.noise_refiner = nn.ModuleList(ZImageBlock(adaln_dim=A, **block) for _ in range(c.n_refiner_layers))
        self.context_refiner = nn.ModuleList(ZImageContextBlock(**block) for _ in range(c.n_refiner_layers))
        self.layers = nn.ModuleList(ZImageBlock(adaln_dim=A, **block) for _ in range(c.n_layers))
        self.final_mod = Linear(A, D, **lin)  # scale = 1 + final_mod(silu(adaln))
        self.final_norm = LayerNorm(D, eps=FINAL_NORM_EPS, ops=ops)
        self.proj_out = Linear(D, c.patch_features, **lin)

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_lens: Sequence[int] | None = None) -> torch.Tensor:
        state, ctx = self.prepare(hidden_states, timestep, encoder_hidden_states, encoder_lens)
        return self.finish(run_all_blocks(self, state, ctx), ctx)

    # ----------------------------------------------------------------------------------- block interface

    @property
    def num_blocks(self) -> int:
        """The main layers (what `run_blocks` indexes; the refiners run in `prepare`)."""
        return len(self.layers)

    def _check_inputs(self, hidden_states, timestep, encoder_hidden_states, encoder_lens) -> list[int]:
        """Validate shapes and positions (host only); -> the real caption length of each item."""
        c = self.config
        p = c.patch_size
        if hidden_states.ndim != 4 or hidden_states.shape[1] != c.in_channels:
            raise ValueError(f"hidden_states must be (B, {c.in_channels}, h, w), got {tuple(hidden_states.shape)}")
        B, _, h, w = hidden_states.shape
        if h % p or w % p or h == 0 or w == 0:
            raise ValueError(f"latent height and width must be positive multiples of the patch size {p}, "
                             f"got {h} x {w}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != B or \
                encoder_hidden_states.shape[2] != c.cap_feat_dim:
            raise ValueError(f"encoder_hidden_states must be ({B}, T, {c.cap_feat_dim}), got "
                             f"{tuple(encoder_hidden_states.shape)}")
        if timestep.shape != (B,):
            raise ValueError(f"timestep must be ({B},), got {tuple(timestep.shape)}")
        T = encoder_hidden_states.shape[1]
        lens = [T] * B if encoder_lens is None else [int(n) for n in encoder_lens]
        if len(lens) != B or any(not 1 <= n <= T for n in lens):
            raise ValueError(f"encoder_lens must hold {B} lengths in [1, {T}], got {list(lens)}")
        # The positions must lie in the RoPE tables diffusers builds (axes_lens entries per axis).
        P = _round_up(max(lens))
        need = (P + 2, h // p, w // p)  # caption positions 1..P, image frame position P + 1
        if any(n > m for n, m in zip(need, c.axes_lens)):
            raise ValueError(f"positions out of the RoPE range axes_lens={list(c.axes_lens)}: a padded caption of "
                             f"{P} tokens and an image of {h // p} x {w // p} tokens need {list(need)}")
        return lens

    def prepare(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_lens: Sequence[int] | None = None) -> tuple[tuple[torch.Tensor], ZImageBlockContext]:
        """Everything before the main layers (arguments as `forward`): embeddings, padding, the refiners and the
        unified sequence -> ((x (B, S, D),), the per-forward constants every main block takes)."""
        c = self.config
        lens = self._check_inputs(hidden_states, timestep, encoder_hidden_states, encoder_lens)
        B, C, h, w = hidden_states.shape
        p, D = c.patch_size, c.dim
        Hp, Wp = h // p, w // p
        L = Hp * Wp
        Lp = _round_up(L)
        padded = [_round_up(n) for n in lens]  # P_i
        P = max(padded)
        T = encoder_hidden_states.shape[1]
        device = hidden_states.device
        shared = all(n == P for n in padded)  # one padded caption length: no mask, one RoPE table

        # Timestep: sinusoidal features of t * t_scale (fp32), cast to the MLP's dtype; the result in the model's.
        t_freq = timestep_features(timestep * c.t_scale, TIME_FREQ_DIM)  # (B, 256) fp32
        t_freq = t_freq.to(self.t_embedder.in_layer.weight.dtype)
        adaln = self.t_embedder(t_freq).to(hidden_states.dtype)  # (B, A)

        # Image tokens: p x p patches, features ordered (pH, pW, C), embedded, padded to Lp with x_pad_token.
        x = hidden_states.view(B, C, Hp, p, Wp, p).permute(0, 2, 4, 3, 5, 1).reshape(B, L, p * p * C)
        x = self.x_embedder(x)  # (B, L, D)
        if Lp > L:
            x = torch.cat((x, self.x_pad_token.to(x.dtype).expand(B, Lp - L, D)), dim=1)  # (B, Lp, D)

        # Caption tokens: embedded, then every row from an item's real length on is cap_pad_token (its inner pad
        # P_i - len_i tokens, which attend and are attended to, and its batch padding, masked below).
        cap = encoder_hidden_states[:, :P]  # (B, min(T, P), cap_feat_dim)
        cap = self.cap_embedder(self.cap_norm(cap))  # (B, min(T, P), D)
        if T < P:
            cap = F.pad(cap, (0, 0, 0, P - T))  # (B, P, D)
        if any(n < P for n in lens):
            rows = torch.arange(P, device=device)
            real = torch.stack([rows < n for n in lens])  # (B, P) bool, built on the device (no host copy)
            cap = torch.where(real[..., None], cap, self.cap_pad_token.to(cap.dtype))  # (B, P, D)

        # RoPE: caption token j at (j + 1, 0, 0); image token (r, c) at (P_i + 1, r, c), image pad at (0, 0, 0).
        cap_ids = torch.zeros(P, 3, dtype=torch.int64, device=device)
        cap_ids[:, 0] = torch.arange(1, P + 1, device=device)
        cap_cos, cap_sin = rope_cos_sin(cap_ids, c.axes_dims, c.rope_theta)  # (P, Dh/2) each
        grid = torch.zeros(Lp, 3, dtype=torch.int64, device=device)
        grid[:L, 1] = torch.arange(Hp, device=device).repeat_interleave(Wp)
        grid[:L, 2] = torch.arange(Wp, device=device).repeat(Hp)
        starts = sorted(set(padded)) if not shared else [P]
        tables = {}
        for n in starts:
            ids = grid.clone()
            ids[:L, 0] = n + 1
            tables[n] = rope_cos_sin(ids, c.axes_dims, c.rope_theta)  # (Lp, Dh/2) each
        if shared:
            img_cos, img_sin = tables[P]  # (Lp, Dh/2)
            cos, sin = torch.cat((img_cos, cap_cos)), torch.cat((img_sin, cap_sin))  # (S, Dh/2)
            cap_mask = mask = None
        else:
            img_cos = torch.stack([tables[n][0] for n in padded])  # (B, Lp, Dh/2)
            img_sin = torch.stack([tables[n][1] for n in padded])
            cos = torch.cat((img_cos, cap_cos.expand(B, P, -1)), dim=1)  # (B, S, Dh/2)
            sin = torch.cat((img_sin, cap_sin.expand(B, P, -1)), dim=1)
            rows = torch.arange(P, device=device)
            cap_valid = torch.stack([rows < n for n in padded])  # (B, P) bool: not batch padding
            cap_mask = cap_valid[:, None, None, :]  # (B, 1, 1, P)
            img_valid = torch.ones(B, Lp, dtype=torch.bool, device=device)
            mask = torch.cat((img_valid, cap_valid), dim=1)[:, None, None, :]  # (B, 1, 1, S)

        for block in self.noise_refiner:  # every item's image has Lp tokens: no mask
            x = block(x, None, img_cos, img_sin, adaln)  # (B, Lp, D)
        for block in self.context_refiner:
            cap = block(cap, cap_mask, cap_cos, cap_sin)  # (B, P, D)

        x = torch.cat((x, cap), dim=1)  # (B, S, D): per item [image (Lp), caption (P_i), batch padding]
        S = x.shape[1]
        if self.sharder is not None:  # this rank's shard (B, Ls, D); the key mask over the padded sequence
            sh = self.sharder
            key_mask = sh.key_mask(S, B, mask, device)
            mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, sp*Ls)
            x, cos, sin = sh.shard(x), sh.shard(cos, dim=-2), sh.shard(sin, dim=-2)
        return (x,), ZImageBlockContext(adaln=adaln, cos=cos, sin=sin, mask=mask, image_tokens=L, height=h,
                                        width=w, tokens=S)

    def run_blocks(self, state: tuple[torch.Tensor, ...], ctx: ZImageBlockContext, start: int,
                   stop: int) -> tuple[torch.Tensor]:
        """Main layers [start, stop) on state (x (B, S, D),) -> (x,)."""
        (x,) = state
        for block in self.layers[start:stop]:
            x = block(x, ctx.mask, ctx.cos, ctx.sin, ctx.adaln)  # (B, S, D)
        return (x,)

    def finish(self, state: tuple[torch.Tensor, ...], ctx: ZImageBlockContext) -> torch.Tensor:
        """The final layer on the image tokens and unpatchify: (x (B, S, D),) -> (B, C, h, w). In a dummy run
        (`ditserve.dummy_run`) it is skipped and a zero tensor of the output's shape (a broadcast view: no
        memory) is returned."""
        (x,) = state
        c = self.config
        B, C, p = x.shape[0], c.out_channels, c.patch_size
        h, w = ctx.height, ctx.width
        if in_dummy_run():
            return x.new_zeros(()).expand(B, C, h, w)
        if self.sharder is not None:
            x = self.sharder.gather(x, ctx.tokens)  # (B, S, D), the same on every rank
        scale = 1.0 + self.final_mod(F.silu(ctx.adaln)).unsqueeze(1)  # (B, 1, D)
        x = self.proj_out(self.final_norm(x[:, :ctx.image_tokens]) * scale)  # (B, L, p*p*C)
        x = x.view(B, h // p, w // p, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (B, C, h/p, p, w/p, p)
        return x.reshape(B, C, h, w)

    def enable_sequence_parallel(self, state) -> None:
        """Run the main layers on this rank's shard of the unified sequence (`ditserve.parallel.sharding`; state:
        a `ParallelState` with a sequence-parallel degree above 1)."""
        from ditserve.parallel.sharding import SequenceSharder, swap_attention

        swap_attention(self.layers, state)
        self.sharder = SequenceSharder(state)

    # ------------------------------------------------------------------------------------- weight loading

    def weight_map(self) -> dict[str, tuple[str, int | None, int | None]]:
        """Every key of a diffusers `ZImageTransformer2DModel` state dict -> (our parameter name, start, stop).

        The tensor goes into rows [start:stop] (dim 0) of our parameter; (None, None) means the whole parameter.
        Each piece lands independently, so tensors can be streamed one at a time into a model already allocated
        on its device.
        """
        c = self.config
        D, Fh = c.dim, c.ffn_hidden
        m: dict[str, tuple[str, int | None, int | None]] = {}

        def linear(src: str, dst: str, bias: bool = True, start: int | None = None, stop: int | None = None):
            m[f"{src}.weight"] = (f"{dst}.weight", start, stop)
            if bias:
                m[f"{src}.bias"] = (f"{dst}.bias", start, stop)

        def param(src: str, dst: str) -> None:
            m[src] = (dst, None, None)

        patch = f"{c.patch_size}-{c.f_patch_size}"
        linear("t_embedder.mlp.0", "t_embedder.in_layer")
        linear("t_embedder.mlp.2", "t_embedder.out_layer")
        param("cap_embedder.0.weight", "cap_norm.weight")
        linear("cap_embedder.1", "cap_embedder")
        linear(f"all_x_embedder.{patch}", "x_embedder")
        param("x_pad_token", "x_pad_token")
        param("cap_pad_token", "cap_pad_token")

        def block(prefix: str, modulated: bool) -> None:
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                linear(f"{prefix}.attention.{name}", f"{prefix}.qkv", False, j * D, (j + 1) * D)
            param(f"{prefix}.attention.norm_q.weight", f"{prefix}.q_norm.weight")
            param(f"{prefix}.attention.norm_k.weight", f"{prefix}.k_norm.weight")
            linear(f"{prefix}.attention.to_out.0", f"{prefix}.attn_out", False)
            linear(f"{prefix}.feed_forward.w1", f"{prefix}.ffn_in", False, 0, Fh)
            linear(f"{prefix}.feed_forward.w3", f"{prefix}.ffn_in", False, Fh, 2 * Fh)
            linear(f"{prefix}.feed_forward.w2", f"{prefix}.ffn_out", False)
            for src, dst in (("attention_norm1", "attn_norm1"), ("attention_norm2", "attn_norm2"),
                             ("ffn_norm1", "ffn_norm1"), ("ffn_norm2", "ffn_norm2")):
                param(f"{prefix}.{src}.weight", f"{prefix}.{dst}.weight")
            if modulated:
                linear(f"{prefix}.adaLN_modulation.0", f"{prefix}.mod")

        for i in range(c.n_refiner_layers):
            block(f"noise_refiner.{i}", True)
            block(f"context_refiner.{i}", False)
        for i in range(c.n_layers):
            block(f"layers.{i}", True)

        linear(f"all_final_layer.{patch}.adaLN_modulation.1", "final_mod")
        linear(f"all_final_layer.{patch}.linear", "proj_out")
        return m

    def lora_aliases(self) -> dict[str, tuple[str, ...]]:
        """Module names of the original Z-Image checkpoint that differ from diffusers' -> the diffusers modules
        whose outputs each concatenates (`ditserve.lora`): the fused `attention.qkv`, `attention.out`, and the
        final layer and patch embedder without their patch-size keys."""
        c = self.config
        patch = f"{c.patch_size}-{c.f_patch_size}"
        a: dict[str, tuple[str, ...]] = {
            "x_embedder": (f"all_x_embedder.{patch}",),
            "final_layer.linear": (f"all_final_layer.{patch}.linear",),
            "final_layer.adaLN_modulation.1": (f"all_final_layer.{patch}.adaLN_modulation.1",),
        }
        blocks = [f"noise_refiner.{i}" for i in range(c.n_refiner_layers)]
        blocks += [f"context_refiner.{i}" for i in range(c.n_refiner_layers)]
        blocks += [f"layers.{i}" for i in range(c.n_layers)]
        for b in blocks:
            a[f"{b}.attention.qkv"] = tuple(f"{b}.attention.{n}" for n in ("to_q", "to_k", "to_v"))
            a[f"{b}.attention.out"] = (f"{b}.attention.to_out.0",)
        return a

    def expected_diffusers_keys(self) -> list[str]:
        """The keys a diffusers `ZImageTransformer2DModel` state dict of this config has, sorted."""
        return sorted(self.weight_map())

    def load_diffusers_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy a full diffusers `ZImageTransformer2DModel` state dict into this model through `weight_map`, everything
        checked before anything is written (`ditserve.loader.weights.copy_state_dict`)."""
        from ditserve.loader.weights import copy_state_dict

        copy_state_dict(self, sd, self.weight_map(), "diffusers Z-Image")

    # ------------------------------------------------------------------------------------------ examples

    @staticmethod
    def example_inputs(config: ZImageConfig, height: int, width: int, *, text_len: int,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 1,
                       seed: int = 0) -> dict[str, Any]:
        """Forward kwargs for a `height` x `width` pixel image (the 8x VAE: latents height/8 x width/8) with
        `text_len` caption tokens per item: random (seeded, drawn on the CPU) latents and text features,
        timestep 0.5, encoder_lens None (every token real)."""
        multiple = VAE_SCALE * config.patch_size
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % multiple:
                raise ConfigError(f"{name} must be a positive multiple of {multiple}, got {v}")
        if text_len < 1:
            raise ConfigError(f"text_len must be >= 1, got {text_len}")
        gen = torch.Generator().manual_seed(seed)

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        return dict(
            hidden_states=rand(batch, config.in_channels, height // VAE_SCALE, width // VAE_SCALE),
            timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
            encoder_hidden_states=rand(batch, text_len, config.cap_feat_dim),
            encoder_lens=None,
        )


# ------------------------------------------------------------------------------------------------ presets
# Component configs of Tongyi-MAI/Z-Image-Turbo (docs: /work/shared/reference/model-configs.md, section 8); the
# ModelSpec preset is assembled from them elsewhere.

Z_IMAGE_TURBO_TRANSFORMER: dict[str, Any] = {
    "all_patch_size": [2], "all_f_patch_size": [1], "in_channels": 16, "dim": 3840, "n_layers": 30,
    "n_refiner_layers": 2, "n_heads": 30, "n_kv_heads": 30, "norm_eps": 1e-05, "qk_norm": True,
    "cap_feat_dim": 2560, "siglip_feat_dim": None, "rope_theta": 256.0, "t_scale": 1000.0,
    "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
}

# The FLUX.1 VAE (AutoencoderKL), byte-identical config.
Z_IMAGE_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu", "latent_channels": 16,
    "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": False,
    "use_post_quant_conv": False, "mid_block_add_attention": True,
}

# Qwen3-4B (transformers Qwen3Config), loaded as the bare Qwen3Model; the pipeline reads hidden_states[-2].
QWEN3_4B_TEXT: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
    "max_position_embeddings": 40960, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "attention_bias": False,
    "attention_dropout": 0.0, "use_sliding_window": False, "tie_word_embeddings": True,
    "bos_token_id": 151643, "eos_token_id": 151645,
}

Z_IMAGE_TURBO_SCHEDULER: dict[str, Any] = {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0}
