"""Ops whose torch_xla 2.9 registration loses a gradient, computes a wrong one, has no
lowering or stops AOTAutograd's trace, routed through PyTorch's own definitions while
AOTAutograd traces.

Four gaps, each found against eager PyTorch on CPU (``tests/xla/test_lowering_gaps.py``):

* **No gradient at all.** torch defines ``kl_div``, ``std.dim``, ``diag``, ``selu``,
  ``cross``, ``qr`` and a few more (:func:`ungraded_ops`) as CompositeImplicitAutograd:
  autograd differentiates the ops they decompose into. torch_xla registers an XLA
  kernel for each and no autograd kernel, and a backend kernel takes an op off the
  composite path for that backend's autograd key too. The dispatcher's fallback then
  warns, and a backward through the op gives its inputs no gradient: under Dynamo,
  ``x.std(-1)`` in a LayerNorm of one's own left every parameter before it with
  ``grad=None``, so the optimizer silently skipped them. :func:`restore_composite_autograd`
  gives the AutogradXLA key back the composite kernel, as a Python-dispatcher kernel:
  AOTAutograd traces with the Python dispatcher on, so the compiled graphs get torch's
  gradients, while torch_xla's lazy mode (which never enables it) keeps its own kernels.
* **A wrong value.** torch_xla's ``elu_backward`` reads its last argument as the
  forward's result whatever ``is_result`` says; autograd passes the input, so ELU, SELU
  and CELU gradients are wrong wherever the input is negative (in lazy mode too). It
  is decomposed with torch's reference, as is ``norm`` with ``p=inf`` or ``-inf``
  (:func:`infinite_norm`): ``torch.norm`` calls it on XLA tensors (eager CPU goes to
  ``linalg.vector_norm``), and its lowering gives other values there. Its
  ``avg_pool2d`` and ``avg_pool3d`` with ``divisor_override`` give other values than
  eager where ``ceil_mode`` is on or ``count_include_pad`` off:
  :func:`avg_pool_with_divisor`. Their backward with an override runs on the host, as
  torch_xla sends it to its fallback.
* **No lowering.** Each op in :data:`DECOMPOSED_FOR_LOWERING` has no XLA kernel, so a
  graph holding it would run it on the host: a round trip per step (GLU's backward,
  Huber loss's backward, ``logaddexp``, ``vdot`` in ``spectral_norm``'s power
  iteration, ``Tensor.unfold``). torch's decompositions of them lower to ordinary XLA
  ops; ``Tensor.unfold``'s backward gets one of its own (:func:`unfold_backward`), and
  ``Embedding(max_norm=...)``'s ``embedding_renorm``, which torch does not decompose,
  one of ours (:func:`embedding_renorm`), as do ``EmbeddingBag``'s forward and
  backward (:func:`embedding_bag`), ``logcumsumexp`` (:func:`log_cumulative_sum_exp`),
  ``lgamma``, ``digamma`` and ``polygamma`` (``special_functions``), and ``matrix_exp``
  and ``householder_product`` (``matrix_functions``).
* **A backward that cannot be traced or lowered.** ``affine_grid``'s backward is a C++
  composite that reshapes a tensor in place (``unsqueeze_``); on the functional tensors
  of AOTAutograd's trace that reaches torch_xla's kernel, which stops the compile with
  "Expected XLA tensor". ``grid_sample``'s sampler has no lowering, forward or
  backward. A spatial transformer could not compile, or ran both on the host. Each op
  in :data:`DIFFERENTIATED_AS_DECOMPOSED` gets, for AutogradXLA under the Python
  dispatcher (as above), torch's decomposition as its kernel: autograd differentiates
  the ordinary ops it is made of, which lower.

And one gap of torch 2.9's own: its decomposition of ``multilabel_margin_loss_forward``,
which AOTAutograd traces for every device, keeps the target slots after the first
``-1`` as class 0 (pytorch/pytorch#141017, fixed after 2.9): with a padded target,
which is how the loss is used, the compiled loss and gradient were wrong (2.32
against eager's 0.98 on a 4-class batch). :func:`multilabel_margin_loss` replaces it
for AutogradXLA in the same way, so the loss also runs on the device, where torch_xla
would send the op to its CPU fallback.

Two linear-algebra kernels of torch_xla's return what torch's autograd cannot use:
``_linalg_slogdet`` returns no LU factors, which torch's backward solves with
(:func:`linalg_slogdet` gives it a gradient through the inverse), and
``linalg_pinv`` fails to lower for a batch (:func:`pseudo_inverse` computes it from the
SVD, as eager does).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch._decomp import get_decompositions

from ._fx import working_precision
from .matrix_functions import matrix_function_decompositions
from .special_functions import special_function_decompositions

_aten = torch.ops.aten

#: Decomposed because torch_xla's lowering gives another value than eager.
DECOMPOSED_FOR_VALUES: tuple[torch._ops.OpOverloadPacket, ...] = (_aten.elu_backward,)

#: Decomposed because torch_xla has no lowering: each would run on the host.
DECOMPOSED_FOR_LOWERING: tuple[torch._ops.OpOverloadPacket, ...] = (
    _aten.glu_backward,
    _aten.huber_loss,
    _aten.huber_loss_backward,
    _aten.logaddexp,
    _aten.vdot,
    _aten.unfold,
)

#: Differentiated through torch's decomposition: their own backward cannot be traced
#: (``affine_grid``) or lowered (``grid_sample``).
DIFFERENTIATED_AS_DECOMPOSED: tuple[torch._ops.OpOverloadPacket, ...] = (
    _aten.affine_grid_generator,
    _aten.grid_sampler_2d,
)


def unfold_backward(grad: torch.Tensor, input_sizes: list[int], dim: int, size: int,
                    step: int) -> torch.Tensor:
    """The gradient of ``Tensor.unfold(dim, size, step)``: each window's elements added
    back where they came from. (torch's own decomposition unfolds an index tensor,
    and ``unfold`` has no XLA lowering either.)"""
    if not input_sizes:
        return grad.squeeze(0)
    dim %= len(input_sizes)
    windows = torch.arange(grad.shape[dim], device=grad.device) * step
    index = (windows[:, None] + torch.arange(size, device=grad.device)).flatten()
    grad = grad.movedim(-1, dim + 1).flatten(dim, dim + 1)
    return grad.new_zeros(input_sizes).index_add(dim, index, grad)


def avg_pool_with_divisor(dims: int) -> Callable[..., torch.Tensor]:
    """``avg_pool{dims}d`` with ``divisor_override``, which torch_xla's lowering gets
    wrong (the module's docstring): each window's sum (zeros padded in explicitly, as
    far as ``ceil_mode``'s last window reaches) divided by the override. Without an
    override the op is left as it is."""

    def decomposition(x: torch.Tensor, kernel_size: list[int], stride: list[int] = (),
                      padding: list[int] | int = 0, ceil_mode: bool = False,
                      count_include_pad: bool = True,
                      divisor_override: int | None = None) -> torch.Tensor:
        if divisor_override is None:
            return NotImplemented

        def per_dim(v: list[int] | int) -> list[int]:
            v = [v] if isinstance(v, int) else list(v)
            return v * dims if len(v) == 1 else v

        kernel, padding = per_dim(kernel_size), per_dim(padding)
        stride = per_dim(stride) if stride else kernel
        pads: list[int] = []
        for size, k, s, p in zip(x.shape[-dims:], kernel, stride, padding):
            span = size + 2 * p - k
            out = (span + (s - 1 if ceil_mode else 0)) // s + 1
            if ceil_mode and (out - 1) * s >= size + p:
                out -= 1  # the last window must start inside the input or its left pad
            pads = [p, max(p, (out - 1) * s + k - size - p)] + pads
        summed = _AVG_POOL[dims](torch.nn.functional.pad(x, pads), kernel, stride, 0,
                                 False, True) * math.prod(kernel)
        return summed / divisor_override

    return decomposition


_AVG_POOL = {2: _aten.avg_pool2d.default, 3: _aten.avg_pool3d.default}


def embedding_renorm(weight: torch.Tensor, indices: torch.Tensor, max_norm: float,
                     norm_type: float) -> torch.Tensor:
    """``Embedding(max_norm=...)``'s renormalization, which has no lowering: each looked-up
    row whose ``norm_type`` norm exceeds ``max_norm`` scaled by ``max_norm / (norm +
    1e-7)``, as eager's kernel does. A row looked up twice is written twice with the
    same value."""
    index = indices.flatten()
    rows = weight[index]
    norms = torch.linalg.vector_norm(rows, norm_type, dim=-1, keepdim=True)
    scale = torch.where(norms > max_norm, max_norm / (norms + 1e-7), 1.0)
    return weight.index_put((index,), rows * scale)


def log_cumulative_sum_exp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``logcumsumexp``, which has no lowering (forward, and backward, which calls it
    too), as a parallel prefix scan: ``ceil(log2 n)`` rounds, each adding to every
    element, in log space, the element ``2**k`` before it. Float16 and bfloat16 are
    scanned in float32 and rounded once; complex input and a symbolic length stay on
    the host."""
    n = x.shape[dim] if x.dim() else 1
    if not x.is_floating_point() or not isinstance(n, int):
        return NotImplemented
    if x.dim() == 0:
        return x.clone()
    y, dim = working_precision(x), dim % x.dim()
    shift = 1
    while shift < n:
        empty = y.new_full([*y.shape[:dim], shift, *y.shape[dim + 1:]], -math.inf)
        y = _log_add_exp(y, torch.cat([empty, y.narrow(dim, 0, n - shift)], dim))
        shift *= 2
    return y.to(x.dtype)


def _log_add_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(exp(a) + exp(b))`` from the larger of the two; two equal infinities (a
    step's ``-inf`` padding against a ``-inf`` input) give themselves, with no NaN in
    the unused branch for the gradient to pick up."""
    high, low = torch.maximum(a, b), torch.minimum(a, b)
    tie = (low == high) & low.isinf()
    gap = torch.where(tie, 0.0, low - high)
    return torch.where(tie, high, high + torch.log1p(torch.exp(gap)))


def infinite_norm(reference: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """An overload of ``aten.norm`` through torch's reference where ``p`` is infinite,
    and left as it is otherwise (the other norms lower as eager computes them)."""

    def decomposition(x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        p = args[0] if args else kwargs.get("p", 2)
        if not (isinstance(p, (int, float)) and math.isinf(p)):
            return NotImplemented
        return reference(x, *args, **kwargs)

    return decomposition


def pseudo_inverse(a: torch.Tensor, *, atol: torch.Tensor | None = None,
                   rtol: torch.Tensor | None = None, hermitian: bool = False) -> torch.Tensor:
    """``linalg_pinv.atol_rtol_tensor`` from ``_linalg_svd`` (``_linalg_eigh`` when
    ``hermitian``), as eager computes it: singular values at or below
    ``max(atol, rtol * the largest)`` count as zero. torch_xla's own kernel fails to
    lower for a batch ("Shapes are not compatible for broadcasting") and differs from
    eager by 2e-5 for one matrix; the SVD it is built from here is right for both
    (``rewrites.batched_svd``)."""
    m, n = a.shape[-2:]
    if atol is None:
        atol = torch.zeros((), dtype=torch.float64, device=a.device)
    if rtol is None:
        default = torch.finfo(a.dtype).eps * max(m, n)
        rtol = torch.where(atol > 0, 0.0, default)
    if a.numel() == 0:
        return a.new_zeros((*a.shape[:-2], n, m))
    if hermitian:
        s, u = torch.linalg.eigh(a)
        largest = s.abs().amax(dim=-1, keepdim=True)
        kept = s.abs() > torch.maximum(atol.unsqueeze(-1), rtol.unsqueeze(-1) * largest)
        return (u * torch.where(kept, s.reciprocal(), 0.0).unsqueeze(-2)) @ u.mH
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    largest = s[..., :1]  # sorted in descending order
    kept = s > torch.maximum(atol.unsqueeze(-1), rtol.unsqueeze(-1) * largest)
    return (vh.mH * torch.where(kept, s.reciprocal(), 0.0).unsqueeze(-2)) @ u.mH


def _bags(indices: torch.Tensor, offsets: torch.Tensor, bags: int) -> torch.Tensor:
    """The bag of each index: how many offsets are at or before its position, less one
    (empty bags share an offset; a last offset equal to the length starts nothing).
    Indices past ``include_last_offset``'s last offset go to the last bag, as in eager's
    ``offset2bag``."""
    starts = torch.zeros(indices.numel() + 1, dtype=torch.long, device=indices.device)
    starts = starts.index_add(0, offsets, torch.ones_like(offsets))
    return (torch.cumsum(starts, 0)[:-1] - 1).clamp(max=bags - 1)


def embedding_bag(weight: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                  scale_grad_by_freq: bool = False, mode: int = 0, sparse: bool = False,
                  per_sample_weights: torch.Tensor | None = None,
                  include_last_offset: bool = False, padding_idx: int = -1
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``EmbeddingBag``'s forward (``aten._embedding_bag``), which has no lowering (three
    host round trips a step): each bag's rows summed (times their per-sample weights),
    averaged over its non-padding rows, or their per-feature maximum; an empty bag is
    zeros. Also returns each index's bag, the bags' sizes and, for ``max``, the row
    that gave each maximum (the first in the bag), as eager's kernel does. Indices past
    ``include_last_offset``'s last offset (not a documented input; eager's CPU kernel
    treats them differently per mode) are left out of the last bag's value and counted
    in its size, as eager does for ``mean``."""
    bags = offsets.numel() - (1 if include_last_offset else 0)
    bag = _bags(indices, offsets, bags)
    counted = indices != padding_idx
    sizes = torch.zeros(offsets.shape, dtype=torch.long, device=indices.device)
    sizes = sizes.index_add(0, bag, counted.long())[:bags]
    rows = weight.index_select(0, indices)
    width = (bags, weight.shape[-1])
    position = torch.arange(indices.numel(), device=indices.device)
    summed = counted & (position < offsets[-1]) if include_last_offset else counted
    if mode == 2:  # max
        masked = torch.where(summed.unsqueeze(-1), rows, -math.inf)
        where = bag.unsqueeze(-1).expand_as(rows)
        best = weight.new_full(width, -math.inf).scatter_reduce(0, where, masked, "amax")
        first = torch.where(masked == best.index_select(0, bag), position.unsqueeze(-1),
                            indices.numel())
        first = torch.full(width, indices.numel(), device=indices.device).scatter_reduce(
            0, where, first.expand_as(rows), "amin")
        nonempty = (sizes > 0).unsqueeze(-1)
        max_indices = torch.where(nonempty, indices.index_select(
            0, first.clamp(max=max(indices.numel() - 1, 0)).flatten()).view(width), 0)
        return torch.where(nonempty, best, 0), bag, sizes, max_indices
    scale = summed.to(weight.dtype)
    if per_sample_weights is not None:
        scale = scale * per_sample_weights
    out = weight.new_zeros(width).index_add(0, bag, rows * scale.unsqueeze(-1))
    if mode == 1:  # mean
        out = out / sizes.clamp(min=1).unsqueeze(-1).to(weight.dtype)
    if mode == 0:  # eager counts no sizes for a sum
        return out, bag, torch.zeros_like(sizes), torch.zeros_like(sizes)
    return out, bag, sizes, sizes.clone()


def embedding_bag_per_sample_weights_backward(grad: torch.Tensor, weight: torch.Tensor,
                                              indices: torch.Tensor, offsets: torch.Tensor,
                                              offset2bag: torch.Tensor, mode: int,
                                              padding_idx: int = -1) -> torch.Tensor:
    """The per-sample weights' gradient (``sum`` mode only, as in eager): each index's
    bag gradient dotted with its row, zero for padding. Sent to the host by torch_xla."""
    rows = weight.index_select(0, indices)
    dots = (grad.index_select(0, _bags(indices, offsets, grad.shape[0])) * rows).sum(-1)
    return torch.where(indices == padding_idx, 0, dots)


def embedding_bag_backward(grad: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor,
                           offset2bag: torch.Tensor, bag_size: torch.Tensor,
                           maximum_indices: torch.Tensor, num_weights: int,
                           scale_grad_by_freq: bool, mode: int, sparse: bool,
                           per_sample_weights: torch.Tensor | None,
                           padding_idx: int = -1) -> torch.Tensor:
    """``EmbeddingBag``'s weight gradient, which torch_xla sends to its CPU fallback (two
    host round trips a step), as eager's dense kernel computes it: each looked-up row
    gets its bag's gradient (times its per-sample weight; over the bag's size for
    ``mean``; over the row's count with ``scale_grad_by_freq``), padding rows none; for
    ``max``, each non-empty bag's gradient goes to the rows that gave its maxima.
    Each index's bag is found from ``offsets``, as eager leaves ``offset2bag`` empty for
    ``sum`` without padding. A sparse gradient is left to torch_xla. With
    ``scale_grad_by_freq`` each row is divided by its own index's count, as documented
    and as CUDA does; torch 2.9's CPU kernel (which the fallback ran) divides some rows
    by another index's count (pytorch/pytorch#190063)."""
    if sparse:
        return NotImplemented
    bag = _bags(indices, offsets, grad.shape[0])
    counted = (indices != padding_idx).to(grad.dtype)
    # bag_size is zeros for a sum (eager's too): the sizes are counted here
    sizes = grad.new_zeros(offsets.shape).index_add(0, bag, counted)[: grad.shape[0]]
    weights = grad.new_zeros((num_weights, grad.shape[-1]))
    if mode == 2:  # max
        kept = torch.where((sizes > 0).unsqueeze(-1), grad, 0)
        return weights.scatter_add(0, maximum_indices, kept)
    scale = counted
    if per_sample_weights is not None:
        scale = scale * per_sample_weights
    if mode == 1:  # mean
        scale = scale / sizes.clamp(min=1).index_select(0, bag)
    if scale_grad_by_freq:
        frequency = grad.new_zeros(num_weights).index_add(0, indices, torch.ones_like(scale))
        scale = scale / frequency.index_select(0, indices)
    rows = grad.index_select(0, bag) * scale.unsqueeze(-1)
    return weights.index_add(0, indices, rows)


def gap_decompositions() -> dict[torch._ops.OpOverload, Callable]:
    """The decompositions of :data:`DECOMPOSED_FOR_VALUES` and
    :data:`DECOMPOSED_FOR_LOWERING`, :func:`unfold_backward`, :func:`infinite_norm`,
    :func:`avg_pool_with_divisor`, :func:`embedding_renorm`, :func:`pseudo_inverse`, the
    :func:`embedding_bag` family, :func:`log_cumulative_sum_exp`,
    ``special_functions``' ``lgamma`` family and ``matrix_functions``' ``matrix_exp``
    and ``householder_product``, for AOTAutograd's ``decompositions=``."""
    table = get_decompositions([*DECOMPOSED_FOR_VALUES, *DECOMPOSED_FOR_LOWERING])
    table[_aten.unfold_backward.default] = unfold_backward
    for op, reference in get_decompositions([_aten.norm]).items():
        table[op] = infinite_norm(reference)
    for dims, op in _AVG_POOL.items():
        table[op] = avg_pool_with_divisor(dims)
    table[_aten.embedding_renorm.default] = embedding_renorm
    table[_aten.logcumsumexp.default] = log_cumulative_sum_exp
    table[_aten.linalg_pinv.atol_rtol_tensor] = pseudo_inverse
    table[_aten._embedding_bag.default] = embedding_bag
    table[_aten._embedding_bag_backward.default] = embedding_bag_backward
    table[_aten._embedding_bag_per_sample_weights_backward.default] = (
        embedding_bag_per_sample_weights_backward)
    table.update(special_function_decompositions())
    table.update(matrix_function_decompositions())
    return table


def multilabel_margin_loss(x: torch.Tensor, target: torch.Tensor, reduction: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``aten.multilabel_margin_loss_forward`` as eager's kernel computes it: each
    sample's targets are its target entries up to the first -1; the loss is
    the sum over targets ``j`` and non-targets ``c`` of ``relu(1 - x[j] + x[c])``,
    divided by the number of classes. Returns the loss and the 0/1 target mask."""
    torch._check(x.dim() <= 2 and (x.dim() == 0 or x.shape[-1] > 0), lambda: (
        f"multilabel_margin_loss: expected a non-empty vector or matrix, got shape "
        f"{tuple(x.shape)}"))
    torch._check(target.shape == x.shape, lambda: (
        f"multilabel_margin_loss: target shape {tuple(target.shape)} differs from the "
        f"input's {tuple(x.shape)}"))
    rows = x.reshape(-1, x.shape[-1] if x.dim() else 1)
    labels = target.reshape(rows.shape)
    classes = rows.shape[1]
    position = torch.arange(classes, device=labels.device)
    first_stop = torch.where(labels == -1, position, classes).amin(dim=1, keepdim=True)
    counted = position < first_stop  # [N, slot]
    label = torch.where(counted, labels, 0)
    is_target = ((label.unsqueeze(2) == position) & counted.unsqueeze(2)).any(dim=1)
    margins = torch.relu(1 - rows.gather(1, label).unsqueeze(2) + rows.unsqueeze(1))
    kept = counted.unsqueeze(2) & ~is_target.unsqueeze(1)  # [N, slot, class]
    per_sample = torch.where(kept, margins, 0).sum(dim=(1, 2)) / classes
    if reduction == 1:  # mean
        loss = per_sample.mean()
    elif reduction == 2:  # sum
        loss = per_sample.sum()
    else:
        loss = per_sample if x.dim() == 2 else per_sample.reshape(())
    return loss, is_target.to(x.dtype).reshape(target.shape)


class _LogAbsDet(torch.autograd.Function):
    """torch_xla's ``_linalg_slogdet`` with the gradient of ``log|det A|``, ``A^{-T}``,
    from ``linalg_inv_ex`` (which lowers) instead of torch's, which solves with the LU
    factors torch_xla does not return."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, a: torch.Tensor
                ) -> tuple[torch.Tensor, ...]:
        with torch._C._AutoDispatchBelowAutograd():
            sign, logabsdet, lu, pivots = _aten._linalg_slogdet.default(a)
        ctx.save_for_backward(a)
        # torch_xla's LU and pivots are undefined tensors (None) on the device
        ctx.mark_non_differentiable(*(t for t in (sign, lu, pivots) if t is not None))
        return sign, logabsdet, lu, pivots

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, _sign: torch.Tensor,
                 grad: torch.Tensor, _lu: torch.Tensor, _pivots: torch.Tensor) -> torch.Tensor:
        (a,) = ctx.saved_tensors
        return grad[..., None, None] * torch.linalg.inv_ex(a)[0].mT


def linalg_slogdet(a: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``aten._linalg_slogdet`` for real matrices, its gradient through the inverse.

    torch_xla's kernel returns no LU factors and pivots (undefined tensors), which
    torch's backward solves with: the backward of ``slogdet`` or ``logdet`` failed in
    lazy mode ("Expected a proper Tensor but got None ... 'LU'") and stopped a compiled
    step with a bare AssertionError in AOTAutograd, for one matrix as for a batch (the
    log-determinant of a flow's invertible 1x1 convolution). The sign has no gradient,
    as in eager for real matrices.
    """
    torch._check(not a.is_complex(), lambda: (
        f"syncfree_xla: slogdet of a complex matrix ({a.dtype}) is not supported on XLA"))
    return _LogAbsDet.apply(a)


#: Given a kernel of ours for AutogradXLA: torch's own decomposition gives wrong values,
#: or torch's gradient cannot run on what torch_xla's kernel returns.
REDEFINED_AUTOGRAD: dict[torch._ops.OpOverload, Callable[..., object]] = {
    _aten.multilabel_margin_loss_forward.default: multilabel_margin_loss,
    _aten._linalg_slogdet.default: linalg_slogdet,
}


def _has_out(op: torch._ops.OpOverload) -> bool:
    """Whether ``op`` is an out= variant, which autograd refuses."""
    return any(arg.is_out for arg in op._schema.arguments)


@functools.cache
def ungraded_ops() -> tuple[torch._ops.OpOverload, ...]:
    """The ops torch differentiates through their composite kernel, which a torch_xla
    kernel shadows for XLA with no AutogradXLA kernel in its place. Read off the
    dispatcher once torch_xla is imported, as its registrations decide the list."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    found = []
    for name in sorted(torch._C._dispatch_get_all_op_names()):
        if not (name.startswith("aten::") and has(name, "XLA")
                and has(name, "CompositeImplicitAutograd") and not has(name, "AutogradXLA")):
            continue
        packet, _, overload = name[len("aten::"):].partition(".")
        if packet.startswith("_"):  # torch_xla's own helpers (_to_cpu, _propagate_xla_data)
            continue
        op = getattr(getattr(_aten, packet), overload or "default")
        if not _has_out(op):
            found.append(op)
    return tuple(found)


@functools.cache
def restore_composite_autograd() -> None:
    """Registers torch's composite kernel for AutogradXLA on each of :func:`ungraded_ops`,
    and torch's decomposition on each of :data:`DIFFERENTIATED_AS_DECOMPOSED`, for
    traces under the Python dispatcher (AOTAutograd's), and :data:`REDEFINED_AUTOGRAD`'s
    kernels; once per process."""
    for op in ungraded_ops():
        op.py_impl(torch._C.DispatchKey.AutogradXLA)(functools.partial(_composite, op))
    for op, decomposition in get_decompositions(list(DIFFERENTIATED_AS_DECOMPOSED)).items():
        if not _has_out(op):
            op.py_impl(torch._C.DispatchKey.AutogradXLA)(decomposition)
    for op, kernel in REDEFINED_AUTOGRAD.items():
        op.py_impl(torch._C.DispatchKey.AutogradXLA)(kernel)


def _composite(op: torch._ops.OpOverload, *args: object, **kwargs: object) -> object:
    return op.decompose(*args, **kwargs)


__all__ = ["DECOMPOSED_FOR_LOWERING", "DECOMPOSED_FOR_VALUES", "DIFFERENTIATED_AS_DECOMPOSED",
           "REDEFINED_AUTOGRAD", "embedding_bag", "embedding_bag_backward",
           "embedding_bag_per_sample_weights_backward", "gap_decompositions", "linalg_slogdet",
           "multilabel_margin_loss", "pseudo_inverse", "restore_composite_autograd",
           "ungraded_ops"]
