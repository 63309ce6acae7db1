"""The models' sequence-parallel hooks: the token sequence sharded over the ulysses x ring ranks after the
embeddings and gathered before the output projection.

A family that supports sequence parallelism implements `enable_sequence_parallel(state)` on its DiT: it swaps the
attention of the blocks that run on the sharded sequence for `SequenceParallelAttention` (`swap_attention`) and
keeps a `SequenceSharder`, which its forward uses to shard the sequence, the RoPE tables and the key mask, and to
gather the result. Lengths the degree does not divide are padded at the end (zero tokens, masked as keys, their
outputs dropped at the gather), so every rank holds the same number of tokens.
"""

from __future__ import annotations

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn

from ditserve.errors import ConfigError
from ditserve.parallel.attention import SequenceParallelAttention
from ditserve.parallel.state import ParallelState


class SequenceSharder:
    """Shards and gathers a sequence of S tokens over the `state.sp` ranks of this rank's sequence group: each
    holds Ls = ceil(S / sp) tokens (rank j the tokens [j*Ls, (j+1)*Ls) of the sequence padded to sp*Ls)."""

    def __init__(self, state: ParallelState):
        self.sp, self.rank, self.group = state.sp, state.sp_rank, state.sp_group
        # The current forward's key mask over the padded sequence, for models whose blocks call attention without
        # one (`swap_attention(..., sharder)` reads it): set by the model's prepare, eagerly, once a forward.
        self.current_mask: torch.Tensor | None = None

    def local_len(self, S: int) -> int:
        return -(-S // self.sp)

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """x with S tokens along `dim` -> this rank's Ls tokens (zero padding past S)."""
        S = x.shape[dim]
        Ls = self.local_len(S)
        if Ls * self.sp > S:
            pad = [0, 0] * (x.ndim - 1 - dim % x.ndim) + [0, Ls * self.sp - S]
            x = F.pad(x, pad)
        return x.narrow(dim, self.rank * Ls, Ls)

    def key_mask(self, S: int, B: int, mask: torch.Tensor | None, device) -> torch.Tensor | None:
        """The key mask over the whole padded sequence, (B, sp*Ls) bool (True = a real key), from the model's
        own mask over S tokens ((B, S) or (B, 1, 1, S) bool, or None); None when nothing is masked."""
        pad = self.local_len(S) * self.sp - S
        if mask is not None and mask.ndim == 4:
            mask = mask[:, 0, 0, :]  # (B, S)
        if pad == 0:
            return mask
        if mask is None:
            mask = torch.ones(B, S, dtype=torch.bool, device=device)
        return F.pad(mask, (0, pad), value=False)  # (B, sp*Ls)

    def joint_key_mask(self, parts: list[tuple[int, torch.Tensor | None]], B: int, device) -> torch.Tensor | None:
        """The key mask (B, sp * sum(Ls_i)) of a joint sequence whose parts are sharded each on its own and joined
        per rank as [part 0's shard, part 1's shard, ...]. parts: (S_i, the part's own key mask (B, S_i) bool or
        None) each. None when nothing is masked or padded."""
        if all(m is None and self.local_len(S) * self.sp == S for S, m in parts):
            return None
        blocks = []
        for S, m in parts:
            if m is None:
                m = torch.ones(B, S, dtype=torch.bool, device=device)
            m = F.pad(m.to(torch.bool), (0, self.local_len(S) * self.sp - S), value=False)  # (B, sp*Ls_i)
            blocks.append(m.view(B, self.sp, -1))
        return torch.cat(blocks, dim=2).reshape(B, -1)  # rank j's block: [part 0 | part 1 | ...]

    def gather(self, x: torch.Tensor, S: int, dim: int = 1) -> torch.Tensor:
        """Every rank's shard (..., Ls, ...) -> the whole sequence (..., S, ...), the same on every rank."""
        full = funcol.wait_tensor(funcol.all_gather_single(x.contiguous(), dim, self.group))
        return full.narrow(dim, 0, S)


def swap_attention(blocks: nn.Module, state: ParallelState, sharder: SequenceSharder | None = None) -> int:
    """Every `Attention` module under `blocks` wrapped in a `SequenceParallelAttention`; -> how many. With
    `sharder`, a call without a mask uses `sharder.current_mask` (for blocks that pass attention no mask)."""
    from ditserve.ops.attention import Attention

    targets = [(parent, name, child) for parent in blocks.modules() for name, child in parent.named_children()
               if isinstance(child, Attention)]
    for parent, name, child in targets:
        setattr(parent, name, SequenceParallelAttention(child, state, sharder))
    return len(targets)


def enable_sequence_parallel(transformer: nn.Module, state: ParallelState) -> None:
    """Make `transformer` run on this rank's shard of the sequence (its family's `enable_sequence_parallel`).
    Raises ConfigError for a family without it, or with a DiT cache mounted (its per-step decision would be
    taken on each rank's shard, differently)."""
    hook = getattr(transformer, "enable_sequence_parallel", None)
    if hook is None:
        raise ConfigError(f"--parallel: {type(transformer).__name__} has no sequence parallelism (ulysses, ring) "
                          f"yet; use cfg=2 alone")
    if getattr(transformer, "block_cache", None) is not None:
        raise ConfigError("--parallel: ulysses/ring cannot run with --cache (the cache's per-step decision would "
                          "differ between the ranks' shards)")
    hook(state)
