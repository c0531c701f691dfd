"""``matrix_exp`` and ``householder_product`` from matrix products, where torch_xla 2.9
has no lowering for either.

Both are what ``torch.nn.utils.parametrizations.orthogonal`` computes a weight from
(``matrix_exp`` for a square one by default, ``householder_product`` for the rest), so
an orthogonal layer ran them on torch_xla's CPU fallback: 2 host transfers and 2-3
executions a step more, forward and backward. These are AOTAutograd decompositions,
so the backward graphs get them too (``matrix_exp``'s backward is the ``matrix_exp``
of a block matrix twice the size).

* ``matrix_exp``: scaling and squaring. The matrix is divided by ``2**s``, ``s`` the
  smallest whole number that brings its 1-norm to at most 1, then a Taylor polynomial
  of degree 12 (float32; 18 in float64) is evaluated by Horner's rule, within rounding
  of the exponential at that norm, and squared ``s`` times. ``s`` is data, so every
  matrix is squared up to :data:`MAX_SQUARINGS` times, each squaring kept only where
  ``s`` asks for it; a matrix whose 1-norm is above ``2**MAX_SQUARINGS`` gives NaN,
  not a wrong value (eager would give its exponential, or overflow).
* ``householder_product``: the product of the reflectors ``I - tau_i v_i v_i^T`` applied
  to the first columns of the identity, right to left, a rank-one update each.

Float16 and bfloat16 are computed in float32 and rounded once; complex matrices and
symbolic sizes stay on the host.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._fx import working_precision

#: The most squarings ``matrix_exp`` does: 1-norms up to 2**24 (1.7e7).
MAX_SQUARINGS = 24


def _supported(*tensors: torch.Tensor) -> bool:
    return all(t.is_floating_point() and all(isinstance(d, int) for d in t.shape)
               for t in tensors)


def matrix_exponential(a: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.matrix_exp`` of a real (batch of) square matrices."""
    if not _supported(a):
        return NotImplemented
    x = working_precision(a)
    n = x.shape[-1]
    degree = 18 if x.dtype == torch.float64 else 12
    with torch.no_grad():  # how far to scale is piecewise constant: no gradient
        norm = x.abs().sum(-2).amax(-1)
        squarings = torch.ceil(torch.log2(norm)).clamp(min=0)
        # 2**-s exactly, from halvings: torch_xla has no exp2, and exp or pow may round
        factor = torch.ones_like(squarings)
        for k in range(MAX_SQUARINGS):
            factor = torch.where(squarings > k, factor * 0.5, factor)
    scaled = x * factor[..., None, None]
    eye = torch.eye(n, dtype=x.dtype, device=x.device).expand_as(x)
    power = eye
    for j in range(degree, 0, -1):
        power = eye + (scaled @ power) / j
    for k in range(MAX_SQUARINGS):
        power = torch.where((squarings > k)[..., None, None], power @ power, power)
    power = torch.where((squarings > MAX_SQUARINGS)[..., None, None], torch.nan, power)
    return power.to(a.dtype)


def householder_product(a: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``torch.linalg.householder_product``: the first ``n`` columns of
    ``H_1 ... H_k``, ``H_i = I - tau_i v_i v_i^T``, ``v_i`` being 1 at row ``i``, 0 above
    and ``a``'s column ``i`` below."""
    if not _supported(a, tau):
        return NotImplemented
    x, t = working_precision(a), working_precision(tau)
    m, n = x.shape[-2], x.shape[-1]
    rows = torch.arange(m, device=x.device)
    q = torch.eye(m, n, dtype=x.dtype, device=x.device).expand_as(x)
    for i in range(t.shape[-1] - 1, -1, -1):
        v = torch.where(rows > i, x[..., :, i], (rows == i).to(x.dtype))
        q = q - t[..., i, None, None] * v[..., :, None] * (v[..., None, :] @ q)
    return q.to(a.dtype)


def matrix_function_decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """The decompositions, for AOTAutograd's ``decompositions=``."""
    aten = torch.ops.aten
    return {aten.linalg_matrix_exp.default: matrix_exponential,
            aten.linalg_householder_product.default: householder_product}


__all__ = ["MAX_SQUARINGS", "householder_product", "matrix_exponential",
           "matrix_function_decompositions"]
