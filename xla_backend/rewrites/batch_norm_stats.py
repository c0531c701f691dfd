"""BatchNorm in training mode as eager computes it: its variance, and its running one.

torch_xla 2.9 lowers ``_native_batch_norm_legit_functional`` with two bugs.

**Its variance is E[x^2] - E[x]^2**, in the input's dtype: where a channel's mean is
large next to its spread, that cancels (at a mean of 100 and a spread of 0.1 the
outputs were off by up to 0.3, or NaN once the difference went negative). BatchNorm's
output does not change when a constant is taken off each channel, so the first rewrite
(``CENTERED_BATCH_NORM``) hands torch_xla ``x - c``, ``c`` each channel's first value
(a sample, so within a few spreads of the mean), and ``running_mean - c``, and adds ``c``
back to the batch mean it saves for the backward and to the new running mean. The
gradients are the same function of ``x``; the backward reads the saved mean and the
original ``x``.

**Its new ``running_var`` is the biased batch variance** (divided by N); eager uses the
unbiased one (N - 1), so a model trained on XLA carried other running statistics into
evaluation. The second rewrite (``UNBIASED_RUNNING_VAR``) leaves the normalization to
torch_xla and recomputes only that output:
``running_var * (1 - momentum) + var(x, all dims but 1, correction=1) * momentum``,
which is eager's definition. One extra reduction over the input, fused by XLA.

(Decomposing the whole op through ``torch._decomp`` would also fix the variance, but
made ResNet-18's gradients drift; see ``norms``.)
"""

from __future__ import annotations

import functools
import logging
import operator

import torch
import torch.fx

from ._fx import call, cast, meta_val, node_rewrite_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten

_BATCH_NORM = aten._native_batch_norm_legit_functional.default
# (out, save_mean, save_invstd, new_running_mean, new_running_var)
_SAVE_MEAN_OUTPUT, _RUNNING_MEAN_OUTPUT, _RUNNING_VAR_OUTPUT = 1, 3, 4


def _center(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    x, weight, bias, running_mean, running_var, training, momentum, eps = node.args
    x_val, mean_val = meta_val(x), meta_val(running_mean)
    if (not training or x_val is None or mean_val is None or x_val.dim() < 2
            or not all(isinstance(d, int) and d > 0 for d in x_val.shape)
            or node.meta.get(_CENTERED)):
        return False
    with graph.inserting_before(node):
        first = x
        for k in range(x_val.dim() - 1):  # drop the batch dim, then each spatial one
            first = call(graph, node, aten.select.int, (first, min(k, 1), 0))
        first = call(graph, node, aten.detach.default, (first,))
        shape = [1] * x_val.dim()
        shape[1] = x_val.shape[1]
        shift = call(graph, node, aten.view.default, (first, shape))
        centered = call(graph, node, aten.sub.Tensor, (x, shift))
        offset = cast(graph, node, first, mean_val.dtype)
        mean_centered = call(graph, node, aten.sub.Tensor, (running_mean, offset))
    node.args = (centered, weight, bias, mean_centered, running_var, training, momentum, eps)
    node.meta[_CENTERED] = True
    for use in [u for u in node.users if u.target is operator.getitem
                and u.args[1] in (_SAVE_MEAN_OUTPUT, _RUNNING_MEAN_OUTPUT)]:
        with graph.inserting_after(use):
            back = cast(graph, use, first, meta_val(use).dtype)
        with graph.inserting_after(back):
            restored = call(graph, use, aten.add.Tensor, (use, back))
        use.replace_all_uses_with(restored, delete_user_cb=functools.partial(
            operator.is_not, restored))
    return True


_CENTERED = "syncfree_xla_centered"  # a node already rewritten (a pass may run twice)


def _rewrite(graph: torch.fx.Graph, node: torch.fx.Node) -> bool:
    x, _weight, _bias, _mean, running_var, training, momentum, _eps = node.args
    x_val, var_val = meta_val(x), meta_val(running_var)
    if not training or x_val is None or var_val is None or x_val.dim() < 2:
        return False
    uses = [u for u in node.users
            if u.target is operator.getitem and u.args[1] == _RUNNING_VAR_OUTPUT]
    if not uses:
        return False
    dims = [d for d in range(x_val.dim()) if d != 1]
    with graph.inserting_after(uses[0]):
        batch_var = call(graph, node, aten.var.correction, (x, dims),
                         {"correction": 1, "keepdim": False})
    with graph.inserting_after(batch_var):
        batch_var = cast(graph, node, batch_var, var_val.dtype)
    with graph.inserting_after(batch_var):
        kept = call(graph, node, aten.mul.Tensor, (running_var, 1.0 - momentum))
    with graph.inserting_after(kept):
        added = call(graph, node, aten.mul.Tensor, (batch_var, momentum))
    with graph.inserting_after(added):
        new_var = call(graph, node, aten.add.Tensor, (kept, added))
    for use in uses:
        use.replace_all_uses_with(new_var)
        graph.erase_node(use)
    return True


#: The passes, for :data:`xla_backend.rewrites.ATEN_REWRITES`.
CENTERED_BATCH_NORM = node_rewrite_pass(
    "centered_batch_norm", 1, {_BATCH_NORM}, _center, log,
    "centered BatchNorm inputs on each channel's first value")
UNBIASED_RUNNING_VAR = node_rewrite_pass(
    "unbiased_running_var", 1, {_BATCH_NORM}, _rewrite, log,
    "recomputed BatchNorm running_var with the unbiased batch variance")

__all__ = ["CENTERED_BATCH_NORM", "UNBIASED_RUNNING_VAR"]
