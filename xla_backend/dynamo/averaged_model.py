"""``AveragedModel.update_parameters`` (SWA and EMA) traced into our graphs, branch-free.

Why: the stock method decides on the host whether this is the first update, twice
(``bool(self.n_averaged == 0)`` and ``if self.n_averaged > 0``). Dynamo breaks the graph
at each, and with ``AveragedModel(model, device=...)`` (the torchvision reference
scripts' EMA) the counter lives on the device: two host syncs per update, and the step
splits into 3-7 executions. With a per-parameter ``avg_fn`` the rest runs as one small
frame per parameter shape, recompiled up to Dynamo's limit.

While one of our compiled functions runs, :func:`update_traced` gives ``AveragedModel``
an ``update_parameters`` that computes both outcomes and keeps one with
``torch.where(n_averaged == 0, model's value, average)``: the same numbers as eager's
branches, since exactly one of them runs there and the average is computed with the
same function (``multi_avg_fn`` per device and dtype, ``avg_fn`` per tensor, or SWA's
per-tensor mean, which is what torch runs on the CPU and XLA devices). A counter on the
host (``AveragedModel(model)`` of a device model) stays there: its ops run on the host
(``lower.split``), and only ``n_averaged == 0`` crosses to the device. An average kept
on another device than the model (``AveragedModel(model, device="cpu")``, to spare device
memory) is updated by the stock method outside the graph: its copies read the device.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch.optim.swa_utils import AveragedModel, get_swa_avg_fn

__all__ = ["traceable_update_parameters", "update_traced"]

_STOCK_UPDATE = AveragedModel.__dict__["update_parameters"]
_Pair = tuple[list[torch.Tensor], list[torch.Tensor]]


def _tensors(averaged: AveragedModel, model: torch.nn.Module) -> _Pair:
    if averaged.use_buffers:
        return (list(itertools.chain(averaged.module.parameters(), averaged.module.buffers())),
                list(itertools.chain(model.parameters(), model.buffers())))
    return list(averaged.parameters()), list(model.parameters())


def _average_in_place(averaged: AveragedModel, mine: list[torch.Tensor],
                      theirs: list[torch.Tensor]) -> None:
    """What the stock method does when ``n_averaged > 0``, on detached tensors."""
    if averaged.multi_avg_fn is None:
        avg_fn = averaged.avg_fn or get_swa_avg_fn()
        for a, p in zip(mine, theirs):
            a.copy_(avg_fn(a, p, averaged.n_averaged.to(a.device)))
        return
    groups: dict[tuple[torch.device, torch.dtype], _Pair] = {}
    for a, p in zip(mine, theirs):
        group = groups.setdefault((a.device, a.dtype), ([], []))
        group[0].append(a)
        group[1].append(p)
    for (device, _), (a_list, p_list) in groups.items():
        averaged.multi_avg_fn(a_list, p_list, averaged.n_averaged.to(device))


@torch._dynamo.disable
def _eager_update(averaged: AveragedModel, model: torch.nn.Module) -> None:
    """The stock update, outside the graph: for an average kept on another device than
    the model (an EMA on the host), whose copies are device-to-host reads either way."""
    _STOCK_UPDATE(averaged, model)


def traceable_update_parameters(self: AveragedModel, model: torch.nn.Module) -> None:
    """``AveragedModel.update_parameters`` without a host read of ``n_averaged``."""
    if not torch.compiler.is_compiling():
        return _STOCK_UPDATE(self, model)
    mine, theirs = _tensors(self, model)
    if any(a.device != p.device for a, p in zip(mine, theirs)):
        return _eager_update(self, model)
    with torch.no_grad():
        mine = [a.detach() for a in mine]
        theirs = [p.detach() for p in theirs]
        first = self.n_averaged == 0
        _average_in_place(self, mine, theirs)
        for a, p in zip(mine, theirs):
            a.copy_(torch.where(first.to(a.device), p, a))
        if not self.use_buffers:
            for b_mine, b_theirs in zip(self.module.buffers(), model.buffers()):
                b_mine.detach().copy_(b_theirs.detach().to(b_mine.device))
        self.n_averaged.add_(1)
    return None


@contextlib.contextmanager
def update_traced() -> Iterator[None]:
    """Puts :func:`traceable_update_parameters` on ``AveragedModel`` for the duration."""
    AveragedModel.update_parameters = traceable_update_parameters  # type: ignore[method-assign]
    try:
        yield
    finally:
        AveragedModel.update_parameters = _STOCK_UPDATE  # type: ignore[method-assign]
