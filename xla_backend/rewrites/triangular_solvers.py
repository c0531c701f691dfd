"""``linalg_cholesky_ex``, ``linalg_solve_triangular`` and ``cholesky_solve`` through the
older ops torch_xla lowers, ``cholesky`` and ``triangular_solve``.

torch_xla 2.9 lowers ``torch.cholesky`` and ``torch.triangular_solve`` (batched and
broadcast, to 1e-7 of eager's) but not their ``torch.linalg`` successors nor
``cholesky_solve``, which AOTAutograd's graphs hold, in the backward too: a Gaussian
process's marginal likelihood (``cholesky``, ``cholesky_solve``) cost 9 host transfers
and 4 executions a step on its CPU fallback, a ``MultivariateNormal`` log-probability
(``cholesky``, ``solve_triangular``) 13 and 5. Each call is rewritten onto the older
ops:

* ``linalg_cholesky_ex`` when its ``info`` is not used (``torch.linalg.cholesky``,
  whose check a compiled graph drops for every backend) and errors are not checked.
  For a matrix that is not positive-definite XLA's factor is NaN where eager's kernel
  returns a partial factor; an ``info`` that is read stays on the fallback, as XLA's
  factor cannot say which leading minor failed.
* ``linalg_solve_triangular`` as ``triangular_solve``, transposed for ``left=False``.
* ``cholesky_solve`` as two triangular solves with the factor and its transpose.

Complex operands are left alone (the conjugations differ).
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx

from ._fx import arguments, call, meta_val, node_rewrite_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten


def _real(*nodes: object) -> bool:
    vals = [meta_val(n) for n in nodes]
    return all(isinstance(v, torch.Tensor) and v.is_floating_point() for v in vals)


def _solve(graph: torch.fx.Graph, like: torch.fx.Node, b: torch.fx.Node, a: torch.fx.Node,
           upper: bool, transpose: bool, unitriangular: bool) -> torch.fx.Node:
    """``X`` with ``op(A) X = B``, ``op`` the transpose or not: ``triangular_solve``'s
    first result."""
    pair = call(graph, like, aten.triangular_solve.default,
                (b, a, upper, transpose, unitriangular))
    return call(graph, like, operator.getitem, (pair, 0))


def _transpose(graph: torch.fx.Graph, like: torch.fx.Node, t: torch.fx.Node) -> torch.fx.Node:
    return call(graph, like, aten.transpose.int, (t, -2, -1))


def _cholesky(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    args = arguments(node)
    users = list(node.users)
    if args["check_errors"] or not _real(args["input"]) or any(
            u.target is not operator.getitem or u.args[1] != 0 for u in users):
        return False
    with graph.inserting_before(node):
        factor = call(graph, node, aten.cholesky.default, (args["input"], args["upper"]))
    for user in users:
        user.replace_all_uses_with(factor)
        graph.erase_node(user)
    graph.erase_node(node)
    return True


def _solve_triangular(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    args = arguments(node)
    a, b = args["input"], args["B"]
    if not _real(a, b):
        return False
    with graph.inserting_before(node):
        if args["left"]:
            x = _solve(graph, node, b, a, args["upper"], False, args["unitriangular"])
        else:  # X A = B is A^T X^T = B^T
            x = _transpose(graph, node, _solve(graph, node, _transpose(graph, node, b), a,
                                               args["upper"], True, args["unitriangular"]))
    node.replace_all_uses_with(x)
    graph.erase_node(node)
    return True


def _cholesky_solve(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    args = arguments(node)
    b, factor, upper = args["input"], args["input2"], args["upper"]
    if not _real(b, factor):
        return False
    with graph.inserting_before(node):
        # A = L L^T (lower) or U^T U (upper): solve with the left factor, then the right
        y = _solve(graph, node, b, factor, upper, upper, False)
        x = _solve(graph, node, y, factor, upper, not upper, False)
    node.replace_all_uses_with(x)
    graph.erase_node(node)
    return True


_REWRITES = {
    aten.linalg_cholesky_ex.default: _cholesky,
    aten.linalg_solve_triangular.default: _solve_triangular,
    aten.cholesky_solve.default: _cholesky_solve,
}


def _rewrite(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    return _REWRITES[node.target](graph, node)


#: The pass, for :data:`xla_backend.rewrites.ATEN_REWRITES`.
TRIANGULAR_SOLVERS = node_rewrite_pass(
    "triangular_solvers", 1, set(_REWRITES), _rewrite, log,
    "rewrote torch.linalg's Cholesky and triangular solves onto the ops torch_xla lowers")

__all__ = ["TRIANGULAR_SOLVERS"]
