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
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["COUNTERS", "DEFAULT_TOLERANCE", "RATIOS", "STEP_OVER_REFERENCE", "TOLERANCE",
           "BudgetExceeded", "Measurement", "Snapshot", "assert_budget", "between",
           "budget_problems", "compare_entry", "compare_with_baseline", "failure_message",
           "measure", "read_baseline", "snapshot", "tolerance_of", "write_baseline"]

#: The counters a measurement compares, each with the budget keyword that bounds it.
COUNTERS: dict[str, str] = {
    "syncs_per_step": "max_syncs_per_step",
    "compiles": "max_compiles",
    "recompiles": "max_recompiles",
    "executions_per_step": "max_executions_per_step",
    "graph_breaks": "max_graph_breaks",
}


#: A baseline entry's timing ratios, by name. Timings are opt-in: CI machines are noisy,
#: so a ratio measured in one run (the step over a reference step, interleaved) is
#: compared, with a tolerance, and only where the run measured one.
RATIOS = "ratios"
#: An entry's allowed growth of its ratios, as a fraction (0.25: 25% slower passes).
TOLERANCE = "tolerance"
DEFAULT_TOLERANCE = 0.25
#: The ratio :func:`measure` records with a ``reference``: median per-step time over its.
STEP_OVER_REFERENCE = "step_over_reference"
_EPS = 1e-9


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
    #: the step's time over the reference step's (median of per-step ratios), when
    #: :func:`measure` was given a reference; None otherwise
    ratio: float | None = None

    def counters(self) -> dict[str, float]:
        """The counters alone."""
        return {name: getattr(self, name) for name in COUNTERS}

    def entry(self) -> dict[str, Any]:
        """What a baseline file keeps of this measurement: counters, and a measured ratio."""
        entry: dict[str, Any] = dict(self.counters())
        if self.ratio is not None:
            entry[RATIOS] = {STEP_OVER_REFERENCE: self.ratio}
        return entry


def _call(step: Callable[..., Any], batch: Any) -> Any:
    return step(*batch) if isinstance(batch, (tuple, list)) else step(batch)


@dataclass(frozen=True)
class Snapshot:
    """torch_xla's and Dynamo's running totals at one moment, all queued work done."""

    syncs: int
    executions: int
    compiles: int
    dynamo_graphs: int


def snapshot() -> Snapshot:
    """Waits for the device, then reads the totals a :class:`Measurement` is made of."""
    import torch_xla.core.xla_model as xm
    from torch._dynamo.utils import counters as dynamo_counters

    from . import xla_metrics

    xm.wait_device_ops()
    return Snapshot(xla_metrics.device_to_host_transfers(), xla_metrics.executions(),
                    xla_metrics.compiles(), int(dynamo_counters["stats"]["unique_graphs"]))


def between(start: Snapshot, end: Snapshot, steps: int, warmup: int,
            report: Any = None) -> Measurement:
    """The measurement of ``steps`` steps that ran from ``start`` to ``end``."""
    return Measurement(
        steps=steps, warmup=warmup,
        syncs_per_step=(end.syncs - start.syncs) / steps,
        executions_per_step=(end.executions - start.executions) / steps,
        compiles=end.compiles - start.compiles,
        recompiles=end.dynamo_graphs - start.dynamo_graphs,
        graph_breaks=len(report.graph_breaks) if report is not None else 0,
        report=report)


def measure(step: Callable[..., Any], batches: Iterable[Any], warmup: int = 3,
            steps: int | None = None,
            reference: Callable[..., Any] | None = None) -> Measurement:
    """Runs ``step`` on ``warmup`` batches, then counts what the next ``steps`` cost.

    A batch that is a tuple or list is passed as positional arguments, anything else as
    the one argument. ``steps=None`` measures every batch after the warm-up. The step's
    results are left on the device: reading them would be a sync of the test's own.

    ``reference`` (opt-in timing): a step to time against, usually the same step run
    eagerly, called on each measured batch right after ``step``. The measurement's
    ``ratio`` is then the median over the measured steps of ``step``'s time (waited
    for on the device) over the reference's; interleaving them makes load from other
    processes slow both sides of each ratio. The counters exclude the reference calls.
    """
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
        start = snapshot()
        end = start
        measured, ratios = 0, []
        for batch in batches:
            if reference is None:
                _call(step, batch)
            else:
                # timed without explain's host-read watch; the warm-up steps ran the
                # same code under it, so a host read is still placed
                with session.unprofiled():
                    before, started = snapshot(), time.perf_counter()
                    _call(step, batch)
                    after = snapshot()
                    took = time.perf_counter() - started
                    started = time.perf_counter()
                    _call(reference, batch)
                    ratios.append(took / max(time.perf_counter() - started, _EPS))
                end = _plus(end, before, after)
            measured += 1
            if steps is not None and measured == steps:
                break
        if reference is None:
            end = snapshot()
    if measured == 0 or (steps is not None and measured < steps):
        raise ValueError(f"the batches ran out: {measured} measured step(s) after "
                         f"{warmup} warm-up step(s), {steps or 'at least 1'} asked")
    measurement = between(start, end, measured, warmup, session.report())
    measurement.ratio = statistics.median(ratios) if ratios else None
    return measurement


def _plus(total: Snapshot, before: Snapshot, after: Snapshot) -> Snapshot:
    """``total`` advanced by what happened from ``before`` to ``after``."""
    return Snapshot(*(t + a - b for t, b, a in zip(dataclasses.astuple(total),
                                                     dataclasses.astuple(before),
                                                     dataclasses.astuple(after))))


def budget_problems(measurement: Measurement, max_syncs_per_step: float | None = 0,
                    max_compiles: int | None = 0, max_recompiles: int | None = 0,
                    max_executions_per_step: float | None = None,
                    max_graph_breaks: int | None = None) -> list[str]:
    """Each counter above its budget (None: no bound), as 'name: value > limit allowed'."""
    limits = {"max_syncs_per_step": max_syncs_per_step, "max_compiles": max_compiles,
              "max_recompiles": max_recompiles,
              "max_executions_per_step": max_executions_per_step,
              "max_graph_breaks": max_graph_breaks}
    return [f"{name}: {getattr(measurement, name):g} > {limits[limit]:g} allowed"
            for name, limit in COUNTERS.items()
            if limits[limit] is not None and getattr(measurement, name) > limits[limit]]


def assert_budget(measurement: Measurement, **budget: float | None) -> None:
    """Raises :class:`BudgetExceeded` if a counter is above its budget.

    The budgets are :func:`budget_problems`'s keywords: ``max_syncs_per_step`` (default
    0), ``max_compiles`` (0), ``max_recompiles`` (0), ``max_executions_per_step`` and
    ``max_graph_breaks`` (no bound); None lifts a bound.
    """
    unknown = sorted(set(budget) - set(COUNTERS.values()))
    if unknown:
        raise TypeError(f"unknown budget {', '.join(unknown)}; accepted: "
                        f"{', '.join(COUNTERS.values())}")
    over = budget_problems(measurement, **budget)
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


def _num(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) and not value.is_integer() else \
        f"{value:g}"


def tolerance_of(entry: Mapping[str, Any], override: float | None = None) -> float:
    """How far an entry's timing ratios may grow: ``override``, else the entry's
    :data:`TOLERANCE`, else :data:`DEFAULT_TOLERANCE`."""
    return override if override is not None else float(entry.get(TOLERANCE,
                                                                  DEFAULT_TOLERANCE))


def compare_entry(recorded: Mapping[str, Any], current: Mapping[str, Any],
                  higher_is_better: Iterable[str] = (), tolerance: float | None = None,
                  where: str = "") -> tuple[list[str], list[str]]:
    """(regressions, improvements) of ``current`` against a baseline entry, in words.

    Counters are exact: any move the wrong way is a regression, naming the counter, the
    baseline and the new value (an increase, or a decrease for ``higher_is_better``
    ones), and a counter the entry has but ``current`` lacks is one too. Timing ratios
    (:data:`RATIOS`) are compared only where ``current`` measured them, and may grow by
    ``tolerance`` (default: the entry's :data:`TOLERANCE`, else 25%). ``where`` (a test
    or workload name) is added to each message.
    """
    on = f" on {where}" if where else ""
    better_up = set(higher_is_better)
    tol = tolerance_of(recorded, tolerance)
    regressions: list[str] = []
    improvements: list[str] = []
    for name, old in sorted(recorded.items()):
        if name in (RATIOS, TOLERANCE) or old is None:
            continue
        new = current.get(name)
        if new is None:
            regressions.append(f"{name}{on}: baseline {_num(old)}, now not measured")
            continue
        up = name in better_up
        if (new < old - _EPS) if up else (new > old + _EPS):
            change = "a decrease" if up else "an increase"
            regressions.append(f"{name}{on}: baseline {_num(old)}, now {_num(new)} "
                               f"({change}; counters must not get worse)")
        elif (new > old + _EPS) if up else (new < old - _EPS):
            improvements.append(f"{name}{on} improved: baseline {_num(old)}, now {_num(new)}")
    measured = current.get(RATIOS) or {}
    for name, old in sorted((recorded.get(RATIOS) or {}).items()):
        new = measured.get(name)
        if new is None:
            continue
        change = new / old - 1
        if new > old * (1 + tol):
            regressions.append(f"{name}{on}: baseline {old:.3f}, now {new:.3f} "
                               f"({change:+.0%}, tolerance {tol:.0%})")
        elif new < old * (1 - tol):
            improvements.append(f"{name}{on} is {-change:.0%} better than the baseline "
                                f"({old:.3f} -> {new:.3f})")
    return regressions, improvements


def compare_with_baseline(measurement: Measurement, baseline: Mapping[str, Any],
                          tolerance: float | None = None) -> list[str]:
    """Each regression of ``measurement`` against its baseline entry (:func:`compare_entry`)."""
    return compare_entry(baseline, measurement.entry(), tolerance=tolerance)[0]


def read_baseline(path: Path) -> dict[str, dict[str, Any]]:
    """The entries a baseline file holds, by test id; empty if there is no file yet.

    An entry is a JSON object of counters, with timing ratios under :data:`RATIOS` and
    their tolerance under :data:`TOLERANCE` where it has them.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ValueError(f"baseline {path}: cannot read it ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"baseline {path}: not a baseline file (a JSON object of test ids "
                         "to counters)")
    return data


def write_baseline(path: Path, results: Mapping[str, Mapping[str, Any]],
                   merge: bool = True) -> None:
    """Merges ``results`` into the baseline at ``path`` (or replaces it, ``merge=False``):
    written whole or not at all."""
    merged = {**(read_baseline(path) if merge else {}), **results}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(dict(sorted(merged.items())), f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
