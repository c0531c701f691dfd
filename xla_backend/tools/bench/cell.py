"""Measuring one cell in this process: build the step, time it, read the counters.

Run in the fresh child process that ``runner.run_cell`` starts (``__main__``), and by
the pytest-benchmark suites, which time the very same step (:func:`prepare`).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..backends import XLA_BACKENDS
from .spec import LOOPS, MODELS, CellResult, CellSpec


def _rss_mb() -> float:
    import resource

    # Linux reports KiB, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _resolve_backend(name: str) -> Any:
    """What torch.compile gets as ``backend``: a name, or an imported ``module:function``."""
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    return name


def _dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far, from Dynamo's own counters."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


@dataclass
class PreparedStep:
    """A cell's training step, ready to run: ``step(i)`` trains on batch ``i``.

    ``barrier()`` waits until all work queued so far has finished (a no-op on the
    CPU, whose ops are synchronous). Shared by the subprocess cells and the
    pytest-benchmark suites, so both time the very same step.
    """

    step: Callable[[int], Any]
    barrier: Callable[[], None]
    batches: int
    notes: list[str]


def prepare(spec: CellSpec, batches: int) -> PreparedStep:
    """Builds model, optimizer and ``batches`` batches on the backend's device, compiles."""
    from ...device import configure_pjrt

    configure_pjrt()  # before torch_xla is imported, anywhere
    import torch

    if spec.model not in MODELS:
        raise ValueError(f"unknown model {spec.model!r}; accepted: {', '.join(MODELS)}")
    if spec.loop not in LOOPS:
        raise ValueError(f"unknown loop {spec.loop!r}; accepted: {', '.join(LOOPS)}")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    on_xla = spec.backend in XLA_BACKENDS
    mesh = None
    if on_xla:
        import torch_xla
        import torch_xla.core.xla_model as xm

        if spec.devices is not None:
            from ... import sharding

            mesh = sharding.data_parallel_mesh(spec.devices)  # before any device tensor
        # Autograd sizes its per-device queues at the first backward of the process.
        device = torch_xla.device()

        def barrier() -> None:
            torch_xla.sync()
            xm.wait_device_ops()
    else:
        device = torch.device("cpu")

        def barrier() -> None:  # CPU ops are synchronous
            pass

    from .. import workloads

    workload_name, sizes = MODELS[spec.model]
    work = workloads.get_workload(workload_name, **sizes)
    model = work.build_model().to(device)
    # A plain AdamW everywhere: syncfree_xla moves its step counter to the device itself.
    notes: list[str] = []
    if mesh is not None:
        notes.append(f"SPMD data parallel over {spec.devices} devices")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    fn, extra_args, extra_kwargs = _loop_parts(spec.loop, opt, device)
    compiled = _compile(fn, spec)
    if mesh is None:
        data = [work.make_batch(i, device) for i in range(batches)]
    else:
        data = [tuple(sharding.shard_batch(t, mesh) for t in work.make_batch(i))
                for i in range(batches)]
    barrier()

    def step(i: int) -> Any:
        loss = compiled(model, opt, *extra_args, *data[i % batches], **extra_kwargs)
        if spec.backend == "lazy":
            torch_xla.sync()  # the lazy loop's step boundary (mark_step)
        return loss

    return PreparedStep(step, barrier, batches, notes)


def measure_cell(spec: CellSpec) -> CellResult:
    """Runs one cell in this process. Call it in a fresh process (see :func:`run_cell`)."""
    from ... import counters, testing

    if spec.paired_loop is not None and (spec.paired_loop not in LOOPS
                                         or spec.paired_loop == spec.loop):
        others = ", ".join(repr(loop) for loop in LOOPS if loop != spec.loop)
        raise ValueError(f"paired_loop must be another loop of the same model, one of "
                         f"{others}; got {spec.paired_loop!r}")
    result = CellResult(spec.model, spec.loop, spec.backend, steps=spec.steps,
                        warmup=spec.warmup)
    total = spec.warmup + spec.steps * (2 if spec.pipelined else 1)
    prepared = prepare(spec, total)
    import torch  # only now: prepare() configures PJRT before anything imports torch_xla

    one, barrier = prepared.step, prepared.barrier
    result.notes = prepared.notes
    result.threads = torch.get_num_threads()
    on_xla = spec.backend in XLA_BACKENDS
    result.start_rss_mb = _rss_mb()

    started = time.perf_counter()
    loss = one(0)
    barrier()
    result.first_step_s = time.perf_counter() - started
    for i in range(1, spec.warmup):
        loss = one(i)
    barrier()
    # Recompiles often land in the second step (a step counter or lr that changed),
    # so the first step alone can understate the cold cost.
    result.warmup_s = time.perf_counter() - started

    other = _prepare_paired(spec, total)
    # counted as the budget API counts (one way for the gate, the plugin and `check`)
    start = testing.snapshot() if on_xla else None
    graphs = None if on_xla else _dynamo_counts()[0]
    times, paired_times = [], []
    for i in range(spec.warmup, spec.warmup + spec.steps):
        seconds, loss = _timed(prepared, i)
        times.append(seconds)
        if other is not None:
            paired_times.append(_timed(other, i)[0])
    result.steady_ms = statistics.median(times) * 1e3
    result.steady_ms_min = min(times) * 1e3
    if paired_times:
        result.paired_steady_ms = statistics.median(paired_times) * 1e3
        result.paired_steady_ms_min = min(paired_times) * 1e3
        result.paired_ratio = _median_ratio(times, paired_times)
    if start is not None:
        counted = testing.between(start, testing.snapshot(), spec.steps, spec.warmup)
        result.syncs_per_step = counted.syncs_per_step
        result.executions_per_step = counted.executions_per_step
        result.xla_compiles_after_warmup = counted.compiles
        result.dynamo_graphs_after_warmup = counted.recompiles
    else:  # off XLA: Dynamo's own count
        result.dynamo_graphs_after_warmup = _dynamo_counts()[0] - graphs
    if spec.backend in ("eager", "lazy"):
        result.dynamo_graphs_after_warmup = None  # nothing is compiled by Dynamo

    if spec.pipelined:
        start = spec.warmup + spec.steps
        started = time.perf_counter()
        for i in range(start, start + spec.steps):
            loss = one(i)
        barrier()
        result.pipelined_ms = (time.perf_counter() - started) / spec.steps * 1e3

    result.graph_breaks = _dynamo_counts()[1]
    if spec.backend == "syncfree_xla":
        stats = counters.stats()
        result.cache_graph_hits = int(stats.get(counters.CACHE_GRAPH_HITS, 0))
        result.cache_graph_misses = int(stats.get(counters.CACHE_GRAPH_MISSES, 0))
        result.cache_aot_hits = int(stats.get(counters.CACHE_AOT_HITS, 0))
        result.cache_aot_misses = int(stats.get(counters.CACHE_AOT_MISSES, 0))
        result.eager_fallbacks = int(stats.get(counters.EAGER_FALLBACKS, 0))
    result.final_loss = float(loss)  # a host read, after everything was measured
    result.peak_rss_mb = _rss_mb()
    if spec.paired_loop is not None:
        _interleave_loop(spec, prepared, total, result)
    return result


def _timed(prepared: PreparedStep, i: int) -> tuple[float, Any]:
    """Step ``i``: seconds up to the device barrier after it, and what it returned."""
    started = time.perf_counter()
    loss = prepared.step(i)
    prepared.barrier()
    return time.perf_counter() - started, loss


def _median_ratio(times: list[float], paired_times: list[float]) -> float:
    """The median of per-step ratios: each pair of steps saw the same machine load."""
    return statistics.median(t / p for t, p in zip(times, paired_times))


def _interleave_loop(spec: CellSpec, prepared: PreparedStep, first: int,
                     result: CellResult) -> None:
    """Times ``spec.steps`` more steps of this cell interleaved with as many of
    ``spec.paired_loop``'s (same model and backend, built and warmed up only now)."""
    other = prepare(replace(spec, loop=spec.paired_loop, paired=None, paired_loop=None),
                    spec.warmup)
    for i in range(spec.warmup):
        other.step(i)
    other.barrier()
    times, paired_times = [], []
    for i in range(first, first + spec.steps):
        times.append(_timed(prepared, i)[0])
        paired_times.append(_timed(other, i)[0])
    result.paired_loop_steady_ms = statistics.median(paired_times) * 1e3
    result.loop_ratio = _median_ratio(times, paired_times)


def _prepare_paired(spec: CellSpec, batches: int) -> PreparedStep | None:
    """The paired backend's step, warmed up, or None without ``spec.paired``."""
    if spec.paired is None:
        return None
    if spec.paired != "eager":
        # A compiled backend would share Dynamo's state with the measured one, and an
        # XLA one its metrics: only eager leaves the measured cell's counters alone.
        raise ValueError(f"paired must be 'eager', got {spec.paired!r}")
    other = prepare(CellSpec(spec.model, spec.loop, spec.paired, threads=spec.threads),
                    batches)
    for i in range(spec.warmup):
        other.step(i)
    other.barrier()
    return other


def _loop_parts(loop: str, opt: Any, device: Any) -> tuple[Callable, tuple, dict]:
    """The step function of ``loop`` and the arguments it takes besides model, opt, x, y."""
    import torch

    from .. import workloads

    if loop == "plain":
        return workloads.train_step, (), {}
    if loop == "A":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
        return workloads.train_step_clip, (), {"scheduler": sched}
    # train_step_amp takes the scaler between opt and the batch.
    return workloads.train_step_amp, (workloads.make_grad_scaler(device),), {}


def _compile(fn: Callable, spec: CellSpec) -> Callable:
    """``fn`` as the backend runs it: itself for eager and lazy, else torch.compile'd."""
    import torch

    if spec.backend in ("eager", "lazy"):
        return fn
    if spec.backend == "syncfree_xla":
        options = {"cache_dir": spec.cache_dir} if spec.cache_dir else {"cache": False}
        return torch.compile(fn, backend="syncfree_xla", options=options)
    return torch.compile(fn, backend=_resolve_backend(spec.backend))
