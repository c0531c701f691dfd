"""The running_var rewrite on CPU graphs, no XLA: the rewritten graph computes what
eager's own batch norm kernel does, and the eager result is what torch_xla misses."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from xla_backend.rewrites.batch_norm_stats import UNBIASED_RUNNING_VAR

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


def test_eval_mode_is_left_alone():
    gm = make_fx(_bn(False, 0.1), tracing_mode="fake")(*_inputs((4, 3)))
    assert not UNBIASED_RUNNING_VAR(gm).modified
