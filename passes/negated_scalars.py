"""A negated float scalar moves out of the tensor op it feeds (``hoist_scalar_negation``).

Runs on the *Dynamo* graph, before AOTAutograd, after ``tensorify_scalar_reads``: that
pass turns a learning rate's whole arithmetic into tensor ops, but leaves the group
alone when one use cannot take a tensor (a keyword argument, a graph output); this
narrower rewrite still applies then. The pattern is how SGD and RMSprop
apply their learning rate, ``param.add_(update, alpha=-lr)``, once Dynamo keeps
``lr`` symbolic (``specialize_float=False``, see ``xla_backend.dynamo.scope``)::

    lr = L_lr_.item()                  # Dynamo's own float input: a SymFloat s0
    neg = -lr                          # operator.neg
    upd = torch.mul(buf, neg)          # the tensor op sees only -s0
    p.add_(upd)

and the rewrite is::

    upd = torch.neg(torch.mul(buf, lr))

Why: AOTAutograd's ``tensorify_python_scalars`` turns Sym floats feeding tensor
ops into tensor inputs, but it records a float input as handled only when some op
takes the bare symbol. When every use is ``-s0`` it decides ``s0`` was not
tensorified, specializes it and restarts Dynamo: the learning rate is baked in and
every scheduler step recompiles (and after ``recompile_limit`` runs eagerly). With
``-s0`` hoisted out, the op takes ``s0`` itself.

Why the semantics are kept: IEEE-754 negation is exact and rounding to nearest is
symmetric, so ``round(a * -b) == -round(a * b)`` and likewise for ``/`` in either
operand order; converting ``-b`` to the tensor's dtype is ``-(b converted)``. The
dtype of the result does not change (``neg`` keeps it). Only ``mul`` and ``div`` /
``true_divide`` without keyword arguments are rewritten (``rounding_mode`` would
break the symmetry), only for SymFloat operands, and only when the other operand is
a tensor. In-place forms (``t.mul_(-s)``) become ``t.mul_(s).neg_()``.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx
from torch.fx import Node

from .base import GraphPass, PassResult
from .dynamo_graph import is_tensor, value

log = logging.getLogger(__name__)

__all__ = ["hoist_scalar_negation"]

_FUNCTIONS = frozenset({operator.mul, operator.truediv, torch.mul, torch.div, torch.true_divide})
_METHODS = frozenset({"mul", "div", "true_divide"})
_INPLACE = frozenset({"mul_", "div_"})


def _negated_float(arg: Any) -> Node | None:
    """``s`` when ``arg`` is the node ``-s`` for a SymFloat ``s``, else None."""
    if (isinstance(arg, Node) and arg.op == "call_function" and arg.target is operator.neg
            and len(arg.args) == 1 and isinstance(value(arg), torch.SymFloat)
            and isinstance(arg.args[0], Node)):
        return arg.args[0]
    return None


def _match(node: Node) -> tuple[int, Node] | None:
    """(operand index, s) when ``node`` is ``tensor OP -s`` / ``-s OP tensor``."""
    if node.kwargs or len(node.args) != 2:
        return None
    if node.op == "call_function":
        if node.target not in _FUNCTIONS:
            return None
    elif node.op == "call_method":
        if node.target not in _METHODS | _INPLACE:
            return None
    else:
        return None
    for i, arg in enumerate(node.args):
        inner = _negated_float(arg)
        if inner is not None and is_tensor(node.args[1 - i]):
            if node.op == "call_method" and i == 0:
                return None
            return i, inner
    return None


def _run(gm: torch.fx.GraphModule) -> PassResult:
    graph = gm.graph
    rewritten = 0
    for node in list(graph.nodes):
        match = _match(node)
        if match is None:
            continue
        index, inner = match
        negated = node.args[index]
        args = list(node.args)
        args[index] = inner
        inplace = node.op == "call_method" and node.target in _INPLACE
        with graph.inserting_after(node):
            if inplace:
                flipped = graph.call_method("neg_", (node,))
            else:
                flipped = graph.call_function(torch.neg, (node,))
        node.replace_all_uses_with(flipped, delete_user_cb=lambda user, f=flipped: user is not f)
        node.args = tuple(args)
        if value(node) is not None:  # same shape and dtype, only the sign differs
            flipped.meta["example_value"] = value(node)
        if not negated.users:
            graph.erase_node(negated)
        rewritten += 1
    if rewritten:
        log.debug("hoist_scalar_negation: %d tensor ops now take the scalar itself", rewritten)
    return PassResult(gm, bool(rewritten))


hoist_scalar_negation = GraphPass(name="hoist_scalar_negation", version=1, run=_run)
