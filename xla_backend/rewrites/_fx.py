"""Helpers the rewrites share: values from ``meta["val"]``, new calls with theirs, the
pass that rewrites each call of some ops, and the precision decompositions compute in."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._guards import detect_fake_mode
from torch.fx.operator_schemas import normalize_function

from passes.base import GraphPass, PassResult

_COPIED_META = ("stack_trace", "nn_module_stack", "seq_nr")


def meta_val(arg: Any) -> Any:
    """The value a node stands for (a fake tensor, a SymInt...), or None for a literal."""
    return arg.meta.get("val") if isinstance(arg, torch.fx.Node) else None


def working_precision(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the dtype a decomposition computes in: float32 for half precision and
    integers (rounded back once at the end, as eager's kernels do), else ``x`` itself."""
    return x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)


def arguments(node: torch.fx.Node) -> dict[str, Any]:
    """A call's arguments by their schema names, defaults filled in (the first one, a
    schema's ``self``, is named ``input``)."""
    return normalize_function(node.target, node.args, node.kwargs,
                              normalize_to_only_use_kwargs=True).kwargs


def call(graph: torch.fx.Graph, like: torch.fx.Node, target: Any, args: tuple,
         kwargs: dict | None = None) -> torch.fx.Node:
    """A call of ``target`` at the graph's insertion point, with the ``meta["val"]`` later
    rewrites and the lowering read, computed under the graph's fake mode when it has one,
    and ``like``'s source location, so reports still point at the user's line."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    node.meta.update({k: like.meta[k] for k in _COPIED_META if k in like.meta})
    vals_args, vals_kwargs = pytree.tree_map_only(torch.fx.Node, meta_val, (args, kwargs))
    # ``like``'s value too: a call with no tensor operand (scalar_tensor) must still
    # make a fake value
    fake_mode = detect_fake_mode(pytree.tree_leaves((vals_args, vals_kwargs, meta_val(like))))
    with fake_mode or contextlib.nullcontext():
        node.meta["val"] = target(*vals_args, **vals_kwargs)
    return node


def cast(graph: torch.fx.Graph, like: torch.fx.Node, arg: torch.fx.Node,
         dtype: torch.dtype) -> torch.fx.Node:
    """``arg`` converted to ``dtype`` (``aten._to_copy``), at the insertion point."""
    return call(graph, like, torch.ops.aten._to_copy.default, (arg,), {"dtype": dtype})


def node_rewrite_pass(name: str, version: int, targets: Collection[Any],
                      rewrite: Callable[[torch.fx.Graph, torch.fx.Node], bool],
                      logger: logging.Logger, done: str) -> GraphPass:
    """A pass that calls ``rewrite(graph, node)`` on each call of one of ``targets`` (it
    says whether it changed the graph), and logs ``done`` when one did."""

    def run(gm: torch.fx.GraphModule) -> PassResult:
        modified = False
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target in targets:
                modified |= rewrite(gm.graph, node)
        if modified:
            logger.debug(done)
        return PassResult(gm, modified)

    return GraphPass(name, version, run)


def replacing_pass(name: str, version: int, arguments: Callable[[torch.fx.Node], tuple | None],
                   replacement: Callable, logger: logging.Logger, done: str) -> GraphPass:
    """A pass over a Dynamo graph that replaces each node for which ``arguments(node)``
    gives a tuple by a call of ``replacement`` on it, with the node's meta (its
    ``example_value`` and source location); logs ``done`` with the count when one did."""

    def run(gm: torch.fx.GraphModule) -> PassResult:
        rewritten = 0
        for node in list(gm.graph.nodes):
            args = arguments(node)
            if args is None:
                continue
            with gm.graph.inserting_before(node):
                new = gm.graph.call_function(replacement, args)
            new.meta = dict(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            rewritten += 1
        if rewritten:
            logger.debug(done, rewritten)
        return PassResult(gm, bool(rewritten))

    return GraphPass(name, version, run)
