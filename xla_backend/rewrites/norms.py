"""Batch norm and layer norm lowered through PyTorch's reference decompositions.

torch_xla 2.9 lowers ``native_batch_norm`` (and its ``_native_batch_norm_legit*``
variants) and ``native_layer_norm`` with two numerical bugs that eager PyTorch does
not have:

* the variance is computed as E[x^2] - E[x]^2 in the input dtype, which cancels
  catastrophically when the mean is large next to the spread: outputs off by up to
  0.3, or NaN once the difference goes negative;
* BatchNorm's ``running_var`` is updated with the biased batch variance (divided by
  N) where eager uses the unbiased one (N - 1).

``torch._decomp`` has decompositions of these ops into ``var_mean`` (which torch_xla
lowers as a two-pass mean and variance, accurately) and elementwise ops. AOTAutograd
applies them while it traces, below autograd, so the graphs the backend lowers never
contain the decomposed ops. LayerNorm's backward is decomposed too (torch_xla has no
XLA kernel of its own for it); the step time of the transformer LM did not change
measurably (CHANGELOG).

Weight normalization (``torch.nn.utils.parametrizations.weight_norm``, with ``dim`` the
first or last dimension) reaches ``_weight_norm_interface`` and its backward, which
torch_xla does not lower at all: each would run on the host, a round trip per step.
The forward is decomposed by torch's own decomposition, the backward by
:func:`weight_norm_interface_backward` (``torch._decomp`` has none), eager's formula.

Not decomposed yet: BatchNorm with running statistics
(``_native_batch_norm_legit_functional``, its backward). Decomposing it gives the right
running_var and large-mean outputs for a single layer, but ResNet-18 (torchvision,
32x32 inputs, CPU PJRT) then got gradients 3e-3 off float64 where torch_xla's own
lowering and eager are 1e-5 off; layers 1-3 alone reproduce it, each block alone does
not. ``batch_norm_stats`` fixes its running_var, and its large-mean precision by
centering its input, around torch_xla's own lowering.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch._decomp import get_decompositions

_aten = torch.ops.aten

#: The ops decomposed. AOTAutograd emits ``native_layer_norm`` and its backward for
#: LayerNorm; their decompositions reach ``_native_batch_norm_legit.no_stats`` (also
#: what BatchNorm with ``track_running_stats=False`` emits), decomposed in turn into
#: ``var_mean``. BatchNorm with running statistics (``_native_batch_norm_legit_functional``)
#: is not decomposed: see the module docstring.
NORM_OPS: tuple[torch._ops.OpOverloadPacket, ...] = (
    _aten.native_layer_norm,
    _aten.native_layer_norm_backward,
    _aten._native_batch_norm_legit,
)


def weight_norm_interface_backward(grad_w: torch.Tensor, saved_v: torch.Tensor,
                                   saved_g: torch.Tensor, saved_norms: torch.Tensor,
                                   dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``w = v * g / ||v||`` (norm over every dimension but ``dim``), in
    the norms' dtype (float for bfloat16 weights, as the forward keeps them)."""
    acc = saved_norms.dtype
    grad_w, v, g = grad_w.to(acc), saved_v.to(acc), saved_g.to(acc)
    dims = [d for d in range(v.dim()) if d != dim]
    grad_g = (grad_w * v).sum(dims, keepdim=True) / saved_norms
    grad_v = (g / saved_norms) * (grad_w - v * (grad_g / saved_norms))
    return grad_v.to(saved_v.dtype), grad_g.to(saved_g.dtype)


def norm_decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """The decomposition table handed to AOTAutograd (``decompositions=``)."""
    table = get_decompositions([*NORM_OPS, _aten._weight_norm_interface])
    table[_aten._weight_norm_interface_backward.default] = weight_norm_interface_backward
    return table


__all__ = ["NORM_OPS", "norm_decompositions", "weight_norm_interface_backward"]
