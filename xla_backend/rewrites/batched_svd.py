"""``_linalg_svd`` of a batch of matrices rebuilt from the ``U`` and ``V`` torch_xla gets
right, the singular values read off them.

torch_xla 2.9's ``_linalg_svd`` is right for one matrix and wrong for a batch (in lazy
mode too): it declares the singular values of a ``[..., m, n]`` batch with shape
``[min(m, n)]``, the batch dims dropped, so every later op computes on the wrong
elements (a batch's nuclear norms came out as one vector summed across the batch), and
it makes ``Vh`` by swapping ``V``'s first two dims instead of its last two (``aten.svd``
is built on it and inherits both). Its ``U`` is right, and its ``Vh`` holds ``V`` with
those two dims swapped. The rewrite takes ``U`` as it is, ``V`` by swapping them back
(:func:`svd_factors`), ``Vh`` as ``V``'s transpose, and each singular value ``s_j`` as
``u_j . (A v_j)``, the diagonal of ``U^T A V`` (XLA's own up to rounding, ~1e-7
relative). The gradient is unchanged: AOTAutograd's backward reads the forward's ``U``,
``S`` and ``Vh``.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx
from torch._subclasses.fake_tensor import is_fake

from ._fx import arguments, call, meta_val, node_rewrite_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten


def svd_factors(a: torch.Tensor, full_matrices: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``U`` and ``V`` (not ``Vh``) of a batch of matrices, from torch_xla's
    ``_linalg_svd``, whose ``Vh`` is ``V`` with its first two dims swapped (the module's
    docstring); on a fake tensor, torch's own shapes."""
    u, _, vh = aten._linalg_svd.default(a, full_matrices, True)
    return u, (vh.mT if is_fake(a) else vh.transpose(0, 1))


def _rewrite(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    args = arguments(node)
    a, full_matrices, compute_uv = args["A"], args["full_matrices"], args["compute_uv"]
    val = meta_val(a)
    users = list(node.users)
    if not isinstance(val, torch.Tensor) or val.dim() <= 2 or val.is_complex() or \
            not all(u.target is operator.getitem for u in users):
        return False
    k = min(val.shape[-2:])
    with graph.inserting_before(node):
        uv = call(graph, node, svd_factors, (a, full_matrices))
        u = call(graph, node, operator.getitem, (uv, 0))
        v = call(graph, node, operator.getitem, (uv, 1))
        # the first k columns: all of them unless full_matrices made U or V square
        u_k = call(graph, node, aten.slice.Tensor, (u, -1, 0, k))
        v_k = call(graph, node, aten.slice.Tensor, (v, -1, 0, k))
        av = call(graph, node, aten.matmul.default, (a, v_k))
        products = call(graph, node, aten.mul.Tensor, (u_k, av))
        # |.|: a zero singular value must not come out as -1e-9
        s = call(graph, node, aten.abs.default,
                 (call(graph, node, aten.sum.dim_IntList, (products, [-2])),))
        if compute_uv:
            vh = call(graph, node, aten.transpose.int, (v, -2, -1))
        else:  # torch returns empty U and Vh then
            u = vh = call(graph, node, aten.new_empty.default, (a, [0]))
    for user in users:
        user.replace_all_uses_with((u, s, vh)[user.args[1]])
        graph.erase_node(user)
    graph.erase_node(node)
    return True


#: The pass, for :data:`xla_backend.rewrites.ATEN_REWRITES`.
BATCHED_SVD = node_rewrite_pass("batched_svd", 1, {aten._linalg_svd.default}, _rewrite, log,
                                "rewrote a batched _linalg_svd")

__all__ = ["BATCHED_SVD", "svd_factors"]
