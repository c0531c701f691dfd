"""``lowering_gaps.log_cumulative_sum_exp`` (``logcumsumexp`` as a parallel prefix scan)
against eager's kernel on CPU, no XLA: values and gradients over lengths that are and
are not powers of two, each dimension, large magnitudes, infinities, NaN and half
precision.

Where an input is ``-inf``, eager's gradient for it is NaN even where the output is
finite (for ``[-inf, 0.5]`` the derivative of the second output by the first input is
``e**-inf / ...``, 0); the scan gives 0 there, and eager's gradient elsewhere."""

from __future__ import annotations

import math

import pytest
import torch

from xla_backend.rewrites.lowering_gaps import log_cumulative_sum_exp

SHAPES = [((7,), 0), ((5, 8), 1), ((5, 8), 0), ((3, 1), 1), ((1, 4), 0),
          ((2, 3, 100), -1), ((2, 3, 100), 1), ((2, 1000), 1)]


def _grads(fn, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_()
    out = fn(x, dim)
    (grad,) = torch.autograd.grad((out.sin() * torch.linspace(-1, 2, out.numel()).reshape(
        out.shape).to(out.dtype)).sum(), x)
    return out.detach(), grad


@pytest.mark.parametrize(("shape", "dim"), SHAPES, ids=[f"{s}-{d}" for s, d in SHAPES])
def test_values_and_gradients_are_eagers(shape, dim):
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 4
    got, got_grad = _grads(log_cumulative_sum_exp, x, dim)
    want, want_grad = _grads(torch.logcumsumexp, x, dim)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-9, atol=1e-9)


def test_float32_with_large_magnitudes_neither_overflows_nor_underflows():
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 80
    torch.testing.assert_close(log_cumulative_sum_exp(x, 1), torch.logcumsumexp(x, 1),
                               rtol=1e-6, atol=1e-5)


def test_a_scalar_is_itself():
    x = torch.tensor(1.5)
    assert torch.equal(log_cumulative_sum_exp(x, 0), torch.logcumsumexp(x, 0))


def test_minus_infinity_inputs_give_eagers_values_and_a_zero_gradient():
    x = torch.tensor([[-math.inf, -math.inf, 0.5, -math.inf, 2.0],
                      [1.0, -math.inf, -3.0, -math.inf, -math.inf]])
    want = torch.logcumsumexp(x, 1)
    got = log_cumulative_sum_exp(x, 1)
    assert torch.equal(got.isinf(), want.isinf())
    torch.testing.assert_close(got, want)
    x.requires_grad_()
    (grad,) = torch.autograd.grad(log_cumulative_sum_exp(x, 1).exp().sum(), x)
    (eager,) = torch.autograd.grad(torch.logcumsumexp(x, 1).exp().sum(), x)
    finite = x.detach().isfinite()
    assert eager[~finite].isnan().any(), "eager's gradient at -inf is NaN in torch 2.9"
    assert torch.equal(grad[~finite], torch.zeros_like(grad[~finite]))
    torch.testing.assert_close(grad[finite], eager[finite])


def test_nan_and_plus_infinity_propagate_as_in_eager():
    x = torch.tensor([0.0, math.nan, 1.0, math.inf, 2.0])
    torch.testing.assert_close(log_cumulative_sum_exp(x, 0), torch.logcumsumexp(x, 0),
                               equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_scanned_in_float32_and_rounded_once(dtype):
    x = (torch.randn(3, 64, generator=torch.Generator().manual_seed(2)) * 3).to(dtype)
    got = log_cumulative_sum_exp(x, 1)
    assert got.dtype == dtype
    want = torch.logcumsumexp(x.float(), 1).to(dtype)
    assert torch.equal(got, want)


@pytest.mark.parametrize("x", [torch.randn(3, 2, dtype=torch.complex64), torch.arange(3)],
                         ids=["complex", "integer"])
def test_complex_and_integer_inputs_are_left_to_the_op(x):
    """``NotImplemented`` tells AOTAutograd to keep the op (complex runs on the host;
    eager refuses integers itself)."""
    assert log_cumulative_sum_exp(x, 0) is NotImplemented
