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
    """Intersection and union areas of ``(x1, y1, x2, y2)`` boxes, pair by pair."""
    a_x1, a_y1, a_x2, a_y2 = boxes1.unbind(dim=-1)
    b_x1, b_y1, b_x2, b_y2 = boxes2.unbind(dim=-1)
    left, top = torch.max(a_x1, b_x1), torch.max(a_y1, b_y1)
    right, bottom = torch.min(a_x2, b_x2), torch.min(a_y2, b_y2)
    overlapping = (bottom > top) & (right > left)
    area = torch.where(overlapping, (right - left) * (bottom - top), torch.zeros_like(a_x1))
    union = (a_x2 - a_x1) * (a_y2 - a_y1) + (b_x2 - b_x1) * (b_y2 - b_y1) - area
    return area, union


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
