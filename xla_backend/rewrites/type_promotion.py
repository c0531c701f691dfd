"""Explicit casts where torch_xla's lowering skips type promotion (``promote_dtypes``).

The torch_xla bugs stepped around (torch_xla 2.9):

* ``clamp`` / ``clamp_min`` / ``clamp_max`` / ``remainder`` / ``where`` / ``cat`` with
  operands of mixed dtypes compute in the first tensor's dtype: ``int.clamp(min=-1.5)``
  gives an integer result with the bound truncated, ``where(c, bool, int)`` a bool,
  ``cat([empty bool, int])`` a bool. Eager promotes to the common dtype first.
* ``cumsum`` / ``cumprod`` of a bool tensor give bool; eager accumulates in int64.
* Floating-only pointwise ops (``exp``, ``sin``, ``sigmoid``, ``sqrt``, ...) of a bool
  tensor fail to lower (XLA's ``PRED`` is not a floating type), and ``clamp`` of a bool
  tensor raises "Clamp unimplemented for PRED"; eager converts the bool to the result's
  dtype first.

Why the rewrite keeps eager semantics: for these ops eager's TensorIterator computes
in the common dtype of its operands, which is the dtype of the result recorded in
``node.meta["val"]`` (none of them is a comparison, whose result is bool whatever the
operands), and casts every tensor operand to it before computing. The rewrite inserts
exactly those casts (``aten._to_copy`` with the result's dtype), so the lowering sees
operands of one dtype and nothing is left to promote. Scalars are left as they are: once
the tensor has the result's dtype, a float bound is applied as a float, as in eager.
Operands that are not promoted (a ``where`` condition, a ``masked_fill`` mask) are left
alone, and so are ops whose operands already all have the result's dtype. So is
subtraction of a bool tensor, which eager refuses: a cast would make it succeed.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx
from torch.fx import Node

from passes.base import GraphPass, PassResult

from ._fx import meta_val

log = logging.getLogger(__name__)

__all__ = ["promote_dtypes"]

aten = torch.ops.aten

#: Ops whose operands all promote to the result's dtype, cast whatever their dtypes.
_PROMOTING = frozenset({
    aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_min.Tensor,
    aten.clamp_max.default, aten.clamp_max.Tensor, aten.remainder.Scalar,
    aten.remainder.Tensor, aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther,
    aten.cat.default,
    # a scan of bool gives bool in torch_xla; eager accumulates integers in int64
    aten.cumsum.default, aten.cumprod.default,
})

#: Ops that eager refuses for bool operands ("Subtraction ... with a bool tensor is not
#: supported"), which their meta kernels let through: a cast would make them succeed.
_REFUSE_BOOL = frozenset({aten.sub.Tensor, aten.sub.Scalar, aten.rsub.Tensor, aten.rsub.Scalar})

#: Schema argument names that are not part of type promotion.
_NOT_PROMOTED = frozenset({"condition", "mask"})


def _should_cast(target: Any, operand: torch.Tensor, result: torch.dtype) -> bool:
    if operand.dtype == result:
        return False
    if target in _PROMOTING:
        return True
    # a pointwise op with a floating result computes a bool operand as that float
    return operand.dtype == torch.bool and result.is_floating_point


def _applies(node: Node) -> bool:
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return False
    if node.target is torch.ops.prims.convert_element_type.default or node.target in _REFUSE_BOOL:
        return False
    if node.target not in _PROMOTING and torch.Tag.pointwise not in node.target.tags:
        return False
    result = meta_val(node)
    return isinstance(result, torch.Tensor)


def _cast(graph: torch.fx.Graph, node: Node, operand: Node, dtype: torch.dtype) -> Node:
    with graph.inserting_before(node):
        cast = graph.call_function(aten._to_copy.default, (operand,), {"dtype": dtype})
    cast.meta["val"] = meta_val(operand).to(dtype)
    if "stack_trace" in node.meta:
        cast.meta["stack_trace"] = node.meta["stack_trace"]
    return cast


def _rewrite(graph: torch.fx.Graph, node: Node) -> int:
    """Casts the promoted tensor operands of ``node``; returns how many it cast."""
    dtype = meta_val(node).dtype
    schema = node.target._schema
    casts = 0

    def promote(arg: Any, name: str) -> Any:
        nonlocal casts
        if isinstance(arg, (list, tuple)):
            return type(arg)(promote(a, name) for a in arg)
        operand = meta_val(arg)
        if (name in _NOT_PROMOTED or not isinstance(operand, torch.Tensor)
                or not _should_cast(node.target, operand, dtype)):
            return arg
        casts += 1
        return _cast(graph, node, arg, dtype)

    names = [a.name for a in schema.arguments]
    node.args = tuple(promote(a, names[i] if i < len(names) else "")
                      for i, a in enumerate(node.args))
    node.kwargs = {k: promote(v, k) for k, v in node.kwargs.items()}
    return casts


def _run(gm: torch.fx.GraphModule) -> PassResult:
    casts = 0
    for node in list(gm.graph.nodes):
        if _applies(node):
            casts += _rewrite(gm.graph, node)
    if casts:
        log.debug("promote_dtypes: %d operands cast to their op's result dtype", casts)
    return PassResult(gm, bool(casts))


promote_dtypes = GraphPass(name="promote_dtypes", version=1, run=_run)
