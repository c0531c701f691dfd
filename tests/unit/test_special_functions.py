"""``rewrites.special_functions`` against eager's kernels on CPU, no XLA: ``lgamma``,
``digamma`` and ``polygamma(1, x)`` over the positive and negative axis, at the poles,
and for each input dtype."""

from __future__ import annotations

import pytest
import torch

from xla_backend.rewrites.special_functions import digamma, lgamma, polygamma

FUNCTIONS = {
    "lgamma": (lgamma, torch.lgamma, 3e-6),
    "digamma": (digamma, torch.digamma, 1e-6),
    "trigamma": (lambda t: polygamma(1, t), lambda t: torch.polygamma(1, t), 1e-6),
}
POSITIVE = torch.cat([torch.logspace(-5, 5, 2001), torch.linspace(0.01, 20, 4000)])
NEGATIVE = -torch.linspace(0.01, 9.99, 4000)
NEGATIVE = NEGATIVE[(NEGATIVE - NEGATIVE.round()).abs() > 1e-3]  # off the poles


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference as a fraction of ``max(1, |want|)``."""
    got, want = got.double(), want.double()
    return float(((got - want).abs() / want.abs().clamp(min=1)).max())


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_float32_values_are_eagers_on_the_positive_axis(name):
    mine, eager, tolerance = FUNCTIONS[name]
    assert _error(mine(POSITIVE), eager(POSITIVE)) < tolerance


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_float32_values_are_right_on_the_negative_axis(name):
    """Against float64, as eager's float32 ``polygamma(1, x)`` itself is 4e-3 off next
    to the poles there."""
    mine, eager, tolerance = FUNCTIONS[name]
    assert _error(mine(NEGATIVE), eager(NEGATIVE.double())) < 5 * tolerance


def test_the_poles_and_zeros_are_eagers():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0])
    torch.testing.assert_close(lgamma(x), torch.lgamma(x), rtol=0, atol=0)
    torch.testing.assert_close(digamma(x), torch.digamma(x), rtol=0, atol=0, equal_nan=True)
    assert torch.isinf(polygamma(1, x[:3])).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64])
@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_the_result_has_eagers_dtype_and_value(name, dtype):
    mine, eager, tolerance = FUNCTIONS[name]
    x = torch.linspace(0.1, 10, 200).to(dtype) if dtype.is_floating_point else torch.arange(1, 30)
    got, want = mine(x), eager(x)
    assert got.dtype == want.dtype
    assert _error(got, want) <= (tolerance if dtype in (torch.float64, torch.int64)
                                 else torch.finfo(dtype).eps)


def test_higher_orders_are_left_to_torch_xla():
    assert polygamma(2, torch.ones(3)) is NotImplemented
    torch.testing.assert_close(polygamma(0, POSITIVE), torch.digamma(POSITIVE), rtol=1e-6,
                               atol=1e-6)
