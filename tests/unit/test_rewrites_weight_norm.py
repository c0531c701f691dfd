"""The weight-norm backward handed to AOTAutograd, against eager's own kernel."""

from __future__ import annotations

import pytest
import torch

from xla_backend.rewrites.norms import norm_decompositions, weight_norm_interface_backward

aten = torch.ops.aten


@pytest.mark.parametrize(("shape", "dim"), [((6, 5), 0), ((6, 5), 1), ((4, 3, 5), 0),
                                            ((4, 3, 5), 2)])
def test_gradients_match_eagers_kernel(shape, dim):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    keep = [n if d == dim else 1 for d, n in enumerate(shape)]
    gain = torch.rand(keep, generator=g, dtype=torch.float64) + 0.5
    grad_w = torch.randn(shape, generator=g, dtype=torch.float64)
    _, norms = aten._weight_norm_interface(v, gain, dim)
    want = aten._weight_norm_interface_backward(grad_w, v, gain, norms, dim)
    got = weight_norm_interface_backward(grad_w, v, gain, norms, dim)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_forward_and_backward_are_both_in_the_table():
    """torch_xla lowers neither: each left in a graph would run on the host."""
    table = norm_decompositions()
    assert aten._weight_norm_interface.default in table
    assert table[aten._weight_norm_interface_backward.default] is weight_norm_interface_backward
