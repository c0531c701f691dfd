"""``t -= x`` on a tensor, traced as the same tensor it is in Python.

Why: for a tensor, ``p -= lr * p.grad`` calls ``p.__isub__``, which updates ``p`` in
place and returns ``p`` itself. Dynamo 2.9 traces the in-place op but binds the name to
a *new* variable with no source, so what the code does to ``p`` afterwards is done to
that stand-in. A hand-written SGD loop::

    for p in model.parameters():
        p -= lr * p.grad
        p.grad = None

then sets ``grad = None`` on nothing the program can see: the real gradients stay, the
next backward adds to them, and training is silently wrong on every backend, ``eager``
included. (The method form rebound, ``p = p.sub_(x)``, loses it the same way in torch
2.9, as pytorch/pytorch#113160 and #113271 describe; it is rarer and not covered here.)

While one of our compiled functions runs, :func:`augmented_assignment_keeps_tensor`
gives Dynamo's in-place arithmetic instructions (``+=``, ``-=``, ``*=``, ``/=`` and the
others) a variant that, when the left operand is a plain tensor and the result is one
too, leaves the left operand's variable on the stack. The op itself is still in the
graph, so reads after it see the updated value, exactly as the method form
``p.sub_(x)`` (which Dynamo already gets right) does.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

from torch._dynamo import symbolic_convert
from torch._dynamo.variables.tensor import TensorVariable

__all__ = ["augmented_assignment_keeps_tensor"]

_TRANSLATOR = symbolic_convert.InstructionTranslatorBase
#: Dynamo's own handlers of the in-place arithmetic instructions, by name.
_STOCK: dict[str, Callable[..., None]] = {
    name: fn for name, fn in vars(_TRANSLATOR).items() if name.startswith("INPLACE_")
}


def _keeping_tensor(stock: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(stock)
    def handler(self: Any, inst: Any) -> None:
        target = self.stack[-2]
        stock(self, inst)
        if type(target) is TensorVariable and type(self.stack[-1]) is TensorVariable:
            self.stack[-1] = target

    return handler


_PATCHED = {name: _keeping_tensor(fn) for name, fn in _STOCK.items()}

#: Python >= 3.11 runs every binary and in-place op through this table (BINARY_OP);
#: swapping its contents is one slice assignment, at each outermost call of ours.
_LOOKUP: list[Callable[..., None]] | None = getattr(symbolic_convert, "_binary_op_lookup", None)
if _LOOKUP is not None:
    _by_stock = {id(_STOCK[name]): _PATCHED[name] for name in _STOCK}
    _STOCK_LOOKUP = list(_LOOKUP)
    _PATCHED_LOOKUP = [_by_stock.get(id(fn), fn) for fn in _LOOKUP]


def _install(patched: bool) -> None:
    if _LOOKUP is not None:
        _LOOKUP[:] = _PATCHED_LOOKUP if patched else _STOCK_LOOKUP
        return
    for name, fn in (_PATCHED if patched else _STOCK).items():  # one opcode per op
        setattr(_TRANSLATOR, name, fn)


@contextlib.contextmanager
def augmented_assignment_keeps_tensor() -> Iterator[None]:
    """Puts the tensor-keeping handlers in Dynamo for the duration."""
    _install(True)
    try:
        yield
    finally:
        _install(False)
