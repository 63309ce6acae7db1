"""Sequence-parallel attention: Ulysses, ring and their product (USP), on traceable functional collectives
(`torch.distributed._functional_collectives`), so a compiled block keeps them in its graph (no graph break).

Every op takes this rank's shard of the sequence, q, k, v (B, Ls, H, D) (the same Ls on every rank: a model pads
the sequence to a multiple of the degree), and returns the attention output of the shard's queries over the whole
sequence's keys, (B, Ls, H, D). Padded key positions are excluded by `kv_valid` (B, Ls * sp) bool over the
whole padded sequence (True = a real key), the same tensor on every rank; None = every key is real.

- Ulysses: an all-to-all turns the sequence-sharded (B, Ls, H, D) into head-sharded (B, Ls*U, H/U, D), attention
  runs on whole sequences with the engine's backend, and a second all-to-all turns it back. Head counts that the
  degree does not divide are padded with zero heads (their outputs are dropped).
- Ring: each rank keeps its queries; the K/V blocks pass around the ring (one permute a step, issued before the
  step's compute so the transfer overlaps it) and the partial outputs merge exactly by their log-sum-exp.
- USP: Ulysses inside each ring chunk, ring attention between the chunks.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
from torch import nn

from ditserve.parallel.state import ParallelState


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Equal all-to-all along dim 0 (x.shape[0] = the group size): chunk j goes to rank j; chunk j of the result
    came from rank j."""
    return funcol.wait_tensor(funcol.all_to_all_single(x.contiguous(), None, None, group))


def _send_next(x: torch.Tensor, group, rank: int, size: int) -> torch.Tensor:
    """The ring step: x goes to rank+1, the result is rank-1's x (same shape). An all-to-all with one non-empty
    split each way (what `funcol.permute_tensor` does), on the flattened tensor."""
    n = x.numel()
    send = [n if j == (rank + 1) % size else 0 for j in range(size)]
    recv = [n if j == (rank - 1) % size else 0 for j in range(size)]
    out = funcol.all_to_all_single(x.reshape(-1).contiguous(), recv, send, group)
    return out.view(x.shape)


def seq_to_heads(x: torch.Tensor, group, degree: int) -> torch.Tensor:
    """(B, Ls, Hp, D) sequence shard, Hp a multiple of `degree` -> (B, Ls*degree, Hp/degree, D): every rank's
    shard of this rank's head slice, in rank order."""
    B, Ls, Hp, D = x.shape
    x = x.reshape(B, Ls, degree, Hp // degree, D).permute(2, 0, 1, 3, 4)  # (U, B, Ls, h, D): chunk j -> rank j
    x = _all_to_all(x, group)  # (U, B, Ls, h, D): chunk j = rank j's sequence shard of my heads
    return x.permute(1, 0, 2, 3, 4).reshape(B, degree * Ls, Hp // degree, D)


def heads_to_seq(x: torch.Tensor, group, degree: int) -> torch.Tensor:
    """The inverse of `seq_to_heads`: (B, Ls*degree, h, D) -> (B, Ls, h*degree, D)."""
    B, L, h, D = x.shape
    x = x.reshape(B, degree, L // degree, h, D).permute(1, 0, 2, 3, 4)  # (U, B, Ls, h, D): shard j -> rank j
    x = _all_to_all(x, group)  # (U, B, Ls, h, D): chunk j = head slice j of my shard
    return x.permute(1, 2, 0, 3, 4).reshape(B, L // degree, degree * h, D)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  kv_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention with its log-sum-exp: q (B, Lq, H, D), k, v (B, Lk, H, D), kv_valid (B, Lk) bool or None ->
    (out (B, Lq, H, D) fp32, lse (B, H, Lq) fp32). A query whose keys are all masked gets out 0 and lse -inf (it
    then weighs nothing in `merge`).

    Fused kernels that return the log-sum-exp where there is one: on the CPU, PyTorch's flash attention (masks
    as an additive bias); on CUDA in fp16/bf16 without a mask, FlashAttention-2 (PyTorch's). Elsewhere (CUDA with
    a mask: only the padded ring chunks of lengths the degree does not divide) the scores in fp32 (`_math_lse`)."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D) views
    if q.device.type == "cpu":
        bias = None
        if kv_valid is not None:  # (B, 1, 1, Lk) additive, in q's dtype (the kernel's rule)
            bias = torch.zeros(kv_valid.shape, dtype=q.dtype, device=q.device).masked_fill(~kv_valid, float("-inf"))
            bias = bias[:, None, None, :]
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, attn_mask=bias)
    elif q.device.type == "cuda" and kv_valid is None and q.dtype in (torch.float16, torch.bfloat16):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(qt, kt, vt)[:2]
    else:
        return _math_lse(q, k, v, kv_valid)
    out, lse = out.transpose(1, 2).float(), lse.float()  # (B, Lq, H, D), (B, H, Lq)
    if kv_valid is not None:  # an item whose keys here are all masked: the kernel's lse is 0, not -inf
        empty = ~kv_valid.any(-1)  # (B,)
        lse = lse.masked_fill(empty[:, None, None], float("-inf"))
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out, lse


def _math_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              kv_valid: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_lse` in plain PyTorch, the scores (B, H, Lq, Lk) in fp32: the reference, and the masked CUDA
    path."""
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5  # (B, H, Lq, Lk)
    if kv_valid is not None:
        s = s.masked_fill(~kv_valid[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # (B, H, Lq)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])  # exp(-inf) = 0 where all masked
    return torch.einsum("bhqk,bkhd->bqhd", p, v.float()), lse


def merge(out: torch.Tensor, lse: torch.Tensor, out_i: torch.Tensor,
          lse_i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact online-softmax merge of two partial attentions over disjoint key sets: out (B, Lq, H, D), lse
    (B, H, Lq) each -> the attention over their union."""
    new = torch.logaddexp(lse, lse_i)  # (B, H, Lq)
    safe = torch.where(torch.isinf(new), 0.0, new)
    w, w_i = torch.exp(lse - safe), torch.exp(lse_i - safe)  # (B, H, Lq)
    out = out * w.transpose(1, 2)[..., None] + out_i * w_i.transpose(1, 2)[..., None]
    return out, new


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_valid: torch.Tensor | None, group,
                   rank: int, size: int) -> torch.Tensor:
    """Ring attention over `group` (size ranks; this one `rank`): q, k, v (B, Lr, H, D) this rank's chunk,
    kv_valid (B, Lr*size) or None -> (B, Lr, H, D) in q's dtype. Chunk j of the sequence is rank j's."""
    Lr = k.shape[1]
    kv = torch.stack((k, v))  # (2, B, Lr, H, D): one transfer a step
    out = lse = None
    for step in range(size):
        nxt = _send_next(kv, group, rank, size) if step < size - 1 else None  # in flight during the compute
        src = (rank - step) % size  # whose chunk kv holds now
        valid = None if kv_valid is None else kv_valid[:, src * Lr:(src + 1) * Lr]
        o, l = attention_lse(q, kv[0], kv[1], valid)
        out, lse = (o, l) if out is None else merge(out, lse, o, l)
        if nxt is not None:
            kv = nxt
    return out.to(q.dtype)


class SequenceParallelAttention(nn.Module):
    """Attention over a sequence sharded across the ulysses x ring ranks of `state`. Wraps the block's own
    `Attention` (the backend Ulysses runs on whole sequences; with a padded, masked sequence and a backend that
    takes no mask, `attention_lse` instead); forward(q, k, v, mask) like it, with q, k, v this
    rank's shard (B, Ls, H, D) and `mask` None or a key mask over the whole padded sequence, (B, Ls*sp) or
    (B, 1, 1, Ls*sp) bool (True = attend). `mask_source` (a `SequenceSharder`): where a call without a mask finds
    the current forward's, for blocks that pass attention none."""

    def __init__(self, inner: nn.Module, state: ParallelState, mask_source=None):
        super().__init__()
        self.inner = inner
        self.mask_source = mask_source
        cfg = state.config
        self.ulysses, self.ring = cfg.ulysses, cfg.ring
        self.ulysses_group, self.ring_group, self.ring_rank = state.ulysses_group, state.ring_group, state.ring_rank

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None and self.mask_source is not None:
            mask = self.mask_source.current_mask
        if mask is not None and mask.ndim == 4:
            mask = mask[:, 0, 0, :]  # (B, S)
        U, H = self.ulysses, q.shape[2]
        if U > 1:
            Hp = -(-H // U) * U
            if Hp > H:  # zero heads so that U divides the count; their outputs are dropped below
                q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, Hp - H)) for t in (q, k, v))
            q, k, v = (seq_to_heads(t, self.ulysses_group, U) for t in (q, k, v))  # (B, Ls*U, Hp/U, D)
        if self.ring > 1:
            out = ring_attention(q, k, v, mask, self.ring_group, self.ring_rank, self.ring)
        elif mask is not None and not getattr(self.inner, "supports_mask", True):  # a backend without masks
            out = attention_lse(q, k, v, mask)[0].to(q.dtype)
        else:
            out = self.inner(q, k, v, None if mask is None else mask[:, None, None, :])  # mask (B, 1, 1, S)
        if U > 1:
            out = heads_to_seq(out, self.ulysses_group, U)[:, :, :H]  # (B, Ls, H, D)
        return out

    def extra_repr(self) -> str:
        return f"ulysses={self.ulysses}, ring={self.ring}"
