"""Optimizer step counters on the device, so a masked GradScaler step needs no host read.

Why: Adam, AdamW, RMSprop (and Adagrad, from its constructor) created normally, without
``capturable=True``, keep ``state["step"]`` in a 0-d CPU tensor ("special device hosting
for step" in ``torch/optim/adam.py``). Our branch-free ``GradScaler._maybe_opt_step``
(:func:`xla_backend.dynamo.grad_scaler.masked_maybe_opt_step`) undoes a skipped step by masking
every tensor the step changed with ``found_inf``; a counter on the host could only be
masked after reading ``found_inf`` there, one device-to-host transfer per step.

The same counters must be on the device from the moment Dynamo creates them while it
traces a step, or a graph captures a host counter that Dynamo then replaces
(:func:`counters_on_device_when_traced`, in force while our compiled functions run).

What :func:`device_step_counters` does, for each param group whose parameters are all on
a non-CPU device, while the masked step runs and around each ``_init_group`` Dynamo
runs (both only while one of our compiled functions runs):

* moves each CPU ``step`` tensor to its parameter's device, once (a host-to-device copy;
  it stays there afterwards). Dynamo's own ``OptimizerVariable.move_step_if_cpu`` does
  the same when it traces ``_init_group`` for state that already exists;
* sets ``group["capturable"] = True`` (when the group has that key and is neither fused
  nor differentiable) for the duration of the step, then restores the user's value.
  That is what torch's own optimizers need for device counters: state created in this
  step gets its counter on the device, and any eager part of the step does its bias
  correction as tensor math instead of ``step.item()``. Under ``torch.compile`` Dynamo
  already traces optimizer steps as capturable (``OptimizerVariable._set_capturable``),
  so the traced arithmetic is the same either way. Adagrad has no such flag; its traced
  step reads a device counter as a tensor.

State dicts: the first time it moves a counter or flips a group, the optimizer gets a
``state_dict`` post-hook that returns the ``step`` of every group that is not (by the
user's own choice) capturable as a CPU copy, and the groups carry the user's own
``capturable``. So ``opt.state_dict()`` looks as it would
without this backend and loads into an eager (non-capturable) optimizer on the CPU;
the copy is one small device-to-host read per counter when a checkpoint is taken.
Loading a state dict back puts the counters on the host again; the next masked step
moves them (and Dynamo recompiles the optimizer step once for the new device).

Eager steps outside our backend still work with counters on the device: a
non-capturable torch optimizer reads them with ``.item()``, as it would a CPU counter.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch._dynamo

log = logging.getLogger(__name__)

__all__ = ["counters_on_device_when_traced", "device_step_counters", "give_back_capturable",
           "restore_capturable"]

_hooked: weakref.WeakSet[torch.optim.Optimizer] = weakref.WeakSet()
#: per optimizer, the groups (by index) the user left ``capturable=False``, as seen when
#: Dynamo first traced it (:func:`give_back_capturable`)
_user_not_capturable: weakref.WeakKeyDictionary[torch.optim.Optimizer, set[int]] = (
    weakref.WeakKeyDictionary())


def _on_device(group: dict[str, Any]) -> bool:
    params = group["params"]
    return bool(params) and all(p.device.type != "cpu" for p in params)


def _move_counters(optimizer: torch.optim.Optimizer) -> dict[int, torch.Tensor]:
    """Moves the host ``step`` of every device group's parameters to that device.

    Returns the device copy by ``id`` of each host tensor it replaced in the state.
    """
    moved: dict[int, torch.Tensor] = {}
    for group in optimizer.param_groups:
        if not _on_device(group):
            continue
        for p in group["params"]:
            state = optimizer.state.get(p)
            step = state.get("step") if state else None
            if isinstance(step, torch.Tensor) and step.device != p.device:
                state["step"] = moved[id(step)] = step.to(p.device)
    if moved:
        log.debug("syncfree_xla: moved %d step counters of %s to the device", len(moved),
                  type(optimizer).__name__)
    return moved


def _hook_state_dict(optimizer: torch.optim.Optimizer) -> None:
    if optimizer not in _hooked:
        optimizer.register_state_dict_post_hook(_host_step_counters)
        _hooked.add(optimizer)


@torch._dynamo.disable  # plain eager bookkeeping; Dynamo must not make a frame of it
def device_step_counters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Moves host step counters to the device and marks device groups capturable.

    Returns the groups whose ``capturable`` was flipped; hand them to
    :func:`restore_capturable` when the step is done.
    """
    flipped: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        if (_on_device(group) and group.get("capturable") is False
                and not group.get("fused") and not group.get("differentiable")):
            group["capturable"] = True
            flipped.append(group)
    _move_counters(optimizer)
    if any(_on_device(group) for group in optimizer.param_groups):
        _hook_state_dict(optimizer)  # Dynamo may have moved counters before we were asked
    return flipped


@contextlib.contextmanager
def counters_on_device_when_traced() -> Iterator[None]:
    """Creates the step counters Dynamo initializes on the device, while in force.

    Why: Dynamo runs each group's ``_init_group`` for real while it traces
    ``optimizer.step``, and before each one ``OptimizerVariable.move_step_if_cpu``
    replaces *every* CPU ``step`` in the optimizer's state by a device copy. It sets
    ``capturable`` (which creates counters on the device) only for CUDA and XPU
    parameters, so on XLA the first group's new counter is a CPU tensor that the graph
    already reads and increments when the second group's ``_init_group`` swaps a device
    copy of it into the state. That copy stays at 0 forever; the graph keeps stepping
    the orphan, and once a changing lr makes Dynamo retrace, the new graph reads the
    stale copy: bias corrections one step behind, for every group but the last (torch
    2.9, ``torch/_dynamo/variables/optimizer.py``).

    So each device group is capturable for exactly the real ``_init_group`` call (from
    ``get_python_args``, which Dynamo calls just before it, until
    ``map_sources_and_install_guards``, just after): its new counters (and NAdam's
    ``mu_product``, ASGD's ``eta`` and ``mu``) are created on the device, as they are on
    CUDA, and the traced code is the capturable one either way. A counter created on
    the host all the same (Adafactor ignores ``capturable``) is moved there and then,
    in the state and in the lists ``_init_group`` filled, before the state is bound to
    graph sources. Guards and the user's ``param_groups`` see the user's own
    ``capturable``; ``state_dict`` shows the counters on the host
    (:func:`_host_step_counters`).
    """
    from torch._dynamo.variables.optimizer import OptimizerVariable

    stock_args = OptimizerVariable.__dict__["get_python_args"]
    stock_bind = OptimizerVariable.__dict__["map_sources_and_install_guards"]
    stock_capturable = OptimizerVariable.__dict__["_set_capturable"]
    # per optimizer being traced: the groups flipped, and the lists _init_group fills
    pending: dict[int, tuple[list[dict[str, Any]], list[Any]]] = {}

    def args_then_flip(self: Any, *args: Any, **kwargs: Any) -> Any:
        py_args, py_kwargs = stock_args(self, *args, **kwargs)
        restore_capturable(pending.pop(id(self.value), ([], []))[0])
        lists = [a for a in (*py_args, *py_kwargs.values()) if isinstance(a, list)]
        pending[id(self.value)] = device_step_counters(self.value), lists
        return py_args, py_kwargs

    def restore_then_bind(self: Any, tx: Any) -> Any:
        flipped, lists = pending.pop(id(self.value), ([], []))
        restore_capturable(flipped)
        moved = _move_counters(self.value)
        for filled in lists:
            filled[:] = [moved.get(id(t), t) for t in filled]
        return stock_bind(self, tx)

    def note_user_capturable(self: Any, tx: Any) -> Any:
        noted = _user_not_capturable.setdefault(self.value, set())
        noted.update(k for k, group in enumerate(self.value.param_groups)
                     if group.get("capturable") is False and _on_device(group))
        return stock_capturable(self, tx)

    OptimizerVariable.get_python_args = args_then_flip
    OptimizerVariable.map_sources_and_install_guards = restore_then_bind
    OptimizerVariable._set_capturable = note_user_capturable
    try:
        yield
    finally:
        OptimizerVariable.get_python_args = stock_args
        OptimizerVariable.map_sources_and_install_guards = stock_bind
        OptimizerVariable._set_capturable = stock_capturable
        for flipped, _ in pending.values():
            restore_capturable(flipped)


@torch._dynamo.disable
def restore_capturable(groups: list[dict[str, Any]]) -> None:
    """Gives back the ``capturable=False`` that :func:`device_step_counters` flipped."""
    for group in groups:
        group["capturable"] = False


def _host_step_counters(optimizer: torch.optim.Optimizer,
                        state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` post-hook: device ``step`` counters saved as the CPU tensors torch
    keeps for groups that are neither capturable nor fused (a user's own
    ``capturable=True`` group keeps its counters on the device, as torch saves them).

    ``state_dict["state"]`` is a fresh dict but its per-parameter dicts are the live
    optimizer's, so those are replaced, never changed in place.
    """
    packed = state_dict["state"]
    for group in state_dict["param_groups"]:
        if group.get("capturable") or group.get("fused"):
            continue
        for index in group["params"]:
            state = packed.get(index)
            step = state.get("step") if state else None
            if isinstance(step, torch.Tensor) and step.device.type != "cpu":
                packed[index] = {**state, "step": step.detach().cpu()}
    return state_dict


def give_back_capturable() -> None:
    """Sets ``capturable=False`` again where the user left it so, at the end of our call.

    Dynamo traces every group of an optimizer step as capturable
    (``OptimizerVariable._set_capturable`` marks its own view of each group). A frame
    that also writes into a group (``group["lr"] = lr`` before the forward) puts that
    view back into the real dict, ``capturable=True`` included: ``state_dict()`` then
    carried it, and an eager CPU optimizer refused to load it ("If capturable=True,
    params and state_steps must be on supported devices").
    """
    for optimizer, indices in list(_user_not_capturable.items()):
        groups = optimizer.param_groups
        for index in indices:
            if index < len(groups) and groups[index].get("capturable") is True:
                groups[index]["capturable"] = False
