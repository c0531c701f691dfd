"""``addmm`` with ``beta`` or ``alpha`` other than 1 as ``mm``, ``mul`` and ``add``.

torch_xla 2.9 lowers ``aten.addmm`` only for ``beta == alpha == 1`` and sends any
other call to its CPU fallback: a device-to-host copy of all three operands and a
host-to-device copy of the result at every call, and a graph split around the op.
Muon's Newton-Schulz iteration calls ``torch.addmm(B, A, B, beta=b, alpha=c)`` five
times per matrix per step. The rewrite is eager's definition,
``beta * input + alpha * (mat1 @ mat2)``, as XLA ops, in float32 for half-precision
operands and rounded once to the result's dtype (a BLAS ``gemm`` orders its sums
differently, so results agree to the dtype's rounding, not bit for bit). ``beta == 0``
drops the input, as eager does (its NaN and inf are ignored then).
"""

from __future__ import annotations

import logging

import torch
import torch.fx

from ._fx import call, cast, node_rewrite_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten


def _rewrite(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    beta = node.kwargs.get("beta", 1)
    alpha = node.kwargs.get("alpha", 1)
    if len(node.args) != 3 or set(node.kwargs) - {"beta", "alpha"} or (beta == 1 and alpha == 1):
        return False
    out = node.meta.get("val")
    if out is None or not out.dtype.is_floating_point:
        return False
    # half-precision operands: the whole expression in float32, rounded once at the
    # end, as eager's gemm accumulates and scales before it rounds
    wide = torch.float32 if out.dtype in (torch.float16, torch.bfloat16) else out.dtype
    with graph.inserting_before(node):
        bias, mat1, mat2 = (
            a if wide == out.dtype else cast(graph, node, a, wide) for a in node.args)
        product = call(graph, node, aten.mm.default, (mat1, mat2))
        if alpha != 1:
            product = call(graph, node, aten.mul.Tensor, (product, alpha))
        if beta == 0:
            result = call(graph, node, aten.expand.default, (product, list(out.shape)))
            result = call(graph, node, aten.clone.default, (result,))
        else:
            scaled = bias if beta == 1 else call(graph, node, aten.mul.Tensor, (bias, beta))
            result = call(graph, node, aten.add.Tensor, (scaled, product))
        if wide != out.dtype:
            result = cast(graph, node, result, out.dtype)
    node.replace_all_uses_with(result)
    graph.erase_node(node)
    return True


#: The pass, for :data:`xla_backend.rewrites.ATEN_REWRITES`.
SCALED_ADDMM = node_rewrite_pass("scaled_addmm", 1, {aten.addmm.default}, _rewrite, log,
                                 "rewrote addmm with beta/alpha as mm, mul and add")

__all__ = ["SCALED_ADDMM"]
