"""Picks torch_xla's device quietly: the CPU PJRT client unless a TPU is present."""

from __future__ import annotations

import importlib.util
import os


def configure_pjrt() -> None:
    """Chooses CPU when nothing else is configured, before torch_xla is imported.

    torch_xla warns and guesses when PJRT_DEVICE is unset; users of this backend
    should not have to set it on a CPU machine, while a TPU host (libtpu installed)
    keeps torch_xla's own choice.
    """
    if "PJRT_DEVICE" in os.environ:
        return
    if importlib.util.find_spec("libtpu") is None:
        os.environ["PJRT_DEVICE"] = "CPU"
