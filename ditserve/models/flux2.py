"""FLUX.2 (dev, klein): the MMDiT transformer of Black Forest Labs' second generation, built on `ditserve.ops`.

Numerically this is diffusers' `Flux2Transformer2DModel` (0.42.x): same inputs, same conventions, same weights
(loaded from a diffusers state dict through `Flux2Transformer.weight_map`). What sets it apart from FLUX.1:

  - no biases anywhere;
  - the AdaLN modulation is global: one Linear per kind (double-stream image, double-stream text, single
    stream) computes shift/scale/gate vectors from silu(temb) once per forward, and every block of that kind
    shares them (here the three are one Linear, `mod`, whose output is split);
  - SwiGLU MLPs (silu(gate) * up, the two halves of one input projection), hidden width mlp_ratio * D;
  - the single-stream blocks project q, k, v and the MLP's gate and up halves with one Linear, and concat(attn,
    mlp) with one Linear;
  - RoPE over 4 axes (t, h, w, l) with theta 2000: text token j at (0, 0, 0, j), image token (r, c) at
    (0, r, c, 0), reference image i's tokens at (10 (i + 1), r, c, 0) (the pipeline builds the ids);
  - a guidance embedding (dev: guidance_embeds=True) or none (klein); no pooled text embedding.

Reference images are extra image tokens appended after the noisy latents' (hidden_states and img_ids both
longer); only the first `out_tokens` image tokens go through the output layer when the caller says how many it
reads (diffusers projects all of them and the pipeline drops the rest).

Notation in shape comments: B batch, L image tokens (noisy + reference), T text tokens, S = T + L, D = heads *
head_dim (hidden), H heads, Dh head_dim, C in_channels, F = mlp_ratio * D the MLP hidden width.
"""

from __future__ import annotations

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
    Attention, Fp8Attention, Fp8Linear, Linear, MulAdd, NormScaleShift, OpsConfig, ResidualNormScaleShift, RMSNorm,
    RMSNormRotary, axial_rope_cos_sin,
)
from ditserve.ops import functional as Fn

VAE_SCALE = 16  # pixels per latent token: the 8x VAE, then 2x2 patchified into 4x the channels
FP16_MAX = 65504.0


# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class Flux2Config:
    """Architecture of a FLUX.2 transformer. Field names and defaults are diffusers' `Flux2Transformer2DModel`
    constructor arguments (the defaults are FLUX.2-dev's values)."""

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None  # None -> in_channels
    num_layers: int = 8  # double-stream blocks
    num_single_layers: int = 48  # single-stream blocks
    attention_head_dim: int = 128
    num_attention_heads: int = 48
    joint_attention_dim: int = 15360  # text feature width: 3 stacked text-encoder layers
    timestep_guidance_channels: int = 256  # sinusoidal timestep / guidance features
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000.0
    eps: float = 1e-6
    guidance_embeds: bool = True  # dev: True; klein: False

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.patch_size != 1:
            raise ConfigError(f"FLUX.2 transformer: patch_size must be 1 (the pipeline patchifies the latents "
                              f"itself), got {self.patch_size}")
        for name in ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim",
                     "joint_attention_dim", "timestep_guidance_channels"):
            if getattr(self, name) < 1:
                raise ConfigError(f"FLUX.2 transformer: {name} must be >= 1, got {getattr(self, name)}")
        if self.timestep_guidance_channels % 2:
            raise ConfigError(f"FLUX.2 transformer: timestep_guidance_channels must be even, got "
                              f"{self.timestep_guidance_channels}")
        for name in ("num_layers", "num_single_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"FLUX.2 transformer: {name} must be >= 0, got {getattr(self, name)}")
        if self.mlp_ratio <= 0:
            raise ConfigError(f"FLUX.2 transformer: mlp_ratio must be > 0, got {self.mlp_ratio}")
        if any(a <= 0 or a % 2 for a in self.axes_dims_rope):
            raise ConfigError(f"FLUX.2 transformer: every axes_dims_rope entry must be even and positive, "
                              f"got {list(self.axes_dims_rope)}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ConfigError(f"FLUX.2 transformer: sum(axes_dims_rope) = {sum(self.axes_dims_rope)} must equal "
                              f"attention_head_dim = {self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)  # diffusers' expression

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> "Flux2Config":
        """From a diffusers `Flux2Transformer2DModel` config.json dict; an unknown key raises ConfigError
        (`ditserve.models.config_from_diffusers`)."""
        return config_from_diffusers(cls, d, "Flux2Transformer2DModel")


# ------------------------------------------------------------------------------------------------ embedders


class MLPEmbedder(nn.Module):
    """out_layer(silu(in_layer(x))) without biases: (B, in_dim) -> (B, dim). Embeds timestep and guidance."""

    def __init__(self, in_dim: int, dim: int, ops: OpsConfig, device=None, dtype=None):
        super().__init__()
        self.in_layer = Linear(in_dim, dim, bias=False, ops=ops, device=device, dtype=dtype)
        self.out_layer = Linear(dim, dim, bias=False, ops=ops, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x = [gate | up]: (..., 2F) -> (..., F)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


# ------------------------------------------------------------------------------------------------- blocks


class Flux2DoubleBlock(nn.Module):
    """Double-stream block: separate weights per stream, one joint attention over [txt, img].

    forward(img (B, L, D), txt (B, T, D), mod_img (B, 1, 6D), mod_txt (B, 1, 6D), cos, sin (S, Dh/2) fp32)
    -> (img, txt), same shapes. mod_* are the global modulation vectors every double block shares:
    (shift, scale, gate) of the attention, then of the MLP.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float, ops: OpsConfig,
                 attention: str, clamp_fp16: bool, device=None, dtype=None):
        super().__init__()
        self.heads, self.head_dim, self.clamp_fp16 = heads, head_dim, clamp_fp16
        lin = dict(bias=False, ops=ops, device=device, dtype=dtype)
        norm = dict(ops=ops, device=device, dtype=dtype)
        self.norm1 = NormScaleShift(dim, eps=eps, norm="layer", ops=ops)
        self.img_qkv = Linear(dim, 3 * dim, **lin)  # [q | k | v]
        self.txt_qkv = Linear(dim, 3 * dim, **lin)
        # The q/k RMSNorms hold their weights (the checkpoint's names); `norm_rotary` applies them and RoPE in one op.
        self.img_q_norm = RMSNorm(head_dim, eps=eps, **norm)
        self.img_k_norm = RMSNorm(head_dim, eps=eps, **norm)
        self.txt_q_norm = RMSNorm(head_dim, eps=eps, **norm)
        self.txt_k_norm = RMSNorm(head_dim, eps=eps, **norm)
        self.norm_rotary = RMSNormRotary(head_dim, eps=eps, interleaved=True, ops=ops)
        self.attn = Attention(attention)
        self.fp8_attn: Fp8Attention | None = None  # set by Flux2Transformer.use_fp8_attention
        self.img_attn_out = Linear(dim, dim, **lin)
        self.txt_attn_out = Linear(dim, dim, **lin)
        self.norm2 = ResidualNormScaleShift(dim, eps=eps, norm="layer", ops=ops)
        self.img_mlp_in = Linear(dim, 2 * mlp_hidden, **lin)  # [gate | up]
        self.img_mlp_out = Linear(mlp_hidden, dim, **lin)
        self.txt_mlp_in = Linear(dim, 2 * mlp_hidden, **lin)
        self.txt_mlp_out = Linear(mlp_hidden, dim, **lin)
        self.gated_add = MulAdd(k=0.0, ops=ops)  # gated_add(y, gate, r) = r + gate * y

    def forward(self, img: torch.Tensor, txt: torch.Tensor, mod_img: torch.Tensor, mod_txt: torch.Tensor,
                cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = txt.shape[1]
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = mod_img.chunk(6, dim=-1)  # (B, 1, D)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = mod_txt.chunk(6, dim=-1)

        # (fp8 tier: the norms hand the projections their input already quantised, see `Linear.takes_fp8`)
        img_h = self.norm1(img, img_scale1, img_shift1, quantize=self.img_qkv.takes_fp8)  # (B, L, D)
        txt_h = self.norm1(txt, txt_scale1, txt_shift1, quantize=self.txt_qkv.takes_fp8)  # (B, T, D)
        qkv_shape = (3, self.heads, self.head_dim)
        img_q, img_k, img_v = self.img_qkv(img_h).unflatten(-1, qkv_shape).unbind(2)  # (B, L, H, Dh) each
        txt_q, txt_k, txt_v = self.txt_qkv(txt_h).unflatten(-1, qkv_shape).unbind(2)  # (B, T, H, Dh) each
        # q, k: each stream RMS-normed with its own weight, joined as [txt, img], rotated: (B, S, H, Dh)
        q_parts = ((txt_q, img_q), (self.txt_q_norm.weight, self.img_q_norm.weight))
        k_parts = ((txt_k, img_k), (self.txt_k_norm.weight, self.img_k_norm.weight))
        v = torch.cat((txt_v, img_v), dim=1)  # (B, S, H, Dh)
        if self.fp8_attn is not None:  # q, k, v and the output in fp8, one scale each (the out projections read it)
            o, o_descale = self.fp8_attn(*self.norm_rotary(*q_parts, cos, sin, quantize=True),
                                         *self.norm_rotary(*k_parts, cos, sin, quantize=True), v)
            o = o.flatten(2)  # (B, S, D) fp8
            txt_attn, img_attn = Fn.tensorwise(o[:, :T], o_descale), Fn.tensorwise(o[:, T:], o_descale)
        else:
            attn = self.attn(self.norm_rotary(*q_parts, cos, sin), self.norm_rotary(*k_parts, cos, sin), v)
            attn = attn.flatten(2)  # (B, S, D)
            txt_attn, img_attn = attn[:, :T], attn[:, T:]

        # Each stream: gated residual + AdaLN, then the SwiGLU MLP with a gated residual.
        img_h, img = self.norm2(self.img_attn_out(img_attn), img, img_gate1, img_scale2, img_shift2,
                                quantize=self.img_mlp_in.takes_fp8)
        img = self.gated_add(self.img_mlp_out(swiglu(self.img_mlp_in(img_h))), img_gate2, img)  # (B, L, D)
        txt_h, txt = self.norm2(self.txt_attn_out(txt_attn), txt, txt_gate1, txt_scale2, txt_shift2,
                                quantize=self.txt_mlp_in.takes_fp8)
        txt = self.gated_add(self.txt_mlp_out(swiglu(self.txt_mlp_in(txt_h))), txt_gate2, txt)  # (B, T, D)
        if self.clamp_fp16:  # as diffusers: keep fp16 text activations finite
            txt = txt.clamp(-FP16_MAX, FP16_MAX)
        return img, txt


class Flux2SingleBlock(nn.Module):
    """Single-stream block: parallel attention + SwiGLU MLP over the joint sequence, one input projection
    (q, k, v, MLP gate and up: 3D + 2F outputs) and one output projection over concat(attn, mlp) (D + F inputs).

    forward(x (B, S, D), mod (B, 1, 3D) the shared (shift, scale, gate), cos, sin (S, Dh/2) fp32) -> (B, S, D).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float, ops: OpsConfig,
                 attention: str, clamp_fp16: bool, device=None, dtype=None):
        super().__init__()
        self.dim, self.heads, self.head_dim, self.mlp_hidden = dim, heads, head_dim, mlp_hidden
        self.clamp_fp16 = clamp_fp16
        lin = dict(bias=False, ops=ops, device=device, dtype=dtype)
        self.norm = NormScaleShift(dim, eps=eps, norm="layer", ops=ops)
        self.qkv_mlp = Linear(dim, 3 * dim + 2 * mlp_hidden, **lin)  # [q | k | v | gate | up]
        self.q_norm = RMSNorm(head_dim, eps=eps, ops=ops, device=device, dtype=dtype)  # weights only, as above
        self.k_norm = RMSNorm(head_dim, eps=eps, ops=ops, device=device, dtype=dtype)
        self.norm_rotary = RMSNormRotary(head_dim, eps=eps, interleaved=True, ops=ops)
        self.attn = Attention(attention)
        self.fp8_attn: Fp8Attention | None = None  # set by Flux2Transformer.use_fp8_attention
        self.out = Linear(dim + mlp_hidden, dim, **lin)  # over concat(attn, swiglu(mlp))
        self.gated_add = MulAdd(k=0.0, ops=ops)

    def forward(self, x: torch.Tensor, mod: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = mod.chunk(3, dim=-1)  # (B, 1, D) each
        h = self.norm(x, scale, shift, quantize=self.qkv_mlp.takes_fp8)  # (B, S, D) (fp8 tier: quantised)
        qkv, mlp = self.qkv_mlp(h).split((3 * self.dim, 2 * self.mlp_hidden), dim=-1)  # (B, S, 3D), (B, S, 2F)
        q, k, v = qkv.unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)  # (B, S, H, Dh) each
        q_parts, k_parts = ((q,), (self.q_norm.weight,)), ((k,), (self.k_norm.weight,))
        if self.fp8_attn is not None:  # fp8 q, k, v and output; the output read back in the compute dtype
            o, o_descale = self.fp8_attn(*self.norm_rotary(*q_parts, cos, sin, quantize=True),
                                         *self.norm_rotary(*k_parts, cos, sin, quantize=True), v)
            attn = (o.flatten(2).float() * o_descale).to(x.dtype)  # (B, S, D)
        else:
            attn = self.attn(self.norm_rotary(*q_parts, cos, sin), self.norm_rotary(*k_parts, cos, sin), v)
            attn = attn.flatten(2)  # (B, S, D)
        h = self.out(torch.cat((attn, swiglu(mlp)), dim=-1))  # (B, S, D + F) -> (B, S, D)
        x = self.gated_add(h, gate, x)
        if self.clamp_fp16:
            x = x.clamp(-FP16_MAX, FP16_MAX)
        return x


# -------------------------------------------------------------------------------------------------- model


@dataclass
class Flux2BlockContext:
    """What every block of one forward takes besides the hidden states."""

    temb: torch.Tensor  # (B, D) the timestep (+ guidance) embedding, for the output layer
    mod_img: torch.Tensor  # (B, 1, 6D) the double blocks' image-stream modulation
    mod_txt: torch.Tensor  # (B, 1, 6D) the double blocks' text-stream modulation
    mod_single: torch.Tensor  # (B, 1, 3D) the single blocks' modulation
    cos: torch.Tensor  # (S, Dh/2) fp32 RoPE table of the joint sequence [txt, img]
    sin: torch.Tensor  # (S, Dh/2) fp32
    out_tokens: int  # the image tokens the output layer projects (the first ones)
    image_tokens: int = 0  # L before sequence-parallel padding (0: not sharded)


class Flux2Transformer(nn.Module):
    """The FLUX.2 transformer. Inputs and conventions are diffusers' `Flux2Transformer2DModel.forward`:

    hidden_states (B, L, C) packed latents (noisy tokens first, then any reference-image tokens);
    encoder_hidden_states (B, T, joint_attention_dim) stacked text-encoder states; timestep (B,) in [0, 1] (the
    model multiplies by 1000); img_ids (L, 4), txt_ids (T, 4) RoPE positions (a leading batch dim is accepted
    and its first entry used, as diffusers does); guidance (B,) the distilled guidance scale (x1000), required
    iff config.guidance_embeds. One more argument, ours: out_tokens, how many of the first image tokens the
    output layer projects (None: all of them, as diffusers). Returns (B, out_tokens, out_channels) in the
    model's dtype.
    """

    repeated_blocks = ("double_blocks", "single_blocks")
    # The block-cache interface (see `ditserve.cache`): the block state is always (img (B, L, D), txt (B, T, D)).
    block_cache = None
    # Sequence parallelism (`ditserve.parallel.sharding`): the image (and reference image) tokens and the text tokens
    # are each sharded over the ranks (split, not replicated); each rank's joint sequence is [its text shard, its
    # image shard].
    sharder = None
    # The fp8 tier (`ditserve.ops.fp8.apply_fp8`): the token-wise GEMMs of every block. Left out: `mod` (M = batch
    # size), the embedders and the output layer (small and the most precision-sensitive).
    fp8_linears = (
        ("double_blocks", ("img_qkv", "txt_qkv", "img_attn_out", "txt_attn_out", "img_mlp_in", "img_mlp_out",
                           "txt_mlp_in", "txt_mlp_out")),
        ("single_blocks", ("qkv_mlp", "out")),
    )

    def __init__(self, config: Flux2Config, ops: OpsConfig | None = None, attention: str = "sdpa", device=None,
                 dtype=None):
        super().__init__()
        if ops is None:
            device_type = torch.device(device).type if device is not None else None
            ops = OpsConfig(device=None if device_type == "meta" else device_type,
                            dtype=dtype or torch.get_default_dtype())
        self.config = c = config
        D, H, Dh, Fh = c.inner_dim, c.num_attention_heads, c.attention_head_dim, c.mlp_hidden
        clamp_fp16 = (dtype or torch.get_default_dtype()) == torch.float16
        lin = dict(ops=ops, device=device, dtype=dtype)

        self.time_embedder = MLPEmbedder(c.timestep_guidance_channels, D, **lin)
        self.guidance_embedder = MLPEmbedder(c.timestep_guidance_channels, D, **lin) if c.guidance_embeds else None
        # The three global modulations in one GEMM: [double img: 6D | double txt: 6D | single: 3D].
        self.mod = Linear(D, 15 * D, bias=False, **lin)
        self.x_embedder = Linear(c.in_channels, D, bias=False, **lin)
        self.context_embedder = Linear(c.joint_attention_dim, D, bias=False, **lin)
        block = dict(ops=ops, attention=attention, clamp_fp16=clamp_fp16, device=device, dtype=dtype)
        self.double_blocks = nn.ModuleList(Flux2DoubleBlock(D, H, Dh, Fh, c.eps, **block)
                                           for _ in range(c.num_layers))
        self.single_blocks = nn.ModuleList(Flux2SingleBlock(D, H, Dh, Fh, c.eps, **block)
                                           for _ in range(c.num_single_layers))
        self.norm_out_mod = Linear(D, 2 * D, bias=False, **lin)  # (scale, shift): AdaLayerNormContinuous's order
        self.norm_out = NormScaleShift(D, eps=c.eps, norm="layer", ops=ops)
        self.proj_out = Linear(D, c.out_channels, bias=False, **lin)

    def use_fp8_attention(self, ops: OpsConfig) -> None:
        """Run every block's attention in fp8 (`ditserve.ops.attention.Fp8Attention`; lossy). Needs the fp8 tier
        (`apply_fp8` first: the double blocks' output projections read the fp8 output). Call it before compiling."""
        blocks = (*self.double_blocks, *self.single_blocks)
        if not all(isinstance(b.img_attn_out if isinstance(b, Flux2DoubleBlock) else b.out, Fp8Linear)
                   for b in blocks):
            raise ConfigError("fp8 attention needs the fp8 tier's layers: apply_fp8 (--quantization fp8) first")
        for block in blocks:
            block.fp8_attn = Fp8Attention(ops)
            block.norm_rotary.warm_quantized = True  # the prewarm compiles the kernel variant now in use

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep: torch.Tensor,
                img_ids: torch.Tensor, txt_ids: torch.Tensor, guidance: torch.Tensor | None = None,
                out_tokens: int | None = None) -> torch.Tensor:
        state, ctx = self.prepare(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance,
                                  out_tokens)
        return self.finish(run_all_blocks(self, state, ctx), ctx)

    # ----------------------------------------------------------------------------------- block interface

    @property
    def num_blocks(self) -> int:
        """Blocks in the flat order `run_blocks` indexes: double blocks, then single blocks."""
        return self.config.num_layers + self.config.num_single_layers

    def _check_inputs(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance,
                      out_tokens) -> None:
        """Shapes and the guidance argument (host only: shapes are known without a device sync)."""
        c = self.config
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != c.in_channels:
            raise ValueError(f"hidden_states must be (B, L, {c.in_channels}), got {tuple(hidden_states.shape)}")
        B, L = hidden_states.shape[:2]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != B or \
                encoder_hidden_states.shape[2] != c.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states must be ({B}, T, {c.joint_attention_dim}), got "
                             f"{tuple(encoder_hidden_states.shape)}")
        if timestep.shape != (B,):
            raise ValueError(f"timestep must be ({B},), got {tuple(timestep.shape)}")
        axes = len(c.axes_dims_rope)
        for name, ids, n in (("img_ids", img_ids, L), ("txt_ids", txt_ids, encoder_hidden_states.shape[1])):
            if tuple(ids.shape[-2:]) != (n, axes):
                raise ValueError(f"{name} must be ({n}, {axes}), got {tuple(ids.shape)}")
        if self.guidance_embedder is not None and guidance is None:
            raise ValueError("this FLUX.2 transformer is guidance-distilled (guidance_embeds=True, e.g. FLUX.2-dev): "
                             "pass guidance, a (B,) tensor of guidance scales")
        if self.guidance_embedder is None and guidance is not None:
            raise ValueError("this FLUX.2 transformer has no guidance embedder (guidance_embeds=False, e.g. "
                             "FLUX.2-klein): pass guidance=None")
        if out_tokens is not None and not 1 <= out_tokens <= L:
            raise ValueError(f"out_tokens must be in [1, {L}], got {out_tokens}")

    def prepare(self, hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance=None,
                out_tokens=None) -> tuple[tuple[torch.Tensor, torch.Tensor], Flux2BlockContext]:
        """Everything before the blocks (arguments as `forward`): -> the block state (img (B, L, D),
        txt (B, T, D)) and the per-forward constants every block takes."""
        self._check_inputs(hidden_states, encoder_hidden_states, timestep, img_ids, txt_ids, guidance, out_tokens)
        c = self.config
        D = c.inner_dim
        dtype = self.x_embedder.weight.dtype  # the compute dtype (the embedders are never quantised)
        # As diffusers: round the timestep (and guidance) to the model dtype, then scale by 1000.
        t_freq = Fn.timestep_features(timestep.to(dtype) * 1000, c.timestep_guidance_channels).to(dtype)  # (B, 256)
        temb = self.time_embedder(t_freq)  # (B, D)
        if self.guidance_embedder is not None:
            g_freq = Fn.timestep_features(guidance.to(dtype) * 1000, c.timestep_guidance_channels).to(dtype)
            temb = temb + self.guidance_embedder(g_freq)  # (B, D)
        mod = self.mod(F.silu(temb)).unsqueeze(1)  # (B, 1, 15D)
        mod_img, mod_txt, mod_single = mod.split((6 * D, 6 * D, 3 * D), dim=-1)

        if img_ids.ndim == 3:  # (B, L, 4): diffusers' form; positions are shared across the batch
            img_ids = img_ids[0]
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]
        img = self.x_embedder(hidden_states)  # (B, L, D)
        txt = self.context_embedder(encoder_hidden_states)  # (B, T, D)
        ids = torch.cat((txt_ids, img_ids), dim=0)  # (S, 4)
        cos, sin = axial_rope_cos_sin(ids, c.axes_dims_rope, c.rope_theta)  # (S, Dh/2) fp32
        L, T = hidden_states.shape[1], txt.shape[1]
        if self.sharder is not None:  # this rank's shards (B, Li, D), (B, Lt, D); the tables and key mask to match
            sh = self.sharder
            sh.current_mask = sh.joint_key_mask([(T, None), (L, None)], img.shape[0], img.device)
            cos, sin = (torch.cat((sh.shard(t[:T], 0), sh.shard(t[T:], 0))) for t in (cos, sin))  # (Lt+Li, Dh/2)
            img, txt = sh.shard(img), sh.shard(txt)
        return (img, txt), Flux2BlockContext(temb=temb, mod_img=mod_img, mod_txt=mod_txt, mod_single=mod_single,
                                             cos=cos, sin=sin, out_tokens=L if out_tokens is None else out_tokens,
                                             image_tokens=L)

    def run_blocks(self, state: tuple[torch.Tensor, torch.Tensor], ctx: Flux2BlockContext, start: int,
                   stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks [start, stop) of the flat order on the state (img (B, L, D), txt (B, T, D)) -> (img, txt).
        Single blocks take the joint sequence [txt, img], joined on entering them and split (views) on leaving."""
        img, txt = state
        n_double = self.config.num_layers
        for block in self.double_blocks[start:min(stop, n_double)]:
            img, txt = block(img, txt, ctx.mod_img, ctx.mod_txt, ctx.cos, ctx.sin)  # (B, L, D), (B, T, D)
        if stop > n_double:
            T = txt.shape[1]
            x = torch.cat((txt, img), dim=1)  # (B, S, D)
            for block in self.single_blocks[max(start, n_double) - n_double:stop - n_double]:
                x = block(x, ctx.mod_single, ctx.cos, ctx.sin)  # (B, S, D)
            txt, img = x[:, :T], x[:, T:]
        return img, txt

    def finish(self, state: tuple[torch.Tensor, torch.Tensor], ctx: Flux2BlockContext) -> torch.Tensor:
        """The output layer on the first ctx.out_tokens image tokens: -> (B, out_tokens, out_channels). In a dummy
        run (`ditserve.dummy_run`) it is skipped and a zero broadcast view of the output's shape returned."""
        img = state[0]
        if in_dummy_run():
            return img.new_zeros(()).expand(img.shape[0], ctx.out_tokens, self.config.out_channels)
        if self.sharder is not None:
            img = self.sharder.gather(img, ctx.image_tokens)  # (B, L, D), the same on every rank
        img = img[:, :ctx.out_tokens]  # (B, N, D)
        scale, shift = self.norm_out_mod(F.silu(ctx.temb)).unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        return self.proj_out(self.norm_out(img, scale, shift))  # (B, N, out_channels)

    def enable_sequence_parallel(self, state) -> None:
        """Run every block on this rank's shards of the text and the image tokens (`ditserve.parallel.sharding`;
        state: a `ParallelState` with a sequence-parallel degree above 1). Not with fp8 attention."""
        from ditserve.parallel.sharding import SequenceSharder, swap_attention

        if any(b.fp8_attn is not None for b in (*self.double_blocks, *self.single_blocks)):
            raise ConfigError("--parallel ulysses/ring cannot run with --fp8-attention")
        self.sharder = SequenceSharder(state)
        swap_attention(self, state, self.sharder)

    # ------------------------------------------------------------------------------------- weight loading

    def weight_map(self) -> dict[str, tuple[str, int | None, int | None]]:
        """Every key of a diffusers `Flux2Transformer2DModel` state dict -> (our parameter name, start, stop):
        the tensor goes into rows [start:stop] (dim 0) of our parameter ((None, None): the whole parameter), so
        fused projections are filled piece by piece and tensors can be streamed one at a time."""
        c = self.config
        D = c.inner_dim
        m: dict[str, tuple[str, int | None, int | None]] = {}

        def put(src: str, dst: str, start: int | None = None, stop: int | None = None) -> None:
            m[src] = (dst, start, stop)

        tge = "time_guidance_embed"
        put(f"{tge}.timestep_embedder.linear_1.weight", "time_embedder.in_layer.weight")
        put(f"{tge}.timestep_embedder.linear_2.weight", "time_embedder.out_layer.weight")
        if c.guidance_embeds:
            put(f"{tge}.guidance_embedder.linear_1.weight", "guidance_embedder.in_layer.weight")
            put(f"{tge}.guidance_embedder.linear_2.weight", "guidance_embedder.out_layer.weight")
        put("double_stream_modulation_img.linear.weight", "mod.weight", 0, 6 * D)
        put("double_stream_modulation_txt.linear.weight", "mod.weight", 6 * D, 12 * D)
        put("single_stream_modulation.linear.weight", "mod.weight", 12 * D, 15 * D)
        put("x_embedder.weight", "x_embedder.weight")
        put("context_embedder.weight", "context_embedder.weight")

        for i in range(c.num_layers):
            src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                put(f"{src}.attn.{name}.weight", f"{dst}.img_qkv.weight", j * D, (j + 1) * D)
            for j, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
                put(f"{src}.attn.{name}.weight", f"{dst}.txt_qkv.weight", j * D, (j + 1) * D)
            put(f"{src}.attn.norm_q.weight", f"{dst}.img_q_norm.weight")
            put(f"{src}.attn.norm_k.weight", f"{dst}.img_k_norm.weight")
            put(f"{src}.attn.norm_added_q.weight", f"{dst}.txt_q_norm.weight")
            put(f"{src}.attn.norm_added_k.weight", f"{dst}.txt_k_norm.weight")
            put(f"{src}.attn.to_out.0.weight", f"{dst}.img_attn_out.weight")
            put(f"{src}.attn.to_add_out.weight", f"{dst}.txt_attn_out.weight")
            put(f"{src}.ff.linear_in.weight", f"{dst}.img_mlp_in.weight")
            put(f"{src}.ff.linear_out.weight", f"{dst}.img_mlp_out.weight")
            put(f"{src}.ff_context.linear_in.weight", f"{dst}.txt_mlp_in.weight")
            put(f"{src}.ff_context.linear_out.weight", f"{dst}.txt_mlp_out.weight")

        for i in range(c.num_single_layers):
            src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
            put(f"{src}.attn.to_qkv_mlp_proj.weight", f"{dst}.qkv_mlp.weight")
            put(f"{src}.attn.norm_q.weight", f"{dst}.q_norm.weight")
            put(f"{src}.attn.norm_k.weight", f"{dst}.k_norm.weight")
            put(f"{src}.attn.to_out.weight", f"{dst}.out.weight")

        put("norm_out.linear.weight", "norm_out_mod.weight")
        put("proj_out.weight", "proj_out.weight")
        return m

    def expected_diffusers_keys(self) -> list[str]:
        """The keys a diffusers `Flux2Transformer2DModel` state dict of this config has, sorted."""
        return sorted(self.weight_map())

    def load_diffusers_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy a full diffusers `Flux2Transformer2DModel` state dict into this model through `weight_map`,
        everything checked before anything is written (`ditserve.loader.weights.copy_state_dict`)."""
        from ditserve.loader.weights import copy_state_dict

        copy_state_dict(self, sd, self.weight_map(), "diffusers FLUX.2")

    # ------------------------------------------------------------------------------------------ examples

    @staticmethod
    def example_inputs(config: Flux2Config, height: int, width: int, *, text_len: int = 512,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, batch: int = 1,
                       seed: int = 0) -> dict[str, Any]:
        """Forward kwargs for a `height` x `width` pixel image (one token per 16 x 16 pixels) and `text_len`
        text tokens: random (seeded, drawn on the CPU) latents and text features, timestep 0.5, diffusers' ids
        (image (0, r, c, 0), text (0, 0, 0, j)), guidance 4.0 for a guidance-distilled model."""
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % VAE_SCALE:
                raise ConfigError(f"{name} must be a positive multiple of {VAE_SCALE}, got {v}")
        if text_len < 1:
            raise ConfigError(f"text_len must be >= 1, got {text_len}")
        gen = torch.Generator().manual_seed(seed)
        rows, cols = height // VAE_SCALE, width // VAE_SCALE

        def rand(*shape):
            return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

        return dict(
            hidden_states=rand(batch, rows * cols, config.in_channels),
            encoder_hidden_states=rand(batch, text_len, config.joint_attention_dim),
            timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
            img_ids=image_ids(rows, cols).to(device),
            txt_ids=text_ids(text_len).to(device),
            guidance=torch.full((batch,), 4.0, device=device, dtype=dtype) if config.guidance_embeds else None,
        )


def image_ids(rows: int, cols: int, t: int = 0) -> torch.Tensor:
    """RoPE positions of a rows x cols token grid, row-major: (rows * cols, 4) int64 = (t, r, c, 0). t = 0 for
    the image being generated, 10 (i + 1) for reference image i (diffusers' convention)."""
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    return torch.stack((torch.full_like(r, t), r, c, torch.zeros_like(r)), dim=-1)


def text_ids(n: int) -> torch.Tensor:
    """RoPE positions of n text tokens: (n, 4) int64 = (0, 0, 0, j)."""
    ids = torch.zeros(n, 4, dtype=torch.int64)
    ids[:, 3] = torch.arange(n)
    return ids


# ------------------------------------------------------------------------------------------------ presets
# Component configs of the released checkpoints (docs: /work/shared/reference/model-configs.md, sections 4 and 5);
# the ModelSpec presets are assembled from them in `ditserve.pipelines.flux2`.


def _transformer_config(num_layers: int, num_single_layers: int, heads: int, joint_dim: int,
                        guidance_embeds: bool) -> dict[str, Any]:
    return {"patch_size": 1, "in_channels": 128, "out_channels": None, "num_layers": num_layers,
            "num_single_layers": num_single_layers, "attention_head_dim": 128, "num_attention_heads": heads,
            "joint_attention_dim": joint_dim, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
            "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": guidance_embeds}


FLUX_2_DEV_TRANSFORMER = _transformer_config(8, 48, 48, 15360, True)
FLUX_2_KLEIN_4B_TRANSFORMER = _transformer_config(5, 20, 24, 7680, False)
FLUX_2_KLEIN_9B_TRANSFORMER = _transformer_config(8, 24, 32, 12288, False)

FLUX_2_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "decoder_block_out_channels": None, "layers_per_block": 2,
    "act_fn": "silu", "latent_channels": 32, "norm_num_groups": 32, "sample_size": 1024, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True, "batch_norm_eps": 1e-4,
    "batch_norm_momentum": 0.1, "patch_size": [2, 2],
}

# The FLUX.1-dev scheduler config the FLUX.2 repos copy (the pipeline passes its own mu).
FLUX_2_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096, "time_shift_type": "exponential",
}
