"""GradScaler's optimizer step, decided on the device while one of our frames runs.

GradScaler.step skips optimizer.step() when the unscaled gradients hold an inf or a
NaN, and decides so on the host: ``if not sum(v.item() for v in found_inf...)``, one
device-to-host transfer per step. torch.amp is on Dynamo's skip list, so this code
runs eagerly (on lazy XLA tensors) between our graphs. While one of our compiled
functions runs, GradScaler._maybe_opt_step is swapped for a branch-free twin: take
the step, then keep every parameter and state tensor's old value where found_inf is
set. Same results, decided on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._dynamo

from . import step_counters

__all__ = ["OBSERVERS", "masked_maybe_opt_step", "masked_step"]


@contextlib.contextmanager
def masked_step() -> Iterator[None]:
    """Swaps in :func:`masked_maybe_opt_step` for the duration (re-entrant)."""
    from torch.amp.grad_scaler import GradScaler

    previous = GradScaler.__dict__["_maybe_opt_step"]
    GradScaler._maybe_opt_step = masked_maybe_opt_step  # type: ignore[method-assign]
    try:
        yield
    finally:
        GradScaler._maybe_opt_step = previous  # type: ignore[method-assign]


def _step_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor] | None:
    """Every tensor ``optimizer.step()`` may change, or None when masking cannot be exact.

    None when a parameter with a gradient has no state yet (a skipped first step
    must leave the state *absent*, which no mask can express), when state lives on
    another device than its parameter (reverting it would need found_inf there; step
    counters were moved to the device before this is asked), or holds a non-tensor
    value the step may change. A group whose step keeps no state at all (SGD without
    momentum) is masked on its parameters alone.
    """
    tensors: list[torch.Tensor] = []
    for group in optimizer.param_groups:
        stateless = isinstance(optimizer, torch.optim.SGD) and group.get("momentum") == 0
        for p in group["params"]:
            tensors.append(p)
            state = optimizer.state.get(p)
            if not state:
                if p.grad is not None and not stateless:
                    return None
                continue
            for v in state.values():
                if v is None:
                    continue
                if not isinstance(v, torch.Tensor) or v.device != p.device:
                    return None
                tensors.append(v)
    return tensors


#: Callbacks ``observer(optimizer, masked)`` told at each GradScaler step our scope runs:
#: ``masked`` when it is decided on the device, False when the stock step reads found_inf
#: on the host, so ``xla_backend.tools.explain`` can report it. Empty unless something watches.
OBSERVERS: list[Callable[[torch.optim.Optimizer, bool], None]] = []


@torch._dynamo.disable
def _notify_grad_scaler_step(optimizer: torch.optim.Optimizer, masked: bool) -> None:
    for observer in list(OBSERVERS):
        observer(optimizer, masked)


# The snapshot and the revert run eagerly (lazy XLA ops, no transfer): Dynamo would
# otherwise compile them as frames of their own, and our lowering may hand back a
# graph's input tensor as its ``clone()`` output, so the snapshot would be the
# parameter itself.
@torch._dynamo.disable
def _snapshot(optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any]
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor] | None:
    tensors = _step_tensors(optimizer)
    if not tensors:
        return None
    device = tensors[0].device
    with torch.no_grad():
        found = [v.to(device) for v in optimizer_state["found_inf_per_device"].values()]
        skip = torch.stack(found).sum() > 0
        return tensors, [t.detach().clone() for t in tensors], skip


@torch._dynamo.disable
def _revert(tensors: list[torch.Tensor], old: list[torch.Tensor], skip: torch.Tensor) -> None:
    with torch.no_grad():
        for t, o in zip(tensors, old):
            t.copy_(torch.where(skip, o, t))


@torch._dynamo.disable(recursive=False)  # optimizer.step() inside is still compiled
def masked_maybe_opt_step(self: Any, optimizer: torch.optim.Optimizer,
                          optimizer_state: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    """``GradScaler._maybe_opt_step`` deciding on the device instead of the host.

    Step counters kept on the host (Adam-style optimizers created without
    ``capturable=True``) are moved to the device first, and the groups run this step
    as capturable (see :mod:`xla_backend.dynamo.step_counters`). Falls back to the stock
    method (one host read) when :func:`_step_tensors` says a mask cannot reproduce a
    skipped step exactly: the first step, or state that is not a device tensor.
    """
    flipped = step_counters.device_step_counters(optimizer)
    try:
        snapshot = _snapshot(optimizer, optimizer_state)
        _notify_grad_scaler_step(optimizer, masked=snapshot is not None)
        if snapshot is None:
            return _STOCK_MAYBE_OPT_STEP(self, optimizer, optimizer_state, *args, **kwargs)
        retval = optimizer.step(*args, **kwargs)
        _revert(*snapshot)
        return retval
    finally:
        step_counters.restore_capturable(flipped)


def _stock_maybe_opt_step() -> Callable[..., Any]:
    from torch.amp.grad_scaler import GradScaler

    return GradScaler.__dict__["_maybe_opt_step"]


_STOCK_MAYBE_OPT_STEP = _stock_maybe_opt_step()
