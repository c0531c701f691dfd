"""Process-wide counters that every stage of the backend reports into.

Counter names are defined here once; other modules import the constants so a
typo becomes an ImportError instead of a silently separate counter.
"""

from __future__ import annotations

import threading

GRAPHS_RECEIVED = "graphs_received"
GRAPHS_LOWERED = "graphs_lowered"
EXECUTIONS = "executions"
EAGER_FALLBACKS = "eager_fallbacks"
# Ops torch_xla cannot lower: graphs cut around them at compile time, and each run of
# such an op outside a compiled computation (one per op node per call).
GRAPHS_PARTITIONED = "graphs_partitioned"
OP_FALLBACK_EXECUTIONS = "op_fallback_executions"
INPUT_MATERIALIZATIONS = "input_materializations"
# With join_graphs: steps run as one computation, and the graph calls they joined.
STEPS_JOINED = "steps_joined"
GRAPHS_JOINED = "graphs_joined"
# joined steps that a host read or a host op ran in more than one execution
STEPS_CUT = "steps_cut"
# Masked GradScaler steps undone from a lazy snapshot of the optimizer's tensors: its
# first masked step after the stock one failed the check, or its steps change them
# other than through compiled input updates (``dynamo.grad_scaler``). 0 per step otherwise.
GRAD_SCALER_SNAPSHOTS = "grad_scaler_snapshots"
HOST_TRANSFERS_TO_DEVICE = "host_to_device_transfers"
DEVICE_TO_HOST_TRANSFERS = "device_to_host_transfers"
COMPILE_SECONDS = "compile_seconds"
COMPILE_WAIT_SECONDS = "compile_wait_seconds"
COMPILES_SHARED = "compiles_shared"
DISPATCH_WAIT_SECONDS = "dispatch_wait_seconds"
QUEUE_DEPTH_MAX = "queue_depth_max"
CACHE_MEMORY_HITS = "cache_memory_hits"
CACHE_MEMORY_MISSES = "cache_memory_misses"
CACHE_DISK_HITS = "cache_disk_hits"
CACHE_DISK_MISSES = "cache_disk_misses"
CACHE_DISK_WRITES = "cache_disk_writes"
CACHE_EVICTIONS = "cache_evictions"
CACHE_BAD_ENTRIES = "cache_bad_entries"
# Per graph, whatever tier answered: a hit skips tracing and HLO lowering (the XLA
# compile still runs on CPU); a miss traces; rejected entries loaded but were unusable.
CACHE_GRAPH_HITS = "cache_graph_hits"
CACHE_GRAPH_MISSES = "cache_graph_misses"
CACHE_GRAPH_REJECTED = "cache_graph_rejected"
CACHE_GRAPH_UNCACHEABLE = "cache_graph_uncacheable"
# Per Dynamo graph: a hit skips AOTAutograd (its metadata pass, joint trace and
# partitioner); uncacheable graphs are those whose result has no exact stored form.
CACHE_AOT_HITS = "cache_aot_hits"
CACHE_AOT_MISSES = "cache_aot_misses"
CACHE_AOT_REJECTED = "cache_aot_rejected"
CACHE_AOT_UNCACHEABLE = "cache_aot_uncacheable"
INPUT_WAIT_SECONDS = "input_wait_seconds"
INPUT_BATCHES = "input_batches"

_lock = threading.Lock()
_counters: dict[str, float] = {}


def incr(name: str, amount: float = 1) -> None:
    with _lock:
        _counters[name] = _counters.get(name, 0) + amount


def counter(name: str) -> float:
    """One counter's value, without asking torch_xla (cheap, and safe where it is absent)."""
    with _lock:
        return _counters.get(name, 0)


def set_max(name: str, value: float) -> None:
    with _lock:
        if value > _counters.get(name, float("-inf")):
            _counters[name] = value


def stats() -> dict[str, float]:
    """A snapshot of every counter, plus torch_xla's transfer and compile counts."""
    with _lock:
        snapshot = dict(_counters)
    snapshot.update(_xla_counters())
    return snapshot


def reset_stats() -> None:
    with _lock:
        _counters.clear()
    _reset_xla_counters()


def _xla_counters() -> dict[str, float]:
    from . import xla_metrics

    return {
        DEVICE_TO_HOST_TRANSFERS: xla_metrics.device_to_host_transfers(),
        HOST_TRANSFERS_TO_DEVICE: xla_metrics.host_to_device_transfers(),
    }


def _reset_xla_counters() -> None:
    from . import xla_metrics

    xla_metrics.clear()
