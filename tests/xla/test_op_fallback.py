"""Ops torch_xla cannot lower: the graph is cut around them, never run with a baked-in value.

``aten.special_i1``, ``aten.i0`` and ``aten.histc`` have no XLA kernel in torch_xla
2.9 (its CPU fallback runs them); ``aten.median.dim`` has a composite kernel whose
out-variant falls back, so only the trace's safety net finds it.
"""

from __future__ import annotations

import logging

import pytest
import torch

from tests.xla_helpers import MetricWindow, assert_same_state, settle, twin
from xla_backend import counters, stats, warn_once
from xla_backend.runtime import partition

WARNING = "has no XLA lowering; it runs eagerly, outside the compiled graph"


@pytest.fixture
def fresh_warnings():
    """Warnings are once per process; each test starts as if none had been logged."""
    warn_once.reset_all()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and WARNING in r.getMessage()]


class _I1Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 8)
        self.fc2 = torch.nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.special.i1(self.fc1(x)))


def test_training_step_with_an_unsupported_op_matches_eager(xla, fresh_warnings, caplog):
    torch.manual_seed(0)
    model, reference = twin(_I1Net(), xla)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)

    def step(net, optimizer, x, y):
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    compiled = torch.compile(step, backend="syncfree_xla")
    batches = [(torch.randn(5, 6), torch.randn(5, 1)) for _ in range(5)]
    with caplog.at_level(logging.WARNING):
        for i, (x, y) in enumerate(batches):
            got = compiled(model, opt, x.to(xla), y.to(xla))
            want = step(reference, ref_opt, x, y)
            torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
            if i == 2:  # step 0 runs graph by graph, steps 1 and 2 compile the joined segments
                settle()
                warm = stats()
                window = MetricWindow().__enter__()
    window.__exit__(None, None, None)
    assert_same_state(model, reference, rtol=1e-4)
    after = stats()
    # forward and backward are cut; the optimizer
    # graph is not. Each step runs i1 (forward) and i0 (backward, which reuses the saved
    # i1) eagerly: two warm steps, two ops each.
    assert after[counters.GRAPHS_PARTITIONED] == 2
    assert after[counters.OP_FALLBACK_EXECUTIONS] - warm[counters.OP_FALLBACK_EXECUTIONS] == 2 * 2
    assert window.counts.compiles == 0, "warm steps replay what was compiled"
    assert window.counts.executions > 0, "the segments run as compiled XLA computations"
    assert after[counters.EXECUTIONS] > warm[counters.EXECUTIONS]
    assert sorted(_warnings(caplog)) == [f"syncfree_xla: aten.i0 {WARNING}",
                                         f"syncfree_xla: aten.special_i1 {WARNING}"]


def test_multiple_outputs_and_an_input_mutation_fed_by_an_eager_op(xla, fresh_warnings):
    def fn(x, buf):
        buf.add_(torch.histc(x, bins=4, min=-2.0, max=2.0))
        h = torch.special.i1(x)
        return h * 2, h.sum() + buf.sum(), x + 1

    for seed in range(3):
        torch.manual_seed(seed)
        x, buf = torch.randn(10), torch.ones(4)
        want = fn(x, buf.clone())
        dev_buf = torch.ones(4, device=xla)
        compiled = torch.compile(fn, backend="syncfree_xla")
        got = compiled(x.to(xla), dev_buf)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dev_buf.cpu(), buf + torch.histc(x, 4, -2.0, 2.0))
    assert stats()[counters.OP_FALLBACK_EXECUTIONS] == 3 * 2


def test_each_op_name_warns_once_per_process(xla, fresh_warnings, caplog):
    def first(x):
        return torch.histc(x, bins=3, min=0.0, max=1.0) + 1

    def second(x):
        return torch.histc(x * 2, bins=3, min=0.0, max=1.0).sum(), torch.histc(x, 5, 0.0, 1.0)

    with caplog.at_level(logging.WARNING):
        for fn in (first, second):
            compiled = torch.compile(fn, backend="syncfree_xla")
            for _ in range(2):
                x = torch.rand(8)
                got = compiled(x.to(xla))
                want = fn(x)
                for g, w in zip(*[(v,) if isinstance(v, torch.Tensor) else v
                                  for v in (got, want)]):
                    torch.testing.assert_close(g.cpu(), w)
    assert _warnings(caplog) == [f"syncfree_xla: aten.histc {WARNING}"]
    assert stats()[counters.GRAPHS_PARTITIONED] == 2
    assert stats()[counters.OP_FALLBACK_EXECUTIONS] == 2 * 1 + 2 * 2


def test_op_that_falls_back_only_inside_a_composite_is_caught_by_the_trace(xla,
                                                                            fresh_warnings):
    def fn(x):
        return torch.median(x, 0).values * 3 + x.sum()

    compiled = torch.compile(fn, backend="syncfree_xla")
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(5, 3)
        torch.testing.assert_close(compiled(x.to(xla)).cpu(), fn(x))
    assert stats()[counters.GRAPHS_PARTITIONED] == 1
    assert stats()[counters.OP_FALLBACK_EXECUTIONS] == 3


def test_safety_net_never_bakes_in_an_op_detection_missed(xla, fresh_warnings, monkeypatch):
    monkeypatch.setattr(partition, "has_xla_lowering", lambda op: True)

    def fn(x):
        return torch.special.i1(x) + 1

    compiled = torch.compile(fn, backend="syncfree_xla")
    results = []
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(6)
        got = compiled(x.to(xla)).cpu()
        torch.testing.assert_close(got, fn(x))
        results.append(got)
    assert not torch.equal(results[0], results[1]), "the result follows the input"
    assert stats()[counters.OP_FALLBACK_EXECUTIONS] == 3


def test_fallback_error_raises_naming_the_op(xla):
    def fn(x):
        return torch.special.i1(x)

    compiled = torch.compile(fn, backend="syncfree_xla", options={"fallback": "error"})
    with pytest.raises(Exception, match="no XLA lowering for aten.special_i1"):
        compiled(torch.randn(3, device=xla))


def test_detection_agrees_with_torch_xla():
    ops = torch.ops.aten
    for op in (ops.histc.default, ops.special_i1.default, ops.i0.default,
               ops.bincount.default, ops._fft_r2c.default, ops.polygamma.default):
        assert not partition.has_xla_lowering(op), op
    for op in (ops.mm.default, ops.add.Tensor, ops.native_layer_norm.default,
               ops._linalg_eigh.default, ops.kthvalue.default, ops.cummax.default):
        assert partition.has_xla_lowering(op), op


def test_explain_names_the_ops_that_run_eagerly(xla, fresh_warnings):
    import xla_backend

    def fn(x):
        return torch.histc(x, bins=3, min=0.0, max=1.0) * 2

    report = xla_backend.explain(fn, torch.rand(6, device=xla))
    (aten,) = report.aten_graphs
    assert aten.eager_ops == ["aten.histc"] and not aten.runs_op_by_op
    assert "run eagerly: aten.histc" in str(aten)


def test_a_signature_first_traced_at_call_time_runs_op_by_op_if_it_falls_back(
        xla, monkeypatch):
    from torch.fx.experimental.proxy_tensor import make_fx

    from xla_backend import xla_metrics
    from xla_backend.runtime.graph import LoweredGraph

    def fn(x):
        return (torch.ops.aten.special_i1.default(x) * 2,)

    gm = make_fx(fn, tracing_mode="fake")(torch.randn(4, device=xla))
    # the compile-time trace for shape (4,) is let through unchecked; shape (6,) is new
    real_check = xla_metrics.fell_back_since
    monkeypatch.setattr(xla_metrics, "fell_back_since", lambda before: [])
    lowered = LoweredGraph(gm, [torch.randn(4, device=xla)], "call-time")
    monkeypatch.setattr(xla_metrics, "fell_back_since", real_check)
    for seed in range(2):
        torch.manual_seed(seed)
        x = torch.randn(6)
        (got,) = lowered([x.to(xla)])
        torch.testing.assert_close(got.cpu(), fn(x)[0])
    assert stats()[counters.EAGER_FALLBACKS] == 2
