"""GradScaler's optimizer step, decided on the device while one of our frames runs.

GradScaler.step skips optimizer.step() when the unscaled gradients hold an inf or a
NaN, and decides so on the host: ``if not sum(v.item() for v in found_inf...)``, one
device-to-host transfer per step. torch.amp is on Dynamo's skip list, so this code
runs eagerly (on lazy XLA tensors) between our graphs. While one of our compiled
functions runs, GradScaler's methods are swapped for :data:`STAND_INS`:

* ``_maybe_opt_step``: a branch-free twin: take the step, then keep every parameter and
  state tensor's old value where found_inf is set. Same results, decided on the device.
* ``scale``, ``unscale_`` and ``update``: the same ops on the same values, written where
  Dynamo traces them into the step's graphs instead of three graph breaks with eager
  ops between them. What they do not cover (a list to scale, float16 or sparse
  gradients, a new scale, a subclass that overrides a helper) goes to the stock method.

How the old values are kept, per optimizer:

* Every GradScaler step is checked: did every change to the optimizer's parameters
  and state come from an input update of our compiled graphs? The runtime reports
  each update it makes (:func:`active_mask`), and a tensor's version counter counts
  every change. The first step (stock: the state does not exist yet, so it decides on
  the host) is checked too.
* Once a step checked out, later steps take no snapshot: the runtime runs each graph
  that updates inputs as a masked twin (``lower.split.masked``) that writes
  ``where(found_inf, old, new)``, so undoing a skipped step costs no host op per tensor.
* Otherwise a step snapshots every tensor it may change (a lazy clone each) and puts
  them back where found_inf is set. So does a checked optimizer's step that compiles a
  graph (code not checked yet), from that moment on. Should a step of a checked
  optimizer change a tensor some other way without compiling (a cached path that was
  never checked), the optimizer goes back to snapshots; if that very step was one to
  skip, its change cannot be undone, and the step raises rather than train on a
  wrong value.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._dynamo
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .. import counters
from . import step_counters

log = logging.getLogger(__name__)

__all__ = ["OBSERVERS", "STAND_INS", "WriteBackMask", "active_mask", "graph_compiling",
           "masked_maybe_opt_step", "masked_step", "traceable_scale", "traceable_unscale_",
           "traceable_update"]


@contextlib.contextmanager
def masked_step() -> Iterator[None]:
    """Swaps in :data:`STAND_INS` for the duration (re-entrant)."""
    from torch.amp.grad_scaler import GradScaler

    previous = {name: GradScaler.__dict__[name] for name in STAND_INS}
    for name, fn in STAND_INS.items():
        setattr(GradScaler, name, fn)
    # What ``disable(recursive=False)`` asks, kept on the code object: Dynamo otherwise
    # runs its whole frame callback to decide so again at every step (~0.3 ms). Set at
    # each entry, since ``torch._dynamo.reset()`` may clear it.
    torch._dynamo.eval_frame.skip_code(_MASKED_MAYBE_OPT_STEP_CODE)
    try:
        yield
    finally:
        for name, fn in previous.items():
            setattr(GradScaler, name, fn)


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


class WriteBackMask:
    """What the runtime does to the inputs a compiled graph updates during a masked step.

    ``skip``: found_inf as a 0-d bool on the device; each update is written as
    ``where(skip, old, new)``. None while the step is checked but not trusted (the
    snapshot undoes it). The runtime reports each tensor it updates (:meth:`wrote`), and
    the compiled call around it (``aot``) credits that tensor with every version-counter
    bump the call made: its own update, and the one AOTAutograd adds for autograd.
    """

    def __init__(self, skip: torch.Tensor | None) -> None:
        self.skip = skip
        self.on_compile: Callable[[], None] | None = None
        self._bumps: dict[int, int] = {}
        self._written: set[int] = set()

    def select(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """The value to write: ``new``, or ``old`` where the step is skipped (lazy)."""
        if self.skip is None:
            return new
        with torch.no_grad():
            return torch.where(self.skip, old, new)

    def wrote(self, t: torch.Tensor) -> None:
        """The runtime updated ``t`` through :meth:`select`."""
        self._written.add(id(t))

    def credit(self, args: list[Any], versions: list[int | None]) -> None:
        """After one compiled call on ``args`` (their versions before it): credits the
        bumps of the tensors the runtime updated in it. Any other change goes uncredited."""
        for a, v in zip(args, versions):
            if v is not None and id(a) in self._written:
                self._bumps[id(a)] = self._bumps.get(id(a), 0) + a._version - v
        self._written.clear()

    def bumps(self, t: torch.Tensor) -> int:
        return self._bumps.get(id(t), 0)


_active = threading.local()


def active_mask() -> WriteBackMask | None:
    """The mask of the masked optimizer step running on this thread, if any."""
    return getattr(_active, "mask", None)


#: Optimizers whose masked steps changed their tensors only through our runtime's input
#: updates (see the module docstring): their steps run without a snapshot.
_trusted: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()


class _Masked:
    """One GradScaler step in flight: what it may change, and how to undo it.

    ``skip`` None: the stock step (the first), which decides on the host and masks
    nothing; it is still checked, so the next step can already run without a snapshot.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor],
                 skip: torch.Tensor | None) -> None:
        self.optimizer = optimizer
        self.tensors = tensors
        self.skip = skip
        # every tensor the optimizer holds now; one created by the step starts at 0
        self.versions = {id(t): t._version for t in _held_tensors(optimizer)}
        self.old: list[torch.Tensor] | None = None
        trusted = skip is not None and optimizer in _trusted
        if skip is not None and not trusted:
            self._snapshot()
        self.mask = WriteBackMask(skip if trusted else None)
        self.mask.on_compile = self._compiling
        self.lost = False  # changed other than by our updates before a late snapshot

    def _snapshot(self) -> None:
        counters.incr(counters.GRAD_SCALER_SNAPSHOTS)
        with unset_fake_temporarily(), torch.no_grad():
            self.old = [t.detach().clone() for t in self.tensors]

    def _compiling(self) -> None:
        """A graph compiles during a trusted step: code not checked before may run from
        here, so the step is undone from a snapshot taken now, as an untrusted one is."""
        if self.old is None and self.skip is not None:
            self.lost = not self.accounted()
            self._snapshot()

    def accounted(self) -> bool:
        """Whether every change to the step's tensors was an update our runtime reported."""
        now = _step_tensors(self.optimizer)
        if not now or (self.tensors and [id(t) for t in now] != [id(t) for t in self.tensors]):
            return False
        return all(t._version - self.versions.get(id(t), 0) == self.mask.bumps(t) for t in now)


def _held_tensors(optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
    for group in optimizer.param_groups:
        for p in group["params"]:
            yield p
            for v in optimizer.state.get(p, {}).values():
                if isinstance(v, torch.Tensor):
                    yield v


def graph_compiling() -> None:
    """Told by the backend as each Dynamo graph arrives (see :meth:`_Masked._compiling`)."""
    mask = active_mask()
    if mask is not None and mask.on_compile is not None:
        mask.on_compile()


# The helpers below run eagerly (lazy XLA ops, no transfer): Dynamo would otherwise
# compile them as frames of their own, and our lowering may hand back a graph's input
# tensor as its ``clone()`` output, so the snapshot would be the parameter itself.
@torch._dynamo.disable
def _begin(optimizer: torch.optim.Optimizer, optimizer_state: dict[str, Any]) -> _Masked:
    tensors = _step_tensors(optimizer)
    _notify_grad_scaler_step(optimizer, masked=bool(tensors))
    skip = None
    if tensors:
        device = tensors[0].device
        with torch.no_grad():
            found = [v.to(device) for v in optimizer_state["found_inf_per_device"].values()]
            skip = torch.stack(found).sum() > 0
    masked = _Masked(optimizer, tensors or [], skip)
    _active.mask = masked.mask
    return masked


@torch._dynamo.disable
def _deactivate() -> None:
    _active.mask = None


@torch._dynamo.disable
def _finish(masked: _Masked) -> None:
    """Undoes a skipped step, and decides whether the next ones need a snapshot."""
    accounted = masked.accounted()
    if masked.old is not None:
        with torch.no_grad():
            for t, o in zip(masked.tensors, masked.old):
                t.copy_(torch.where(masked.skip, o, t))
    if accounted:
        _trusted.add(masked.optimizer)
        return
    if masked.optimizer not in _trusted:
        return
    _trusted.discard(masked.optimizer)
    name = type(masked.optimizer).__name__
    log.warning("syncfree_xla: a GradScaler step of %s changed its tensors other than "
                "through a compiled graph's input updates; its later steps snapshot them "
                "again to undo a skip", name)
    if (masked.old is None or masked.lost) and bool(masked.skip):  # a host read, rarely
        raise RuntimeError(
            f"syncfree_xla: GradScaler skipped this step of {name} (its gradients held an "
            f"inf or a NaN), but the step changed its parameters or state other than "
            f"through a compiled graph's input updates, so the skip cannot be undone and "
            f"those tensors now hold the skipped step's values. Earlier steps of the same "
            f"optimizer did not do that; the step's code must have changed. Later steps "
            f"snapshot their tensors again.")


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
        masked = _begin(optimizer, optimizer_state)
        try:
            if masked.skip is None:
                retval = _STOCK_MAYBE_OPT_STEP(self, optimizer, optimizer_state, *args, **kwargs)
            else:
                retval = optimizer.step(*args, **kwargs)
        finally:
            _deactivate()
        _finish(masked)
        return retval
    finally:
        step_counters.restore_capturable(flipped)


_MASKED_MAYBE_OPT_STEP_CODE = masked_maybe_opt_step.__wrapped__.__code__  # type: ignore[attr-defined]


def _stock(name: str) -> Callable[..., Any]:
    from torch.amp.grad_scaler import GradScaler

    return GradScaler.__dict__[name]


_STOCK_MAYBE_OPT_STEP = _stock("_maybe_opt_step")
_STOCK_SCALE = _stock("scale")
_STOCK_UNSCALE = _stock("unscale_")
_STOCK_UPDATE = _stock("update")
#: The helpers the stand-ins below do the work of: a subclass that overrides one of
#: them gets the stock methods, which call its override.
_STOCK_HELPERS = {name: _stock(name) for name in
                  ("_lazy_init_scale_growth_tracker", "_check_scale_growth_tracker",
                   "_unscale_grads_")}


def _stock_helpers(scaler: Any) -> bool:
    cls = type(scaler)
    return all(getattr(cls, name) is fn for name, fn in _STOCK_HELPERS.items())


# The stand-ins below are plain functions outside torch.amp, so Dynamo traces them into
# the step's graphs: the stock methods are each a graph break, a frame of their own and
# a few eager ops per step. Each does what the stock method does on the same values,
# with the same ops, and hands anything it does not cover to the stock method, which
# handles it or raises its own error.


def traceable_scale(self: Any, outputs: Any) -> Any:
    """``GradScaler.scale`` of one tensor; a list or tuple goes to the stock method."""
    if not self._enabled:
        return outputs
    if not isinstance(outputs, torch.Tensor) or not _stock_helpers(self):
        return _STOCK_SCALE(self, outputs)
    if self._scale is None:
        if self._growth_tracker is not None:
            return _STOCK_SCALE(self, outputs)
        # What _lazy_init_scale_growth_tracker does; calling it (torch.amp) would break
        # the graph. _stock_helpers made sure it is not overridden.
        self._scale = torch.full((), self._init_scale, dtype=torch.float32,
                                 device=outputs.device)
        self._growth_tracker = torch.full((), self._init_growth_tracker, dtype=torch.int32,
                                          device=outputs.device)
    return outputs * self._scale.to(device=outputs.device, non_blocking=True)


def traceable_unscale_(self: Any, optimizer: torch.optim.Optimizer) -> None:
    """``GradScaler.unscale_`` of dense gradients, none float16, all on the scale's device."""
    from torch.amp.grad_scaler import OptState

    if not self._enabled:
        return
    scale = self._scale
    states = self._per_optimizer_states
    key = id(optimizer)
    state = states[key] if key in states else None
    if (scale is None or self._growth_tracker is None or not _stock_helpers(self)
            or (state is not None and state["stage"] is not OptState.READY)):
        return _STOCK_UNSCALE(self, optimizer)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse or g.dtype == torch.float16 or g.device != scale.device:
                return _STOCK_UNSCALE(self, optimizer)
            by_dtype.setdefault(g.dtype, []).append(g)
    found_inf_per_device = {}
    if by_dtype:
        with torch.no_grad():
            inv_scale = scale.double().reciprocal().float()  # in float64, as the stock one
            found_inf = torch.full((), 0.0, dtype=torch.float32, device=scale.device)
            for grads in by_dtype.values():
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        found_inf_per_device[scale.device] = found_inf
    if state is None:
        state = {"stage": OptState.READY, "found_inf_per_device": {}}
        states[key] = state
    state["found_inf_per_device"] = found_inf_per_device
    state["stage"] = OptState.UNSCALED


def traceable_update(self: Any, new_scale: Any = None) -> None:
    """``GradScaler.update()`` with every found_inf on the scale's device; ``new_scale``
    goes to the stock method."""
    if not self._enabled:
        return
    scale, tracker = self._scale, self._growth_tracker
    if new_scale is not None or scale is None or tracker is None or not _stock_helpers(self):
        return _STOCK_UPDATE(self, new_scale)
    found_infs = [found_inf for state in self._per_optimizer_states.values()
                  for found_inf in state["found_inf_per_device"].values()]
    if not found_infs or any(f.device != scale.device for f in found_infs):
        return _STOCK_UPDATE(self, new_scale)
    combined = found_infs[0]
    for found_inf in found_infs[1:]:
        combined += found_inf  # in place, as the stock method sums them
    torch._amp_update_scale_(scale, tracker, combined, self._growth_factor,
                             self._backoff_factor, self._growth_interval)
    # The stock method binds a new defaultdict, which Dynamo cannot build: emptying
    # this one leaves the same state (nothing else holds it).
    self._per_optimizer_states.clear()


#: What :func:`masked_step` puts on GradScaler while our frames run.
STAND_INS: dict[str, Callable[..., Any]] = {
    "_maybe_opt_step": masked_maybe_opt_step,
    "scale": traceable_scale,
    "unscale_": traceable_unscale_,
    "update": traceable_update,
}
