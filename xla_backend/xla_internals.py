"""Every private torch_xla binding the backend uses, in one place.

torch_xla 2.9 is the last release and its ``_XLAC`` bindings are not a public API:
keeping each one behind a named function here means a change in torch_xla is fixed in
one module, and the rest of the backend reads as what it does ("the tensor's device
buffer", "compile these results") instead of binding names. Process-wide toggles are
context managers that save, set and give back the setting, never a bare setter.

Importing this module imports torch_xla: the base modules that must not (``device``,
``xla_metrics``) import it only once torch_xla is loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Sequence

import torch
import torch_xla

_XLAC = torch_xla._XLAC


# --------------------------------------------------------------------------- runtime


def runtime_is_initialized() -> bool:
    """Whether the PJRT client exists (XLA_FLAGS set after this have no effect)."""
    return bool(_XLAC._xla_runtime_is_initialized())


def wait_device_ops() -> None:
    """Blocks until every queued execution on every device has finished."""
    _XLAC._xla_wait_device_ops([])


def counters() -> dict[str, int]:
    """torch_xla's counters, by name (``aten::<op>`` counts CPU fallbacks)."""
    return {name: int(_XLAC._xla_counter_value(name)) for name in _XLAC._xla_counter_names()}


# --------------------------------------------------------------------------- tensors


def tensor_id(t: torch.Tensor) -> int:
    """The lazy tensor's unique id, stable while the tensor lives."""
    return _XLAC._xla_get_tensor_id(t)


def needs_materialization(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Per tensor, whether it is pending IR rather than a device buffer."""
    return list(_XLAC._check_tensor_need_materialization(list(tensors)))


def device_data(tensors: Sequence[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
    """The device buffers ``tensors`` read: their ids and the buffers, as tensors."""
    ids, values = _XLAC._get_tensors_xla_device_data_node(list(tensors))
    return list(ids), list(values)


def to_host(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies of device tensors in one transfer, where ``.cpu()`` on each is one
    transfer per tensor (a graph's constants: a transfer each, ~0.08 ms apiece)."""
    return list(_XLAC._xla_get_cpu_tensors(list(tensors)))


def buffer_handles(tensors: Sequence[torch.Tensor]) -> list[int]:
    """Each tensor's device buffer, as a number: equal for tensors on one buffer."""
    return list(_XLAC._get_tensors_handle(list(tensors)))


def buffer_alias(t: torch.Tensor) -> torch.Tensor:
    """A new tensor on ``t``'s device buffer, which ``t`` must hold (not pending IR).

    torch_xla names a buffer's computation parameter, and lets a sync donate the
    buffer, after the last tensor that made an IR node of it.
    """
    (alias,) = _XLAC._get_tensors_xla_device_data_node([t])[1]
    return alias


def buffer_address(t: torch.Tensor) -> int:
    """Where ``t``'s device buffer lies in memory: unchanged by an update made in place."""
    return int(_XLAC._unsafe_buffer_pointer(t))


def upload(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host tensors copied to ``device`` as plain buffers (never special scalars)."""
    return list(_XLAC._xla_tensors_from_aten(list(tensors), [str(device)] * len(tensors)))


def rebind(t: torch.Tensor, value: torch.Tensor) -> None:
    """Makes ``t`` hold ``value``'s buffer, without a copy."""
    _XLAC._replace_xla_tensor(t, value)


def sync_live_tensors(device: torch.device) -> None:
    """Materializes every pending tensor on ``device``: one asynchronous execution."""
    _XLAC._xla_sync_live_tensors(str(device), [], False)


# --------------------------------------------------------------------------- computations


def hlo_proto(tensors: Sequence[torch.Tensor]) -> bytes:
    """The HLO module proto that computes ``tensors`` from their device buffers."""
    return _XLAC._get_xla_tensors_hlo_proto(list(tensors))


def graph_hash(tensors: Sequence[torch.Tensor]) -> Any:
    """torch_xla's key for the computation of ``tensors`` in its executable cache."""
    return _XLAC._get_graph_hash(list(tensors))


def computation_from_hlo(name: str, hlo: bytes) -> Any:
    """The HLO module proto ``hlo`` as a computation torch_xla can apply to tensors."""
    return _XLAC._xla_op_computation_from_module_proto(name, hlo)


def apply_computation(name: str, computation: Any,
                      operands: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``computation`` applied to ``operands`` as one lazy-IR node named ``name``."""
    return list(_XLAC._xla_user_computation("xla::" + name, list(operands), computation))


def user_computation(name: str, hlo: bytes,
                     operands: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``hlo`` applied to ``operands`` as one lazy-IR node named ``name``."""
    return apply_computation(name, computation_from_hlo(name, hlo), operands)


def compile(tensors: Sequence[torch.Tensor]) -> None:
    """Compiles the computation of ``tensors`` into torch_xla's cache, running nothing."""
    _XLAC._xla_warm_up_cache(list(tensors), [])


class ComputationEvicted(RuntimeError):
    """torch_xla's computation cache (``XLA_COMPILATION_CACHE_SIZE`` entries, least
    recently used out first) no longer holds a computation compiled earlier."""


_EVICTED = "Failed to get computation by hash"  # torch_xla 2.9's message for it


def run_cached(graph_hash_: Any, buffers: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Runs the cached executable ``graph_hash_`` on ``buffers``; results are lazy.
    Raises :class:`ComputationEvicted`, before anything runs, when it was evicted."""
    try:
        return _XLAC._run_cached_graph(graph_hash_, list(buffers))
    except RuntimeError as exc:
        if _EVICTED in str(exc):
            raise ComputationEvicted(str(exc).splitlines()[0]) from None
        raise


_READS = "syncfree_reads"  # the name of :func:`reader`'s computations and their nodes


def reader(tensors: Sequence[torch.Tensor], keep_first: bool) -> Any:
    """A computation that reads each of ``tensors`` and computes nothing from them.

    Its result is the first tensor's value with ``keep_first``, else a 0-d ``False``.
    A sync's walk of the IR meets a node's operands last to first and numbers the
    computation's parameters in that order: applied as a node (:func:`read`), this is
    how a caller sets the order.
    """
    import torch_xla.core.xla_builder as xb  # only here: it is not needed otherwise

    def root(*params: Any) -> Any:
        if keep_first:
            return params[0]
        return xb.Op.scalar(params[0].builder(), False, dtype=xb.Type.PRED)

    shapes = xb.tensor_shape(list(tensors), str(tensors[0].device))
    return xb.create_computation(_READS, root, shapes)


def read(computation: Any, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """A :func:`reader` computation applied to ``tensors`` as one lazy-IR node."""
    (result,) = apply_computation(_READS, computation, tensors)
    return result


# --------------------------------------------------------------------------- settings


def device_data_cache_enabled() -> bool:
    """Whether torch_xla shares one device buffer per scalar value."""
    return bool(_XLAC._get_xla_enable_device_data_cache())


def set_device_data_cache(enabled: bool) -> bool:
    """Turns torch_xla's cache of one shared device buffer per scalar value on or off
    for the process; returns whether it was on."""
    was = device_data_cache_enabled()
    _XLAC._set_xla_enable_device_data_cache(enabled)
    return was


@contextlib.contextmanager
def device_data_cache(enabled: bool) -> Iterator[None]:
    """torch_xla's cache of one shared device buffer per scalar value, on or off."""
    was = set_device_data_cache(enabled)
    try:
        yield
    finally:
        set_device_data_cache(was)


@contextlib.contextmanager
def special_scalars(enabled: bool) -> Iterator[None]:
    """Whether a 0-d 0 or 1 becomes an IR literal (a "special scalar") or a buffer."""
    was = _XLAC._get_xla_handle_special_scalars()
    _XLAC._set_xla_handle_special_scalars(enabled)
    try:
        yield
    finally:
        _XLAC._set_xla_handle_special_scalars(was)


def set_special_scalars(enabled: bool) -> None:
    """Sets that for the process: torch_xla reads its variable once, at import."""
    _XLAC._set_xla_handle_special_scalars(enabled)


# --------------------------------------------------------------------------- SPMD


def sharding_spec(t: torch.Tensor) -> str:
    """The tensor's sharding as torch_xla prints it; empty when it has none."""
    return _XLAC._get_xla_sharding_spec(t)


def op_sharding(t: torch.Tensor) -> Any:
    """The tensor's sharding as an ``OpSharding``, or None."""
    return _XLAC._get_xla_op_sharding(t)


def mark_sharding(t: torch.Tensor, sharding: Any) -> None:
    _XLAC._xla_mark_sharding(t, sharding)


def clear_sharding(t: torch.Tensor) -> None:
    _XLAC._xla_clear_sharding(t)


def spmd_config_locked() -> bool:
    """Whether the runtime has started in a mode (SPMD or not) that can no longer change."""
    return bool(_XLAC._xla_get_spmd_config_is_locked())


__all__ = [
    "ComputationEvicted",
    "apply_computation",
    "clear_sharding",
    "compile",
    "computation_from_hlo",
    "counters",
    "device_data",
    "device_data_cache",
    "device_data_cache_enabled",
    "set_device_data_cache",
    "graph_hash",
    "hlo_proto",
    "mark_sharding",
    "needs_materialization",
    "op_sharding",
    "read",
    "reader",
    "rebind",
    "run_cached",
    "runtime_is_initialized",
    "set_special_scalars",
    "sharding_spec",
    "special_scalars",
    "spmd_config_locked",
    "sync_live_tensors",
    "tensor_id",
    "upload",
    "user_computation",
    "wait_device_ops",
]
