"""Reads torch_xla's own metrics: the ground truth for syncs, compiles and executions.

torch_xla counts every device-to-host transfer, compilation and execution no matter
who caused it, so tests and benchmarks read them here instead of trusting our own
bookkeeping.
"""

from __future__ import annotations

import sys


def _metric_count(name: str) -> int:
    if "torch_xla" not in sys.modules:
        return 0
    import torch_xla.debug.metrics as met

    data = met.metric_data(name)
    return int(data[0]) if data else 0


def device_to_host_transfers() -> int:
    return _metric_count("TransferFromDeviceTime")


def host_to_device_transfers() -> int:
    return _metric_count("TransferToDeviceTime")


def compiles() -> int:
    return _metric_count("CompileTime")


def executions() -> int:
    """Single-device executions plus SPMD ones (one replicated run over the whole mesh)."""
    return _metric_count("ExecuteTime") + _metric_count("ExecuteReplicatedTime")


def compile_seconds() -> float:
    if "torch_xla" not in sys.modules:
        return 0.0
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return float(data[1]) / 1e9 if data else 0.0


def clear() -> None:
    if "torch_xla" not in sys.modules:
        return
    import torch_xla.debug.metrics as met

    met.clear_metrics()
    met.clear_counters()
