"""``abs`` of a complex tensor as the magnitude of its real view (all XLA clients).

torch_xla 2.9's ``abs`` of a complex tensor returns a complex tensor. Eagerly, autograd
then refuses the backward ("abs does not support automatic differentiation for outputs
with complex dtype"); in a compiled step the reduction that follows fails to lower
("Invalid type for NanValue (C64)"). ``torch.fft.rfft(x).abs()``, a spectrum's
magnitude, is the usual case (``torch.stft`` itself does not trace on XLA: its C++
composite stops AOTAutograd with "Expected XLA tensor"). The rewrite runs on the Dynamo
graph, before AOTAutograd, so the backward is derived from the replacement: the square
root of the sum of squares of ``torch.view_as_real``'s two components, in the input's
real dtype.
At zero, where that square root has no derivative, the value and the gradient are 0,
as eager's (its gradient there is ``sgn(0) = 0``). It agrees with eager's magnitude to
float rounding; eager's avoids overflow for components near the dtype's maximum, and
this one does not.
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from ._fx import replacing_pass

log = logging.getLogger(__name__)

_ABS_FUNCTIONS = frozenset({torch.abs, torch.absolute})
_ABS_METHODS = frozenset({"abs", "absolute"})


def complex_magnitude(z: torch.Tensor) -> torch.Tensor:
    """``z.abs()`` for a complex ``z``, from real ops only."""
    squared = torch.view_as_real(z).square().sum(-1)
    nonzero = squared > 0
    return torch.where(nonzero, torch.where(nonzero, squared, 1).sqrt(), 0)


def _complex_abs_operand(node: torch.fx.Node) -> tuple[torch.fx.Node] | None:
    """``(z,)`` for ``torch.abs(z)`` or ``z.abs()`` of a complex ``z``, else None."""
    is_abs = ((node.op == "call_function" and node.target in _ABS_FUNCTIONS)
              or (node.op == "call_method" and node.target in _ABS_METHODS))
    if not is_abs or len(node.args) != 1 or node.kwargs or \
            not isinstance(node.args[0], torch.fx.Node):
        return None  # out= or a bad call: torch reports it
    value = node.args[0].meta.get("example_value")
    if isinstance(value, torch.Tensor) and value.is_complex():
        return (node.args[0],)
    return None


#: The pass, run on Dynamo graphs (``backend.py``).
COMPLEX_ABS = replacing_pass("complex_abs", 1, _complex_abs_operand, complex_magnitude, log,
                             "rewrote %d abs of a complex tensor as a real magnitude")

__all__ = ["COMPLEX_ABS", "complex_magnitude"]
