"""Host tensors the step itself moves to the device become device inputs (``hoist_device_moves``).

A step that starts with ``x, y = x.to(device), y.to(device)`` gets the batch as host
tensors, and Dynamo puts the moves inside the graph: the graph's inputs are on the
CPU. A graph lowered for the device cannot take them. Where every use of such an input
is a move of it to one device, with nothing else changed (dtype, layout), the move is
taken out of the graph: the placeholder stands for the moved tensor, and the caller
moves the argument before the call, as the step would have.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch.fx import Node

from .dynamo_graph import value

__all__ = ["hoist_device_moves"]

_MOVE_KEYWORDS = {"device", "non_blocking", "copy"}


def _moved_to(node: Node, source: Node) -> torch.device | None:
    """The device ``node`` moves ``source`` to, if that is all it does."""
    if not (node.op == "call_method" and node.target == "to" and node.args[:1] == (source,)
            and set(node.kwargs) <= _MOVE_KEYWORDS):
        return None
    before, after = value(source), value(node)
    devices = [*node.args[1:], node.kwargs.get("device")]
    if not all(d is None or isinstance(d, (torch.device, str)) for d in devices):
        return None  # a dtype or another tensor's options
    if not (isinstance(after, torch.Tensor) and after.dtype == before.dtype
            and after.shape == before.shape and after.device != before.device):
        return None
    return after.device


def hoist_device_moves(gm: torch.fx.GraphModule,
                       example_inputs: Sequence[Any]) -> dict[int, torch.device]:
    """Rewrites such placeholders in place; returns their positions and devices.

    Only host tensors of one dimension or more: a 0-d host tensor is a scalar the
    graph may take as it is. The caller must move each of those arguments to its
    device, its example input included, from then on.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        return {}
    hoisted: dict[int, torch.device] = {}
    for k, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if not (isinstance(example, torch.Tensor) and example.device.type == "cpu"
                and example.dim() > 0 and node.users):
            continue
        targets = {user: _moved_to(user, node) for user in node.users}
        devices = set(targets.values())
        if len(devices) != 1 or None in devices:
            continue
        node.meta["example_value"] = next(iter(targets)).meta["example_value"]
        for user in targets:
            user.replace_all_uses_with(node)
            gm.graph.erase_node(user)
        hoisted[k] = devices.pop()
    if hoisted:
        gm.recompile()
    return hoisted
