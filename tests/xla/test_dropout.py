"""Random ops in replayed computations: fresh masks each call, no host round trip."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.xla_helpers import MetricWindow
from xla_backend.tools import workloads


def test_two_calls_draw_different_masks(xla):
    @torch.compile(backend="syncfree_xla")
    def drop(x):
        return F.dropout(x, p=0.5, training=True)

    x = torch.ones(64, 64, device=xla)
    first, second = drop(x).cpu(), drop(x).cpu()
    for out in (first, second):
        kept = out != 0
        assert 0.4 < kept.float().mean() < 0.6
        assert torch.all(out[kept] == 2.0), "kept elements are scaled by 1/(1-p)"
    assert not torch.equal(first != 0, second != 0)


def test_manual_seed_repeats_masks(xla):
    @torch.compile(backend="syncfree_xla")
    def drop(x):
        return F.dropout(x, p=0.5, training=True)

    x = torch.ones(32, 32, device=xla)
    masks = []
    for seed in (7, 8, 7):
        torch.manual_seed(seed)
        masks.append(drop(x).cpu())
    assert torch.equal(masks[0], masks[2])
    assert not torch.equal(masks[0], masks[1])


def test_dropout_trains_without_syncs_or_recompiles(xla):
    work = workloads.get_workload("transformer_lm", batch=8, seq=32, vocab_size=200,
                                  d_model=64, n_layers=2, n_heads=4, d_ff=128, dropout=0.1)
    model = work.build_model().to(xla)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    step = torch.compile(workloads.train_step, backend="syncfree_xla")
    losses = [step(model, opt, *work.make_batch(i, xla)) for i in range(3)]
    with MetricWindow() as window:
        losses += [step(model, opt, *work.make_batch(i, xla)) for i in range(3, 40)]
    assert window.counts.compiles == 0
    assert window.counts.transfers_to_host == 0
    values = torch.stack([loss.cpu() for loss in losses])
    assert values[-5:].mean() < values[:5].mean() - 0.5
