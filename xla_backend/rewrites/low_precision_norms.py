"""Batch norm on bfloat16 / float16 inputs computed in float32, as eager computes it.

Eager PyTorch computes batch norm on a low-precision input in float32 (its "opmath"
type), and the graph AOTAutograd traces says so: PyTorch's own shape and dtype
functions give the saved mean and inverse standard deviation as float32, the output
and the gradients in the input's and the weight's dtypes, and the backward is built
against those. torch_xla 2.9 lowers these ops in the input's dtype instead, and two
things break (bf16 training, the common case on TPU):

* ``_native_batch_norm_legit_functional`` (BatchNorm with running statistics) returns
  its saved statistics in bfloat16 where the graph has float32 (the backend's dtype
  check refuses the graph).
* ``native_batch_norm_backward``, which every LayerNorm, GroupNorm and BatchNorm backward
  reaches (``norms`` decomposes the first two into it), gets the float32 statistics
  next to a bfloat16 input; XLA's ``batch-norm-grad`` then fails its HLO verifier
  ("Seen floating point types of different precisions").

The rewrite gives these ops float32 operands (``aten._to_copy`` of every low-precision
floating operand) and casts each result back to the dtype the graph gives it, read off
the original node's ``meta["val"]``. Graphs without a low-precision operand to these
ops are left as they are.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx

from ._fx import call, cast, meta_val, node_rewrite_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten

__all__ = ["LOW_PRECISION_NORMS"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)
#: Ops whose every result is reached through ``getitem``.
_NORM_OPS = frozenset({
    aten.native_batch_norm_backward.default,
    aten._native_batch_norm_legit_functional.default,
    aten._native_batch_norm_legit_no_training.default,
    aten._native_batch_norm_legit.default,
    aten._native_batch_norm_legit.no_stats,
    aten.native_batch_norm.default,
})


def _low_precision(arg: Any) -> bool:
    val = meta_val(arg)
    return isinstance(val, torch.Tensor) and val.dtype in _LOW_PRECISION


def _rewrite(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    if not any(_low_precision(a) for a in node.args):
        return False
    uses = list(node.users)
    if not all(u.target is operator.getitem for u in uses):
        return False  # not the shape AOTAutograd emits; leave it to the lowering
    with graph.inserting_before(node):
        args = tuple(cast(graph, node, a, torch.float32) if _low_precision(a) else a
                     for a in node.args)
        wide = call(graph, node, node.target, args, dict(node.kwargs))
    for use in uses:
        index, want = use.args[1], meta_val(use)
        with graph.inserting_after(use):
            result = call(graph, use, operator.getitem, (wide, index))
        if isinstance(want, torch.Tensor) and want.dtype != torch.float32:
            with graph.inserting_after(result):
                result = cast(graph, use, result, want.dtype)
        use.replace_all_uses_with(result)
        graph.erase_node(use)
    graph.erase_node(node)
    return True


#: The pass, for :data:`xla_backend.rewrites.ATEN_REWRITES`.
LOW_PRECISION_NORMS = node_rewrite_pass(
    "low_precision_norms", 1, _NORM_OPS, _rewrite, log,
    "batch norm on a low-precision input computed in float32")
