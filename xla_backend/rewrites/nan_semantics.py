"""Eager's NaN and infinity semantics for argmax/argmin, max/min over a dim, and clamp.

torch_xla 2.9 on XLA:CPU departs from eager PyTorch where a tensor holds NaN or inf:

* XLA:CPU's "fast min/max" (on by default) drops NaN in ``amax``, ``max``,
  ``maximum`` and two-sided ``clamp``. :func:`xla_backend.device.configure_pjrt`
  turns it off (``--xla_cpu_enable_fast_min_max=false``), which fixes those ops but
  not the ones below.
* ``argmax``/``argmin`` and the indices of ``max.dim``/``min.dim`` skip NaN, where
  eager treats NaN as the extreme value and returns the index of the first NaN.
* ``clamp`` with one bound fills the missing bound with the dtype's largest finite
  value, so ``clamp(min=0)`` turns +inf into 3.4e38 and ``clamp(max=0)`` -inf into
  -3.4e38 (and without the flag above both drop NaN).

The rewrite replaces each of these, for floating-point inputs only (integer ones have
no NaN and lower correctly), by ops whose lowering agrees with eager:

* indices: ``where(any(isnan(x), dim), argmax(isnan(x), dim), indices)``; XLA's argmax
  returns the first of equal maxima, so the first NaN, as eager does;
* ``clamp``: ``minimum(maximum(x, lo), hi)`` with a scalar bound as a 0-d tensor of
  ``x``'s dtype, which is how eager defines it: NaN in ``x`` or in a tensor bound
  propagates, inf stays inf. A NaN *scalar* bound is left alone: eager's clamp kernels
  treat it differently with one bound or two.
"""

from __future__ import annotations

import logging
import math
import operator
from typing import Any

import torch
import torch.fx

from passes.base import GraphPass, PassResult

from ._fx import call, meta_val

log = logging.getLogger(__name__)
aten = torch.ops.aten

_ARG_OPS = {aten.argmax.default, aten.argmin.default}
_DIM_OPS = {aten.max.dim, aten.min.dim}
_CLAMP_OPS = {aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default,
              aten.clamp_min.Tensor, aten.clamp_max.default, aten.clamp_max.Tensor}


def _floating(node: Any) -> torch.Tensor | None:
    """The node's example value if it is a floating-point tensor (NaN can occur)."""
    val = meta_val(node)
    if not isinstance(val, torch.Tensor) or not val.is_floating_point():
        return None
    return val


class _Builder:
    """Adds calls one after another, after ``after``, located at ``like``'s line."""

    def __init__(self, graph: torch.fx.Graph, after: torch.fx.Node,
                 like: torch.fx.Node) -> None:
        self.graph = graph
        self.cursor = after
        self.like = like

    def __call__(self, target: Any, *args: Any, **kwargs: Any) -> torch.fx.Node:
        with self.graph.inserting_after(self.cursor):
            self.cursor = call(self.graph, self.like, target, args, kwargs)
        return self.cursor


def _arg(node: torch.fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _first_nan_wins(graph: torch.fx.Graph, x: torch.fx.Node, dim: int | None, keepdim: bool,
                    indices: torch.fx.Node) -> None:
    """Makes every use of ``indices`` (argmax-like over ``x``) see the first NaN's index."""
    x_val = meta_val(x)
    b = _Builder(graph, indices, indices)
    nan = b(aten.isnan.default, x)
    nan_as_x = b(aten._to_copy.default, nan, dtype=x_val.dtype)
    first_nan = b(aten.argmax.default, nan_as_x, dim, keepdim)
    has_nan = (b(aten.any.default, nan) if dim is None
               else b(aten.any.dim, nan, dim, keepdim))
    fixed = b(aten.where.self, has_nan, first_nan, indices)
    indices.replace_all_uses_with(fixed, delete_user_cb=lambda user: user is not fixed)


def _reduces_floats(x: Any) -> bool:
    """Whether an argmax-like op over ``x`` can meet NaN (a 0-d ``x`` has index 0 only)."""
    val = _floating(x)
    return val is not None and val.dim() > 0


def _rewrite_arg(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    x = node.args[0]
    if not _reduces_floats(x):
        return False
    _first_nan_wins(graph, x, _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False), node)
    return True


def _rewrite_dim(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    x = node.args[0]
    if not _reduces_floats(x):
        return False
    dim, keepdim = _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False)
    changed = False
    for user in list(node.users):
        if user.target is operator.getitem and user.args[1] == 1:
            _first_nan_wins(graph, x, dim, keepdim, user)
            changed = True
    return changed


def _clamp_bounds(node: torch.fx.Node) -> tuple[Any, Any]:
    if node.target in (aten.clamp_min.default, aten.clamp_min.Tensor):
        return node.args[1], None
    if node.target in (aten.clamp_max.default, aten.clamp_max.Tensor):
        return None, node.args[1]
    return _arg(node, 1, "min", None), _arg(node, 2, "max", None)


def _rewrite_clamp(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    x = node.args[0]
    x_val, out_val = _floating(x), meta_val(node)
    if x_val is None or not isinstance(out_val, torch.Tensor) or out_val.dtype != x_val.dtype:
        return False
    bounds = _clamp_bounds(node)
    if any(isinstance(b, (int, float)) and math.isnan(b) for b in bounds):
        return False
    for bound in bounds:
        if isinstance(bound, torch.fx.Node) and (
                not isinstance(meta_val(bound), torch.Tensor)  # a symbolic number
                or meta_val(bound).dtype != x_val.dtype):  # mixed: clamp promotes itself
            return False
    b = _Builder(graph, node, node)
    out = x
    for bound, target in zip(bounds, (aten.maximum.default, aten.minimum.default)):
        if bound is None:
            continue
        if not isinstance(bound, torch.fx.Node):
            bound = b(aten.scalar_tensor.default, bound, dtype=x_val.dtype,
                      device=x_val.device)
        out = b(target, out, bound)
    if out is x:
        return False
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return True


def _run(gm: torch.fx.GraphModule) -> PassResult:
    graph = gm.graph
    modified = False
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in _ARG_OPS:
            modified |= _rewrite_arg(graph, node)
        elif node.target in _DIM_OPS:
            modified |= _rewrite_dim(graph, node)
        elif node.target in _CLAMP_OPS:
            modified |= _rewrite_clamp(graph, node)
    if modified:
        log.debug("rewrote argmax/max.dim/clamp for eager NaN and inf semantics")
    return PassResult(gm, modified)


#: The pass, for :data:`xla_backend.rewrites.ATEN_REWRITES`.
NAN_SEMANTICS = GraphPass("nan_semantics", 1, _run)

__all__ = ["NAN_SEMANTICS"]
