"""Sync and recompile budgets for a training step, for a team's own CI.

A CPU CI runner cannot time a TPU step, but it can count what makes one slow on any XLA
device: host syncs, XLA compiles and Dynamo recompiles after warm-up, executions per
step, graph breaks. Those counts are exact, so a test may assert them::

    from xla_backend.testing import assert_budget, measure

    step = torch.compile(train_step, backend="syncfree_xla")
    counts = measure(step, batches, warmup=3)
    assert_budget(counts, max_syncs_per_step=0, max_compiles=0)

On failure the message says what was measured against what was allowed, and where the
step syncs, breaks and recompiles (file, line and reason, from ``explain``), readable in
a CI log without running anything again. The pytest plugin
(``xla_backend.tools.pytest_plugin``: the ``syncfree`` marker and the
``syncfree_budget`` fixture) is built on these two functions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["COUNTERS", "BudgetExceeded", "Measurement", "assert_budget", "compare_with_baseline",
           "failure_message", "measure"]

#: The counters a measurement compares, each with the budget keyword that bounds it.
COUNTERS: dict[str, str] = {
    "syncs_per_step": "max_syncs_per_step",
    "compiles": "max_compiles",
    "recompiles": "max_recompiles",
    "executions_per_step": "max_executions_per_step",
    "graph_breaks": "max_graph_breaks",
}


class BudgetExceeded(AssertionError):
    """A measured counter is above its budget; the message says which, and where."""


@dataclass
class Measurement:
    """What the measured steps cost, after warm-up.

    ``compiles`` are XLA compiles and ``recompiles`` graphs Dynamo traced, both counted
    over the measured steps only; ``graph_breaks`` are Dynamo's distinct graph breaks
    over the whole run, warm-up included (where they are decided). ``report`` is
    ``explain``'s account of the run.
    """

    steps: int
    warmup: int
    syncs_per_step: float
    executions_per_step: float
    compiles: int
    recompiles: int
    graph_breaks: int
    report: Any = dataclasses.field(repr=False, default=None)

    def counters(self) -> dict[str, float]:
        """The counters alone, as a baseline file keeps them."""
        return {name: getattr(self, name) for name in COUNTERS}


def _call(step: Callable[..., Any], batch: Any) -> Any:
    return step(*batch) if isinstance(batch, (tuple, list)) else step(batch)


def measure(step: Callable[..., Any], batches: Iterable[Any], warmup: int = 3,
            steps: int | None = None) -> Measurement:
    """Runs ``step`` on ``warmup`` batches, then counts what the next ``steps`` cost.

    A batch that is a tuple or list is passed as positional arguments, anything else as
    the one argument. ``steps=None`` measures every batch after the warm-up. The step's
    results are left on the device: reading them would be a sync of the test's own.
    """
    import torch_xla.core.xla_model as xm
    from torch._dynamo.utils import counters as dynamo_counters

    from . import xla_metrics
    from .tools.explain import ExplainSession

    if warmup < 0 or (steps is not None and steps < 1):
        raise ValueError(f"warmup must be >= 0 and steps >= 1 or None; got warmup={warmup}, "
                         f"steps={steps}")
    batches = iter(batches)
    with ExplainSession() as session:
        for k in range(warmup):
            try:
                _call(step, next(batches))
            except StopIteration:
                raise ValueError(f"the batches ran out during warm-up, after {k} of "
                                 f"{warmup}") from None
        xm.wait_device_ops()
        syncs, execs = xla_metrics.device_to_host_transfers(), xla_metrics.executions()
        compiles = xla_metrics.compiles()
        graphs = int(dynamo_counters["stats"]["unique_graphs"])
        measured = 0
        for batch in batches:
            _call(step, batch)
            measured += 1
            if steps is not None and measured == steps:
                break
        xm.wait_device_ops()
        if measured == 0 or (steps is not None and measured < steps):
            raise ValueError(f"the batches ran out: {measured} measured step(s) after "
                             f"{warmup} warm-up step(s), {steps or 'at least 1'} asked")
        result = Measurement(
            steps=measured, warmup=warmup,
            syncs_per_step=(xla_metrics.device_to_host_transfers() - syncs) / measured,
            executions_per_step=(xla_metrics.executions() - execs) / measured,
            compiles=xla_metrics.compiles() - compiles,
            recompiles=int(dynamo_counters["stats"]["unique_graphs"]) - graphs,
            graph_breaks=0)
    result.report = session.report()
    result.graph_breaks = len(result.report.graph_breaks)
    return result


def assert_budget(measurement: Measurement, max_syncs_per_step: float | None = 0,
                  max_compiles: int | None = 0, max_recompiles: int | None = 0,
                  max_executions_per_step: float | None = None,
                  max_graph_breaks: int | None = None) -> None:
    """Raises :class:`BudgetExceeded` if a counter is above its budget (None: no bound)."""
    limits = {"max_syncs_per_step": max_syncs_per_step, "max_compiles": max_compiles,
              "max_recompiles": max_recompiles,
              "max_executions_per_step": max_executions_per_step,
              "max_graph_breaks": max_graph_breaks}
    over = [f"{name}: {getattr(measurement, name):g} > {limits[limit]:g} allowed"
            for name, limit in COUNTERS.items()
            if limits[limit] is not None and getattr(measurement, name) > limits[limit]]
    if over:
        raise BudgetExceeded(failure_message(measurement, over))


def failure_message(measurement: Measurement, problems: Iterable[str]) -> str:
    """What went over, the counters, then ``explain``'s account of where and why."""
    counts = ", ".join(f"{k}={v:g}" for k, v in measurement.counters().items())
    lines = ["syncfree_xla budget exceeded:", *(f"  {p}" for p in problems),
             f"  measured over {measurement.steps} step(s) after {measurement.warmup} "
             f"warm-up step(s): {counts}"]
    if measurement.report is not None:
        lines += ["", str(measurement.report)]
    return "\n".join(lines)


def compare_with_baseline(measurement: Measurement, baseline: Mapping[str, float]) -> list[str]:
    """Each counter above its baseline value, as 'name: old -> new'."""
    return [f"{name}: {baseline[name]:g} -> {value:g} (baseline)"
            for name, value in measurement.counters().items()
            if name in baseline and value > baseline[name]]
