"""Capturable Adam's update without ``0 / 0`` at a zero learning rate (``fold_step_size_last``).

Runs on the *Dynamo* graph. Dynamo traces every ``torch.optim`` step as capturable
(``OptimizerVariable._set_capturable``), and torch 2.9's capturable single-tensor Adam
(Adam, AdamW, and their ``amsgrad`` form) folds the step size into the denominator::

    step_size_neg = -(lr / bias_correction1)
    denom = (exp_avg_sq.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(eps / step_size_neg)
    param.addcdiv_(exp_avg, denom)

With ``lr == 0`` (the first step of a linear warm-up from zero, as Hugging Face's
``get_linear_schedule_with_warmup`` gives) and an element whose second moment is still
0, that is ``0 / -0 = NaN``, and the parameter becomes NaN where eager (not capturable)
PyTorch adds ``-0 * exp_avg / (sqrt(v) / bc2 + eps)``, that is nothing (pytorch#126514,
fixed upstream after 2.9). The rewrite divides by the step size last::

    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt + eps) / step_size_neg

``sqrt(v) / bc2 + eps`` is at least ``eps``, so at ``lr == 0`` the denominator is an
infinity and the update is ``exp_avg / inf = 0``, as in eager; otherwise it is the same
quotient with the division moved, a difference of rounding only (and the same order of
operations as eager's denominator).

Matched exactly: ``x.add_(eps / s)`` whose ``x`` is ``a / (b * s)`` for one node ``s``, a
Python float ``eps``, and intermediates used nowhere else. Anything else is left alone.
"""

from __future__ import annotations

import logging
import operator
from typing import Any

import torch.fx
from torch.fx import Node

from .base import GraphPass, PassResult
from .dynamo_graph import annotate, fake_mode, is_tensor

log = logging.getLogger(__name__)

__all__ = ["fold_step_size_last"]


def _only_user(node: Any, user: Node) -> bool:
    return isinstance(node, Node) and len(node.users) == 1 and user in node.users


def _match(node: Node) -> tuple[Node, Node, float, Node] | None:
    """(a, b, eps, s) when ``node`` is ``(a / (b * s)).add_(eps / s)``."""
    if not (node.op == "call_method" and node.target == "add_" and len(node.args) == 2
            and not node.kwargs):
        return None
    quotient, eps_term = node.args
    if not (_only_user(quotient, node) and _only_user(eps_term, node)):
        return None
    if not all(n.op == "call_function" and n.target is operator.truediv and not n.kwargs
               and len(n.args) == 2 for n in (quotient, eps_term)):
        return None
    a, product = quotient.args
    eps, s = eps_term.args
    if not (isinstance(eps, float) and isinstance(s, Node) and is_tensor(a)
            and _only_user(product, quotient)):
        return None
    if not (product.op == "call_function" and product.target is operator.mul
            and not product.kwargs and len(product.args) == 2 and product.args[1] is s):
        return None
    return a, product.args[0], eps, s


def _run(gm: torch.fx.GraphModule) -> PassResult:
    graph = gm.graph
    mode = fake_mode(gm)
    rewritten = 0
    for node in list(graph.nodes):
        match = _match(node)
        if match is None:
            continue
        a, b, eps, s = match
        quotient, eps_term = node.args
        product = quotient.args[1]
        with graph.inserting_before(node):
            scaled = graph.call_function(operator.truediv, (a, b))
            shifted = graph.call_function(operator.add, (scaled, eps))
            denom = graph.call_function(operator.truediv, (shifted, s))
        for new in (scaled, shifted, denom):
            if "stack_trace" in node.meta:
                new.meta["stack_trace"] = node.meta["stack_trace"]
            annotate(new, mode)
        node.replace_all_uses_with(denom)
        for dead in (node, eps_term, quotient, product):
            graph.erase_node(dead)
        rewritten += 1
    if rewritten:
        log.debug("fold_step_size_last: %d Adam denominators divide by the step last",
                  rewritten)
    return PassResult(gm, bool(rewritten))


fold_step_size_last = GraphPass(name="fold_step_size_last", version=1, run=_run)
