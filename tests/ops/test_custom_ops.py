"""The `ditserve::` custom ops (ditserve.kernels.norm) as torch.library ops.

`torch.library.opcheck` checks each op's schema, fake (meta) implementation and dispatch registrations on
CPU (the default implementation) and, gpu-marked, on CUDA (the Triton kernels), with every optional argument
both given and None. Then the output contract (contiguous outputs, dtypes, the optional arguments really
matter) and the opaque-node behaviour under torch.compile with a dynamic row count. Numerical parity of the
ops against fp64 lives in test_ops.py (the "custom" path).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from ditserve.kernels import norm as K

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16]
B, L, D = 2, 7, 48


def rand(gen, *shape, dtype, device):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(dtype).to(device)


def rms_norm_cases(dtype, device):
    g = torch.Generator().manual_seed(0)
    x = rand(g, B, L, D, dtype=dtype, device=device)
    w = rand(g, D, dtype=dtype, device=device)
    x_t = rand(g, B, D, L, dtype=dtype, device=device).transpose(1, 2)  # non-contiguous (B, L, D)
    return {
        "weight": (x, w, 1e-6),
        "no_weight": (x, None, 1e-6),
        "2d_rows": (x.reshape(B * L, D), w, 1e-5),
        "non_contiguous": (x_t, w, 1e-6),
    }


def norm_scale_shift_cases(dtype, device):
    g = torch.Generator().manual_seed(1)
    r = lambda *s: rand(g, *s, dtype=dtype, device=device)  # noqa: E731
    x, w = r(B, L, D), r(D)
    return {
        "layer_no_weight_sample": (x, None, r(B, 1, D), r(B, 1, D), 1e-6, False),
        "layer_weight_token": (x, w, r(B, L, D), r(B, L, D), 1e-6, False),
        "rms_weight_sample": (x, w, r(B, 1, D), r(B, 1, D), 1e-6, True),
        "rms_no_weight_token": (x, None, r(B, L, D), r(B, L, D), 1e-6, True),
        "non_contiguous": (r(B, D, L).transpose(1, 2), w, r(B, L, D)[:, :1], r(B, 1, D), 1e-6, True),
    }


def residual_norm_scale_shift_cases(dtype, device):
    g = torch.Generator().manual_seed(2)
    r = lambda *s: rand(g, *s, dtype=dtype, device=device)  # noqa: E731
    x, res, w = r(B, L, D), r(B, L, D), r(D)
    fp32_res = rand(g, B, L, D, dtype=torch.float32, device=device)
    return {
        "gate_weight_layer": (x, res, r(B, 1, D), w, r(B, 1, D), r(B, 1, D), 1e-6, False),
        "no_gate_no_weight_layer": (x, res, None, None, r(B, 1, D), r(B, 1, D), 1e-6, False),
        "gate_no_weight_rms_token": (x, res, r(B, L, D), None, r(B, L, D), r(B, L, D), 1e-6, True),
        "no_gate_weight_rms": (x, res, None, w, r(B, 1, D), r(B, 1, D), 1e-6, True),
        "fp32_residual": (x, fp32_res, r(B, 1, D), w, r(B, 1, D), r(B, 1, D), 1e-6, False),
        "non_contiguous": (r(B, D, L).transpose(1, 2), r(B, D, L).transpose(1, 2), r(B, 1, D), w,
                           r(B, 1, D), r(B, 1, D), 1e-6, True),
    }


CASES = {
    "rms_norm": (torch.ops.ditserve.rms_norm.default, rms_norm_cases),
    "norm_scale_shift": (torch.ops.ditserve.norm_scale_shift.default, norm_scale_shift_cases),
    "residual_norm_scale_shift": (torch.ops.ditserve.residual_norm_scale_shift.default,
                                  residual_norm_scale_shift_cases),
}
ALL_CASES = [(op, case) for op, (_, make) in CASES.items() for case in make(torch.float32, "cpu")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op_name,case", ALL_CASES)
def test_opcheck(op_name, case, dtype, device):
    op, make = CASES[op_name]
    args = make(dtype, device)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name,case", ALL_CASES)
def test_output_contract(op_name, case, device):
    """Outputs are contiguous, shaped like x; out has x's dtype, the new residual has residual's dtype."""
    op, make = CASES[op_name]
    args = make(torch.bfloat16, device)[case]
    outs = op(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    x = args[0]
    assert outs[0].shape == x.shape and outs[0].dtype == x.dtype and outs[0].is_contiguous()
    if op_name == "residual_norm_scale_shift":
        residual = args[1]
        assert outs[1].shape == residual.shape and outs[1].dtype == residual.dtype and outs[1].is_contiguous()


def test_python_wrappers_are_the_registered_ops():
    x = torch.randn(3, 16)
    torch.testing.assert_close(K.rms_norm(x, None, 1e-6), torch.ops.ditserve.rms_norm(x, None, 1e-6), rtol=0, atol=0)
    for name in ("rms_norm", "norm_scale_shift", "residual_norm_scale_shift"):
        assert hasattr(torch.ops.ditserve, name)


@pytest.mark.parametrize("device", DEVICES)
def test_optional_arguments_matter(device):
    """weight=None means 1 and gate=None means 1: given explicitly as ones they give the same result."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: rand(g, *s, dtype=torch.float32, device=device)  # noqa: E731
    x, res, scale, shift, w = r(B, L, D), r(B, L, D), r(B, 1, D), r(B, 1, D), r(D)
    ones = torch.ones(D, device=device)
    gate_ones = torch.ones(B, 1, D, device=device)
    torch.testing.assert_close(K.rms_norm(x, None, 1e-6), K.rms_norm(x, ones, 1e-6))
    assert not torch.allclose(K.rms_norm(x, w, 1e-6), K.rms_norm(x, None, 1e-6))
    torch.testing.assert_close(K.norm_scale_shift(x, None, scale, shift, 1e-6, True),
                               K.norm_scale_shift(x, ones, scale, shift, 1e-6, True))
    y0, r0 = K.residual_norm_scale_shift(x, res, None, None, scale, shift, 1e-6, False)
    y1, r1 = K.residual_norm_scale_shift(x, res, gate_ones, ones, scale, shift, 1e-6, False)
    torch.testing.assert_close(y0, y1)
    torch.testing.assert_close(r0, r1)
    torch.testing.assert_close(r0, res + x)
    y2, r2 = K.residual_norm_scale_shift(x, res, scale, None, scale, shift, 1e-6, False)
    torch.testing.assert_close(r2, res + scale * x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", list(CASES))
def test_compiles_as_one_node_with_dynamic_rows(op_name, device):
    """Called directly under torch.compile: one graph holding only the custom op, no recompile for new L."""
    op, make = CASES[op_name]
    case = {"rms_norm": "weight", "norm_scale_shift": "rms_weight_sample",
            "residual_norm_scale_shift": "gate_weight_layer"}[op_name]
    counter = CompileCounter()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return counter(gm, example_inputs)

    compiled = torch.compile(lambda *a: op(*a), fullgraph=True, backend=backend)
    base = make(torch.bfloat16, device)[case]
    for length in (L, 2 * L + 3):
        # Grow every (B, L, D) tensor along L; (B, 1, D) and (D,) tensors stay.
        args = tuple(t.repeat(1, 3, 1)[:, :length] if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[1] == L
                     else t for t in base)
        for t in args:
            if isinstance(t, torch.Tensor) and t.dim() == 3 and t.shape[1] == length:
                torch._dynamo.mark_dynamic(t, 1)
        got, want = compiled(*args), op(*args)
        for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert counter.frame_count == 1
    calls = [n.target for n in graphs[0].graph.nodes if n.op == "call_function" and "getitem" not in str(n.target)]
    assert calls == [op], calls
