"""The small-output convolution rewrite on CPU, no XLA: the gather + matmul form computes
F.conv2d's values and gradients, and the pass picks exactly the shapes it is meant for."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from xla_backend.rewrites.small_conv import SMALL_CONV_AS_MATMUL, conv2d_as_matmul

# (input shape, weight shape, stride, padding, dilation)
CASES = [
    ((2, 5, 2, 2), (3, 5, 3, 3), (1, 1), (1, 1), (1, 1)),
    ((2, 4, 4, 4), (6, 4, 3, 3), (2, 2), (1, 1), (1, 1)),
    ((1, 3, 5, 4), (2, 3, 2, 3), (1, 2), (0, 1), (1, 1)),
    ((3, 2, 6, 6), (4, 2, 3, 3), (1, 1), (2, 2), (2, 2)),
    ((2, 3, 3, 5), (5, 3, 1, 3), (3, 1), (0, 0), (1, 2)),
]


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_match_conv2d(case, with_bias):
    x_shape, w_shape, stride, padding, dilation = case
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(w_shape, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(w_shape[0], generator=g, dtype=torch.float64,
                    requires_grad=True) if with_bias else None
    want = F.conv2d(x, w, b, stride, padding, dilation)
    got = conv2d_as_matmul(x, w, b, stride, padding, dilation)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(want.shape, generator=g, dtype=torch.float64)
    leaves = [t for t in (x, w, b) if t is not None]
    want_grads = torch.autograd.grad(want, leaves, upstream)
    got_grads = torch.autograd.grad(got, leaves, upstream)
    for mine, theirs in zip(got_grads, want_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


def _rewritten_count(module: torch.nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(conv2d calls left, gather + matmul calls) in the Dynamo graph after the pass."""
    seen: list[tuple[int, int]] = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        SMALL_CONV_AS_MATMUL(gm)
        targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
        seen.append((sum(t in (torch.conv2d, F.conv2d) for t in targets),
                     targets.count(conv2d_as_matmul)))
        return gm.forward

    torch._dynamo.reset()
    try:
        out = torch.compile(module, backend=backend, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-5)
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("conv, size, rewritten", [
    (torch.nn.Conv2d(256, 8, 3, padding=1), 2, True),             # 4 positions, 2304 values
    (torch.nn.Conv2d(256, 8, 3, stride=2, padding=1), 4, True),   # 4x4 -> 2x2
    (torch.nn.Conv2d(512, 4, (3, 1), padding=(1, 0)), 2, False),  # 1536 values per position
    (torch.nn.Conv2d(256, 8, 1), 2, False),                        # 1x1 kernel
    (torch.nn.Conv2d(256, 8, 3, padding=1), 4, False),             # 16 positions
    (torch.nn.Conv2d(64, 8, 3, padding=1), 2, False),              # 576 values per position
    (torch.nn.Conv2d(512, 8, 3), 3, False),                        # a single position
    (torch.nn.Conv2d(512, 8, 3, padding=1, groups=2), 2, False),   # grouped
    (torch.nn.Conv2d(256, 8, 3, padding="same"), 2, False),        # string padding
], ids=["2x2", "stride2", "few-values", "1x1", "4x4", "few-channels", "1-position",
        "grouped", "same"])
def test_only_small_outputs_with_many_values_are_rewritten(conv, size, rewritten):
    torch.manual_seed(0)
    x = torch.randn(2, conv.in_channels, size, size)
    with torch.no_grad():
        assert _rewritten_count(conv, x) == ((0, 1) if rewritten else (1, 0))


def test_functional_conv_without_bias_is_rewritten():
    weight = torch.randn(8, 256, 3, 3)

    class Functional(torch.nn.Module):
        def forward(self, x):
            return F.conv2d(x, weight, None, 1, 1)

    with torch.no_grad():
        assert _rewritten_count(Functional(), torch.randn(2, 256, 2, 2)) == (0, 1)


def test_float64_convolutions_are_rewritten_too():
    conv = torch.nn.Conv2d(256, 8, 3, padding=1).double()
    with torch.no_grad():
        assert _rewritten_count(conv, torch.randn(2, 256, 2, 2, dtype=torch.float64)) == (0, 1)
