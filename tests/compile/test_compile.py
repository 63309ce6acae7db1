"""Compile policy and compile report.

The report's counters are checked both ways: the tiny FLUX.1 transformer must show 0 graph breaks and 0
recompiles, and toy models built to break the graph or to recompile must show them (so the counters can fail).
Counting runs use backend="eager" (dynamo traces exactly as for inductor, without code generation); one
inductor test checks compiled output against eager.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest
import torch
from torch import nn

import ditserve.compile as dc
from ditserve.compile import CompileConfig, compile_model, compile_regions, compiled_modules, is_compiled
from ditserve.compile_report import add_compile_report_args, compile_report, compile_report_main, second_size
from ditserve.config import ConfigError, EngineConfig
from ditserve.models.flux import FluxConfig, FluxTransformer, flux_example_inputs

EAGER = CompileConfig(backend="eager")
TEXT_LEN = 16


@pytest.fixture(autouse=True)
def _restore_duck_shape():
    """compile_model sets a process-wide dynamo flag; keep tests independent of each other's order."""
    saved = torch.fx.experimental._config.use_duck_shape, torch._dynamo.config.specialize_float
    yield
    torch.fx.experimental._config.use_duck_shape, torch._dynamo.config.specialize_float = saved


def tiny_flux(num_layers: int = 2, num_single_layers: int = 2, guidance_embeds: bool = True) -> FluxTransformer:
    # D = 2 heads x 16 = 32 = joint_attention_dim: a 64x128 image (32 tokens) collides with both under duck shaping.
    cfg = FluxConfig(in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                     guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6))
    torch.manual_seed(0)
    return FluxTransformer(cfg).eval()


def flux_inputs(model: FluxTransformer):
    return lambda h, w: flux_example_inputs(model.config, h, w, text_len=TEXT_LEN)


# ----------------------------------------------------------------------------------------------- toy models


class ToyBlock(nn.Module):
    """x (B, L, D) -> (B, L, D). mode "break": data-dependent Python control flow (a graph break);
    "clean": none."""

    def __init__(self, dim: int, mode: str = "clean"):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(x)))
        if self.mode == "break" and h.sum() > 0:  # branching on a tensor's value leaves the graph: a break
            h = -h
        return x + h


class Toy(nn.Module):
    repeated_blocks = ("blocks",)

    def __init__(self, dim: int = 24, n: int = 3, mode: str = "clean"):
        super().__init__()
        self.blocks = nn.ModuleList(ToyBlock(dim, mode) for _ in range(n))
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def toy_inputs(dim: int):
    # one token per 16x16 pixels, as FLUX
    return lambda h, w: {"x": torch.randn(1, (h // 16) * (w // 16), dim)}


# ------------------------------------------------------------------------------------------------- config


def test_config_validation():
    with pytest.raises(ConfigError, match="backend"):
        CompileConfig(backend="tensorrt")
    with pytest.raises(ConfigError, match="mode"):
        CompileConfig(mode="fastest")
    with pytest.raises(ConfigError, match="needs backend 'inductor'"):
        CompileConfig(mode="max-autotune-no-cudagraphs", backend="eager")
    kw = CompileConfig(mode="max-autotune-no-cudagraphs").compile_kwargs()
    assert kw == dict(backend="inductor", fullgraph=True, dynamic=True, mode="max-autotune-no-cudagraphs")


def test_regional_needs_repeated_blocks():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

    with pytest.raises(ConfigError, match="repeated_blocks"):
        compile_model(Plain(), EAGER)
    m = compile_model(Plain(), CompileConfig(backend="eager", regional=False))
    assert compiled_modules(m) == [""]


def test_disabled_compiles_nothing():
    model = Toy()
    assert compile_model(model, CompileConfig(enabled=False)) is model
    assert compiled_modules(model) == []


# ---------------------------------------------------------------------------------------- compile_model


def test_regional_compiles_each_block_once_by_identity(monkeypatch):
    model = tiny_flux()
    calls = []
    original = nn.Module.compile

    def counting_compile(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "compile", counting_compile)
    compile_model(model, EAGER)
    blocks = [*model.double_blocks, *model.single_blocks]
    assert len(calls) == len(blocks) and all(a is b for a, b in zip(calls, blocks))
    assert compiled_modules(model) == [f"double_blocks.{i}" for i in range(2)] + \
        [f"single_blocks.{i}" for i in range(2)]
    impls = [b._compiled_call_impl for b in blocks]

    # A second call (e.g. after a warmup path) compiles nothing and keeps the compiled callables.
    compile_model(model, EAGER)
    assert len(calls) == len(blocks)
    assert all(b._compiled_call_impl is impl for b, impl in zip(blocks, impls))

    # Identity, not equality: an identical copy of the model is a different object, not compiled.
    twin = tiny_flux()
    twin.load_state_dict(model.state_dict())
    assert not any(is_compiled(b) for b in twin.double_blocks)

    # The same block object listed twice is compiled once.
    shared = Toy(n=1)
    shared.blocks.append(shared.blocks[0])
    calls.clear()
    compile_model(shared, EAGER)
    assert len(calls) == 1


def test_second_compile_call_triggers_no_new_compilation():
    model = tiny_flux()
    x = flux_inputs(model)(128, 128)
    compile_model(model, EAGER)
    stats = torch._dynamo.utils.counters["stats"]
    with torch.inference_mode():
        model(**x)
        graphs = stats["unique_graphs"]
        assert graphs > 0  # the first call compiled
        compile_model(model, EAGER)
        model(**x)
    assert stats["unique_graphs"] == graphs


def test_recompiling_with_other_settings_is_an_error():
    model = Toy()
    compile_model(model, EAGER)
    with pytest.raises(ValueError, match="already compiled"):
        compile_model(model, CompileConfig(backend="aot_eager"))
    with pytest.raises(ValueError, match="regionally compiled"):
        compile_model(model, CompileConfig(backend="eager", regional=False))
    whole = compile_model(Toy(), CompileConfig(backend="eager", regional=False))
    with pytest.raises(ValueError, match="compiled whole"):
        compile_model(whole, EAGER)


def test_compile_regions_names_the_repeated_blocks():
    model = tiny_flux(num_layers=1, num_single_layers=3)
    names = [name for name, _ in compile_regions(model)]
    assert names == ["double_blocks.0", "single_blocks.0", "single_blocks.1", "single_blocks.2"]


# ------------------------------------------------------------------------------------------------ report


def test_report_tiny_flux_is_clean():
    model = tiny_flux()
    # First size 64x128: 32 image tokens = the hidden width = joint_attention_dim (duck-shaping collision).
    report = compile_report(model, flux_inputs(model), [(64, 128), (128, 128)], EAGER)
    assert report["graph_breaks"] == 0 and report["break_reasons"] == []
    assert report["recompiles"] == 0 and report["recompile_reasons"] == []
    # Dynamo shares compiled code between instances of one block class: one graph per class.
    assert report["graph_count"] == len({type(b) for b in [*model.double_blocks, *model.single_blocks]}) == 2
    assert report["sizes"] == [[64, 128], [128, 128]]
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["torch"] == torch.__version__
    assert report["compile_seconds"] >= 0
    json.dumps(report)  # JSON-able


def test_report_tiny_flux_whole_model_is_clean():
    model = tiny_flux(num_layers=1, num_single_layers=1, guidance_embeds=False)
    report = compile_report(model, flux_inputs(model), [(64, 128), (128, 128)],
                            CompileConfig(backend="eager", regional=False))
    assert (report["graph_count"], report["graph_breaks"], report["recompiles"]) == (1, 0, 0)


def test_report_counts_graph_breaks():
    model = Toy(mode="break")
    report = compile_report(model, toy_inputs(model.dim), [(128, 128), (64, 128)], EAGER)
    # One break site in one block class: traced once (all 3 blocks share the code), hence one break.
    assert report["graph_breaks"] == 1
    assert len(report["break_reasons"]) == 1
    # located at the branch, with dynamo's reason
    assert report["break_reasons"][0].startswith(f"{__file__}:{ToyBlock.forward.__code__.co_firstlineno + 2}: ")
    assert "data-dependent branching" in report["break_reasons"][0].lower()
    # The block splits into the graph before the break and the graph of each branch taken after it.
    assert report["graph_count"] >= 2
    assert report["recompiles"] == 0


def test_report_counts_recompiles_with_static_shapes():
    model = Toy()
    static = CompileConfig(backend="eager", dynamic=False)
    report = compile_report(model, toy_inputs(model.dim), [(128, 128), (64, 128)], static)
    assert report["graph_breaks"] == 0
    assert report["graph_count"] == 1
    assert report["recompiles"] == 1  # the block class's forward, once for the new sequence length
    assert len(report["recompile_reasons"]) == 1 and "size mismatch" in report["recompile_reasons"][0]


def test_duck_shaping_off_is_what_keeps_coinciding_sizes_dynamic(monkeypatch):
    # With duck shaping (dynamo's default), a first size whose token count equals the hidden width
    # specialises the graph: the second size recompiles. compile_model turns duck shaping off.
    model = Toy()
    sizes = [(16 * 4, 16 * model.dim // 4), (128, 128)]  # first size: dim tokens
    assert compile_report(model, toy_inputs(model.dim), sizes, EAGER)["recompiles"] == 0

    torch._dynamo.reset()
    monkeypatch.setattr(dc, "set_process_compiler_flags", lambda: None)
    torch.fx.experimental._config.use_duck_shape = True
    report = compile_report(Toy(), toy_inputs(model.dim), sizes, EAGER)
    assert report["recompiles"] == 1


def _restarts(model, sizes) -> int:
    """How many times dynamo restarted a frame's analysis while compiling `model` regionally at `sizes`."""
    from torch._dynamo.utils import compilation_time_metrics

    compilation_time_metrics.clear()
    compile_model(model, CompileConfig(backend="aot_eager"))
    with torch.inference_mode():
        for h, w in sizes:
            model(**flux_example_inputs(model.config, h, w, text_len=TEXT_LEN))
    assert compilation_time_metrics.get("compile_attempt_0"), "dynamo's timing metric names changed"
    return len(compilation_time_metrics.get("compile_attempt_1", []))


def test_block_floats_are_constants_so_no_block_is_traced_twice(monkeypatch):
    # Under dynamic=True dynamo traces float attributes (norm eps, MulAdd's k) as symbolic, fails to tensorify
    # them and restarts each block class's analysis: a whole second trace (~30% of FLUX.1's cold compile).
    # compile_model specialises floats; the model has two block classes and none restarts, at either size.
    sizes = [(64, 64), (64, 128)]
    assert _restarts(tiny_flux(num_layers=1, num_single_layers=1), sizes) == 0

    torch._dynamo.reset()
    monkeypatch.setattr(dc, "set_process_compiler_flags", lambda: None)
    torch._dynamo.config.specialize_float = False  # dynamo's default
    torch.fx.experimental._config.use_duck_shape = False
    assert _restarts(tiny_flux(num_layers=1, num_single_layers=1), sizes) >= 1


def test_prewarm_runs_only_for_inductor_and_has_an_off_switch(monkeypatch):
    calls = []
    monkeypatch.setattr(dc, "warm_compile_workers", lambda model: calls.append("workers"))
    monkeypatch.setattr(dc, "prewarm_kernels", lambda model: calls.append("kernels"))
    compile_model(Toy(), CompileConfig())
    assert calls == ["workers", "kernels"]
    calls.clear()
    compile_model(Toy(), CompileConfig(prewarm=False))
    compile_model(Toy(), EAGER)  # no code generation, nothing to warm
    assert calls == []


def test_prewarm_does_nothing_off_cuda(monkeypatch):
    import torch._inductor.async_compile as ac

    started = []
    monkeypatch.setattr(ac, "maybe_warm_pool", lambda: started.append(True))
    model = tiny_flux()
    dc.warm_compile_workers(model)
    dc.warm_compile_workers(device="cpu")
    assert started == []
    assert dc.prewarm_kernels(model) is None
    dc.warm_compile_workers(device="cuda")  # the engine's call before loading onto a GPU
    assert started == [True]


def test_warm_ops_takes_one_op_per_configuration():
    from ditserve.ops import NormScaleShift, ResidualNormScaleShift

    ops = [NormScaleShift(32), NormScaleShift(32), NormScaleShift(32, norm="rms"), ResidualNormScaleShift(32),
           NormScaleShift(64)]
    native = NormScaleShift(32)
    for op in ops:
        op.path = "cuda"  # as the constructor picks on a GPU; native stays native (nothing to warm)
    model = nn.Sequential(*ops, native)
    assert dc.warm_ops(model) == [ops[0], ops[2], ops[3], ops[4]]


def test_engine_dynamic_shapes_setting():
    assert CompileConfig.for_engine(EngineConfig()).dynamic is None  # "auto", the default
    assert CompileConfig.for_engine(EngineConfig(dynamic_shapes="on")).dynamic is True
    assert CompileConfig.for_engine(EngineConfig()).prewarm is True
    assert CompileConfig.for_engine(EngineConfig(compile_prewarm=False)).prewarm is False
    with pytest.raises(ConfigError, match="dynamic_shapes"):
        EngineConfig(dynamic_shapes="off")


def _entries(block: nn.Module) -> int:
    """Compiled entries dynamo holds for a block class's forward."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(type(block).forward.__code__))


@pytest.mark.parametrize("dynamic_shapes", ["auto", "on"])
def test_dynamic_shapes_auto_compiles_once_more_then_never(dynamic_shapes):
    """auto: static for the first size, one more compile (token counts symbolic) at the second size, none at
    a third; on: one compile for all three sizes."""
    torch._dynamo.reset()
    model = tiny_flux(num_layers=1, num_single_layers=1)
    make = flux_inputs(model)
    cfg = replace(CompileConfig.for_engine(EngineConfig(dynamic_shapes=dynamic_shapes)), backend="eager")
    compile_model(model, cfg)
    blocks = (model.double_blocks[0], model.single_blocks[0])
    with torch.inference_mode():
        model(**make(64, 128))
        assert [_entries(b) for b in blocks] == [1, 1]
        model(**make(128, 128))
        assert [_entries(b) for b in blocks] == [2 if dynamic_shapes == "auto" else 1] * 2
        with torch._dynamo.config.patch(error_on_recompile=True):  # a third size reuses the symbolic graph
            model(**make(96, 160))


def test_report_refuses_compiled_model():
    model = Toy()
    compile_model(model, EAGER)
    with pytest.raises(ValueError, match="not compiled yet"):
        compile_report(model, toy_inputs(model.dim), [(128, 128), (64, 128)], EAGER)


@pytest.mark.slow
def test_inductor_output_matches_eager_at_two_sizes():
    model = tiny_flux(num_layers=1, num_single_layers=1)
    make = flux_inputs(model)
    sizes = [(64, 128), (128, 128)]
    with torch.inference_mode():
        expected = [model(**make(h, w)) for h, w in sizes]
        compile_model(model, CompileConfig())
        got0 = model(**make(*sizes[0]))
        with torch._dynamo.config.patch(error_on_recompile=True):  # the second size must not recompile
            got1 = model(**make(*sizes[1]))
    for block in (model.double_blocks[0], model.single_blocks[0]):  # one compiled entry per block class
        assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(type(block).forward.__code__)) == 1
    torch.testing.assert_close(got0, expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got1, expected[1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------- example inputs


def test_flux_example_inputs():
    model = tiny_flux()
    x = flux_example_inputs(model.config, 48, 80, batch=2, text_len=7)
    rows, cols = 3, 5
    assert x["hidden_states"].shape == (2, rows * cols, 16)
    assert x["encoder_hidden_states"].shape == (2, 7, 32)
    assert x["pooled_projections"].shape == (2, 16)
    assert x["timestep"].shape == x["guidance"].shape == (2,)
    assert torch.equal(x["txt_ids"], torch.zeros(7, 3))
    # token k is at (row k // cols, col k % cols)
    k = torch.arange(rows * cols)
    assert torch.equal(x["img_ids"], torch.stack([torch.zeros(rows * cols), k // cols, k % cols], 1).float())
    assert torch.equal(x["hidden_states"], flux_example_inputs(model.config, 48, 80, batch=2, text_len=7)
                       ["hidden_states"])  # seeded
    assert flux_example_inputs(tiny_flux(guidance_embeds=False).config, 32, 32)["guidance"] is None
    with pytest.raises(ConfigError, match="multiple of 16"):
        flux_example_inputs(model.config, 100, 64)
    assert model(**x).shape == (2, rows * cols, 16)


# ----------------------------------------------------------------------------------------------------- CLI


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_compile_report_args(parser)
    return parser.parse_args(list(argv))


def test_second_size_differs_in_tokens():
    for h, w in [(1024, 1024), (256, 256), (64, 64), (80, 64), (112, 48)]:
        h2, w2 = second_size(h, w)
        assert h2 % 16 == 0 and w2 % 16 == 0 and h2 >= 64 and h2 * w2 != h * w


def test_cli_default_text_len_is_the_pipelines(capsys):
    """No --text-len: the T5 length the pipeline would use for this model (the default model's tokenizer caps
    FLUX.1-dev's 512 at the length it was trained with)."""
    from ditserve.loader import load_model
    from ditserve.pipelines.flux import FluxPipeline, default_max_sequence_length

    assert compile_report_main(parse("--backend", "eager")) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    loaded = load_model(None, EngineConfig(device="cpu"))
    spec = FluxPipeline.spec_for(loaded.name, loaded.components)
    assert report["text_len"] == spec.max_sequence_length < 512
    assert default_max_sequence_length(True) == 512 and default_max_sequence_length(True, 32) == 32
    assert default_max_sequence_length(False, 10**30) == 256  # transformers' "no limit" sentinel


def test_cli_default_model_json(capsys):
    assert compile_report_main(parse("--backend", "eager", "--text-len", "24")) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert report["graph_breaks"] == 0 and report["recompiles"] == 0 and report["graph_count"] == 2
    assert report["compile"]["backend"] == "eager" and report["text_len"] == 24
    (h, w), (h2, w2) = report["sizes"]
    assert (h, w) != (h2, w2)


def test_cli_dynamic_shapes_auto_recompiles_once_per_block_class(capsys):
    argv = ("--backend", "eager", "--text-len", "24", "--dynamic-shapes", "auto")
    assert compile_report_main(parse(*argv)) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["recompiles"] == 2 and report["compile"]["dynamic"] is None
    assert report["compile"]["prewarm"] is True


def test_cli_no_compile_prewarm_reaches_the_report(capsys):
    assert compile_report_main(parse("--backend", "eager", "--text-len", "24", "--no-compile-prewarm")) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["compile"]["prewarm"] is False


def test_cli_static_shapes_recompile(capsys):
    assert compile_report_main(parse("--backend", "eager", "--static", "--text-len", "24")) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Each block class's forward recompiles once for the second size's sequence length.
    assert report["recompiles"] == 2 and report["graph_breaks"] == 0
    assert report["compile"]["dynamic"] is False


@pytest.mark.parametrize("argv, match", [
    (("--height", "100"), "multiple of 16"),
    (("--width2", "32"), "multiple of 16"),
    (("--height", "256", "--width", "256", "--height2", "256", "--width2", "256"), "same number of image tokens"),
    (("--text-len", "0"), "text-len"),
    (("--mode", "max-autotune", "--backend", "eager"), "needs backend 'inductor'"),
    (("--device", "cuda:0"), "CUDA"),
])
def test_cli_errors(argv, match):
    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device exists here")
    with pytest.raises(ConfigError, match=match):
        compile_report_main(parse(*argv))


class ToyTwoLengths(Toy):
    """Its blocks run at two token counts in every forward (the first block on the first half of the tokens),
    as a model's refiner blocks on part of its tokens before the main blocks on all of them."""

    varying_shape_blocks = ("blocks",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.blocks[0](x[:, : x.shape[1] // 2].clone())  # not a view: dynamo guards a view by its base
        x = torch.cat((half, x[:, x.shape[1] // 2 :]), dim=1)
        for block in self.blocks[1:]:
            x = block(x)
        return x


@pytest.mark.parametrize("dynamic, graphs", [(None, 1), (False, 2)])
def test_varying_shape_blocks_compile_symbolic_under_auto(dynamic, graphs):
    """Under "auto" (dynamic=None) a list named in `varying_shape_blocks` compiles symbolic from the first call:
    one graph for both token counts of a forward (a static first compile would recompile at once). An explicit
    dynamic=False still specialises: one graph per token count."""
    model = ToyTwoLengths()
    compile_model(model, CompileConfig(backend="eager", dynamic=dynamic, prewarm=False))
    stats = torch._dynamo.utils.counters["stats"]
    before = stats["unique_graphs"]
    with torch.no_grad():
        model(torch.randn(1, 16, model.dim))
    assert stats["unique_graphs"] - before == graphs
