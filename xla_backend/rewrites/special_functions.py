"""``lgamma``, ``digamma`` and ``polygamma(1, x)`` from ordinary ops, where torch_xla 2.9
has no lowering for any of them.

Each ran on torch_xla's CPU fallback: a round trip to the host per call, 4-12 per step
for a Beta, Gamma, Dirichlet or Poisson log-probability and its gradient (``lgamma``'s
derivative is ``digamma``, whose derivative is ``polygamma(1, x)``). These are
AOTAutograd decompositions, so the backward graphs get them too.

* ``lgamma``: Lanczos's approximation (g = 7, nine terms) for ``x >= 0.5``, the
  reflection formula below, ``inf`` at the poles (0, -1, ...) and exactly 0 at 1 and 2,
  as eager.
* ``digamma`` and ``polygamma(1, x)``: the recurrence up to ``x + 6`` and the asymptotic
  series there, the reflection formula below 0.5; ``digamma`` is ``-inf`` at 0 and NaN at
  the negative integers, as eager, and ``polygamma(1, x)`` is ``inf`` at every pole.

``sin`` and ``tan`` of ``pi x`` are taken of ``pi (x - round(x))``, or the reflection
would lose the digits that matter next to a pole. In float32 the results agree with
eager's to 3e-6 (``lgamma``) and 1e-6 (the others) of ``max(1, |value|)``;
half-precision inputs are computed in float32 and rounded once. Higher orders of
``polygamma`` (the backward of ``polygamma(1, x)`` itself) stay on the host.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ._fx import working_precision

_LANCZOS_G = 7.0
_LANCZOS = (0.99999999999980993, 676.5203681218851, -1259.1392167224028, 771.32342877765313,
            -176.61502916214059, 12.507343278686905, -0.13857109526572012,
            9.9843695780195716e-6, 1.5056327351493116e-7)
_SHIFT = 6  # from here on the series below hold to float32 rounding (1e-10 in float64)


def _result_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def _pi_reduced(x: torch.Tensor) -> torch.Tensor:
    """``pi x`` less a multiple of ``pi``: ``sin`` (up to its sign) and ``tan`` of it are
    those of ``pi x``, without the digits ``pi x`` itself loses next to an integer."""
    return math.pi * (x - torch.round(x))


def _poles(x: torch.Tensor) -> torch.Tensor:
    return (x <= 0) & (x == torch.floor(x))


def lgamma(x: torch.Tensor) -> torch.Tensor:
    """``log|Gamma(x)|``."""
    w = working_precision(x)
    reflect = w < 0.5
    z = torch.where(reflect, 1 - w, w) - 1
    series = _LANCZOS[0] + sum(c / (z + i) for i, c in enumerate(_LANCZOS[1:], 1))
    t = z + _LANCZOS_G + 0.5
    right = 0.5 * math.log(2 * math.pi) + (z + 0.5) * torch.log(t) - t + torch.log(series)
    left = math.log(math.pi) - torch.log(torch.abs(torch.sin(_pi_reduced(w)))) - right
    out = torch.where(_poles(w), math.inf, torch.where(reflect, left, right))
    # its zeros exactly, as eager (log 0! and log 1! of a count)
    out = torch.where((w == 1) | (w == 2), 0.0, out)
    return out.to(_result_dtype(x))


def _shifted(w: torch.Tensor, series: Callable[[torch.Tensor], torch.Tensor],
             term: Callable[[torch.Tensor], torch.Tensor], sign: float) -> torch.Tensor:
    """``series(w + 6) + sign * sum(term(w + k) for k < 6)`` where ``w < 6``, else
    ``series(w)``: the recurrence that moves the argument to where the series holds."""
    small = w < _SHIFT
    recurred = sum(term(w + k) for k in range(_SHIFT))
    return series(torch.where(small, w + _SHIFT, w)) + sign * torch.where(small, recurred, 0.0)


def _digamma_series(y: torch.Tensor) -> torch.Tensor:
    r = 1 / (y * y)
    return torch.log(y) - 0.5 / y - r * (1 / 12 - r * (1 / 120 - r * (1 / 252 - r * (
        1 / 240 - r / 132))))


def _trigamma_series(y: torch.Tensor) -> torch.Tensor:
    r = 1 / (y * y)
    return 1 / y + r / 2 + (r / y) * (1 / 6 - r * (1 / 30 - r * (1 / 42 - r / 30)))


def digamma(x: torch.Tensor) -> torch.Tensor:
    """``d/dx lgamma(x)``."""
    w = working_precision(x)
    reflect = w < 0.5
    right = _shifted(torch.where(reflect, 1 - w, w), _digamma_series, torch.reciprocal, -1.0)
    out = torch.where(reflect, right - math.pi / torch.tan(_pi_reduced(w)), right)
    out = torch.where(_poles(w), torch.where(w == 0, -math.inf, math.nan), out)
    return out.to(_result_dtype(x))


def polygamma(n: int, x: torch.Tensor) -> torch.Tensor:
    """``polygamma(n, x)`` for ``n`` 0 and 1; other orders are left to torch_xla."""
    if n == 0:
        return digamma(x)
    if n != 1:
        return NotImplemented
    w = working_precision(x)
    reflect = w < 0.5
    right = _shifted(torch.where(reflect, 1 - w, w), _trigamma_series,
                     lambda v: 1 / (v * v), 1.0)
    s = torch.sin(_pi_reduced(w))
    out = torch.where(reflect, math.pi ** 2 / (s * s) - right, right)
    return out.to(_result_dtype(x))


def special_function_decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """The decompositions, for AOTAutograd's ``decompositions=``."""
    aten = torch.ops.aten
    return {aten.lgamma.default: lgamma, aten.digamma.default: digamma,
            aten.polygamma.default: polygamma}


__all__ = ["digamma", "lgamma", "polygamma", "special_function_decompositions"]
