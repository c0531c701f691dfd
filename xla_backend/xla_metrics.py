"""Reads torch_xla's own metrics: the ground truth for syncs, compiles and executions.

torch_xla counts every device-to-host transfer, compilation and execution no matter
who caused it, so tests and benchmarks read them here instead of trusting our own
bookkeeping.
"""

from __future__ import annotations

import sys


def _metric(name: str, field: int) -> int:
    """A torch_xla metric's field: 0, how many values it recorded; 1, their sum."""
    if "torch_xla" not in sys.modules:
        return 0
    import torch_xla.debug.metrics as met

    data = met.metric_data(name)
    return int(data[field]) if data else 0


def _counter(name: str) -> int:
    """A torch_xla counter's value: unlike a metric, which copies up to 1024 samples
    into Python on each read, it costs nothing to read once a step."""
    if "torch_xla" not in sys.modules:
        return 0
    import torch_xla.debug.metrics as met

    return int(met.counter_value(name) or 0)


def _metric_count(name: str) -> int:
    return _metric(name, 0)


def _metric_total(name: str) -> int:
    return _metric(name, 1)


def device_to_host_transfers() -> int:
    return _metric_count("TransferFromDeviceTime")


def host_to_device_transfers() -> int:
    return _metric_count("TransferToDeviceTime")


def host_to_device_bytes() -> int:
    """Bytes copied to the device so far (torch_xla names the metric ``OutboundData``)."""
    return _metric_total("OutboundData")


def compiles() -> int:
    return _metric_count("CompileTime")


def graph_syncs() -> int:
    """Syncs that ran lazy IR: each looks its graph up in torch_xla's computation cache
    as it is scheduled, on the calling thread (``CachedCompile`` or ``UncachedCompile``),
    while ``ExecuteTime`` is only recorded once an execution ends."""
    return _counter("CachedCompile") + _counter("UncachedCompile")


def uncached_graph_syncs() -> int:
    """The syncs of :func:`graph_syncs` that found no compiled graph and compiled one."""
    return _counter("UncachedCompile")


def executions() -> int:
    """Single-device executions plus SPMD ones (one replicated run over the whole mesh)."""
    return _metric_count("ExecuteTime") + _metric_count("ExecuteReplicatedTime")


def buffers_donated() -> int:
    """Input buffers that compiled computations may update in place, summed over the
    compiles so far (torch_xla's ``InputOutputAliasCount``): a sync that donates the
    buffers it replaces counts them when it compiles."""
    return _metric_total("InputOutputAliasCount")


def execute_time_ns() -> int:
    """Device time of every single-device execution so far, in nanoseconds."""
    return _metric_total("ExecuteTime")


def fallback_counts() -> dict[str, int]:
    """How often each op ran through torch_xla's CPU fallback (its ``aten::<op>`` counters).

    An op with no XLA lowering makes torch_xla copy its inputs to the host, run it
    there and copy the result back; inside a trace that result becomes a constant.
    """
    if "torch_xla" not in sys.modules:
        return {}
    from . import xla_internals

    return {name: count for name, count in xla_internals.counters().items()
            if name.startswith("aten::")}


def fell_back_since(before: dict[str, int]) -> list[str]:
    """The ops whose fallback counter grew since ``before`` (a ``fallback_counts()``)."""
    return sorted(name for name, count in fallback_counts().items()
                  if count > before.get(name, 0))


def clear() -> None:
    if "torch_xla" not in sys.modules:
        return
    import torch_xla.debug.metrics as met

    met.clear_metrics()
    met.clear_counters()
