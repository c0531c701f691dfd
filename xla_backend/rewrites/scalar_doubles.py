"""Chains of 0-d float32 ops computed in float64, as eager computes them on Python floats.

Eager torch optimizers that are not capturable read ``state["step"]`` with ``.item()``
and compute their bias corrections, RAdam's rectification and similar step-dependent
factors on Python floats (doubles). Traced, they run their capturable code instead
(this backend keeps step counters on the device), which computes the same expressions
on 0-d float32 tensors. Some of those expressions cancel. RAdam's
``rho_t = rho_inf - 2 t beta2^t / (1 - beta2^t)`` is 1e-3 off at step 6, where it
first exceeds 5, with ``beta2=0.999``, and its rectification factor 2e-3 (a
BatchNorm bias 2.5e-3 off eager's after 14 steps); with ``beta2=0.9999`` they are
16% and 31% off (the bias 24%). ``1 - beta2^t`` alone is 2e-4 off at the first step
with ``beta2=0.9999``. torch's own capturable code and inductor give the same float32
numbers; eager's non-capturable code is the reference here.

The rewrite finds each connected chain of at least two ops whose operands and results
are all 0-d float32 tensors (pointwise ops and their ``_foreach_`` forms, rooted at
graph inputs such as step counters and tensor learning rates, integer counters
converted to float, and scalar constants), and
computes it in float64: the chain's inputs are widened once, and each value that
leaves the chain is rounded back to float32 where it is used, so every op outside the
chain sees the dtype it saw before. That is what eager does with a Python float that
meets a float32 tensor: it is rounded to float32 there. Comparisons (``rho_t > 5``)
take the float64 value, as eager compares doubles. A single op is left alone: rounding
its float64 result once gives the float32 result.

On a backend without float64 (torch_xla's ``XLA_USE_BF16`` and friends, Neuron)
torch_xla narrows the widened values again, which leaves the float32 numbers.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode
from torch.fx import Node

from passes.base import GraphPass, PassResult

from ._fx import cast, meta_val

log = logging.getLogger(__name__)

__all__ = ["SCALAR_DOUBLES"]

aten = torch.ops.aten

#: Ops that copy or re-view a value without computing: members of a chain that do not
#: count towards its two ops.
_MOVES = frozenset({aten._to_copy.default, aten.clone.default, aten.alias.default,
                    aten.lift_fresh_copy.default, operator.getitem})
#: Ops that make a 0-d constant from a Python number and a ``dtype``.
_CONSTANTS = frozenset({aten.scalar_tensor.default, aten.full.default})


def _scalar32(value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and value.dim() == 0
            and value.dtype == torch.float32)


def _all_scalar32(value: Any) -> bool:
    leaves = pytree.tree_leaves(value)
    return bool(leaves) and all(_scalar32(v) for v in leaves)


def _floating(node: Node) -> bool:
    return any(isinstance(v, torch.Tensor) and v.dtype.is_floating_point
               for v in pytree.tree_leaves(meta_val(node)))


def _float_operands(node: Node) -> list[Node]:
    """The node's operands that hold floating tensors (a ``_foreach_`` result for its
    ``getitem``)."""
    return [a for a in pytree.tree_leaves((node.args, node.kwargs))
            if isinstance(a, Node) and _floating(a)]


def _computes(node: Node) -> bool:
    """Whether ``node`` is a pure elementwise op this rewrite may widen."""
    target = node.target
    if target is operator.getitem or target in _MOVES:
        return True
    if not isinstance(target, torch._ops.OpOverload) or target._schema.is_mutable:
        return False
    if torch.Tag.nondeterministic_seeded in target.tags:
        return False
    return (torch.Tag.pointwise in target.tags
            or target.overloadpacket.__name__.startswith("_foreach_"))


def _root(node: Node) -> bool:
    """A value a chain may start from: a 0-d float32 input, a number made a 0-d float32
    constant, or a 0-d integer (an int step counter) converted to float32."""
    if node.op == "placeholder":
        return True
    if node.op != "call_function":
        return False
    if node.target in _CONSTANTS:
        return node.target is aten.scalar_tensor.default or list(node.args[0]) == []
    return (node.target is aten._to_copy.default and isinstance(node.args[0], Node)
            and not _floating(node.args[0]))


def _members(graph: torch.fx.Graph) -> dict[Node, None]:
    """The nodes whose values can be float64 with no other node seeing it, in graph
    order."""
    members: dict[Node, None] = {}
    for node in graph.nodes:
        if not _all_scalar32(meta_val(node)):
            continue
        if _root(node):
            members[node] = None
        elif node.op == "call_function" and _computes(node):
            operands = _float_operands(node)
            if operands and all(a in members for a in operands):
                members[node] = None
    return members


def _chains(members: dict[Node, None]) -> list[list[Node]]:
    """The members joined by their edges, in graph order, keeping chains of two ops."""
    seen: set[Node] = set()
    chains = []
    for start in members:
        if start in seen:
            continue
        group, todo = set(), [start]
        while todo:
            node = todo.pop()
            if node not in group:
                group.add(node)
                todo.extend(n for n in (*node.all_input_nodes, *node.users) if n in members)
        seen |= group
        ops = [n for n in group if n.op == "call_function"
               and n.target not in _MOVES and n.target not in _CONSTANTS]
        if len(ops) >= 2:
            chains.append([n for n in members if n in group])
    return chains


def _takes_double(user: Node, chain: set[Node]) -> bool:
    """A comparison of chain values with numbers: eager compares the Python float."""
    value = meta_val(user)
    return (user.op == "call_function" and isinstance(value, torch.Tensor)
            and value.dtype == torch.bool and isinstance(user.target, torch._ops.OpOverload)
            and torch.Tag.pointwise in user.target.tags
            and all(a in chain for a in _float_operands(user)))


def _redirect(graph: torch.fx.Graph, node: Node, users: list[Node],
              dtype: torch.dtype) -> None:
    """``users`` read ``node`` converted to ``dtype``."""
    if not users:
        return
    with graph.inserting_after(node):
        converted = cast(graph, node, node, dtype)
    for user in users:
        user.replace_input_with(node, converted)


def _widen(graph: torch.fx.Graph, chain: list[Node]) -> None:
    members = set(chain)
    for node in chain:
        if node.op == "placeholder":
            _redirect(graph, node, [u for u in node.users if u in members], torch.float64)
            continue
        if "dtype" in node.kwargs:  # a constant, or an integer converted to float
            node.kwargs = {**node.kwargs, "dtype": torch.float64}
        vals_args, vals_kwargs = pytree.tree_map_only(Node, meta_val, (node.args, node.kwargs))
        if node.target is operator.getitem:
            node.meta["val"] = vals_args[0][vals_args[1]]
            continue
        fake_mode = detect_fake_mode(pytree.tree_leaves((vals_args, vals_kwargs, meta_val(node))))
        with fake_mode or contextlib.nullcontext():
            node.meta["val"] = node.target(*vals_args, **vals_kwargs)
    for node in chain:
        if node.op != "placeholder":
            _redirect(graph, node, [u for u in node.users if u not in members
                                    and not _takes_double(u, members)], torch.float32)


def _run(gm: torch.fx.GraphModule) -> PassResult:
    chains = _chains(_members(gm.graph))
    for chain in chains:
        _widen(gm.graph, chain)
    if chains:
        log.debug("scalar_doubles: %d chain(s) of 0-d float32 ops computed in float64",
                  len(chains))
    return PassResult(gm, bool(chains))


#: The pass, for :data:`xla_backend.rewrites.ATEN_REWRITES`.
SCALAR_DOUBLES = GraphPass("scalar_doubles", 1, _run)
