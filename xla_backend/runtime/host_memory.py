"""Host memory on the CPU client, where XLA's device buffers are glibc allocations.

glibc's defaults cost a training process on XLA:CPU twice, in opposite directions:

* After a compile, what tracing and XLA's compiler freed stays in glibc's arenas, and
  the process stays at the first step's high-water mark. :func:`release` gives it back.
* In steady steps, each execution allocates its temporaries (activations kept for the
  backward, gradients) and frees them as it ends. glibc unmaps a large free block, and
  deletes a worker thread's heap once it is empty, so every step faulted its
  temporaries in again: on the bench's transformer LM, joined, 25,000 minor page faults
  and ~40 ms of system time a step. :func:`keep_step_heaps` keeps them mapped: XLA
  splits the temporaries into heaps of at most 16 MiB (``device.CPU_HEAP_FLAG``),
  allocations up to 32 MiB come from the arenas, and each arena keeps up to 64 MiB free
  at its top instead of 128 KiB. :func:`release` still trims everything after a
  compile.
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

_M_TOP_PAD = -2  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
#: glibc's own bounds: the largest mmap threshold it accepts on 64-bit, and the size of a
#: worker thread's heap, so that a heap emptied at the end of a step is not deleted.
MMAP_THRESHOLD = 32 << 20
TOP_PAD = 64 << 20
#: A user who tunes glibc's malloc in the environment keeps their settings.
_USER_SETTINGS = ("MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                  "MALLOC_MMAP_MAX_")

_kept = False  # its one caller is the backend's import, which Python runs once at a time


def _libc_function(name: str) -> Callable[..., int] | None:
    try:
        return getattr(ctypes.CDLL(None), name)  # glibc; absent elsewhere
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _libc_function("malloc_trim")
_MALLOPT = _libc_function("mallopt")


def release() -> None:
    """Gives memory freed inside the process back to the OS, after a compile.

    A first step allocates gigabytes it frees again (a 50M-parameter MLP with AdamW,
    steps joined: +2.7 GB resident after the first step where eager grows by 0.66 GB,
    +0.36 GB after trimming). Compiles happen in warm-up, so steady steps never pay for it.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def keep_step_heaps() -> bool:
    """Sets glibc to keep a step's temporaries mapped from one step to the next, once per
    process; whether this call set it. Left alone where malloc is not glibc's or the
    environment tunes it (``MALLOC_*_`` variables, ``GLIBC_TUNABLES`` naming malloc)."""
    global _kept
    if _kept or _MALLOPT is None or _user_tuned():
        return False
    _kept = True
    ok = _MALLOPT(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and _MALLOPT(_M_TOP_PAD, TOP_PAD)
    log.debug("glibc malloc: mmap threshold %d, top pad %d: %s", MMAP_THRESHOLD, TOP_PAD,
              "set" if ok else "refused")
    return bool(ok)


def _user_tuned() -> bool:
    return (any(name in os.environ for name in _USER_SETTINGS)
            or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""))


__all__ = ["MMAP_THRESHOLD", "TOP_PAD", "keep_step_heaps", "release"]
