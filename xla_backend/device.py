"""Picks torch_xla's device quietly: the CPU PJRT client unless a TPU is present."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys

log = logging.getLogger(__name__)

#: XLA:CPU's fast min/max drops NaN in max/min reductions, ``maximum`` and ``clamp``;
#: eager PyTorch propagates it. Turned off unless the user's XLA_FLAGS say otherwise
#: (see ``xla_backend.rewrites.nan_semantics`` for what the flag leaves to fix).
CPU_NAN_FLAG = "--xla_cpu_enable_fast_min_max=false"

#: XLA:CPU puts all of an execution's temporaries in one allocation, which glibc maps
#: afresh and unmaps every step when it is large (a joined step's activations and
#: gradients). Heaps of at most 16 MiB stay under glibc's mmap threshold and are reused;
#: ``runtime.host_memory`` says why and what it cost.
CPU_HEAP_FLAG = "--xla_multiheap_size_constraint_per_heap=16777216"

#: XLA:CPU's copy insertion orders a computation's reads and writes by data dependence
#: alone unless told to analyse it region by region: an update made in place whose old
#: value another op still reads is then copied first. The region analysis proves more
#: of those reads come first. A joined step of the memory bench's MLP: 56 to 34 copies
#: of a 16 MB buffer and 3-7% of its step time; the bench's transformer LM and bert
#: 2-4% (``benchmarks``, README).
CPU_COPY_FLAG = "--xla_cpu_copy_insertion_use_region_analysis=true"

#: The flags added to XLA_FLAGS on the CPU client, each unless the user set it.
CPU_FLAGS = (CPU_NAN_FLAG, CPU_HEAP_FLAG, CPU_COPY_FLAG)

#: torch_xla's switch for "special scalars": with it unset, a 0-d tensor holding 0 or
#: +-1 is an IR literal, not a buffer. A flag or mask tensor that is 0 on most steps and
#: inf on some (a poisoned gradient, a GradScaler test) then needs an extra execution
#: on the 0 steps and recompiles the first time it is not 0. The backend turns them off
#: for the process once it lowers a graph (``lower.trace``) unless the user set this
#: variable, and never at ``import torch``: torch_xla's own Dynamo backend (``openxla``)
#: fails with them off (an IndexError in its output deduplication).
NO_SPECIAL_SCALARS = "XLA_NO_SPECIAL_SCALARS"


def autoload() -> None:
    """torch's device-backend hook (entry point group ``torch.backends``), run by ``import torch``.

    The usual script imports torch, then torch_xla, asks for the device, and only then
    compiles: by the time this backend is imported torch_xla's runtime has started, too
    late for ``PJRT_DEVICE`` (torch_xla warns and guesses) and for ``XLA_FLAGS`` (the NaN
    flag is lost). Run by ``import torch``, the same defaults as :func:`configure_pjrt`
    are in place before torch_xla starts, without importing it. It never raises (a
    failure here would fail ``import torch``); ``TORCH_DEVICE_BACKEND_AUTOLOAD=0`` turns
    it off.
    """
    try:
        _environment_defaults()
    except Exception as e:  # noqa: BLE001 - must not break import torch
        log.debug("syncfree_xla: device defaults not set at torch import: %s", e)


def _environment_defaults() -> list[str]:
    """PJRT_DEVICE and, on CPU, :data:`CPU_FLAGS`; the flags this call added."""
    if "PJRT_DEVICE" not in os.environ and importlib.util.find_spec("libtpu") is None:
        os.environ["PJRT_DEVICE"] = "CPU"
    if os.environ.get("PJRT_DEVICE") != "CPU":
        return []
    return [flag for flag in CPU_FLAGS if _add_xla_flag(flag)]


def cpu_client() -> bool:
    """Whether torch_xla runs on its CPU PJRT client (rewrites that pay only there)."""
    return os.environ.get("PJRT_DEVICE", "").upper() == "CPU"


def configure_pjrt() -> None:
    """Chooses CPU when nothing else is configured, before torch_xla is imported.

    torch_xla warns and guesses when PJRT_DEVICE is unset; users of this backend
    should not have to set it on a CPU machine, while a TPU host (libtpu installed)
    keeps torch_xla's own choice. On CPU, XLA_FLAGS gains each of :data:`CPU_FLAGS`
    unless it already sets that flag either way.
    """
    added = _environment_defaults()
    if added and _runtime_started():
        log.warning(
            "syncfree_xla: torch_xla's runtime started before this backend was imported, "
            "so XLA_FLAGS %s cannot take effect%s. Import xla_backend before using the "
            "XLA device, or set these flags in XLA_FLAGS yourself.", " ".join(added),
            ": XLA:CPU max/min may drop NaN" if CPU_NAN_FLAG in added else "")


def _runtime_started() -> bool:
    if "torch_xla" not in sys.modules:
        return False
    from . import xla_internals

    return xla_internals.runtime_is_initialized()


def _add_xla_flag(flag: str) -> bool:
    """Adds ``flag`` to XLA_FLAGS unless they name it already; whether it was added."""
    name = flag.split("=", 1)[0]
    flags = os.environ.get("XLA_FLAGS", "")
    if name in flags:  # the user chose; theirs wins
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    log.debug("XLA_FLAGS += %s", flag)
    return True
