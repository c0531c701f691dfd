"""BatchNorm's running variance updated with the unbiased batch variance, as eager does.

torch_xla 2.9 lowers ``_native_batch_norm_legit_functional`` (BatchNorm in training
mode with running statistics) with the new ``running_var`` computed from the *biased*
batch variance (divided by N); eager PyTorch uses the unbiased one (N - 1), so a model
trained on XLA carries other running statistics into evaluation. The rewrite leaves
the normalization to torch_xla and recomputes only that output:
``running_var * (1 - momentum) + var(x, all dims but 1, correction=1) * momentum``,
which is eager's definition. One extra reduction over the input, fused by XLA.

(Decomposing the whole op through ``torch._decomp`` would also fix the E[x^2]-E[x]^2
precision of its normalization, but made ResNet-18's gradients drift; see ``norms``.)
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.fx

from ._fx import call, cast, meta_val, node_rewrite_pass

log = logging.getLogger(__name__)
aten = torch.ops.aten

_BATCH_NORM = aten._native_batch_norm_legit_functional.default
_RUNNING_VAR_OUTPUT = 4  # (out, save_mean, save_invstd, new_running_mean, new_running_var)


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


#: The pass, for :data:`xla_backend.rewrites.ATEN_REWRITES`.
UNBIASED_RUNNING_VAR = node_rewrite_pass(
    "unbiased_running_var", 1, {_BATCH_NORM}, _rewrite, log,
    "recomputed BatchNorm running_var with the unbiased batch variance")

__all__ = ["UNBIASED_RUNNING_VAR"]
