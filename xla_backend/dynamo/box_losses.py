"""torchvision's IoU losses without a boolean-mask assignment, inside our frames.

Why: ``torchvision.ops`` computes the intersection of two boxes for
``generalized_box_iou_loss``, ``distance_box_iou_loss`` and ``complete_box_iou_loss`` as
``intsctk[mask] = (xkis2[mask] - xkis1[mask]) * (ykis2[mask] - ykis1[mask])``. Each
``[mask]`` has a shape that depends on the values: Dynamo breaks the graph there, each
break reads the mask on the host, and every new count of overlapping boxes is a new
shape, compiled again (on a small detection loss: 10 host reads, 11 executions and a
recompile a step). ``torch.where(mask, area, 0)`` is the same function of the boxes,
forward and backward: the areas it keeps are the ones the assignment writes, and the
others get a zero gradient either way.

Only modules torchvision has already imported are patched; this never imports it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

__all__ = ["box_losses_traced", "traceable_loss_inter_union"]

#: The torchvision modules that bind ``_loss_inter_union`` (from ``torchvision.ops._utils``).
_MODULES = ("torchvision.ops._utils", "torchvision.ops.giou_loss",
            "torchvision.ops.diou_loss")


def traceable_loss_inter_union(boxes1: torch.Tensor,
                               boxes2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Intersection and union areas of ``(x1, y1, x2, y2)`` boxes, elementwise."""
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    xkis1 = torch.max(x1, x1g)
    ykis1 = torch.max(y1, y1g)
    xkis2 = torch.min(x2, x2g)
    ykis2 = torch.min(y2, y2g)
    overlap = (ykis2 > ykis1) & (xkis2 > xkis1)
    intsctk = torch.where(overlap, (xkis2 - xkis1) * (ykis2 - ykis1), torch.zeros_like(x1))
    unionk = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intsctk
    return intsctk, unionk


@contextlib.contextmanager
def box_losses_traced() -> Iterator[None]:
    """Puts :func:`traceable_loss_inter_union` in torchvision's modules for the duration."""
    stock: dict[str, object] = {}
    for name in _MODULES:
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "_loss_inter_union"):
            stock[name] = module._loss_inter_union
            module._loss_inter_union = traceable_loss_inter_union
    try:
        yield
    finally:
        for name, function in stock.items():
            sys.modules[name]._loss_inter_union = function
