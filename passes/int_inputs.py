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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.fx import Node

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
    for k, read in list(reads.items()):
        if read not in rewritable:
            node = read.args[0]
            read.replace_all_uses_with(node)
            gm.graph.erase_node(read)
            node.meta["example_value"] = read.meta["example_value"]
            del reads[k]
    if reads:
        gm.recompile()
    return sorted(reads)
