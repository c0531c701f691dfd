"""Data-parallel and FSDP-style training over torch_xla's SPMD runtime.

SPMD runs one program over every device of a mesh: the batch is split along a data
axis, and with ``fsdp=True`` each parameter (and its optimizer state) is split along
the same axis too, so each device holds 1/n of the weights. XLA's SPMD partitioner
inserts the collectives (gradient all-reduce, parameter all-gather); the compiled
step stays one executable per graph, replayed with no host sync.

Typical use (the whole mesh, before any XLA tensor exists)::

    from xla_backend import sharding
    mesh = sharding.data_parallel_mesh()            # enables SPMD, all devices
    model = MyModel().to(torch_xla.device())
    sharding.shard_model(model, mesh, fsdp=True)
    x = sharding.shard_batch(x_cpu, mesh)           # each step

    train_step(model, opt, x, y)                    # first step creates the state
    sharding.shard_optimizer_state(opt, mesh)       # FSDP: state split like its param

What the backend's stages need to keep shardings on stand-ins, in the executable
signature and in the cache key lives in ``xla_backend.spmd``; ``spec_of`` and
``spmd_active`` are re-exported here for scripts that inspect a layout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch_xla
import torch_xla.runtime as xr

from . import xla_internals
from .spmd import spec_of, spmd_active

if TYPE_CHECKING:
    import torch_xla.distributed.spmd as xs

log = logging.getLogger(__name__)

DATA_AXIS = "data"


class ShardingError(ValueError):
    """A mesh, batch or model that cannot be sharded as asked; the message says why."""


# ---------------------------------------------------------------------------
# What a training script uses


def enable_spmd(num_devices: int | None = None) -> int:
    """Turns SPMD on before torch_xla's runtime starts; returns the device count.

    ``num_devices`` sets ``CPU_NUM_DEVICES`` for the CPU PJRT client (ignored on TPU,
    where the hardware decides). Raises ``ShardingError`` when tensors already live on
    a single-device runtime: SPMD would have to copy them onto the mesh behind the
    back of graphs compiled for one device, so it must be the first thing a script does.
    """
    if num_devices is not None:
        _check_count(num_devices)
        if not spmd_active() and not xla_internals.spmd_config_locked():
            os.environ.setdefault("CPU_NUM_DEVICES", str(num_devices))
    if not spmd_active():
        if xla_internals.spmd_config_locked():
            raise ShardingError(
                "syncfree_xla: SPMD was requested after torch_xla's runtime had already "
                "placed tensors on a single device; call sharding.enable_spmd() (or "
                "torch_xla.runtime.use_spmd()) at the start of the script, before any "
                "tensor is moved to the XLA device or anything is compiled")
        xr.use_spmd()
        log.info("SPMD enabled over %d devices", xr.global_runtime_device_count())
    count = int(xr.global_runtime_device_count())
    if num_devices is not None and num_devices != count:
        raise ShardingError(
            f"syncfree_xla: asked for {num_devices} devices but the runtime has {count}; "
            f"set CPU_NUM_DEVICES={num_devices} (CPU) before torch_xla starts, or ask for "
            f"{count}")
    return count


def _check_count(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ShardingError(f"syncfree_xla: a device count must be a positive int, got {n!r}")


def data_parallel_mesh(num_devices: int | None = None, axis: str = DATA_AXIS) -> xs.Mesh:
    """A 1-D mesh named ``axis`` over all devices (SPMD is enabled if it is not yet).

    ``num_devices`` must equal the runtime's device count: an SPMD program always runs
    on every device, so a smaller mesh would leave devices holding nothing useful.
    """
    import numpy as np
    import torch_xla.distributed.spmd as xs

    count = enable_spmd(num_devices)
    return xs.Mesh(np.arange(count), (count,), (axis,))


def _axis_size(mesh: xs.Mesh, axis: str) -> int:
    if axis not in mesh.axis_names:
        raise ShardingError(f"syncfree_xla: mesh has axes {list(mesh.axis_names)}, "
                            f"not {axis!r}")
    return int(mesh.mesh_shape[mesh.axis_names.index(axis)])


def _require_xla(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.device.type != "xla":
        where = t.device.type if isinstance(t, torch.Tensor) else type(t).__name__
        raise ShardingError(f"syncfree_xla: {what} is on {where}, not the XLA device; move "
                            f"it with .to(torch_xla.device()) before sharding it")


def shard_batch(t: torch.Tensor, mesh: xs.Mesh, axis: str = DATA_AXIS) -> torch.Tensor:
    """``t`` on the XLA device, its first dimension split over ``axis``.

    Pass the CPU tensor (or one just moved with ``.to``): under SPMD the host copy is
    then sent straight to the devices, each getting its slice, with no device-to-host
    round trip. The first dimension must divide evenly, or ``ShardingError`` says so.
    """
    import torch_xla.distributed.spmd as xs

    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        raise ShardingError(f"syncfree_xla: shard_batch needs a tensor with a batch "
                            f"dimension, got {t!r:.80}")
    n = _axis_size(mesh, axis)
    if t.shape[0] % n:
        raise ShardingError(
            f"syncfree_xla: batch dimension {t.shape[0]} does not divide evenly over the "
            f"{n} devices of mesh axis {axis!r}; use a global batch that is a multiple of {n}")
    if t.device.type != "xla":
        t = t.to(torch_xla.device())
    xs.mark_sharding(t, mesh, (axis,) + (None,) * (t.dim() - 1))
    return t


def fsdp_partition(shape: Sequence[int], n: int) -> tuple[int, ...] | None:
    """Which dimension of a tensor of ``shape`` FSDP splits over n devices, as a spec.

    The first dimension that divides evenly (dim 0 of a Linear weight is its output
    features); None (replicated) for scalars and tensors with no such dimension.
    """
    for d, size in enumerate(shape):
        if size >= n and size % n == 0:
            return tuple(0 if k == d else None for k in range(len(shape)))
    return None


def _shard_like_fsdp(t: torch.Tensor, mesh: xs.Mesh, axis: str) -> str:
    import torch_xla.distributed.spmd as xs

    n = _axis_size(mesh, axis)
    spec = fsdp_partition(tuple(t.shape), n)
    if spec is None:
        return ""
    partition = tuple(axis if s == 0 else None for s in spec)
    current = spec_of(t)
    if current and "replicated" not in current:
        xla_internals.clear_sharding(t)  # relaid out below; the data moves once
    xs.mark_sharding(t, mesh, partition)
    return spec_of(t)


def shard_model(model: torch.nn.Module, mesh: xs.Mesh, fsdp: bool = False,
                axis: str = DATA_AXIS) -> dict[str, str]:
    """Applies the data-parallel layout to ``model`` (already on the XLA device).

    ``fsdp=False``: parameters and buffers stay replicated on every device (plain data
    parallel; nothing to do beyond checking). ``fsdp=True``: each parameter is split
    along its first dimension that divides evenly over ``axis`` (``fsdp_partition``);
    others stay replicated. Returns each parameter's sharding, for logs and tests.
    """
    _axis_size(mesh, axis)
    layout: dict[str, str] = {}
    for name, p in model.named_parameters():
        _require_xla(p, f"parameter {name}")
        layout[name] = _shard_like_fsdp(p.data, mesh, axis) if fsdp else spec_of(p)
    for name, b in model.named_buffers():
        _require_xla(b, f"buffer {name}")
    log.debug("model layout over mesh %s: %s", mesh.mesh_shape, layout)
    return layout


def shard_optimizer_state(opt: torch.optim.Optimizer, mesh: xs.Mesh,
                          axis: str = DATA_AXIS) -> int:
    """Splits each optimizer state tensor shaped like its parameter as the parameter is.

    PyTorch optimizers create their state lazily in the first ``step``, so call this
    after the first training step. Scalars (Adam's ``step``) stay replicated. The
    resharded inputs select a new executable once (one compile, in warm-up). Returns
    how many tensors were laid out anew.
    """
    _axis_size(mesh, axis)
    if opt.state:
        # torch_xla cannot lay out a buffer whose execution is still running (a step
        # that was just enqueued): "Data does not present on any device".
        xla_internals.wait_device_ops()
    moved = 0
    for group in opt.param_groups:
        for p in group["params"]:
            wanted = spec_of(p)
            for value in opt.state.get(p, {}).values():
                if (not isinstance(value, torch.Tensor) or value.shape != p.shape
                        or spec_of(value) == wanted):
                    continue
                _require_xla(value, "optimizer state")
                if spec_of(value):
                    xla_internals.clear_sharding(value)
                if wanted:
                    xla_internals.mark_sharding(value, xla_internals.op_sharding(p))
                moved += 1
    return moved


__all__ = [
    "DATA_AXIS",
    "ShardingError",
    "data_parallel_mesh",
    "enable_spmd",
    "fsdp_partition",
    "shard_batch",
    "shard_model",
    "shard_optimizer_state",
    "spec_of",
    "spmd_active",
]
