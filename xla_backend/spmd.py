"""The SPMD facts the backend's stages need: is SPMD on, and how is a tensor sharded.

Lowering keeps a stand-in sharded as the input it stands for, the replay path keys
executables by their inputs' shardings, and the graph cache puts them in its key. The
API a training script uses to build meshes and shard models is ``xla_backend.sharding``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch_xla.runtime as xr

from . import xla_internals

_REPLICATED = "{replicated}"


def spmd_active() -> bool:
    """Whether torch_xla runs in SPMD mode (one program over a mesh of devices)."""
    return bool(xr.is_spmd())


def _is_xla(t: Any) -> bool:
    return (isinstance(t, torch.Tensor) and t.device.type == "xla"
            and not isinstance(t, torch._subclasses.FakeTensor))


def spec_of(t: Any) -> str:
    """The tensor's SPMD sharding as torch_xla prints it ("" for none or non-XLA values).

    The text names the device assignment too ("{devices=[4,1]0,1,2,3}"), so a mesh
    with other devices or another order reads differently.
    """
    if not _is_xla(t):
        return ""
    spec = xla_internals.sharding_spec(t)
    # Under SPMD an unannotated tensor is replicated already; results come back marked
    # as such. One spelling for both keeps them one executable and one cache entry.
    return "" if spec == _REPLICATED else spec


def copy_sharding(source: Any, target: Any) -> None:
    """Gives ``target`` the sharding of ``source``, if ``source`` has one.

    A device buffer is laid out anew (a stand-in still holds its host copy, so no
    device-to-host transfer); a pending value gets a sharding annotation in its IR.
    """
    if not (_is_xla(source) and _is_xla(target)) or not spec_of(source):
        return
    op_sharding = xla_internals.op_sharding(source)
    if op_sharding is not None and spec_of(target) != spec_of(source):
        xla_internals.mark_sharding(target, op_sharding)


def signature(inputs: Sequence[Any], pinned: dict[int, int] | None = None) -> dict[str, Any]:
    """The cache-key view of sharding: SPMD on/off, each input's sharding, pinned outputs."""
    if not spmd_active():
        return {"spmd": False}
    return {"spmd": True, "inputs": [spec_of(x) for x in inputs],
            "pinned": sorted((pinned or {}).items())}


__all__ = ["copy_sharding", "signature", "spec_of", "spmd_active"]
