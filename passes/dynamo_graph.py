"""Small helpers for passes that run on Dynamo graphs (torch-level ops, before AOTAutograd).

Dynamo records each node's traced value in ``node.meta["example_value"]``: a
FakeTensor, or a SymInt / SymFloat / SymBool for Python scalars it keeps symbolic.
Passes here read those to know which nodes are scalars and which are tensors.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx
from torch.fx import Node

log = logging.getLogger(__name__)

SYM_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)


def value(node: Any) -> Any:
    """The traced value of ``node`` (Dynamo's ``example_value``, or ``val``), else None."""
    if not isinstance(node, Node):
        return None
    meta = node.meta
    return meta["example_value"] if "example_value" in meta else meta.get("val")


def is_sym(node: Any) -> bool:
    return isinstance(value(node), SYM_TYPES)


def is_tensor(node: Any) -> bool:
    return isinstance(value(node), torch.Tensor)


def is_dynamo_float_input(node: Any) -> bool:
    """A placeholder Dynamo made for a Python float it chose not to specialize.

    Dynamo passes such a float (``param_groups[0]["lr"]``) as a 0-d float64 tensor
    and calls ``.item()`` on it in the graph; AOTAutograd's ``tensorify_python_scalars``
    must still find that ``.item()`` and an op taking its bare result, or it
    specializes the float (see ``tensorify_scalars``).
    """
    if not isinstance(node, Node) or node.op != "placeholder":
        return False
    grapharg = node.meta.get("grapharg")
    return bool(getattr(grapharg, "pass_arg_as_tensor", False))


def fake_mode(gm: torch.fx.GraphModule) -> Any:
    """The fake mode of the graph's traced values, or None (a hand-built graph)."""
    from torch._guards import detect_fake_mode

    vals = [value(n) for n in gm.graph.nodes if n.op == "placeholder"]
    vals = [v for v in vals if isinstance(v, torch.Tensor)]
    try:
        return detect_fake_mode(vals) if vals else None
    except AssertionError:  # values from several fake modes: leave meta alone
        return None


def annotate(node: Node, mode: Any) -> None:
    """Gives a new node an ``example_value`` by running it on its inputs' fake values.

    Advisory only: AOTAutograd retraces the graph itself, so a node we cannot
    evaluate simply goes without.
    """
    if mode is None:
        return
    missing = False

    def to_val(n: Node) -> Any:
        nonlocal missing
        v = value(n)
        if v is None:
            missing = True
        return v

    args = torch.fx.node.map_arg(node.args, to_val)
    kwargs = torch.fx.node.map_arg(node.kwargs, to_val)
    if missing:
        return
    try:
        with mode:
            if node.op == "call_method":
                self_, *rest = args
                result = getattr(self_, node.target)(*rest, **kwargs)
            else:
                result = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - meta is advisory
        log.debug("no example value for %s", node.format_node(), exc_info=True)
        return
    node.meta["example_value"] = result
