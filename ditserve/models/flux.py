"""FLUX.1 (dev, schnell): the MMDiT transformer of Black Forest Labs, built on `ditserve.ops`.

Numerically this is diffusers' `FluxTransformer2DModel` (0.42.x): same inputs, same conventions, same weights
(loaded from a diffusers state dict through `FluxTransformer.weight_map`). The layout differs where it is
faster: q/k/v of each stream come from one fused Linear, the double-stream MLPs' input projections carry their
GELU (`LinearGELU`: on CUDA in the GEMM's epilogue), the single-stream block computes q/k/v and the MLP hidden
state with one Linear (3D + 4D outputs) and projects concat(attn, mlp) with one Linear, and the two AdaLN
modulations of a double-stream block (image and text) are one Linear.

Notation in shape comments: B batch, L image tokens, T text tokens, S = T + L, D = heads * head_dim (hidden),
H heads, Dh head_dim, C in_channels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ditserve.cache.block_cache import run_all_blocks
from ditserve.config import ConfigError, ModelSpec
from ditserve.models import config_from_diffusers
from ditserve.dummy_run import in_dummy_run
from ditserve.ops import (
    Attention, Fp8Attention, Fp8Linear, Linear, LinearGELU, MulAdd, NormScaleShift, OpsConfig, ResidualNormScaleShift,
    RMSNorm, RMSNormRotary, axial_rope_cos_sin,
)
from ditserve.ops import functional as Fn

ROPE_THETA = 10000.0
TIME_EMBED_DIM = 256  # sinusoidal timestep / guidance features
NORM_EPS = 1e-6  # AdaLN LayerNorms and the QK RMSNorms
FP16_MAX = 65504.0


# --------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FluxConfig:
    """Architecture of a FLUX.1 transformer. Field names and defaults are diffusers' `FluxTransformer2DModel`
    constructor arguments (the defaults are FLUX.1-schnell's values)."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None  # None -> in_channels
    num_layers: int = 19  # double-stream blocks
    num_single_layers: int = 38  # single-stream blocks
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096  # text embedding width (T5 d_model)
    pooled_projection_dim: int = 768  # pooled text embedding width (CLIP)
    guidance_embeds: bool = False  # True for the guidance-distilled FLUX.1-dev
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        if self.out_channels is None:
            object.__setattr__(self, "out_channels", self.in_channels)
        if self.patch_size != 1:
            raise ConfigError(
                f"FLUX.1 transformer: patch_size must be 1 (the pipeline packs 2x2 latent patches into tokens "
                f"itself), got {self.patch_size}")
        for name in ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim",
                     "joint_attention_dim", "pooled_projection_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"FLUX.1 transformer: {name} must be >= 1, got {getattr(self, name)}")
        for name in ("num_layers", "num_single_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"FLUX.1 transformer: {name} must be >= 0, got {getattr(self, name)}")
        if any(a <= 0 or a % 2 for a in self.axes_dims_rope):
            raise ConfigError(f"FLUX.1 transformer: every axes_dims_rope entry must be even and positive, "
                              f"got {list(self.axes_dims_rope)}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ConfigError(
                f"FLUX.1 transformer: sum(axes_dims_rope) = {sum(self.axes_dims_rope)} must equal "
                f"attention_head_dim = {self.attention_head_dim}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, d: dict[str, Any]) -> "FluxConfig":
        """From a diffusers `FluxTransformer2DModel` config.json dict; an unknown key raises ConfigError
        (`ditserve.models.config_from_diffusers`)."""
        return config_from_diffusers(cls, d, "FluxTransformer2DModel")


# ------------------------------------------------------------------------------------------------ embedders


class MLPEmbedder(nn.Module):
    """out_layer(silu(in_layer(x))): x (B, in_dim) -> (B, dim). Embeds timestep, guidance and pooled text."""

    def __init__(self, in_dim: int, dim: int, ops: OpsConfig, device=None, dtype=None):
        super().__init__()
        self.in_layer = Linear(in_dim, dim, ops=ops, device=device, dtype=dtype)
        self.out_layer = Linear(dim, dim, ops=ops, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


# ------------------------------------------------------------------------------------------------- blocks


class FluxDoubleBlock(nn.Module):
    """Double-stream (MMDiT) block: separate weights per stream, one joint attention over [txt, img].

    forward(img (B, L, D), txt (B, T, D), cond, cos, sin (T+L, Dh/2) fp32) -> (img, txt), same shapes.
    `cond` is the block's AdaLN vectors (B, 12D) = `self.modulation(silu(temb))`, which the model computes
    outside the block (per step, or for all steps of a request at once:
    `FluxTransformer.precompute_conditioning`); or, once `takes_temb` is set, temb (B, D) itself.
    """

    takes_temb = False  # set on the instance by FluxTransformer.use_per_block_modulation

    def __init__(self, dim: int, heads: int, head_dim: int, ops: OpsConfig, attention: str, clamp_fp16: bool,
                 device=None, dtype=None):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.clamp_fp16 = clamp_fp16
        lin = dict(ops=ops, device=device, dtype=dtype)
        # AdaLN-Zero modulation of both streams in one GEMM: [img: 6 x D | txt: 6 x D].
        self.mod = Linear(dim, 12 * dim, **lin)
        self.norm1 = NormScaleShift(dim, eps=NORM_EPS, norm="layer", ops=ops)
        self.img_qkv = Linear(dim, 3 * dim, **lin)
        self.txt_qkv = Linear(dim, 3 * dim, **lin)
        # The q/k RMSNorms hold their weights (the checkpoint's names); `norm_rotary` applies them and RoPE in one op.
        self.img_q_norm = RMSNorm(head_dim, eps=NORM_EPS, ops=ops, device=device, dtype=dtype)
        self.img_k_norm = RMSNorm(head_dim, eps=NORM_EPS, ops=ops, device=device, dtype=dtype)
        self.txt_q_norm = RMSNorm(head_dim, eps=NORM_EPS, ops=ops, device=device, dtype=dtype)
        self.txt_k_norm = RMSNorm(head_dim, eps=NORM_EPS, ops=ops, device=device, dtype=dtype)
        self.norm_rotary = RMSNormRotary(head_dim, eps=NORM_EPS, interleaved=True, ops=ops)
        self.attn = Attention(attention)
        self.fp8_attn: Fp8Attention | None = None  # set by FluxTransformer.use_fp8_attention
        self.img_attn_out = Linear(dim, dim, **lin)
        self.txt_attn_out = Linear(dim, dim, **lin)
        self.norm2 = ResidualNormScaleShift(dim, eps=NORM_EPS, norm="layer", ops=ops)
        self.img_mlp_in = LinearGELU(dim, 4 * dim, **lin)  # gelu_tanh(Linear)
        self.img_mlp_out = Linear(4 * dim, dim, **lin)
        self.txt_mlp_in = LinearGELU(dim, 4 * dim, **lin)
        self.txt_mlp_out = Linear(4 * dim, dim, **lin)
        self.gated_add = MulAdd(k=0.0, ops=ops)  # gated_add(y, gate, r) = r + gate * y

    def modulation(self, silu_temb: torch.Tensor) -> torch.Tensor:
        """silu(temb) (N, D) -> the block's AdaLN vectors (N, 12D); N = batch, or steps x batch."""
        return self.mod(silu_temb)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, cond: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = txt.shape[1]
        mod = (self.modulation(F.silu(cond)) if self.takes_temb else cond).unsqueeze(1)  # (B, 1, 12D)
        (img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2,
         txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2) = mod.chunk(12, dim=-1)  # (B, 1, D)

        # Attention over the joint sequence [txt, img].
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
        if self.fp8_attn is not None:  # q, k, v and the output in fp8, one scale each (the output projections read it)
            o, o_descale = self.fp8_attn(*self.norm_rotary(*q_parts, cos, sin, quantize=True),
                                         *self.norm_rotary(*k_parts, cos, sin, quantize=True), v)
            o = o.flatten(2)  # (B, S, D) fp8
            txt_attn, img_attn = Fn.tensorwise(o[:, :T], o_descale), Fn.tensorwise(o[:, T:], o_descale)
        else:
            q = self.norm_rotary(*q_parts, cos, sin)
            k = self.norm_rotary(*k_parts, cos, sin)
            attn = self.attn(q, k, v).flatten(2)  # (B, S, D)
            txt_attn, img_attn = attn[:, :T], attn[:, T:]  # (B, T, D), (B, L, D)

        # Image stream: gated residual + AdaLN, then the MLP with a gated residual.
        img_h, img = self.norm2(self.img_attn_out(img_attn), img, img_gate1, img_scale2, img_shift2,
                                quantize=self.img_mlp_in.takes_fp8)  # (B, L, D) x2
        img_h = self.mlp(self.img_mlp_in, self.img_mlp_out, img_h)  # (B, L, D) -> (B, L, 4D) -> (B, L, D)
        img = self.gated_add(img_h, img_gate2, img)  # (B, L, D)

        # Text stream: the same with its own weights.
        txt_h, txt = self.norm2(self.txt_attn_out(txt_attn), txt, txt_gate1, txt_scale2, txt_shift2,
                                quantize=self.txt_mlp_in.takes_fp8)  # (B, T, D) x2
        txt_h = self.mlp(self.txt_mlp_in, self.txt_mlp_out, txt_h)  # (B, T, D) -> (B, T, D)
        txt = self.gated_add(txt_h, txt_gate2, txt)  # (B, T, D)
        if self.clamp_fp16:  # as diffusers: keep fp16 text activations finite
            txt = txt.clamp(-FP16_MAX, FP16_MAX)
        return img, txt

    @staticmethod
    def mlp(mlp_in: nn.Module, mlp_out: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """mlp_out(gelu_tanh(mlp_in(x))): x (B, N, D) -> (B, N, D). In the fp8 tier, mlp_in's bias and GELU and
        mlp_out's input quantisation run as one pass over the (B, N, 4D) hidden state."""
        if isinstance(mlp_out, Fp8Linear):
            return mlp_out.forward_after_gelu(None, mlp_in.matmul(x), mlp_in.pending_bias())
        return mlp_out(mlp_in(x))


class FluxSingleBlock(nn.Module):
    """Single-stream block: parallel attention + MLP over the joint sequence, one fused input projection
    (q, k, v, mlp hidden: 3D + 4D outputs) and one fused output projection over concat(attn, mlp).

    The GELU stays a separate (compiled: fused, writing straight into the concatenated buffer) op here: moving
    it into a GEMM epilogue needs the MLP projection split from the q/k/v one and the output projection split
    in two, and that measured no faster on an H100 (bench/flux_levers.py gelu_epilogue, 4f35b68: the N=12288
    GEMM fills its last wave of tiles poorly, where the fused N=21504 one does not).

    forward(x (B, S, D), cond, cos, sin (S, Dh/2) fp32) -> x (B, S, D); `cond` as in the double block: the
    block's AdaLN vectors (B, 3D), or temb (B, D) once `takes_temb` is set.
    """

    takes_temb = False

    def __init__(self, dim: int, heads: int, head_dim: int, ops: OpsConfig, attention: str, clamp_fp16: bool,
                 device=None, dtype=None):
        super().__init__()
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.clamp_fp16 = clamp_fp16
        lin = dict(ops=ops, device=device, dtype=dtype)
        self.mod = Linear(dim, 3 * dim, **lin)  # shift, scale, gate
        self.norm = NormScaleShift(dim, eps=NORM_EPS, norm="layer", ops=ops)
        self.qkv_mlp = Linear(dim, 3 * dim + 4 * dim, **lin)  # [q | k | v | mlp hidden]
        self.q_norm = RMSNorm(head_dim, eps=NORM_EPS, ops=ops, device=device, dtype=dtype)  # weights only, as above
        self.k_norm = RMSNorm(head_dim, eps=NORM_EPS, ops=ops, device=device, dtype=dtype)
        self.norm_rotary = RMSNormRotary(head_dim, eps=NORM_EPS, interleaved=True, ops=ops)
        self.attn = Attention(attention)
        self.fp8_attn: Fp8Attention | None = None  # set by FluxTransformer.use_fp8_attention
        self.out = Linear(dim + 4 * dim, dim, **lin)  # over concat(attn, gelu(mlp))
        self.gated_add = MulAdd(k=0.0, ops=ops)  # gated_add(y, gate, r) = r + gate * y

    def modulation(self, silu_temb: torch.Tensor) -> torch.Tensor:
        """silu(temb) (N, D) -> the block's AdaLN vectors (N, 3D)."""
        return self.mod(silu_temb)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        mod = self.modulation(F.silu(cond)) if self.takes_temb else cond  # (B, 3D)
        shift, scale, gate = mod.unsqueeze(1).chunk(3, dim=-1)  # (B, 1, D) each
        h = self.norm(x, scale, shift, quantize=self.qkv_mlp.takes_fp8)  # (B, S, D) (fp8 tier: quantised)
        qkv, mlp = self.qkv_mlp(h).split((3 * self.dim, 4 * self.dim), dim=-1)  # (B, S, 3D), (B, S, 4D)
        q, k, v = qkv.unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)  # (B, S, H, Dh)
        if self.fp8_attn is not None:  # q, k, v and the output in fp8, one scale each
            o, o_descale = self.fp8_attn(*self.norm_rotary((q,), (self.q_norm.weight,), cos, sin, quantize=True),
                                         *self.norm_rotary((k,), (self.k_norm.weight,), cos, sin, quantize=True), v)
            h = self.out.forward_after_gelu(o.flatten(2), mlp, plain_descale=o_descale)  # (B, S, D)
            return self.residual(h, gate, x)
        q = self.norm_rotary((q,), (self.q_norm.weight,), cos, sin)  # (B, S, H, Dh)
        k = self.norm_rotary((k,), (self.k_norm.weight,), cos, sin)
        attn = self.attn(q, k, v).flatten(2)  # (B, S, D)
        if isinstance(self.out, Fp8Linear):  # fp8 tier: the GELU and the fp8 quantisation of [attn | mlp], one pass
            h = self.out.forward_after_gelu(attn, mlp)  # (B, S, D)
        else:
            h = self.out(torch.cat((attn, F.gelu(mlp, approximate="tanh")), dim=-1))  # (B, S, 5D) -> (B, S, D)
        return self.residual(h, gate, x)

    def residual(self, h: torch.Tensor, gate: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The gated residual add x + gate * h: (B, S, D)."""
        x = self.gated_add(h, gate, x)
        if self.clamp_fp16:  # as diffusers: keep fp16 activations finite
            x = x.clamp(-FP16_MAX, FP16_MAX)
        return x


# -------------------------------------------------------------------------------------------------- model


@dataclass
class FluxConditioning:
    """The conditioning of one forward (one denoising step): every AdaLN modulation vector, from the timestep,
    the guidance scale and the pooled text embedding. The vectors are products of silu(temb) with each block's
    `mod` weights: M = batch GEMMs that only read weights (6 GB a step for FLUX.1). A pipeline knows every
    step's timestep before the loop, so `FluxTransformer.precompute_conditioning` computes them for all steps
    at once (one pass over those weights per request) and passes one of these to each forward."""

    temb: torch.Tensor  # (B, D) the conditioning vector
    mods: tuple[torch.Tensor, ...]  # per block in the flat order: (B, 12D) double, (B, 3D) single; () when the
    # blocks compute their own (FluxTransformer.use_per_block_modulation)
    out_mod: torch.Tensor  # (B, 2D): the output norm's (scale, shift)


# A pytree node (its fields are leaves): so `ditserve.cuda_graphs.GraphedForward` copies its tensors into a graph.
torch.utils._pytree.register_dataclass(FluxConditioning)


@dataclass
class FluxBlockContext:
    """What every block of one forward takes besides the hidden states."""

    cond: FluxConditioning
    cos: torch.Tensor  # (S, Dh/2) fp32 RoPE table of the joint sequence [txt, img]
    sin: torch.Tensor  # (S, Dh/2) fp32
    image_tokens: int = 0  # L before sequence-parallel padding (0: not sharded)


class FluxTransformer(nn.Module):
    """The FLUX.1 transformer. Inputs and conventions are diffusers' `FluxTransformer2DModel.forward`:

    hidden_states (B, L, C) packed latents; encoder_hidden_states (B, T, joint_attention_dim) T5 states;
    pooled_projections (B, pooled_projection_dim) CLIP pooled output; timestep (B,) in [0, 1] (the model
    multiplies by 1000); img_ids (L, 3), txt_ids (T, 3) RoPE positions (a leading batch dim is accepted and
    its first entry used, as diffusers does); guidance (B,) the distilled guidance scale (multiplied by 1000),
    required iff config.guidance_embeds. Returns (B, L, out_channels) in the model's dtype. One more argument,
    ours: `conditioning`, this step's entry of `precompute_conditioning` (then `timestep`, `guidance` and
    `pooled_projections` are not read again).

    Inputs are expected in the model's dtype (ids may be any float or int dtype). The fp16 overflow clamp of
    diffusers is enabled at construction when `dtype` is float16.
    """

    repeated_blocks = ("double_blocks", "single_blocks")

    # The block-cache interface (see `ditserve.cache`): `prepare` -> `run_blocks` over ranges of the flat
    # block index (double blocks 0 .. num_layers-1, then single blocks) -> `finish`. The block state between
    # ranges is always the tuple (img (B, L, D), txt (B, T, D)); a cache mounted in `block_cache` decides
    # which ranges run. Blocks stay the compiled regions; the cache runs eagerly between them.
    block_cache = None
    # Sequence parallelism (`ditserve.parallel.sharding`): the image and the text tokens are each sharded over the
    # ranks (split, not replicated); each rank's joint sequence is [its text shard, its image shard].
    sharder = None
    # False: the model computes every block's modulation vectors (FluxConditioning) and passes each block its
    # own. True (`use_per_block_modulation`): each block gets temb and computes its own, as diffusers' blocks
    # do; for wrappers that call all blocks of a list with the same arguments (cache-dit's).
    blocks_take_temb = False
    # For `--cache-backend cache-dit` (ditserve.cache.cache_dit): each block list and its cache-dit
    # ForwardPattern number. Double blocks take and return (img, txt): 0; single blocks the joint sequence: 3.
    cache_dit_block_patterns = (("double_blocks", 0), ("single_blocks", 3))
    # The fp8 tier (`ditserve.ops.fp8.apply_fp8`): per block list, the Linear layers it quantises. These are
    # the token-wise GEMMs (M = tokens), nearly all of the FLOPs. Left out: each block's `mod` (M = batch
    # size: an fp8 GEMM gains nothing there), the embedders, norm_out_mod and proj_out (small, and the
    # conditioning path and the output projection are the most precision-sensitive).
    fp8_linears = (
        ("double_blocks", ("img_qkv", "txt_qkv", "img_attn_out", "txt_attn_out", "img_mlp_in", "img_mlp_out",
                           "txt_mlp_in", "txt_mlp_out")),
        ("single_blocks", ("qkv_mlp", "out")),
    )
    # fp8 layers whose bias goes in the GEMM's epilogue: their outputs feed opaque kernels (the q/k norm + RoPE,
    # attention via a concatenation, the residual norm), so a bias added after the GEMM is a pass of its own over
    # the output (3.7 ms of FLUX.1-dev's fp8 forward on an H100, bench/flux_shapes_ab.py at 1c36007), where the
    # epilogue costs ~7% of these GEMMs (bench/fp8_gemm.py). The other layers' bias add fuses into the next op.
    fp8_bias_in_gemm = ("img_qkv", "txt_qkv", "qkv_mlp", "img_attn_out", "txt_attn_out")

    def __init__(self, config: FluxConfig, ops: OpsConfig | None = None, attention: str = "sdpa", device=None,
                 dtype=None):
        super().__init__()
        if ops is None:
            device_type = torch.device(device).type if device is not None else None
            # A model built on "meta" (to be materialised by the loader) picks its paths for the best device.
            ops = OpsConfig(device=None if device_type == "meta" else device_type,
                            dtype=dtype or torch.get_default_dtype())
        self.config = config
        c = config
        D, H, Dh = c.inner_dim, c.num_attention_heads, c.attention_head_dim
        clamp_fp16 = (dtype or torch.get_default_dtype()) == torch.float16
        lin = dict(ops=ops, device=device, dtype=dtype)

        self.time_embedder = MLPEmbedder(TIME_EMBED_DIM, D, **lin)
        self.guidance_embedder = MLPEmbedder(TIME_EMBED_DIM, D, **lin) if c.guidance_embeds else None
        self.pooled_embedder = MLPEmbedder(c.pooled_projection_dim, D, **lin)
        self.context_embedder = Linear(c.joint_attention_dim, D, **lin)
        self.x_embedder = Linear(c.in_channels, D, **lin)
        self.double_blocks = nn.ModuleList(
            FluxDoubleBlock(D, H, Dh, ops, attention, clamp_fp16, device=device, dtype=dtype)
            for _ in range(c.num_layers))
        self.single_blocks = nn.ModuleList(
            FluxSingleBlock(D, H, Dh, ops, attention, clamp_fp16, device=device, dtype=dtype)
            for _ in range(c.num_single_layers))
        self.norm_out_mod = Linear(D, 2 * D, **lin)  # (scale, shift): AdaLayerNormContinuous's order
        self.norm_out = NormScaleShift(D, eps=NORM_EPS, norm="layer", ops=ops)
        self.proj_out = Linear(D, c.out_channels, **lin)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        timestep: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
        conditioning: "FluxConditioning | None" = None,
    ) -> torch.Tensor:
        state, ctx = self.prepare(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids,
                                  txt_ids, guidance, conditioning)
        return self.finish(run_all_blocks(self, state, ctx), ctx)

    # ----------------------------------------------------------------------------------- block interface

    @property
    def num_blocks(self) -> int:
        """Blocks in the flat order `run_blocks` indexes: double blocks, then single blocks."""
        return self.config.num_layers + self.config.num_single_layers

    def prepare(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance=None, conditioning=None) -> tuple[tuple[torch.Tensor, torch.Tensor], "FluxBlockContext"]:
        """Everything before the blocks (arguments as `forward`): -> the block state (img (B, L, D),
        txt (B, T, D)) and the per-forward constants every block takes."""
        if conditioning is None:
            conditioning = self.precompute_conditioning(timestep[None], pooled_projections,
                                                        None if guidance is None else guidance[None])[0]
        elif conditioning.out_mod.shape[0] != hidden_states.shape[0]:
            raise ValueError(f"conditioning was computed for a batch of {conditioning.out_mod.shape[0]}, "
                             f"hidden_states has a batch of {hidden_states.shape[0]}")
        if img_ids.ndim == 3:  # (B, L, 3): diffusers' deprecated form; positions are shared across the batch
            img_ids = img_ids[0]
        if txt_ids.ndim == 3:
            txt_ids = txt_ids[0]

        img = self.x_embedder(hidden_states)  # (B, L, D)
        txt = self.context_embedder(encoder_hidden_states)  # (B, T, D)

        # RoPE tables for the joint sequence [txt, img], computed once for all blocks.
        ids = torch.cat((txt_ids, img_ids), dim=0)  # (S, 3)
        cos, sin = axial_rope_cos_sin(ids, self.config.axes_dims_rope, ROPE_THETA)  # (S, Dh/2) fp32
        if self.sharder is None:
            return (img, txt), FluxBlockContext(cond=conditioning, cos=cos, sin=sin)
        # This rank's shards (B, Lt, D), (B, Li, D); the RoPE tables and the key mask of [txt shard, img shard].
        sh, (B, L), T = self.sharder, img.shape[:2], txt.shape[1]
        sh.current_mask = sh.joint_key_mask([(T, None), (L, None)], B, img.device)  # (B, sp*(Lt+Li)) or None
        cos, sin = (torch.cat((sh.shard(t[:T], 0), sh.shard(t[T:], 0))) for t in (cos, sin))  # (Lt+Li, Dh/2)
        return (sh.shard(img), sh.shard(txt)), FluxBlockContext(cond=conditioning, cos=cos, sin=sin,
                                                                image_tokens=L)

    def precompute_conditioning(self, timesteps: torch.Tensor, pooled_projections: torch.Tensor,
                                guidance: torch.Tensor | None = None) -> list[FluxConditioning]:
        """The conditioning of N forwards at once: timesteps (N, B) in [0, 1] (each row as `forward`'s
        `timestep`), pooled_projections (B, pooled_projection_dim), guidance (N, B) or (B,) for all steps, or
        None -> N FluxConditioning, one per step. Every modulation Linear runs once with M = N x B rows."""
        if self.guidance_embedder is not None and guidance is None:
            raise ValueError("this FLUX.1 transformer is guidance-distilled (guidance_embeds=True, e.g. FLUX.1-dev): "
                             "pass guidance, a (B,) tensor of guidance scales")
        if self.guidance_embedder is None and guidance is not None:
            raise ValueError("this FLUX.1 transformer has no guidance embedder (guidance_embeds=False, e.g. "
                             "FLUX.1-schnell): pass guidance=None")
        N, B = timesteps.shape
        dtype = self.x_embedder.weight.dtype  # the compute dtype (the embedders are never quantised)
        # As diffusers: round the timestep to the model dtype, then scale by 1000.
        t_freq = Fn.timestep_features(timesteps.reshape(N * B).to(dtype) * 1000, TIME_EMBED_DIM).to(dtype)  # (N*B, 256)
        temb = self.time_embedder(t_freq) + self.pooled_embedder(pooled_projections).repeat(N, 1)  # (N*B, D)
        if self.guidance_embedder is not None:
            g = guidance.expand(N, B).reshape(N * B)
            g_freq = Fn.timestep_features(g.to(dtype) * 1000, TIME_EMBED_DIM).to(dtype)  # (N*B, 256)
            temb = temb + self.guidance_embedder(g_freq)  # (N*B, D)
        silu = F.silu(temb)
        blocks = () if self.blocks_take_temb else (*self.double_blocks, *self.single_blocks)
        mods = [block.modulation(silu).unflatten(0, (N, B)) for block in blocks]  # (N, B, kD) each
        out_mod = self.norm_out_mod(silu).unflatten(0, (N, B))  # (N, B, 2D)
        temb = temb.unflatten(0, (N, B))  # (N, B, D)
        return [FluxConditioning(temb=temb[i], mods=tuple(m[i] for m in mods), out_mod=out_mod[i])
                for i in range(N)]

    def use_fp8_attention(self, ops: OpsConfig) -> None:
        """Run every block's attention in fp8 (`ditserve.ops.attention.Fp8Attention`; lossy). Needs the fp8 tier
        (`apply_fp8` first: the attention output projections read the fp8 output). Call it before compiling."""
        blocks = (*self.double_blocks, *self.single_blocks)
        if not all(isinstance(b.img_attn_out if isinstance(b, FluxDoubleBlock) else b.out, Fp8Linear)
                   for b in blocks):
            raise ConfigError("fp8 attention needs the fp8 tier's layers: apply_fp8 (--quantization fp8) first")
        for block in blocks:
            block.fp8_attn = Fp8Attention(ops)
            block.norm_rotary.warm_quantized = True  # the prewarm compiles the kernel variant now in use

    def enable_sequence_parallel(self, state) -> None:
        """Run every block on this rank's shards of the text and the image tokens (`ditserve.parallel.sharding`;
        state: a `ParallelState` with a sequence-parallel degree above 1). Not with fp8 attention."""
        from ditserve.parallel.sharding import SequenceSharder, swap_attention

        if any(b.fp8_attn is not None for b in (*self.double_blocks, *self.single_blocks)):
            raise ConfigError("--parallel ulysses/ring cannot run with --fp8-attention")
        self.sharder = SequenceSharder(state)
        swap_attention(self, state, self.sharder)

    def use_per_block_modulation(self) -> None:
        """Make each block compute its own modulation vectors from temb (see `blocks_take_temb`). Call it
        before compiling (a compiled block traces the setting once)."""
        self.blocks_take_temb = True
        for block in (*self.double_blocks, *self.single_blocks):
            block.takes_temb = True

    def run_blocks(self, state: tuple[torch.Tensor, torch.Tensor], ctx: "FluxBlockContext", start: int, stop: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks [start, stop) of the flat order on the state (img (B, L, D), txt (B, T, D)) -> (img, txt).

        Double blocks take the two streams; single blocks take the joint sequence [txt, img], joined once on
        entering the single blocks and split (as views) on leaving them.
        """
        img, txt = state
        n_double, cond = self.config.num_layers, ctx.cond

        def block_cond(i: int) -> torch.Tensor:  # block i's (flat index) modulation vectors, or temb
            return cond.temb if self.blocks_take_temb else cond.mods[i]

        for i, block in enumerate(self.double_blocks[start:min(stop, n_double)], start):
            img, txt = block(img, txt, block_cond(i), ctx.cos, ctx.sin)  # (B, L, D), (B, T, D)
        if stop > n_double:
            T = txt.shape[1]
            x = torch.cat((txt, img), dim=1)  # (B, S, D)
            first = max(start, n_double)
            for i, block in enumerate(self.single_blocks[first - n_double:stop - n_double], first):
                x = block(x, block_cond(i), ctx.cos, ctx.sin)  # (B, S, D)
            txt, img = x[:, :T], x[:, T:]  # (B, T, D), (B, L, D)
        return img, txt

    def finish(self, state: tuple[torch.Tensor, torch.Tensor], ctx: "FluxBlockContext") -> torch.Tensor:
        """Everything after the blocks: the state's img (B, L, D) -> (B, L, out_channels). In a dummy run
        (`ditserve.dummy_run`) the output projection is skipped and a zero tensor of the output's shape (a
        broadcast view: no memory) is returned."""
        img = state[0]
        if in_dummy_run():
            L = ctx.image_tokens if self.sharder is not None else img.shape[1]
            return img.new_zeros(()).expand(img.shape[0], L, self.config.out_channels)
        if self.sharder is not None:
            img = self.sharder.gather(img, ctx.image_tokens)  # (B, L, D), the same on every rank
        scale, shift = ctx.cond.out_mod.unsqueeze(1).chunk(2, dim=-1)  # (B, 1, D) each
        img = self.norm_out(img, scale, shift)  # (B, L, D)
        return self.proj_out(img)  # (B, L, out_channels)

    # ------------------------------------------------------------------------------------- weight loading

    def weight_map(self) -> dict[str, tuple[str, int | None, int | None]]:
        """Every key of a diffusers `FluxTransformer2DModel` state dict -> (our parameter name, start, stop).

        The tensor goes into rows [start:stop] (dim 0) of our parameter; (None, None) means the whole
        parameter. Each piece lands independently, so tensors can be streamed one at a time into a model
        already allocated on its device.
        """
        D = self.config.inner_dim
        m: dict[str, tuple[str, int | None, int | None]] = {}

        def linear(src: str, dst: str, start: int | None = None, stop: int | None = None) -> None:
            m[f"{src}.weight"] = (f"{dst}.weight", start, stop)
            m[f"{src}.bias"] = (f"{dst}.bias", start, stop)

        def param(src: str, dst: str) -> None:
            m[src] = (dst, None, None)

        tte = "time_text_embed"
        linear(f"{tte}.timestep_embedder.linear_1", "time_embedder.in_layer")
        linear(f"{tte}.timestep_embedder.linear_2", "time_embedder.out_layer")
        if self.config.guidance_embeds:
            linear(f"{tte}.guidance_embedder.linear_1", "guidance_embedder.in_layer")
            linear(f"{tte}.guidance_embedder.linear_2", "guidance_embedder.out_layer")
        linear(f"{tte}.text_embedder.linear_1", "pooled_embedder.in_layer")
        linear(f"{tte}.text_embedder.linear_2", "pooled_embedder.out_layer")
        linear("context_embedder", "context_embedder")
        linear("x_embedder", "x_embedder")

        for i in range(self.config.num_layers):
            src, dst = f"transformer_blocks.{i}", f"double_blocks.{i}"
            linear(f"{src}.norm1.linear", f"{dst}.mod", 0, 6 * D)
            linear(f"{src}.norm1_context.linear", f"{dst}.mod", 6 * D, 12 * D)
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                linear(f"{src}.attn.{name}", f"{dst}.img_qkv", j * D, (j + 1) * D)
            for j, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
                linear(f"{src}.attn.{name}", f"{dst}.txt_qkv", j * D, (j + 1) * D)
            param(f"{src}.attn.norm_q.weight", f"{dst}.img_q_norm.weight")
            param(f"{src}.attn.norm_k.weight", f"{dst}.img_k_norm.weight")
            param(f"{src}.attn.norm_added_q.weight", f"{dst}.txt_q_norm.weight")
            param(f"{src}.attn.norm_added_k.weight", f"{dst}.txt_k_norm.weight")
            linear(f"{src}.attn.to_out.0", f"{dst}.img_attn_out")
            linear(f"{src}.attn.to_add_out", f"{dst}.txt_attn_out")
            linear(f"{src}.ff.net.0.proj", f"{dst}.img_mlp_in")
            linear(f"{src}.ff.net.2", f"{dst}.img_mlp_out")
            linear(f"{src}.ff_context.net.0.proj", f"{dst}.txt_mlp_in")
            linear(f"{src}.ff_context.net.2", f"{dst}.txt_mlp_out")

        for i in range(self.config.num_single_layers):
            src, dst = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
            linear(f"{src}.norm.linear", f"{dst}.mod")
            for j, name in enumerate(("to_q", "to_k", "to_v")):
                linear(f"{src}.attn.{name}", f"{dst}.qkv_mlp", j * D, (j + 1) * D)
            linear(f"{src}.proj_mlp", f"{dst}.qkv_mlp", 3 * D, 7 * D)
            param(f"{src}.attn.norm_q.weight", f"{dst}.q_norm.weight")
            param(f"{src}.attn.norm_k.weight", f"{dst}.k_norm.weight")
            linear(f"{src}.proj_out", f"{dst}.out")

        linear("norm_out.linear", "norm_out_mod")
        linear("proj_out", "proj_out")
        return m

    def lora_aliases(self) -> dict[str, tuple[str, ...]]:
        """Module names of the original (Black Forest Labs) checkpoint -> the diffusers modules whose outputs
        each concatenates, in row order: what kohya / sd-scripts FLUX.1 LoRA files name (`ditserve.lora`). The
        final layer's modulation is left out (its shift/scale halves are swapped against diffusers')."""
        a: dict[str, tuple[str, ...]] = {
            "img_in": ("x_embedder",), "txt_in": ("context_embedder",), "final_layer.linear": ("proj_out",),
            "time_in.in_layer": ("time_text_embed.timestep_embedder.linear_1",),
            "time_in.out_layer": ("time_text_embed.timestep_embedder.linear_2",),
            "vector_in.in_layer": ("time_text_embed.text_embedder.linear_1",),
            "vector_in.out_layer": ("time_text_embed.text_embedder.linear_2",),
        }
        if self.config.guidance_embeds:
            a["guidance_in.in_layer"] = ("time_text_embed.guidance_embedder.linear_1",)
            a["guidance_in.out_layer"] = ("time_text_embed.guidance_embedder.linear_2",)
        for i in range(self.config.num_layers):
            src, dst = f"double_blocks.{i}", f"transformer_blocks.{i}"
            a[f"{src}.img_attn.qkv"] = tuple(f"{dst}.attn.{n}" for n in ("to_q", "to_k", "to_v"))
            a[f"{src}.txt_attn.qkv"] = tuple(f"{dst}.attn.{n}" for n in ("add_q_proj", "add_k_proj", "add_v_proj"))
            a[f"{src}.img_attn.proj"] = (f"{dst}.attn.to_out.0",)
            a[f"{src}.txt_attn.proj"] = (f"{dst}.attn.to_add_out",)
            a[f"{src}.img_mlp.0"], a[f"{src}.img_mlp.2"] = (f"{dst}.ff.net.0.proj",), (f"{dst}.ff.net.2",)
            a[f"{src}.txt_mlp.0"] = (f"{dst}.ff_context.net.0.proj",)
            a[f"{src}.txt_mlp.2"] = (f"{dst}.ff_context.net.2",)
            a[f"{src}.img_mod.lin"] = (f"{dst}.norm1.linear",)
            a[f"{src}.txt_mod.lin"] = (f"{dst}.norm1_context.linear",)
        for i in range(self.config.num_single_layers):
            src, dst = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
            a[f"{src}.linear1"] = tuple(f"{dst}.{n}" for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"))
            a[f"{src}.linear2"], a[f"{src}.modulation.lin"] = (f"{dst}.proj_out",), (f"{dst}.norm.linear",)
        return a

    def expected_diffusers_keys(self) -> list[str]:
        """The keys a diffusers `FluxTransformer2DModel` state dict of this config has, sorted."""
        return sorted(self.weight_map())

    def load_diffusers_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Copy a full diffusers `FluxTransformer2DModel` state dict into this model through `weight_map`, everything
        checked before anything is written (`ditserve.loader.weights.copy_state_dict`)."""
        from ditserve.loader.weights import copy_state_dict

        copy_state_dict(self, sd, self.weight_map(), "diffusers FLUX.1")


# ------------------------------------------------------------------------------------------- example inputs


def flux_example_inputs(config, height: int, width: int, batch: int = 1, text_len: int = 512,
                        device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        seed: int = 0) -> dict[str, torch.Tensor | None]:
    """FluxTransformer kwargs for a `height` x `width` image: random (seeded, drawn on the CPU) tensors.

    `config` is a FluxConfig. Image tokens L = (height/16) * (width/16) (8x VAE, then 2x2 packing);
    hidden_states (B, L, in_channels), encoder_hidden_states (B, text_len, joint_attention_dim),
    pooled_projections (B, pooled_projection_dim), timestep (B,) in [0, 1], img_ids (L, 3) = (0, row, col),
    txt_ids (text_len, 3) zeros, guidance (B,) if the model is guidance-distilled else None.
    """
    for name, v in (("height", height), ("width", width)):
        if v % 16 or v <= 0:
            raise ConfigError(f"{name} must be a positive multiple of 16, got {v}")
    gen = torch.Generator().manual_seed(seed)
    rows, cols = height // 16, width // 16
    img_ids = torch.zeros(rows, cols, 3)
    img_ids[..., 1] = torch.arange(rows)[:, None]
    img_ids[..., 2] = torch.arange(cols)[None, :]

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    return dict(
        hidden_states=rand(batch, rows * cols, config.in_channels),
        encoder_hidden_states=rand(batch, text_len, config.joint_attention_dim),
        pooled_projections=rand(batch, config.pooled_projection_dim),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=img_ids.reshape(rows * cols, 3).to(device=device, dtype=dtype),
        txt_ids=torch.zeros(text_len, 3, device=device, dtype=dtype),
        guidance=torch.full((batch,), 3.5, device=device, dtype=dtype) if config.guidance_embeds else None,
    )


FluxTransformer.example_inputs = staticmethod(flux_example_inputs)  # for `ditserve compile-report`


# ------------------------------------------------------------------------------------------------ presets


def _flux_transformer_config(guidance_embeds: bool) -> dict[str, Any]:
    return {"patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": guidance_embeds, "axes_dims_rope": [16, 56, 56]}


_FLUX_VAE = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu", "latent_channels": 16,
    "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": False,
    "use_post_quant_conv": False, "mid_block_add_attention": True,
}

# openai/clip-vit-large-patch14 text tower, as in the FLUX.1 repos' text_encoder/config.json.
_CLIP_L_TEXT = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
}

# google/t5-v1_1-xxl encoder, as in the FLUX.1 repos' text_encoder_2/config.json.
_T5_XXL = {
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_decoder_layers": 24,
    "num_heads": 64, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False,
    "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
}


def _flux_scheduler_config(dynamic: bool, shift: float) -> dict[str, Any]:
    return {"num_train_timesteps": 1000, "shift": shift, "use_dynamic_shifting": dynamic, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def _flux_spec(name: str, guidance_embeds: bool, scheduler: dict[str, Any], steps: int, guidance: float,
               max_sequence_length: int) -> ModelSpec:
    return ModelSpec(
        name=name,
        pipeline="FluxPipeline",
        components={
            "transformer": ("FluxTransformer2DModel", _flux_transformer_config(guidance_embeds)),
            "vae": ("AutoencoderKL", dict(_FLUX_VAE)),
            "text_encoder": ("CLIPTextModel", dict(_CLIP_L_TEXT)),
            "text_encoder_2": ("T5EncoderModel", dict(_T5_XXL)),
            "scheduler": ("FlowMatchEulerDiscreteScheduler", scheduler),
        },
        default_steps=steps,
        default_guidance=guidance,
        default_height=1024,
        default_width=1024,
        max_sequence_length=max_sequence_length,
    )


FLUX_1_DEV = _flux_spec("flux.1-dev", True, _flux_scheduler_config(dynamic=True, shift=3.0), steps=28,
                        guidance=3.5, max_sequence_length=512)
FLUX_1_SCHNELL = _flux_spec("flux.1-schnell", False, _flux_scheduler_config(dynamic=False, shift=1.0), steps=4,
                            guidance=0.0, max_sequence_length=256)
