"""Tiny, offline, random-weight checkpoints for tests and the packaged default model.

`build_tiny_flux_pipeline(path)` writes a complete diffusers-format FLUX.1 folder (model_index.json plus
transformer / vae / text_encoder / tokenizer / text_encoder_2 / tokenizer_2 / scheduler) a few MB in size,
built from diffusers' and transformers' own classes and saved with diffusers' own `save_pretrained`, so that
diffusers' `FluxPipeline.from_pretrained` and our loader read the very same files.

Nothing here touches the network: the tokenizers are made from a small built-in vocabulary.
"""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Words given whole-word tokens in the tiny tokenizers; anything else falls back to characters (CLIP: bytes).
_WORDS = (
    "a an the of on in with and at to by for from is are this that photo picture painting image drawing "
    "red green blue yellow orange purple pink black white gray brown gold silver dark light bright "
    "circle square triangle star line dot background sky sea sun moon tree flower house city street road "
    "cat dog bird horse fish person man woman child face hand car boat train mountain river forest field "
    "small big large tiny old new beautiful simple detailed colorful night day morning sunset snow rain "
    "hello world sign holding wearing sitting standing under over"
).split()

# CLIP's tokens for unseen text are single bytes; T5's are characters from this set.
_T5_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'\"-:;()"

TINY_CLIP_MAX_LENGTH = 77  # CLIP's context length, as in FLUX's CLIP-L


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte-level BPE's reversible map from bytes to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the adjacent pair of lowest rank (leftmost first) until none of
    the pairs is a merge."""
    while len(symbols) > 1:
        found = [(ranks[pair], i) for i, pair in enumerate(zip(symbols, symbols[1:])) if pair in ranks]
        if not found:
            break
        _, i = min(found)
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2:]
    return symbols


def _write_clip_tokenizer(dir: Path, whole_words: bool = False) -> None:
    """vocab.json + merges.txt for CLIPTokenizer: all 256 byte symbols (alone and word-final), merges for each
    of `_WORDS`, then the two special tokens (last, as in CLIP).

    whole_words=False: each word's merges build it left to right ((w o) r) d</w>. Another word's earlier merge
    can cut that short (b a c k g r o u n d: "g r" of "green" applies first), so some words end up as a few
    pieces; the test checkpoints keep these token ids. whole_words=True: merges are added where the encoding
    with the merges so far still splits the word, so every word is one token (the packaged default model).
    """
    byte_chars = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab.setdefault(tok, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        if whole_words:
            # A merge appended last applies only where no earlier one does: words already whole stay whole.
            while len(pieces := _bpe(symbols, ranks)) > 1:
                ranks.setdefault((pieces[0], pieces[1]), len(ranks))
                vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            continue
        while len(symbols) > 1:
            ranks.setdefault((symbols[0], symbols[1]), len(ranks))
            vocab.setdefault(symbols[0] + symbols[1], len(vocab))
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    merges = [f"{a} {b}" for a, b in ranks]  # in rank order
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    (dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": TINY_CLIP_MAX_LENGTH, **special}, indent=2))
    (dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def _write_t5_tokenizer(dir: Path, model_max_length: int = 512) -> None:
    """tokenizer.json (a `tokenizers` Unigram model laid out like T5's: <pad>=0, </s>=1, <unk>=2, Metaspace
    pre-tokenizer, "</s>" appended) for T5TokenizerFast / T5Tokenizer."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    # Whole words score higher than their spelling out in characters, so the Viterbi split prefers them.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [("▁" + w, -5.0) for w in _WORDS]
    pieces += [("▁" + c, -9.0) for c in _T5_CHARS if "▁" + c not in dict(pieces)]
    pieces += [(c, -10.0) for c in _T5_CHARS]
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(dir / "tokenizer.json"))
    special = {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    (dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "model_max_length": model_max_length, "extra_ids": 0, **special},
        indent=2))
    (dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2))


def make_tiny_tokenizers(dir: str | Path, whole_words: bool = False,
                         t5_max_length: int = 512) -> tuple[Path, Path]:
    """Write a tiny CLIP tokenizer to `dir/tokenizer` and a tiny T5 tokenizer to `dir/tokenizer_2`.

    Both load offline with `from_pretrained` (CLIPTokenizer / T5TokenizerFast). Returns the two folders.
    T5 gives every built-in word one token; CLIP does so with `whole_words` (see `_write_clip_tokenizer`).
    `t5_max_length` is the T5 tokenizer's model_max_length, which caps the pipeline's default T5 length.
    """
    dir = Path(dir)
    _write_clip_tokenizer(dir / "tokenizer", whole_words)
    _write_t5_tokenizer(dir / "tokenizer_2", model_max_length=t5_max_length)
    return dir / "tokenizer", dir / "tokenizer_2"


# FLUX.1's scheduler configs (scheduler/scheduler_config.json of the two releases).
FLUX_DEV_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                          max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
                              max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


# Gain on the transformer's conditioning path (timestep/guidance/pooled-text embedders and AdaLN modulation
# layers). At PyTorch's default Linear init the modulations are small, so a random tiny model draws nearly
# the same image for every prompt and guidance (PSNR > 40 dB between them) and a parity test could not tell
# a pipeline that drops the conditioning from one that passes it. x3 makes prompt and guidance change the
# image as much as the seed does (PSNR ~20 dB), with no saturation.
CONDITIONING_GAIN = 3.0


@torch.no_grad()
def _amplify_conditioning(transformer: torch.nn.Module, is_conditioning, gain: float) -> None:
    """Multiply the weight matrices of every module `is_conditioning(name, module)` selects by `gain`."""
    for name, module in transformer.named_modules():
        if is_conditioning(name, module):
            for p in module.parameters():
                if p.ndim >= 2:
                    p.mul_(gain)


def _tiny_flux_vae(sample_size: int):
    """A tiny AutoencoderKL with FLUX.1's layout: 4 levels (8x downsampling), 16 latent channels, no quant convs,
    FLUX's scaling/shift factors, natural size `sample_size` (the FLUX.1 VAE is also Z-Image's)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 16, 16, 16), layers_per_block=1,
        latent_channels=16, norm_num_groups=4, sample_size=sample_size, scaling_factor=0.3611,
        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


@torch.no_grad()
def _perturb_zeros(module: torch.nn.Module, generator: torch.Generator, std: float = 0.02) -> None:
    """Give every all-zero weight matrix small random values, so no layer is an exact no-op (a zero output
    projection would make every image the same constant)."""
    for p in module.parameters():
        if p.ndim >= 2 and not p.any():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)


def build_tiny_flux_pipeline(path: str | Path, *, guidance_embeds: bool = True, seed: int = 0,
                             sample_size: int = 256) -> Path:
    """Build a tiny random FLUX.1 pipeline with diffusers' classes and save it (safetensors) at `path`.

    Architecture (FLUX.1's layout at toy widths): a FluxTransformer2DModel with 2 double and 2 single blocks,
    2 heads of 16 (rope axes 4+6+6), in_channels 64 (= 4 x 16 latent channels, the 2x2 packing); an
    AutoencoderKL with 4 levels (8x downsampling, like FLUX's), 16 latent channels, no quant convs, FLUX's
    scaling/shift factors, natural size `sample_size`; a 2-layer CLIPTextModel (width 32 = the transformer's
    pooled_projection_dim) and a 2-layer T5EncoderModel (d_model 32 = joint_attention_dim); FLUX-dev's
    dynamic-shifting scheduler config with `guidance_embeds`, schnell's without.

    Random weights at PyTorch's default init, except: the transformer's conditioning path is amplified
    (`CONDITIONING_GAIN`) so prompt and guidance visibly change the image, and any all-zero weight matrix
    gets small noise. Deterministic: the same `seed` gives byte-identical files. Returns `path`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel
    from transformers import T5TokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok_dir = path / "_tokenizers_src"
    make_tiny_tokenizers(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir / "tokenizer")
    tokenizer_2 = T5TokenizerFast.from_pretrained(tok_dir / "tokenizer_2")

    text_width = 32
    torch.manual_seed(seed)  # every constructor below draws its init from the global generator
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=text_width, pooled_projection_dim=text_width,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    vae = _tiny_flux_vae(sample_size)
    clip_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=TINY_CLIP_MAX_LENGTH, hidden_act="quick_gelu",
        projection_dim=text_width, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(clip_config)
    t5_config = T5Config(
        vocab_size=len(tokenizer_2), d_model=text_width, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)
    text_encoder_2 = T5EncoderModel(t5_config)
    scheduler = FlowMatchEulerDiscreteScheduler(**(FLUX_DEV_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER))

    _amplify_conditioning(transformer, lambda name, module: name == "time_text_embed"
                          or type(module).__name__.startswith("AdaLayerNorm"), CONDITIONING_GAIN)
    gen = torch.Generator().manual_seed(seed + 1)
    for module in (transformer, vae, text_encoder, text_encoder_2):
        _perturb_zeros(module, gen)
        module.eval()

    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    for f in sorted(tok_dir.rglob("*"), reverse=True):  # the scratch tokenizer sources
        f.unlink() if f.is_file() else f.rmdir()
    tok_dir.rmdir()
    return path


# --------------------------------------------------------------------------------------------------------------
# Z-Image (Tongyi-MAI/Z-Image-Turbo's layout: a single-stream ZImageTransformer2DModel, FLUX.1's VAE, a Qwen3
# text encoder whose second-to-last hidden state is the caption, a Qwen2 byte-level BPE tokenizer with Qwen3's
# chat template, Turbo's fixed-shift flow-matching scheduler).

# Qwen3's special tokens in Qwen's order (<|endoftext|> first), then the two reasoning markers Qwen3 adds as
# ordinary (non-special) added tokens.
_QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_QWEN_THINK_TOKENS = ("<think>", "</think>")

# Qwen3's chat template, cut down to the system / user / assistant turns (no tools, no reasoning_content
# bookkeeping), with its generation prompt verbatim: the assistant header, plus an empty think block only when
# enable_thinking is False. ZImagePipeline renders [{"role": "user", "content": P}] with
# add_generation_prompt=True, enable_thinking=True: "<|im_start|>user\nP<|im_end|>\n<|im_start|>assistant\n".
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}\n"
    "    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if message.content is string %}\n"
    "        {%- set content = message.content %}\n"
    "    {%- else %}\n"
    "        {%- set content = '' %}\n"
    "    {%- endif %}\n"
    "    {%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == 'assistant' %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n"
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
)

TINY_QWEN_MAX_LENGTH = 512  # the tokenizer's model_max_length (ZImagePipeline pads every prompt to 512)


def make_tiny_qwen_tokenizer(dir: str | Path | None = None):
    """A tiny Qwen2 byte-level BPE tokenizer (transformers' `Qwen2Tokenizer`: NFC, Qwen2's split regex,
    byte-level pre-tokenizer and decoder), saved to `dir` if given. Returns the tokenizer.

    Vocabulary: the 256 byte symbols in GPT-2's order (ids 0-255), merges that make each of `_WORDS` one token
    both bare and with its leading space ("cat", "Ġcat"; merges appended only where the encoding so far still
    splits the form, as in `_write_clip_tokenizer(whole_words=True)`; 384 merges), then Qwen's special tokens
    <|endoftext|>, <|im_start|>, <|im_end|> (ids 640-642) and the added tokens <think>, </think> (643, 644): 645
    in all. Anything else falls back to bytes, so every string encodes. Pad <|endoftext|>, eos <|im_end|>, no
    bos/unk, model_max_length 512, and `QWEN3_CHAT_TEMPLATE`, as Z-Image-Turbo's Qwen3 tokenizer is configured.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    byte_to_char = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in byte_to_char.values():
        vocab.setdefault(c, len(vocab))
    ranks: dict[tuple[str, str], int] = {}
    for word in _WORDS:
        for form in (word, " " + word):
            symbols = [byte_to_char[b] for b in form.encode("utf-8")]
            while len(pieces := _bpe(symbols, ranks)) > 1:
                ranks.setdefault((pieces[0], pieces[1]), len(ranks))
                vocab.setdefault(pieces[0] + pieces[1], len(vocab))
    for token in _QWEN_SPECIAL_TOKENS + _QWEN_THINK_TOKENS:  # fixed ids after the merges, in Qwen's order
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab, merges=list(ranks), unk_token=None, bos_token=None, eos_token="<|im_end|>",
        pad_token="<|endoftext|>", additional_special_tokens=list(_QWEN_SPECIAL_TOKENS),
        model_max_length=TINY_QWEN_MAX_LENGTH, chat_template=QWEN3_CHAT_TEMPLATE, clean_up_tokenization_spaces=False)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in _QWEN_THINK_TOKENS])
    if dir is not None:
        tokenizer.save_pretrained(dir)
    return tokenizer


# Z-Image-Turbo's scheduler config (scheduler/scheduler_config.json): a fixed shift of 3, no dynamic shifting.
Z_IMAGE_TURBO_SCHEDULER = dict(num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0)

# Gain on the Z-Image transformer's conditioning path: the timestep embedder and every adaLN modulation layer
# (the blocks' scale/gate and the final layer's scale), as `CONDITIONING_GAIN` does for FLUX. The prompt reaches
# the image only through attention, whose output is RMS-normalised and then gated by the modulation, so at
# PyTorch's default init two different prompts give images 40-45 dB apart; x4 brings that to 23-26 dB (and
# CFG with a negative prompt vs none to ~20 dB) over build seeds 0-3, with under 6% of pixels clipped.
Z_IMAGE_CONDITIONING_GAIN = 4.0


def build_tiny_z_image_pipeline(path: str | Path, *, seed: int = 0, sample_size: int = 128) -> Path:
    """Build a tiny random Z-Image pipeline with diffusers' and transformers' classes and save it (safetensors)
    at `path` with `ZImagePipeline.save_pretrained`, so diffusers' `ZImagePipeline.from_pretrained` and our
    loader read the very same files.

    Architecture (Z-Image-Turbo's layout at toy widths): a ZImageTransformer2DModel with 2 main layers, 1 noise
    and 1 context refiner layer, width 64 = 2 heads of 32 (rope axes 8+12+12, lengths 1536/64/64 as the real
    one, theta 256), 2x2 patches of 16 latent channels, cap_feat_dim 32, t_scale 1000; an AutoencoderKL with
    FLUX.1's layout (`_tiny_flux_vae`), natural size `sample_size`; a 3-layer Qwen3Model (hidden 32, 2 query
    heads and 1 kv head of 16, MLP 64, Qwen3's rope theta 1e6; the pipeline reads hidden_states[-2], the output
    of layer 2, before the final norm);
    `make_tiny_qwen_tokenizer`; Turbo's scheduler (`Z_IMAGE_TURBO_SCHEDULER`).

    Random weights at PyTorch's default init, except: the transformer's conditioning path is amplified
    (`Z_IMAGE_CONDITIONING_GAIN`) so prompt, guidance and timestep visibly change the image, and every all-zero
    weight (the transformer's x/cap pad tokens, shape (1, 64)) gets small noise. Deterministic: the same `seed`
    gives byte-identical files. Returns `path`.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_qwen_tokenizer()

    text_width = 32
    torch.manual_seed(seed)  # every constructor below draws its init from the global generator
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, cap_feat_dim=text_width, axes_dims=(8, 12, 12), axes_lens=(1536, 64, 64),
        rope_theta=256.0, t_scale=1000.0)
    vae = _tiny_flux_vae(sample_size)
    qwen_config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=text_width, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=TINY_QWEN_MAX_LENGTH,
        rms_norm_eps=1e-6, rope_theta=1_000_000.0, tie_word_embeddings=False, use_cache=False,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    text_encoder = Qwen3Model(qwen_config)
    scheduler = FlowMatchEulerDiscreteScheduler(**Z_IMAGE_TURBO_SCHEDULER)

    _amplify_conditioning(transformer, lambda name, module: name == "t_embedder"
                          or name.endswith("adaLN_modulation"), Z_IMAGE_CONDITIONING_GAIN)
    gen = torch.Generator().manual_seed(seed + 1)
    for module in (transformer, vae, text_encoder):
        _perturb_zeros(module, gen)
        module.eval()

    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def reference_z_image(path: str | Path, prompt: str | list[str], *, height: int, width: int, steps: int,
                      guidance: float, seed: int, negative_prompt: str | list[str] | None = None):
    """Images from diffusers' own `ZImagePipeline` loaded from the folder `path`, on CPU in fp32, as uint8
    (N, H, W, 3): the reference our Z-Image pipeline is compared against.

    Noise from `torch.Generator("cpu").manual_seed(seed)`; `guidance` is ZImagePipeline's guidance_scale (CFG
    runs for any value > 0, with `negative_prompt` or ""); output_type="np", then round(x * 255).
    """
    import numpy as np
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(path, dtype=torch.float32).to("cpu")
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                  negative_prompt=negative_prompt, generator=torch.Generator("cpu").manual_seed(seed),
                  output_type="np").images
    return np.clip(np.round(np.asarray(images, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages of live op outputs: `live` now and its maximum, `peak`.

    Every tensor an op returns (views and in-place results included) is registered once; a storage counts from its
    first registered tensor until its last registered tensor is freed (weakref.finalize). Storages are keyed by
    their StorageImpl, so meta tensors (which have no data pointer) count too. Inputs and weights made before the
    mode count nothing; internal workspaces of kernels are not op outputs and are not seen."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages: dict[int, list[int]] = {}  # storage key -> [live tensors, bytes]
        self._tensors: set[int] = set()  # ids of the registered, still alive tensors

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and id(t) not in self._tensors:
                self._register(t)
        return out

    def _register(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        entry = self._storages.get(key)
        if entry is None:
            entry = self._storages[key] = [0, storage.nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        self._tensors.add(id(t))
        weakref.finalize(t, self._release, id(t), key)

    def _release(self, tensor_id: int, key: int) -> None:
        self._tensors.discard(tensor_id)
        entry = self._storages[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self._storages[key]
            self.live -= entry[1]
