"""Batches whose shapes change: a partial last batch, varying sequence lengths, dynamic=.

XLA computations have static shapes, so every new input shape is an XLA compile. What
must hold: a shape seen before is never compiled again, and a new one costs at most one
compile per graph of the step (never a compile per step).

Measured on CPU (2 cores), compiles counted by torch_xla (``CompileTime``):

* MLP + AdamW, batch 16 with a partial batch of 10 (inputs marked static): first step 5
  compiles, second 1 (the optimizer's warm-up), first partial batch 3, then 0 for any mix
  of full and partial batches;
* GPT (1 layer, d=32) + AdamW, sequence lengths 32, 24, 32, 16, 24, 16 (inputs marked
  static): 5, 2, 0, 3, 0, 0 compiles; one Dynamo graph per distinct length, no recompiles
  of a length seen before.

Those are the per-graph path's figures (``join_graphs=False``). Joined (the default), a
step is one computation, compiled once per distinct length from the second step on.

Without ``torch._dynamo.mark_static`` the figures are the same: the backend keeps tensor
shapes static for its frames (a new shape is one Dynamo recompile, reported by
``explain``), while ``dynamic=True`` traces symbolic sizes and each concrete size gets
its own XLA executable.
"""

from __future__ import annotations

import torch
import torch._dynamo

from tests.xla_helpers import MetricWindow
from xla_backend.tools import workloads
from xla_backend.tools.explain import ExplainSession


def _static(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    for t in tensors:
        for dim in range(t.dim()):
            torch._dynamo.mark_static(t, dim)
    return tensors


def _compiles_per_step(step, model, opt, batches) -> tuple[list[int], list[float]]:
    compiles, losses = [], []
    for batch in batches:
        with MetricWindow() as window:
            loss = step(model, opt, *batch)
        compiles.append(window.counts.compiles)
        losses.append(float(loss))
    return compiles, losses


def _mlp_batches(device, sizes: list[int], static: bool,
                 hidden: int = 128) -> list[tuple[torch.Tensor, ...]]:
    work = workloads.get_workload("mlp", batch=16, hidden=hidden)
    batches = []
    for i, n in enumerate(sizes):
        x, y = work.make_batch(i, device)
        batch = (x[:n], y[:n])
        batches.append(_static(*batch) if static else batch)
    return batches


def _mlp(device, hidden: int = 128):
    # Tests that count compiles use a width of their own: torch_xla keeps every
    # compiled graph for the process, so a graph another test compiled would not count.
    model = workloads.get_workload("mlp", hidden=hidden).build_model().to(device)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


PARTIAL = [16, 16, 10, 16, 16, 10, 16, 10]


def test_partial_last_batch_compiles_once_then_hits_the_cache_with_static_marks(xla):
    model, opt = _mlp(xla)
    step = torch.compile(workloads.train_step, backend="syncfree_xla")
    compiles, losses = _compiles_per_step(step, model, opt, _mlp_batches(xla, PARTIAL, True))
    first, warm, partial, *rest = compiles
    assert 0 < partial <= first, compiles  # at most one compile per graph of the step
    assert rest == [0] * len(rest), compiles
    assert all(loss == loss for loss in losses)


def test_partial_last_batch_compiles_once_then_hits_the_cache(xla):
    model, opt = _mlp(xla, hidden=96)
    step = torch.compile(workloads.train_step, backend="syncfree_xla")
    compiles, _ = _compiles_per_step(step, model, opt,
                                     _mlp_batches(xla, PARTIAL, False, hidden=96))
    first, warm, partial, *rest = compiles
    assert 0 < partial <= first, compiles
    assert rest == [0] * len(rest), compiles


def test_dynamic_false_recompiles_a_partial_batch_statically(xla):
    model, opt = _mlp(xla, hidden=80)
    step = torch.compile(workloads.train_step, backend="syncfree_xla", dynamic=False)
    compiles, _ = _compiles_per_step(step, model, opt,
                                     _mlp_batches(xla, PARTIAL, False, hidden=80))
    assert compiles[3:] == [0] * len(compiles[3:]), compiles


def test_dynamic_true_trains_like_eager(xla):
    model, opt = _mlp(xla)
    reference = workloads.get_workload("mlp").build_model()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    step = torch.compile(workloads.train_step, backend="syncfree_xla", dynamic=True)
    for (x, y), (cx, cy) in zip(_mlp_batches(xla, [16, 10, 16], False),
                                _mlp_batches("cpu", [16, 10, 16], False)):
        got = step(model, opt, x, y)
        want = workloads.train_step(reference, ref_opt, cx, cy)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


def test_symbolic_size_in_device_math(xla):
    fn = torch.compile(lambda x: x.sum(0) / x.shape[0], backend="syncfree_xla")
    for rows in (4, 5, 6):
        x = torch.randn(rows, 3)
        torch.testing.assert_close(fn(x.to(xla)).cpu(), x.mean(0))


SEQ_LENS = [32, 24, 32, 16, 24, 16]
PER_GRAPH = {"join_graphs": False}


def _gpt(device):
    work = workloads.get_workload("gpt", batch=4, seq=max(SEQ_LENS), vocab_size=200,
                                  d_model=32, n_layers=1, n_heads=2)
    model = work.build_model().to(device)
    return work, model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _seq_batches(work, device, static: bool) -> list[tuple[torch.Tensor, ...]]:
    batches = []
    for i, n in enumerate(SEQ_LENS):
        x, y = work.make_batch(i, device)
        batch = (x[:, :n].contiguous(), y[:, :n].contiguous())
        batches.append(_static(*batch) if static else batch)
    return batches


def test_varying_sequence_lengths_compile_once_per_length_with_static_marks(xla):
    work, model, opt = _gpt(xla)
    step = torch.compile(workloads.train_step, backend="syncfree_xla", options=PER_GRAPH)
    compiles, losses = _compiles_per_step(step, model, opt, _seq_batches(work, xla, True))
    seen: set[int] = set()
    for n, count in zip(SEQ_LENS, compiles):
        if n in seen:
            assert count == 0, (SEQ_LENS, compiles)
        else:
            assert 0 < count <= compiles[0], (SEQ_LENS, compiles)
        seen.add(n)
    assert losses[-1] < losses[0]


def test_joined_steps_compile_once_per_sequence_length(xla):
    """Joined, a step's computation is compiled per length: once the first step (run
    graph by graph) is over, a length seen before compiles nothing."""
    work, model, opt = _gpt(xla)
    step = torch.compile(workloads.train_step, backend="syncfree_xla")
    batches = _seq_batches(work, xla, True)
    lengths = [SEQ_LENS[0]] + SEQ_LENS  # the first step runs graph by graph
    compiles, losses = _compiles_per_step(step, model, opt, [batches[0]] + batches)
    seen: set[int] = set()
    for n, count in zip(lengths[1:], compiles[1:]):
        assert (count == 0) == (n in seen), (lengths, compiles)
        seen.add(n)
    assert losses[-1] < losses[0]


def test_varying_sequence_lengths_compile_once_per_length(xla):
    """As above without static marks. The first step runs graph by graph, so its length
    comes once more as the first joined step (it passed only after the test above had
    compiled that step in the same process)."""
    work, model, opt = _gpt(xla)
    step = torch.compile(workloads.train_step, backend="syncfree_xla")
    batches = _seq_batches(work, xla, False)
    compiles, _ = _compiles_per_step(step, model, opt, [batches[0]] + batches)
    assert compiles[3] == compiles[5] == compiles[6] == 0, compiles


def test_explain_counts_one_recompile_per_new_sequence_length(xla):
    work, model, opt = _gpt(xla)
    step = torch.compile(workloads.train_step, backend="syncfree_xla")
    with ExplainSession() as session:
        for batch in _seq_batches(work, xla, False):
            session.call(step, model, opt, *batch)
    recompiles = session.report().recompiles
    assert len(recompiles) == len(set(SEQ_LENS)) - 1, [str(r) for r in recompiles]
    assert all("size mismatch" in r.reason for r in recompiles), [str(r) for r in recompiles]


def test_dynamic_true_trains_a_transformer_like_eager(xla):
    # LayerNorm: torch_xla's autograd kernel needs concrete sizes; the backend traces
    # PyTorch's reference one while dynamic=True is in force.
    work, model, opt = _gpt(xla)
    reference = work.build_model()
    reference.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    step = torch.compile(workloads.train_step, backend="syncfree_xla", dynamic=True)
    for batch, ref_batch in zip(_seq_batches(work, xla, False)[:4],
                                _seq_batches(work, "cpu", False)[:4]):
        got = step(model, opt, *batch)
        want = workloads.train_step(reference, ref_opt, *ref_batch)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
    # leaving the step gave torch_xla its own kernel back
    assert "RegisterAutogradXLA.cpp" in torch._C._dispatch_dump("aten::native_layer_norm")
