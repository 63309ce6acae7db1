"""Library-free components of the packaged default model: its CLIP and T5 text encoders, their tokenizers, its
VAE decoder and its flow-match Euler scheduler, in plain PyTorch (and the `tokenizers` library).

Why. The default model is what a new user runs first (`ditserve generate --prompt ...` on a laptop CPU), and it
computes for about half a second; importing diffusers and transformers costs several times that (each imports
torch._dynamo, about 1 s on a 2-core machine, and transformers' model registry; measured in the README). Its
components are tiny, so ditserve carries their forward passes here (EngineConfig.native_components: "auto" uses
them for the packaged default model on the CPU, "off" never). Every other checkpoint, and the default model on
a GPU, loads diffusers' and transformers' own classes.

Numerics. The same operations in the same order as the library classes of diffusers 0.42 / transformers 5.x:
`CLIPTextModel` (causal attention, quick-GELU, the pooled output at the first end-of-text token),
`T5EncoderModel` (RMS norm in fp32, bidirectional relative-position buckets, gated GELU, no attention mask: the
default model's pipeline passes none), `AutoencoderKL.decode` (GroupNorm ResNets, a single-head mid-block
attention, nearest 2x upsampling) and `FlowMatchEulerDiscreteScheduler` (exponential time shift, Euler steps in
fp32). They load the same safetensors; tests/test_native.py holds each against its library class (fp32, <= 1e-5
relative) and the whole image against `native_components="off"`.

Each class keeps the small part of its library's interface that the default model's pipeline calls.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ditserve.errors import ConfigError

class Config(dict):
    """A component's config: a dict whose keys read as attributes too (as diffusers' FrozenDict)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict[str, Any]:
        return dict(self)


def _load_module(module: nn.Module, file: Path, dtype: torch.dtype, device: torch.device,
                 aliases: dict[str, str] | None = None) -> nn.Module:
    """Fill `module` from a safetensors file: every parameter must be there, under its
    own name or the one `aliases` gives (a tied embedding, a top-level prefix)."""
    from safetensors.torch import load_file

    stored = load_file(str(file))
    state = {}
    for name, p in module.named_parameters():
        key = name if name in stored else (aliases or {}).get(name, name)
        if key not in stored:
            raise ConfigError(f"{file}: no weight {name}")
        if tuple(stored[key].shape) != tuple(p.shape):
            raise ConfigError(f"{file}: {key} is {tuple(stored[key].shape)}, expected {tuple(p.shape)}")
        state[name] = stored[key].to(device=device, dtype=dtype)
    module.load_state_dict(state, assign=True, strict=True)
    return module.eval().requires_grad_(False)


def _read_config(file: Path) -> Config:
    return Config(json.loads(file.read_text()))


# ------------------------------------------------------------------------------------------------ tokenizers


class NativeTokenizer:
    """A tokenizer.json (CLIP's byte-level BPE, T5's unigram) through the `tokenizers` library, called as
    transformers' fast tokenizers are by the default model's pipeline: special tokens added, optional truncation to
    `max_length` and padding to it with the pad token."""

    def __init__(self, tokenizer, config: Config):
        self._tokenizer = tokenizer
        self._lock = threading.Lock()  # a call sets the tokenizer's truncation and padding, then clears them
        self.model_max_length = int(config.get("model_max_length", 10**9))
        self.pad_token_id = tokenizer.token_to_id(config["pad_token"])
        tokenizer.no_truncation()
        tokenizer.no_padding()

    @classmethod
    def from_folder(cls, folder: Path, dtype=None, device=None) -> NativeTokenizer:
        from tokenizers import Tokenizer

        config = _read_config(folder / "tokenizer_config.json")
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), config)

    def __call__(self, texts: list[str], padding: bool | str = False, max_length: int | None = None,
                 truncation: bool = False, return_tensors: str | None = None) -> SimpleNamespace:
        tok = self._tokenizer
        with self._lock:
            if truncation:
                tok.enable_truncation(max_length if max_length is not None else self.model_max_length)
            if padding == "max_length":
                tok.enable_padding(pad_id=self.pad_token_id, length=max_length)
            try:
                ids = [e.ids for e in tok.encode_batch(list(texts))]
            finally:
                tok.no_truncation()
                tok.no_padding()
        return SimpleNamespace(input_ids=torch.tensor(ids, dtype=torch.long) if return_tensors == "pt" else ids)


# --------------------------------------------------------------------------------------------------- CLIP


class _CLIPAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, Dh), scale Dh^-0.5
        return self.out_proj(out.transpose(1, 2).reshape(B, L, D))


class _CLIPLayer(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        D = c.hidden_size
        self.layer_norm1 = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.layer_norm2 = nn.LayerNorm(D, eps=c.layer_norm_eps)
        self.self_attn = _CLIPAttention(D, c.num_attention_heads)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(D, c.intermediate_size), nn.Linear(c.intermediate_size, D)
        if c.hidden_act != "quick_gelu":
            raise ConfigError(f"the native CLIP text encoder runs quick_gelu, this one has {c.hidden_act}")

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        h = self.mlp.fc1(self.layer_norm2(x))
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))


class NativeCLIPTextModel(nn.Module):
    """transformers' `CLIPTextModel`: token + position embeddings, pre-norm layers with causal attention, a final
    LayerNorm; `pooler_output` is the final state at each row's first end-of-text token (or, for the legacy
    eos id 2, at its largest id, as transformers does)."""

    CHECKPOINT_CLASS = "CLIPTextModel"

    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.embeddings.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(_CLIPLayer(c) for _ in range(c.num_hidden_layers))
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    @classmethod
    def from_folder(cls, folder: Path, dtype: torch.dtype, device: torch.device) -> NativeCLIPTextModel:
        c = _read_config(folder / "config.json")
        model = cls(c)  # on the CPU: a meta-device build would import torch._dynamo (~1 s) to initialise
        aliases = {name: "text_model." + name for name, _ in model.named_parameters()}  # files saved either way
        return _load_module(model, folder / "model.safetensors", dtype, device, aliases)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> SimpleNamespace:
        B, L = input_ids.shape
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding.weight[:L]  # (B, L, D)
        causal = torch.full((L, L), float("-inf"), device=x.device, dtype=x.dtype).triu(1)  # (L, L)
        for layer in self.encoder.layers:
            x = layer(x, causal)
        x = self.final_layer_norm(x)
        eos = self.config.eos_token_id
        at = input_ids.argmax(-1) if eos == 2 else (input_ids == eos).int().argmax(-1)  # (B,)
        return SimpleNamespace(last_hidden_state=x, pooler_output=x[torch.arange(B, device=x.device), at])


# ----------------------------------------------------------------------------------------------------- T5


class _T5Norm(nn.Module):
    """T5's RMS norm: no mean, no bias, variance in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class _T5Block(nn.Module):
    def __init__(self, c: Config, has_bias: bool):
        super().__init__()
        inner = c.num_heads * c.d_kv
        attn = nn.Module()
        attn.q, attn.k, attn.v = (nn.Linear(c.d_model, inner, bias=False) for _ in range(3))
        attn.o = nn.Linear(inner, c.d_model, bias=False)
        if has_bias:
            attn.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_heads)
        ff = nn.Module()
        ff.wi_0, ff.wi_1 = (nn.Linear(c.d_model, c.d_ff, bias=False) for _ in range(2))
        ff.wo = nn.Linear(c.d_ff, c.d_model, bias=False)
        self.layer = nn.ModuleList([nn.Module(), nn.Module()])
        self.layer[0].SelfAttention, self.layer[0].layer_norm = attn, _T5Norm(c.d_model, c.layer_norm_epsilon)
        self.layer[1].DenseReluDense, self.layer[1].layer_norm = ff, _T5Norm(c.d_model, c.layer_norm_epsilon)
        self.heads = c.num_heads

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attn, ff = self.layer[0].SelfAttention, self.layer[1].DenseReluDense
        B, L, _ = x.shape
        h = self.layer[0].layer_norm(x)
        q, k, v = (p(h).view(B, L, self.heads, -1).transpose(1, 2) for p in (attn.q, attn.k, attn.v))
        scores = torch.matmul(q, k.transpose(3, 2)) + bias  # (B, H, L, L): T5 does not scale
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        x = x + attn.o(torch.matmul(weights, v).transpose(1, 2).reshape(B, L, -1))
        h = self.layer[1].layer_norm(x)
        return x + ff.wo(F.gelu(ff.wi_0(h), approximate="tanh") * ff.wi_1(h))


class NativeT5EncoderModel(nn.Module):
    """transformers' `T5EncoderModel` with gated GELU (T5 v1.1): `forward(ids)[0]` is the last
    hidden state (B, L, D), every token attending to every token."""

    CHECKPOINT_CLASS = "T5EncoderModel"

    def __init__(self, c: Config):
        super().__init__()
        if not (c.get("is_gated_act") or str(c.get("feed_forward_proj", "")).startswith("gated")) or \
                c.get("dense_act_fn") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError("the native T5 encoder runs gated tanh-GELU feed-forwards only")
        self.config = c
        self.shared = nn.Embedding(c.vocab_size, c.d_model)
        self.encoder = nn.Module()
        self.encoder.block = nn.ModuleList(_T5Block(c, has_bias=i == 0) for i in range(c.num_layers))
        self.encoder.final_layer_norm = _T5Norm(c.d_model, c.layer_norm_epsilon)

    @classmethod
    def from_folder(cls, folder: Path, dtype: torch.dtype, device: torch.device) -> NativeT5EncoderModel:
        c = _read_config(folder / "config.json")
        model = cls(c)  # on the CPU: a meta-device build would import torch._dynamo (~1 s) to initialise
        return _load_module(model, folder / "model.safetensors", dtype, device,
                            {"shared.weight": "encoder.embed_tokens.weight"})

    def position_bias(self, L: int, device: torch.device) -> torch.Tensor:
        """(1, H, L, L): block 0's learned bias of each (query, key) distance bucket, bidirectional: half the
        buckets for keys after the query; exact distances below a quarter of the buckets, log-spaced up to
        relative_attention_max_distance beyond."""
        c = self.config
        pos = torch.arange(L, dtype=torch.long, device=device)
        rel = pos[None, :] - pos[:, None]  # key - query
        half = c.relative_attention_num_buckets // 2
        buckets = (rel > 0).to(torch.long) * half
        n = rel.abs()
        exact = half // 2
        large = exact + (torch.log(n.float() / exact) / math.log(c.relative_attention_max_distance / exact)
                         * (half - exact)).to(torch.long)
        large = torch.min(large, torch.full_like(large, half - 1))
        buckets = buckets + torch.where(n < exact, n, large)
        bias = self.encoder.block[0].layer[0].SelfAttention.relative_attention_bias(buckets)  # (L, L, H)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> tuple[torch.Tensor]:
        x = self.shared(input_ids)  # (B, L, D)
        bias = self.position_bias(input_ids.shape[1], input_ids.device).to(x.dtype)
        for block in self.encoder.block:
            x = block(x, bias)
        return (self.encoder.final_layer_norm(x),)


# --------------------------------------------------------------------------------------------------- VAE


class _Resnet(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, eps: float):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, cin, eps=eps), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, cout, eps=eps), nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class _MidAttention(nn.Module):
    """diffusers' VAE mid-block attention: GroupNorm, one head over the h*w positions, residual."""

    def __init__(self, dim: int, groups: int, eps: float):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, dim, eps=eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, dim) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x.view(B, C, H * W)).transpose(1, 2)  # (B, HW, C)
        q, k, v = (p(h).unsqueeze(1) for p in (self.to_q, self.to_k, self.to_v))  # (B, 1, HW, C)
        out = self.to_out[0](F.scaled_dot_product_attention(q, k, v).squeeze(1))  # (B, HW, C)
        return out.transpose(1, 2).reshape(B, C, H, W) + x


class NativeAutoencoderKL(nn.Module):
    """The decoder of diffusers' `AutoencoderKL` (UpDecoderBlock2D up blocks, a mid block with one attention,
    no post-quant conv): `decode(z, return_dict=False)[0]` is the image (B, 3, H, W), unclamped. No encoder, and
    no tiled decode (the pipeline's `vae_tiling` "auto" then decodes whole)."""

    CHECKPOINT_CLASS = "AutoencoderKL"

    def __init__(self, c: Config):
        super().__init__()
        if c.get("use_post_quant_conv", True) or not c.get("mid_block_add_attention", True) or \
                any(t != "UpDecoderBlock2D" for t in c.up_block_types) or c.get("act_fn", "silu") != "silu":
            raise ConfigError("the native VAE decodes AutoencoderKL configs without post_quant_conv, with "
                              "UpDecoderBlock2D up blocks, a mid-block attention and SiLU only")
        self.config = c
        g, eps, chans, n = c.norm_num_groups, 1e-6, list(reversed(c.block_out_channels)), c.layers_per_block + 1
        d = self.decoder = nn.Module()
        d.conv_in = nn.Conv2d(c.latent_channels, chans[0], 3, padding=1)
        d.mid_block = nn.Module()
        d.mid_block.resnets = nn.ModuleList([_Resnet(chans[0], chans[0], g, eps), _Resnet(chans[0], chans[0], g, eps)])
        d.mid_block.attentions = nn.ModuleList([_MidAttention(chans[0], g, eps)])
        d.up_blocks = nn.ModuleList()
        prev = chans[0]
        for i, cout in enumerate(chans):
            block = nn.Module()
            block.resnets = nn.ModuleList(_Resnet(prev if j == 0 else cout, cout, g, eps) for j in range(n))
            if i < len(chans) - 1:
                up = nn.Module()
                up.conv = nn.Conv2d(cout, cout, 3, padding=1)
                block.upsamplers = nn.ModuleList([up])
            d.up_blocks.append(block)
            prev = cout
        d.conv_norm_out = nn.GroupNorm(g, chans[-1], eps=eps)
        d.conv_out = nn.Conv2d(chans[-1], c.out_channels, 3, padding=1)

    @classmethod
    def from_folder(cls, folder: Path, dtype: torch.dtype, device: torch.device) -> NativeAutoencoderKL:
        c = _read_config(folder / "config.json")
        model = cls(c)  # on the CPU: a meta-device build would import torch._dynamo (~1 s) to initialise
        return _load_module(model, folder / "diffusion_pytorch_model.safetensors", dtype, device)

    def decode(self, z: torch.Tensor, return_dict: bool = False) -> tuple[torch.Tensor]:
        d = self.decoder
        x = d.conv_in(z)
        x = d.mid_block.resnets[0](x)
        x = d.mid_block.resnets[1](d.mid_block.attentions[0](x))
        for block in d.up_blocks:
            for resnet in block.resnets:
                x = resnet(x)
            if hasattr(block, "upsamplers"):
                x = block.upsamplers[0].conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return (d.conv_out(F.silu(d.conv_norm_out(x))),)


# --------------------------------------------------------------------------------------------- scheduler


class NativeFlowMatchEulerScheduler:
    """diffusers' `FlowMatchEulerDiscreteScheduler` for the default model's schedule: given sigmas and mu, the
    exponential time shift exp(mu) / (exp(mu) + (1 / sigma - 1)), timesteps = sigmas x num_train_timesteps, a
    terminal 0; `step` is x + (sigma_next - sigma) v in fp32, cast back to v's dtype."""

    CHECKPOINT_CLASS = "FlowMatchEulerDiscreteScheduler"

    def __init__(self, config: Config):
        c = config
        if not c.get("use_dynamic_shifting") or c.get("time_shift_type", "exponential") != "exponential" or any(
                c.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                   "stochastic_sampling", "invert_sigmas", "shift_terminal", "use_flow_sigmas")):
            raise ConfigError("the native scheduler runs the dynamic exponential shift only")
        self.config = c
        self.timesteps = self.sigmas = None
        self._index = 0

    @classmethod
    def from_folder(cls, folder: Path, dtype=None, device=None) -> NativeFlowMatchEulerScheduler:
        return cls(_read_config(folder / "scheduler_config.json"))

    @classmethod
    def from_config(cls, config: Config) -> NativeFlowMatchEulerScheduler:
        return cls(Config(config))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None,
                      mu: float | None = None) -> None:
        if sigmas is None or mu is None:
            raise ConfigError("the native scheduler takes the pipeline's sigmas and mu")
        s = np.array(sigmas).astype(np.float32)
        s = math.exp(mu) / (math.exp(mu) + (1 / s - 1) ** 1.0)
        s = torch.from_numpy(s).to(dtype=torch.float32, device=device)
        self.timesteps = s * self.config.num_train_timesteps
        self.sigmas = torch.cat([s, torch.zeros(1, device=s.device)])

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._index = begin_index

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             return_dict: bool = False) -> tuple[torch.Tensor]:
        sigma, sigma_next = self.sigmas[self._index], self.sigmas[self._index + 1]
        self._index += 1
        return ((sample.to(torch.float32) + (sigma_next - sigma) * model_output).to(model_output.dtype),)


# model_index.json class name -> the native class that loads it: `.from_folder(folder, dtype, device)`.
NATIVE_CLASSES: dict[str, Any] = {
    "CLIPTextModel": NativeCLIPTextModel, "T5EncoderModel": NativeT5EncoderModel,
    "CLIPTokenizer": NativeTokenizer, "T5Tokenizer": NativeTokenizer,
    "AutoencoderKL": NativeAutoencoderKL, "FlowMatchEulerDiscreteScheduler": NativeFlowMatchEulerScheduler,
}
