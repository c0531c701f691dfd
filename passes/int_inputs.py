"""Python int inputs used only as numbers become 0-d tensor inputs (``tensorify_int_inputs``).

Dynamo makes an int argument symbolic at its second value (a step index passed to
the step, ``train_step(x, y, it)``), and the graph takes it as a SymInt. Lowered, a
SymInt is a constant of the computation: every new value traces the graph again,
reads values back to the host and stores one more graph-cache entry, every step.
A Python float does not have that cost because Dynamo passes it as a 0-d float64
tensor read with ``.item()``, which ``tensorify_scalar_reads`` turns into tensor math.

This does the same for an int: the placeholder becomes a 0-d int64 tensor read with
``.item()``, and the caller passes ``torch.tensor(value)`` there. Only where every
use of the number is arithmetic that ``tensorify_scalar_reads`` rewrites (never a
size, an index or a loop bound) and its symbol is no tensor's size; anything else
keeps the SymInt, as before.

One more use is common enough to be taken: the graph returning a number computed from
the input, as a hand-written optimizer's ``group["step"] += 1`` does next to bias
corrections (``1 - beta ** step``) that are arithmetic. The input then stays a SymInt
for what the graph returns, which gets its own copy of that arithmetic, and the other
uses read ``torch.scalar_tensor(step).item()`` (:func:`_tensorify_beside_outputs`). Left
symbolic, a bias correction times a float learning rate made AOTAutograd specialize the
learning rate: a recompile per scheduled value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.fx import Node
from torch.fx.node import map_arg

from .dynamo_graph import is_tensor, value
from .tensorify_scalars import rewritable_reads

__all__ = ["tensorify_int_inputs"]


def _size_symbols(placeholders: list[Node]) -> set[Any]:
    """Every symbol in a tensor input's sizes and strides."""
    symbols: set[Any] = set()
    for node in placeholders:
        if is_tensor(node):
            t = value(node)
            for dim in (*t.shape, *t.stride()):
                if isinstance(dim, torch.SymInt):
                    symbols |= dim.node.expr.free_symbols
    return symbols


def tensorify_int_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> list[int]:
    """Rewrites such placeholders in place; returns their positions among the inputs.

    The caller must pass each of those inputs as ``torch.tensor(value)`` (int64, on the
    host) from then on, and use such a tensor as its example input.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # the fake mode of Dynamo's traced values, to give the new input one of its own
    mode = next((value(n).fake_mode for n in placeholders
                 if hasattr(value(n), "fake_mode")), None)
    if mode is None or len(placeholders) != len(example_inputs):
        return []
    sizes = _size_symbols(placeholders)
    reads: dict[int, Node] = {}
    last = placeholders[-1]
    for k, (node, example) in enumerate(zip(placeholders, example_inputs)):
        sym = value(node)
        if not (isinstance(example, torch.SymInt) and isinstance(sym, torch.SymInt)
                and sym.node.expr.is_Symbol and sym.node.expr not in sizes
                and node.users):
            continue
        with gm.graph.inserting_after(last):
            read = gm.graph.call_method("item", (node,))
        read.meta["example_value"] = sym
        node.replace_all_uses_with(read, delete_user_cb=lambda user, read=read: user is not read)
        with mode:
            node.meta["example_value"] = torch.empty((), dtype=torch.int64)
        reads[k] = read
    if not reads:
        return []
    rewritable = rewritable_reads(gm)
    kept: list[Node] = []
    for k, read in list(reads.items()):
        if read not in rewritable:
            node = read.args[0]
            read.replace_all_uses_with(node)
            gm.graph.erase_node(read)
            node.meta["example_value"] = read.meta["example_value"]
            del reads[k]
            kept.append(node)
    changed = [node for node in kept if _tensorify_beside_outputs(gm, node, mode)]
    if reads or changed:
        gm.recompile()
    return sorted(reads)


def _numbers(gm: torch.fx.GraphModule, source: Node) -> set[Node]:
    """``source`` and the number arithmetic computed from it (and constants) alone."""
    found = {source}
    for node in gm.graph.nodes:
        if (node.op == "call_function" and isinstance(value(node), (torch.SymInt, torch.SymFloat))
                and node.all_input_nodes and all(a in found for a in node.all_input_nodes)):
            found.add(node)
    return found


def _tensorify_beside_outputs(gm: torch.fx.GraphModule, node: Node, mode: Any) -> bool:
    """Rewrites the uses of SymInt input ``node`` other than the graph's outputs, and
    says whether it did (the module docstring). The outputs keep a copy of the
    arithmetic that computes them from ``node``."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    numbers = _numbers(gm, node)
    returned: set[Node] = set()
    map_arg(output.args, lambda a: returned.add(a) if a in numbers else None)
    if not returned:
        return False
    needed: set[Node] = set()
    stack = [n for n in returned if n is not node]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            stack.extend(a for a in n.all_input_nodes if a is not node)
    copies: dict[Node, Node] = {}
    with gm.graph.inserting_before(output):
        for n in gm.graph.nodes:
            if n in needed:
                copies[n] = gm.graph.node_copy(n, lambda a: copies.get(a, a))
    before = output.args
    output.args = map_arg(output.args, lambda a: copies.get(a, a))
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        boxed = gm.graph.call_function(torch.scalar_tensor, (node,), {"dtype": torch.int64})
    with gm.graph.inserting_after(boxed):
        read = gm.graph.call_method("item", (boxed,))
    with mode:
        boxed.meta["example_value"] = torch.empty((), dtype=torch.int64)
    read.meta["example_value"] = value(node)
    keep = {boxed, *copies.values()}
    node.replace_all_uses_with(read, delete_user_cb=lambda user: user not in keep)
    if read in rewritable_reads(gm):
        return True
    read.replace_all_uses_with(node)
    output.args = before
    for n in [read, boxed, *reversed(list(copies.values()))]:
        gm.graph.erase_node(n)
    return False
