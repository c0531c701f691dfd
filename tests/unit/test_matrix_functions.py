"""``rewrites.matrix_functions`` against eager's kernels on CPU, no XLA: ``matrix_exp``
over 1-norms from 1e-3 to about 100 (values against float64, gradients against eager's
own), orthogonal results for skew-symmetric matrices, NaN past the squarings it does;
``householder_product`` values and gradients for tall, square and partial products."""

from __future__ import annotations

import pytest
import torch

from xla_backend.rewrites.matrix_functions import (
    MAX_SQUARINGS,
    householder_product,
    matrix_exponential,
)

SCALES = [1e-3, 0.3, 1.0, 5.0, 20.0]


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 2e-5), (torch.float64, 1e-13)],
                         ids=["float32", "float64"])
def test_matrix_exp_is_eagers_to_rounding(scale, dtype, tolerance):
    a = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(0), dtype=dtype) * scale
    exact = torch.linalg.matrix_exp(a.double())
    eager = _relative(torch.linalg.matrix_exp(a), exact)
    assert _relative(matrix_exponential(a), exact) < max(tolerance, 3 * eager)


def test_matrix_exp_gradient_is_eagers():
    a = torch.randn(2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weights = torch.randn(2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    grads = []
    for fn in (matrix_exponential, torch.linalg.matrix_exp):
        x = (a * 3).requires_grad_()
        grads.append(torch.autograd.grad((fn(x) * weights).sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_a_skew_symmetric_matrix_gives_an_orthogonal_one():
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(3)) * 2
    q = matrix_exponential(x - x.T)
    torch.testing.assert_close(q @ q.T, torch.eye(16), rtol=0, atol=2e-6)


def test_zero_gives_the_identity_and_past_the_last_squaring_nan():
    assert torch.equal(matrix_exponential(torch.zeros(2, 3, 3)), torch.eye(3).expand(2, 3, 3))
    a = torch.stack([torch.eye(2), torch.full((2, 2), 2.0 ** (MAX_SQUARINGS + 1))])
    got = matrix_exponential(a)
    torch.testing.assert_close(got[0], torch.linalg.matrix_exp(torch.eye(2)))
    assert got[1].isnan().all()


def test_half_precision_is_computed_in_float32():
    a = torch.randn(3, 3, generator=torch.Generator().manual_seed(4)).bfloat16()
    got = matrix_exponential(a)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, torch.linalg.matrix_exp(a.float()).bfloat16())


@pytest.mark.parametrize(("m", "n", "k"), [(6, 4, 4), (5, 5, 5), (7, 3, 2), (4, 4, 1)])
def test_householder_product_and_its_gradients_are_eagers(m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    a = torch.randn(2, m, n, dtype=torch.float64, generator=g).requires_grad_()
    tau = torch.rand(2, k, dtype=torch.float64, generator=g).requires_grad_()
    weights = torch.randn(2, m, n, dtype=torch.float64, generator=g)
    got, want = householder_product(a, tau), torch.linalg.householder_product(a, tau)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for mine, eager in zip(torch.autograd.grad((got * weights).sum(), (a, tau)),
                           torch.autograd.grad((want * weights).sum(), (a, tau))):
        torch.testing.assert_close(mine, eager, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.int64])
def test_complex_and_integer_matrices_are_left_to_the_op(dtype):
    x = torch.ones(2, 2, dtype=dtype)
    assert matrix_exponential(x) is NotImplemented
    assert householder_product(x, torch.ones(1, dtype=dtype)) is NotImplemented
