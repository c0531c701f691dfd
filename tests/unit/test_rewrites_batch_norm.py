"""The batch norm rewrites on CPU graphs, no XLA: the rewritten graph computes what
eager's own batch norm kernel does, and the eager result is what torch_xla misses."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from xla_backend.rewrites.batch_norm_stats import CENTERED_BATCH_NORM, UNBIASED_RUNNING_VAR
from xla_backend.rewrites.low_precision_norms import LOW_PRECISION_NORMS

aten = torch.ops.aten


def _bn(training: bool, momentum: float):
    def fn(x, weight, bias, mean, var):
        return aten._native_batch_norm_legit_functional.default(
            x, weight, bias, mean, var, training, momentum, 1e-5)
    return fn


def _inputs(shape: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    return [torch.randn(shape, generator=g) * 3 + 1, torch.rand(c, generator=g) + 0.5,
            torch.randn(c, generator=g), torch.randn(c, generator=g),
            torch.rand(c, generator=g) + 0.5]


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 3, 4, 4)])
@pytest.mark.parametrize("momentum", [0.1, 1.0])
def test_running_var_is_recomputed_like_eager(shape, momentum):
    fn = _bn(True, momentum)
    inputs = _inputs(shape)
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    assert UNBIASED_RUNNING_VAR(gm).modified
    assert any(n.target is aten.var.correction for n in gm.graph.nodes)
    got, want = gm(*[t.clone() for t in inputs]), fn(*[t.clone() for t in inputs])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    x, var = inputs[0], inputs[4]
    dims = [d for d in range(x.dim()) if d != 1]
    unbiased = x.var(dims, correction=1)
    torch.testing.assert_close(got[4], var * (1 - momentum) + unbiased * momentum)


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 3, 4, 4)])
@pytest.mark.parametrize("mean", [0.0, 100.0])
def test_centering_keeps_every_output_and_hands_the_op_centered_inputs(shape, mean):
    """torch_xla computes the variance as E[x^2] - E[x]^2, which cancels at a large mean:
    after the rewrite the op sees each channel less its first value, so no mean is
    large; every output (the saved mean and the running mean with the shift added back)
    is still eager's."""
    fn = _bn(True, 0.1)
    inputs = _inputs(shape)
    inputs[0] = inputs[0] * 0.1 + mean
    inputs[3] = inputs[3] + mean
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    assert CENTERED_BATCH_NORM(gm).modified
    assert not CENTERED_BATCH_NORM(gm).modified, "a second run leaves it alone"
    seen: list[torch.Tensor] = []

    def spy(*args):
        seen.append(args[0])
        return aten._native_batch_norm_legit_functional.default(*args)

    for node in gm.graph.nodes:
        if node.target is aten._native_batch_norm_legit_functional.default:
            node.target = spy
    gm.recompile()
    got, want = gm(*[t.clone() for t in inputs]), fn(*[t.clone() for t in inputs])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4 * (1 + mean))
    channel_means = seen[0].mean([d for d in range(len(shape)) if d != 1])
    assert channel_means.abs().max() < 1.0, channel_means


def test_eval_mode_is_left_alone():
    gm = make_fx(_bn(False, 0.1), tracing_mode="fake")(*_inputs((4, 3)))
    assert not UNBIASED_RUNNING_VAR(gm).modified
    assert not CENTERED_BATCH_NORM(gm).modified


def _bn_backward(grad, x, weight, save_mean, save_invstd):
    return aten.native_batch_norm_backward.default(
        grad, x, weight, None, None, save_mean, save_invstd, True, 1e-5, [True, True, True])


def _low_precision_cases():
    x, weight, bias, mean, var = (t.to(torch.bfloat16) for t in _inputs((4, 3, 5)))
    _, save_mean, save_invstd, _, _ = _bn(True, 0.1)(x, weight, bias, mean.clone(), var.clone())
    grad = torch.randn_like(x)
    return {
        "forward": (_bn(True, 0.1), [x, weight, bias, mean, var]),
        "backward": (_bn_backward, [grad, x, weight, save_mean, save_invstd]),
    }


@pytest.mark.parametrize("case", ["forward", "backward"])
def test_bfloat16_batch_norm_runs_in_float32_with_the_traced_result_dtypes(case):
    """The graph's own promise (meta values: float32 saved statistics) is kept, and the
    values are eager's within bfloat16 rounding; torch_xla lowers the op in bfloat16
    (see low_precision_norms)."""
    fn, inputs = _low_precision_cases()[case]
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    promised = [n.meta["val"].dtype for n in gm.graph.find_nodes(op="output")[0].args[0]]
    assert torch.bfloat16 in promised
    assert LOW_PRECISION_NORMS(gm).modified
    norms = [n for n in gm.graph.nodes if n.target in (
        aten._native_batch_norm_legit_functional.default, aten.native_batch_norm_backward.default)]
    assert len(norms) == 1
    operand_dtypes = {a.meta["val"].dtype for a in norms[0].args
                      if isinstance(a, torch.fx.Node) and a.meta["val"].is_floating_point()}
    assert operand_dtypes == {torch.float32}
    got, want = gm(*[t.clone() for t in inputs]), fn(*[t.clone() for t in inputs])
    assert [g.dtype for g in got] == promised
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=1.6e-2, atol=1e-2)


def test_float32_batch_norm_is_left_alone():
    gm = make_fx(_bn(True, 0.1), tracing_mode="fake")(*_inputs((4, 3)))
    assert not LOW_PRECISION_NORMS(gm).modified
