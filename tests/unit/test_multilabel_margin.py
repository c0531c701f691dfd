"""``lowering_gaps.multilabel_margin_loss`` against eager's kernel on CPU, no XLA: the
loss, the target mask and the gradient, for each reduction and input rank, with targets
ended by -1 where torch 2.9's decomposition counts the rest as class 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xla_backend.rewrites.lowering_gaps import multilabel_margin_loss

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


@pytest.mark.parametrize("shape", [(5, 4), (4,), (1, 6), (), (0, 3)],
                         ids=["batch", "vector", "one-row", "0-d", "empty-batch"])
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
def test_loss_mask_and_gradient_are_eagers(shape, reduction):
    if shape == (0, 3) and reduction != "none":
        pytest.skip("eager returns uninitialized memory when it reduces an empty batch")
    g = torch.Generator().manual_seed(len(shape) * 7 + REDUCTIONS[reduction])
    x = torch.randn(shape, generator=g)
    target = torch.randint(-1, shape[-1] if shape else 1, shape, generator=g)
    mine, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss, is_target = multilabel_margin_loss(mine, target, REDUCTIONS[reduction])
    want = F.multilabel_margin_loss(theirs, target, reduction=reduction)
    assert loss.shape == want.shape
    torch.testing.assert_close(loss, want)
    want_mask = torch.ops.aten.multilabel_margin_loss_forward(x, target, REDUCTIONS[reduction])[1]
    assert torch.equal(is_target, want_mask)
    loss.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(mine.grad, theirs.grad)


def test_the_slots_after_the_first_minus_one_do_not_count():
    x = torch.tensor([[1.0, -1.0, 0.5, 0.3, -0.2]])
    target = torch.tensor([[0, 1, -1, 2, 3]])  # 2 and 3 come after the end marker
    loss, is_target = multilabel_margin_loss(x, target, REDUCTIONS["mean"])
    # by hand: targets 0 and 1 against non-targets 2, 3, 4, over 5 classes
    want = sum(max(0.0, 1 - x[0, j] + x[0, c]) for j in (0, 1) for c in (2, 3, 4)) / 5
    assert float(loss) == pytest.approx(float(want))
    assert is_target.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize(("x", "target", "match"), [
    (torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.long), "non-empty vector or matrix"),
    (torch.zeros(2, 3), torch.zeros(3, dtype=torch.long), "target shape"),
    (torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, dtype=torch.long), "vector or matrix"),
], ids=["no-classes", "target-shape", "3-d"])
def test_bad_shapes_are_refused_with_the_shape(x, target, match):
    with pytest.raises(RuntimeError, match=match):
        multilabel_margin_loss(x, target, REDUCTIONS["mean"])
