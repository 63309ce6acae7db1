"""Functions the parallel tests run on every spawned rank (module-level, so the spawned processes import them)."""

from __future__ import annotations

import torch
import torch._dynamo
import torch.distributed as dist

from ditserve.ops.attention import Attention
from ditserve.parallel.attention import SequenceParallelAttention


def reference_attention(q, k, v, kv_valid):
    """Single-process attention in fp32: (B, S, H, D) each, kv_valid (B, S) or None."""
    mask = None if kv_valid is None else kv_valid[:, None, None, :]
    return Attention("sdpa")(q, k, v, mask)


def shard(x, state, sp):
    """This rank's equal shard along dim 1 (a multiple of sp long)."""
    n = x.shape[1] // sp
    return x[:, state.sp_rank * n:(state.sp_rank + 1) * n]


def attention_cases(state, cases):
    """Each (plan, q, k, v, kv_valid, compile_[, maskless]) of `cases` on this world (the groups of each plan built in
    turn); -> [(the gathered output, graph breaks or None)] per case."""
    from ditserve.parallel import ParallelConfig
    from ditserve.parallel.state import init_parallel

    results = []
    for plan, *args in cases:
        results.append(attention_case(init_parallel(ParallelConfig.parse(plan), "cpu"), *args))
    return results


class MasklessBackend(torch.nn.Module):
    """An attention backend that takes no mask (as flash-attn's): a mask reaching it fails the test."""

    supports_mask = False

    def forward(self, q, k, v, mask=None):
        assert mask is None, "a mask reached a backend that takes none"
        return reference_attention(q, k, v, None)


def attention_case(state, q, k, v, kv_valid, compile_, maskless=False):
    """Every rank's shard through SequenceParallelAttention (over `MasklessBackend` with `maskless`); -> (the
    gathered output, graph breaks or None)."""
    sp = state.config.sp
    op = SequenceParallelAttention(MasklessBackend() if maskless else Attention("sdpa"), state)
    args = [shard(t, state, sp) for t in (q, k, v)]
    breaks = None
    if compile_:
        explain = torch._dynamo.explain(op)(*args, kv_valid)
        breaks = explain.graph_break_count
        out = torch.compile(op, fullgraph=True, backend="eager")(*args, kv_valid)
    else:
        out = op(*args, kv_valid)
    parts = [torch.empty_like(out) for _ in range(state.world_size)]
    dist.all_gather(parts, out.contiguous())
    full = torch.cat(parts[:sp], dim=1)  # the sp group of cfg rank 0 (the whole world here)
    return full, breaks


def generate_cases(state, cases):
    """Each (folder, plan, requests) of `cases` on this world: the plan's groups built, the engine loaded with
    it, the requests generated; -> [the frames of each request] per case (rank 0's)."""
    from ditserve.config import EngineConfig
    from ditserve.engine import Engine
    from ditserve.parallel import ParallelConfig
    from ditserve.parallel.state import init_parallel

    results = []
    for folder, plan, requests in cases:
        init_parallel(ParallelConfig.parse(plan), "cpu")
        engine = Engine.load(str(folder), EngineConfig(device="cpu", parallel=plan))
        results.append([out.frames for out in engine.generate(list(requests))])
    return results


def rank_one_dies(state):
    """Rank 1 exits at once; the others wait for it in a collective (which must not hang the run)."""
    import os

    if state.rank == 1:
        os._exit(3)
    dist.all_reduce(torch.ones(1))


def compiled_flux_case(state, config, weights, inputs):
    """A FLUX.1 transformer on this rank's shards, each block compiled whole (fullgraph, eager backend);
    -> (its output, the graph breaks of a double and a single block)."""
    from ditserve.models.flux import FluxTransformer
    from ditserve.parallel.sharding import enable_sequence_parallel

    model = FluxTransformer(config).eval()
    model.load_state_dict(weights)
    enable_sequence_parallel(model, state)
    with torch.no_grad():
        (img, txt), ctx = model.prepare(**inputs)
        cond = ctx.cond.mods
        breaks = [torch._dynamo.explain(model.double_blocks[0])(img, txt, cond[0], ctx.cos, ctx.sin).graph_break_count,
                  torch._dynamo.explain(model.single_blocks[0])(torch.cat((txt, img), 1), cond[-1], ctx.cos,
                                                                ctx.sin).graph_break_count]
        for block in (*model.double_blocks, *model.single_blocks):
            block.compile(fullgraph=True, backend="eager")
        out = model(**inputs)
        # A second forward (new values: hidden states, and the key mask the blocks read) reuses the graphs.
        again = dict(inputs, hidden_states=inputs["hidden_states"] * 0.5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            model(**again)
        return out, breaks

