"""Picks torch_xla's device quietly: the CPU PJRT client unless a TPU is present."""

from __future__ import annotations

import importlib.util
import logging
import os

log = logging.getLogger(__name__)

#: XLA:CPU's fast min/max drops NaN in max/min reductions, ``maximum`` and ``clamp``;
#: eager PyTorch propagates it. Turned off unless the user's XLA_FLAGS say otherwise
#: (see ``xla_backend.rewrites.nan_semantics`` for what the flag leaves to fix).
CPU_NAN_FLAG = "--xla_cpu_enable_fast_min_max=false"


def configure_pjrt() -> None:
    """Chooses CPU when nothing else is configured, before torch_xla is imported.

    torch_xla warns and guesses when PJRT_DEVICE is unset; users of this backend
    should not have to set it on a CPU machine, while a TPU host (libtpu installed)
    keeps torch_xla's own choice. On CPU, XLA_FLAGS gains :data:`CPU_NAN_FLAG` unless
    it already sets that flag either way.
    """
    if "PJRT_DEVICE" not in os.environ and importlib.util.find_spec("libtpu") is None:
        os.environ["PJRT_DEVICE"] = "CPU"
    if os.environ.get("PJRT_DEVICE") == "CPU":
        _add_xla_flag(CPU_NAN_FLAG)


def _add_xla_flag(flag: str) -> None:
    name = flag.split("=", 1)[0]
    flags = os.environ.get("XLA_FLAGS", "")
    if name in flags:  # the user chose; theirs wins
        return
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()
    log.debug("XLA_FLAGS += %s", flag)
