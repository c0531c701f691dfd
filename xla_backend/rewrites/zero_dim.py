"""Rewrites for 0-d tensors and zero-sized dims that torch_xla cannot lower.

``unsqueeze_0d_dims``. The torch_xla bug (2.9): an op given ``dim=0`` (or ``-1``) of a
0-d tensor (``sum``, ``amax``, ``argmax``, ``squeeze``, ``index_select``, ``gather``,
``index_copy``, ...) fails to lower with "Value out of range (expected to be in range of
[0, -1], but got 0)". Eager PyTorch treats a 0-d tensor as having one dim of size 1
there. The rewrite makes that explicit: each 0-d tensor operand becomes a 1-d view of
size 1 (``aten.unsqueeze(x, 0)``), the op runs on it with its dim argument unchanged
(0 and -1 name that one dim of a 1-d tensor, as they name the implied dim of a 0-d
one), and where the op's result then has another shape than ``node.meta["val"]`` (a
reduction with ``keepdim``, ``index_select``, ``index_copy``) it is viewed back to that
shape; ops returning a (values, indices) pair (``max.dim``, ``sort``, ``topk``) are
rewritten through their ``getitem`` users. A 1-d tensor of size 1 holds the same single
element as the 0-d one, so the values, the dtype and, for ``squeeze``, the aliasing (a
chain of views of the input) are those of eager. Out of reach: a graph output that is
``squeeze(0)`` of a 0-d *input*, which AOTAutograd rebuilds outside the graph by
replaying the squeeze on the XLA input (``test_squeeze_of_a_0d_input``).

``zeros_for_empty_inputs``. The torch_xla bugs (2.9): ``gather`` from a tensor with a
zero-sized dim fails to lower ("Slice size at index 0 in gather op is out of range"),
and ``cumsum`` / ``cumprod`` over a zero-sized dim fail in the XLA builder ("Window
... has a non-positive dimension"). Eager's result then has no elements: a scan keeps
its input's shape, and a gather's result has the index's shape, which for any index
eager accepts has no elements (every index size must fit the input's size in the other
dims, and no index value fits a zero-sized gathered dim). The rewrite replaces the op by
``aten.new_zeros(input, shape, dtype=...)`` with the result's shape and dtype from
``node.meta["val"]``: the same shape, dtype and device, no elements, and no constant
baked into the computation.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch
import torch.fx
from torch.fx import Node

from passes.base import GraphPass, PassResult

from ._fx import call, meta_val

log = logging.getLogger(__name__)

__all__ = ["unsqueeze_0d_dims", "zeros_for_empty_inputs"]

aten = torch.ops.aten

#: op -> positions of the tensor operands that share the input's rank (each is made
#: 1-d when it is 0-d). The dim argument is the one the schema calls ``dim`` or
#: ``dims``; an absent, None or empty one means "all dims" and is left alone.
_DIM_OPS: dict[Any, tuple[int, ...]] = {
    **dict.fromkeys((
        aten.sum.dim_IntList, aten.nansum.default, aten.mean.dim, aten.prod.dim_int,
        aten.amax.default, aten.amin.default, aten.aminmax.default, aten.max.dim,
        aten.min.dim, aten.argmax.default, aten.argmin.default, aten.any.dim, aten.any.dims,
        aten.all.dim, aten.all.dims, aten.count_nonzero.default, aten.var.correction,
        aten.std.correction, aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim,
        aten.norm.ScalarOpt_dim_dtype, aten.logsumexp.default,
        aten.cumsum.default, aten.cumprod.default, aten.cummax.default, aten.cummin.default,
        aten.logcumsumexp.default, aten._softmax.default, aten._log_softmax.default,
        aten.sort.default, aten.topk.default, aten.kthvalue.default, aten.median.dim,
        aten.mode.default, aten.flip.default, aten.squeeze.dim, aten.squeeze.dims,
    ), (0,)),
    aten.index_select.default: (0, 2),
    aten.gather.default: (0, 2),
    aten.index_copy.default: (0, 2, 3),
    aten.index_add.default: (0, 2, 3),
    aten.index_fill.int_Scalar: (0, 2),
    aten.scatter.src: (0, 2, 3),
    aten.scatter.value: (0, 2),
    aten.scatter_add.default: (0, 2, 3),
}


def _dim_arg(node: Node) -> Any:
    for i, arg in enumerate(node.target._schema.arguments):
        if arg.name in ("dim", "dims"):
            return node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
    return None


def _is_0d(arg: Any) -> bool:
    val = meta_val(arg)
    return isinstance(val, torch.Tensor) and val.dim() == 0


def _static_shape(val: Any) -> list[int] | None:
    if not isinstance(val, torch.Tensor):
        return None
    shape = list(val.shape)
    return shape if all(isinstance(s, int) for s in shape) else None


def _back_to(graph: torch.fx.Graph, like: Node, value: Node, want: Any) -> Node:
    """``value``, viewed as ``want``'s shape where the 1-d operand changed it."""
    if list(value.meta["val"].shape) == list(want.shape):
        return value
    return call(graph, like, aten.view.default, (value, list(want.shape)))


def _rewrite_0d(graph: torch.fx.Graph, node: Node) -> bool:
    positions = _DIM_OPS[node.target]
    dim = _dim_arg(node)
    if not _is_0d(node.args[0]) or dim is None or dim == []:
        return False
    if any(meta_val(arg) is None for arg in node.all_input_nodes):
        return False  # new nodes' meta["val"] is computed from their operands'
    want = meta_val(node)
    wants = list(want) if isinstance(want, (tuple, list)) else [want]
    if any(_static_shape(w) is None for w in wants):
        return False
    if isinstance(want, (tuple, list)) and not all(
            user.target is operator.getitem for user in node.users):
        return False
    args = list(node.args)
    with graph.inserting_before(node):
        for i in positions:
            if i < len(args) and _is_0d(args[i]):
                args[i] = call(graph, node, aten.unsqueeze.default, (args[i], 0))
        op = call(graph, node, node.target, tuple(args), dict(node.kwargs))
        if not isinstance(want, (tuple, list)):
            node.replace_all_uses_with(_back_to(graph, node, op, want))
    if isinstance(want, (tuple, list)):  # a values/indices pair, read by getitem nodes
        for user in list(node.users):
            index = user.args[1]
            with graph.inserting_before(user):
                part = call(graph, user, operator.getitem, (op, index))
                user.replace_all_uses_with(_back_to(graph, user, part, want[index]))
            graph.erase_node(user)
    graph.erase_node(node)
    return True


def _run_0d(gm: torch.fx.GraphModule) -> PassResult:
    rewritten = 0
    for node in list(gm.graph.nodes):
        if (node.op == "call_function" and node.target in _DIM_OPS and node.args
                and _rewrite_0d(gm.graph, node)):
            rewritten += 1
    if rewritten:
        log.debug("unsqueeze_0d_dims: %d ops over dim 0 of a 0-d tensor", rewritten)
    return PassResult(gm, bool(rewritten))


#: Ops of a tensor with a zero-sized dim that fail to lower; their input is argument 0.
_EMPTY_INPUT_OPS = frozenset({aten.gather.default, aten.cumsum.default, aten.cumprod.default})


def _run_empty(gm: torch.fx.GraphModule) -> PassResult:
    rewritten = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _EMPTY_INPUT_OPS or not node.args:
            continue
        source, result = node.args[0], meta_val(node)
        source_shape, shape = _static_shape(meta_val(source)), _static_shape(result)
        if source_shape is None or shape is None or 0 not in source_shape:
            continue
        with graph.inserting_before(node):
            zeros = call(graph, node, aten.new_zeros.default, (source, shape),
                         {"dtype": result.dtype})
        node.replace_all_uses_with(zeros)
        graph.erase_node(node)
        rewritten += 1
    if rewritten:
        log.debug("zeros_for_empty_inputs: %d gathers or scans of empty tensors", rewritten)
    return PassResult(gm, bool(rewritten))


unsqueeze_0d_dims = GraphPass(name="unsqueeze_0d_dims", version=1, run=_run_0d)
zeros_for_empty_inputs = GraphPass(name="zeros_for_empty_inputs", version=1, run=_run_empty)
