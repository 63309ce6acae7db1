"""CUDA graphs for the denoise forward (`ditserve.cuda_graphs`, EngineConfig.cuda_graphs).

On the CPU: the setting's resolution and refusals, the flag, that a CPU pipeline calls its transformer
directly, and how a block range's context reaches its graph. gpu-marked: `GraphedForward` warms up, captures
once per signature, replays with new inputs exactly as the plain call computes, hands out outputs that later
replays do not overwrite, respects `max_graphs`; a FLUX transformer with per-step conditioning replays exactly; a
pipeline makes the same image with graphs on and off, with and without a block cache (whose block ranges are
graphed).
"""

from __future__ import annotations

import pytest
import torch

from ditserve.cli import build_parser
from ditserve.config import ConfigError, EngineConfig
from ditserve.cuda_graphs import GraphedForward, resolve_cuda_graphs
from ditserve.engine_args import check_engine, engine_from_args
from ditserve.loader import load_model
from ditserve.pipelines.flux import FluxPipeline
from ditserve.testing import build_tiny_flux_pipeline

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_unknown_setting_is_a_config_error():
    with pytest.raises(ConfigError, match="cuda_graphs"):
        EngineConfig(cuda_graphs="sometimes")


def test_resolution():
    # auto and on: CUDA, with no cache; on also with ditserve's block cache (graphed by block range; auto leaves
    # it ungraphed: not measured yet); auto then graphs only small shapes, per call (see the admit tests)
    assert resolve_cuda_graphs("auto", CUDA, cache=None)
    assert not resolve_cuda_graphs("auto", CUDA, cache="ditserve")
    for cache in (None, "ditserve"):
        assert not resolve_cuda_graphs("auto", CPU, cache=cache)
        assert resolve_cuda_graphs("on", CUDA, cache=cache)
        assert not resolve_cuda_graphs("off", CUDA, cache=cache)
        with pytest.raises(ConfigError, match="not a CUDA GPU"):
            resolve_cuda_graphs("on", CPU, cache=cache)
    assert not resolve_cuda_graphs("auto", CUDA, cache="cache-dit")  # its hooks decide inside the blocks
    with pytest.raises(ConfigError, match="cache-dit cache backend decides inside"):
        resolve_cuda_graphs("on", CUDA, cache="cache-dit")


def test_auto_admits_small_forwards_only(folder):
    """The pipeline's size rule: "auto" admits a forward of <= AUTO_MAX_TOKENS image tokens over its rows (CFG's
    two branches in one forward count twice); "on" has no rule. Checked on the CPU through the admit callable the
    pipeline hands to GraphedForward (bind_forward is re-run with a CUDA-like wrapper forced)."""
    from ditserve.config import SamplingParams
    from ditserve.cuda_graphs import AUTO_MAX_TOKENS

    pipe = _pipe(folder, device="cpu", dtype="fp32")
    assert pipe.forward is pipe.transformer  # CPU: never graphed
    pipe.engine = EngineConfig(device="cpu", dtype="fp32", cuda_graphs="auto")
    import ditserve.pipelines.base as base

    real = base.resolve_cuda_graphs
    base.resolve_cuda_graphs = lambda *a, **k: True
    try:
        pipe.bind_forward()
    finally:
        base.resolve_cuda_graphs = real
    admit = pipe.forward.admit
    assert pipe.forward_tokens(SamplingParams(prompt="", height=1024, width=1024)) == 4096
    pipe._forward_tokens = AUTO_MAX_TOKENS
    assert admit()
    pipe._forward_tokens = AUTO_MAX_TOKENS + 1
    assert not admit()
    # denoise sets the size: 512x512 at 2 outputs = 2 * 1024 tokens
    pipe.generate(SamplingParams(prompt="a", height=64, width=64, steps=1, seed=0, num_images=2), progress=False)
    assert pipe._forward_tokens == 2 * (64 // 16) ** 2


def test_flag_and_check_engine():
    args = build_parser().parse_args(["generate", "--prompt", "a prompt", "--cuda-graphs", "off"])
    assert engine_from_args(args).cuda_graphs == "off"
    args = build_parser().parse_args(["generate", "--prompt", "a prompt"])
    assert engine_from_args(args).cuda_graphs == "auto"
    with pytest.raises(ConfigError, match="--cuda-graphs on"):
        check_engine(EngineConfig(device="cpu", cuda_graphs="on"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("graphs"), guidance_embeds=True, seed=5)


def _pipe(folder, **engine_kw) -> FluxPipeline:
    engine = EngineConfig(**engine_kw)
    loaded = load_model(str(folder), engine)
    return FluxPipeline(loaded.components, engine, FluxPipeline.spec_for(loaded.name, loaded.components))


def test_cpu_pipeline_calls_its_transformer(folder):
    pipe = _pipe(folder, device="cpu", dtype="fp32")
    assert pipe.forward is pipe.transformer


# ------------------------------------------------------------------------------------------------- CUDA


class _Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 8, device="cuda")
        self.calls = 0

    def forward(self, x, *, shift=None):
        self.calls += 1  # counts Python calls: a replay makes none
        y = torch.relu(self.lin(x))
        return y if shift is None else y + shift


@pytest.mark.gpu
def test_warmup_capture_replay_are_exact():
    torch.manual_seed(0)
    f = _Affine()
    g = GraphedForward(f, warmup=1)
    xs = [torch.randn(4, 16, device="cuda") for _ in range(5)]
    outs = [g(x, shift=torch.full((8,), float(i), device="cuda")) for i, x in enumerate(xs)]
    # call 1 plain, call 2 captures (one side-stream call, one captured call), calls 3-5 replay
    assert f.calls == 1 + 2 and len(g.graphs) == 1 and next(iter(g.graphs.values())).replays == 4
    for i, (x, out) in enumerate(zip(xs, outs)):
        assert torch.equal(out, f(x, shift=torch.full((8,), float(i), device="cuda")))
    # outputs are copies: the later replays did not overwrite the earlier outputs
    assert not torch.equal(outs[2], outs[3])


@pytest.mark.gpu
def test_a_new_signature_evicts_the_least_recently_used_graph():
    f = _Affine()
    g = GraphedForward(f, warmup=1, max_graphs=2)
    for rows in (4, 4, 4, 8, 8, 8, 4, 16, 16, 16):
        x = torch.randn(rows, 16, device="cuda")
        assert torch.equal(g(x), f(x))
    assert len(g.graphs) == 2  # rows 8 (least recently replayed) was evicted for rows 16
    assert sorted(k[1][0][1][0] for k in g.graphs) == [4, 16]
    assert g.memory_bytes > 0 and g.pool is not None
    assert g.release_idle(0.0) == 2 and not g.graphs and g.memory_bytes == 0


@pytest.mark.gpu
def test_admit_false_runs_without_a_graph():
    f, ok = _Affine(), [False]
    g = GraphedForward(f, warmup=1, admit=lambda: ok[0])
    x = torch.randn(4, 16, device="cuda")
    for _ in range(3):
        assert torch.equal(g(x), f(x))
    assert not g.graphs
    ok[0] = True
    g(x)
    assert len(g.graphs) == 1


@pytest.mark.gpu
def test_bypassed_calls_are_neither_counted_nor_captured():
    f, skip = _Affine(), [True]
    g = GraphedForward(f, bypass=lambda: skip[0], warmup=1)
    x = torch.randn(4, 16, device="cuda")
    for _ in range(3):
        g(x)
    assert not g.graphs and not g.calls and f.calls == 3
    skip[0] = False
    g(x), g(x)
    assert len(g.graphs) == 1


@pytest.mark.gpu
def test_pipeline_dummy_warmup_does_not_capture(folder):
    from ditserve.config import SamplingParams
    from ditserve.dummy_run import dummy_run

    pipe = _pipe(folder, device="cuda", dtype="bf16", cuda_graphs="on")
    with dummy_run():
        pipe.generate(SamplingParams(prompt="warm", height=64, width=64, steps=3, seed=0), progress=False)
    assert not pipe.forward.graphs and not pipe.forward.calls


@pytest.mark.gpu
def test_pipeline_image_is_the_same_with_and_without_graphs(folder):
    """A FLUX transformer fed a new conditioning (a FluxConditioning dataclass) and new latents every step."""
    pipe = _pipe(folder, device="cuda", dtype="bf16", cuda_graphs="on")
    assert isinstance(pipe.forward, GraphedForward)
    params = dict(prompt="a red circle", height=64, width=96, steps=4, seed=3)
    from ditserve.config import SamplingParams

    with_graphs = pipe.generate(SamplingParams(**params), progress=False).images[0]
    graphs = next(iter(pipe.forward.graphs.values()))
    assert graphs.replays == 4 - 1  # step 1 plain; step 2 captured, then replayed like steps 3 and 4
    plain = _pipe(folder, device="cuda", dtype="bf16", cuda_graphs="off")
    assert plain.forward is plain.transformer
    without = plain.generate(SamplingParams(**params), progress=False).images[0]
    import numpy as np

    assert np.array_equal(np.asarray(with_graphs), np.asarray(without))


@pytest.mark.gpu
def test_pipeline_auto_graphs_a_small_shape_and_reports_its_memory(folder):
    from ditserve.config import SamplingParams

    pipe = _pipe(folder, device="cuda", dtype="bf16")  # cuda_graphs "auto"
    out = pipe.generate(SamplingParams(prompt="a", height=64, width=64, steps=3, seed=0), progress=False)
    assert len(pipe.forward.graphs) == 1 and pipe.graph_memory_bytes > 0
    again = pipe.generate(SamplingParams(prompt="a", height=64, width=64, steps=3, seed=0), progress=False)
    assert (out.frames == again.frames).all()
    # the forward's graph and the text encoders' (FLUX.1 graphs its CLIP and T5)
    assert pipe.release_idle_graphs(0.0) >= 1 and pipe.graph_memory_bytes == 0 and not pipe.forward.graphs


def test_graphed_blocks_pass_a_dataclass_context_as_its_fields():
    """GraphedBlocks hands the graph a block context's tensors as leaves (copied into a capture) and its other
    fields as part of the key, and rebuilds the same context for `run_blocks` (on the CPU it runs plainly)."""
    import dataclasses

    from torch.utils import _pytree as pytree

    from ditserve.cuda_graphs import GraphedBlocks, _to_tree

    @dataclasses.dataclass
    class Inner:
        mods: tuple
        scale: float

    @dataclasses.dataclass
    class Ctx:
        inner: Inner
        cos: torch.Tensor
        mask: torch.Tensor | None
        grid: tuple[int, int, int]

    ctx = Ctx(Inner((torch.ones(2), torch.zeros(3)), 0.5), torch.arange(4.0), None, (1, 2, 3))
    leaves = pytree.tree_leaves(_to_tree(ctx))
    others = [x for x in leaves if not isinstance(x, torch.Tensor)]
    assert len(leaves) - len(others) == 3 and Ctx in others and 0.5 in others and 3 in others
    seen = []

    def run_blocks(state, c, start, stop):
        seen.append((c, start, stop))
        return tuple(x + c.inner.scale * stop for x in state)

    graphed = GraphedBlocks(run_blocks)
    out = graphed((torch.zeros(2),), ctx, 1, 4)
    assert torch.equal(out[0], torch.full((2,), 2.0)) and seen[0][1:] == (1, 4)
    rebuilt = seen[0][0]
    assert type(rebuilt) is Ctx and type(rebuilt.inner) is Inner and rebuilt.grid == (1, 2, 3)
    assert rebuilt.cos is ctx.cos and rebuilt.inner.mods[1] is ctx.inner.mods[1] and rebuilt.mask is None


def test_a_block_cache_on_the_cpu_runs_its_ranges_plainly(folder):
    pipe = _pipe(folder, device="cpu", dtype="fp32", cache="fbcache-mask-fast")
    assert pipe.forward is pipe.transformer and pipe.transformer.block_cache.runner is None


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["fbcache-mask-fast", "dbcache:threshold=1000,warmup=2,max_consecutive=2"])
def test_a_block_cache_is_graphed_by_block_range_exactly(folder, cache):
    """With a block cache, the block ranges the cache runs are replayed from graphs (the forward itself is not
    graphed): the same image and the same cached steps as without graphs, for a fixed step mask and for a
    decision made on the device (its host sync between the replays), First-Block and Dual-Block."""
    from ditserve.config import SamplingParams
    from ditserve.cuda_graphs import GraphedBlocks

    params = dict(prompt="a red circle", height=64, width=96, steps=8, seed=3)
    pipe = _pipe(folder, device="cuda", dtype="bf16", cuda_graphs="on", cache=cache)
    assert pipe.forward is pipe.transformer and isinstance(pipe.transformer.block_cache.runner, GraphedBlocks)
    with_graphs = pipe.generate(SamplingParams(**params), progress=False)
    again = pipe.generate(SamplingParams(**params), progress=False)
    graphs = pipe.transformer.block_cache.runner.graphed.graphs
    ranges = {key[0] for key in graphs}  # (spec, leaf keys): the ranges are the last two leaves
    assert len(graphs) == (3 if cache.startswith("dbcache") else 2), ranges
    assert all(g.replays > 0 for g in graphs.values()) and pipe.graph_memory_bytes > 0
    plain = _pipe(folder, device="cuda", dtype="bf16", cuda_graphs="off", cache=cache)
    assert plain.transformer.block_cache.runner is None
    without = plain.generate(SamplingParams(**params), progress=False)
    assert with_graphs.cache_stats == again.cache_stats == without.cache_stats
    assert with_graphs.cache_stats["cached"] > 0 and with_graphs.cache_stats["computed"] > 0
    assert (with_graphs.frames == without.frames).all() and (again.frames == without.frames).all()


def test_graphed_module_reads_as_the_module():
    from ditserve.cuda_graphs import GraphedModule

    lin = torch.nn.Linear(4, 3)
    g = GraphedModule(lin, warmup=0)
    assert g.weight is lin.weight and g.out_features == 3 and g.fn is lin
    x = torch.randn(2, 4)
    assert torch.equal(g(x), lin(x))  # CPU tensors: never captured
    assert not g.graphs


@pytest.mark.gpu
def test_text_encoders_are_graphed_and_exact(folder):
    from ditserve.config import SamplingParams

    params = SamplingParams(prompt="a red circle", height=64, width=64, steps=2, seed=3)
    graphed = _pipe(folder, device="cuda", dtype="bf16", cuda_graphs="auto")
    plain = _pipe(folder, device="cuda", dtype="bf16", cuda_graphs="off")
    for name in type(graphed).GRAPHED_TEXT_ENCODERS:
        assert isinstance(getattr(graphed, name), GraphedForward)
        assert not isinstance(getattr(plain, name), GraphedForward)
    a = graphed.generate(params, progress=False).frames
    b = graphed.generate(params, progress=False).frames  # replayed
    c = plain.generate(params, progress=False).frames
    assert graphed.text_encoder_2.graphs and (a == b).all() and (a == c).all()


@pytest.mark.gpu
def test_a_signature_that_cannot_be_captured_runs_plainly():
    class Syncs(torch.nn.Module):
        def forward(self, x):
            return x * float(x.sum().item())  # a host sync: capture fails

    g = GraphedForward(Syncs(), warmup=0)
    x = torch.ones(3, device="cuda")
    assert torch.equal(g(x), x * 3) and torch.equal(g(x), x * 3)
    assert not g.graphs and len(g.refused) == 1
