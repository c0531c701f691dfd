"""pytest plugin: sync and recompile budgets as a marker, a fixture and a baseline file.

Installed with the package (entry point group ``pytest11``)::

    @pytest.mark.syncfree(warmup=3, steps=5, max_syncs_per_step=0, max_compiles=0)
    def test_train_step_is_syncfree(syncfree_budget):
        step = torch.compile(train_step, backend="syncfree_xla")
        syncfree_budget.run(step, batches)     # warms up, measures, asserts

``pytest --syncfree-baseline perf/syncfree.json`` then also fails a marked test whose
counters went up since the file was written, naming the test, the counter and both
values; ``--syncfree-update`` rewrites the file with this run's counters. Counters by
default: they are exact, where timings on shared CI machines are not. Timing is
opt-in: ``syncfree_budget.run(step, batches, reference=eager_step)`` also records the
step's time over the reference's, and a later run fails if that ratio grew by more
than ``--syncfree-tolerance`` (default 0.25, or the file's).

Importing this module imports neither torch nor torch_xla: pytest loads it in every
session of the environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

MARKER = "syncfree"
#: ``xla_backend.testing.COUNTERS``' budget keywords, spelled out so that loading the plugin
#: imports no torch (a test keeps the two equal).
BUDGET_KEYS = ("max_syncs_per_step", "max_compiles", "max_recompiles",
               "max_executions_per_step", "max_graph_breaks")
RUN_KEYS = ("warmup", "steps")
_RESULTS = pytest.StashKey[dict]()
#: The key of a pytest-xdist worker's results in what it hands its controller.
_WORKER_RESULTS = "syncfree_xla_results"
# torch's structured-trace logger: DEBUG records with no text at every compile step
TORCH_TRACE_LOGGER = "torch.__trace"


class _TorchTraceOnlyWhenTraced(logging.Filter):
    """Keeps torch's structured-trace records out of pytest's captured logs.

    pytest attaches its capture handlers to non-propagating loggers too, and torch's
    trace logger is one, at DEBUG: a failing test's report then holds hundreds of
    empty "DEBUG torch.__trace" lines around the budget message. The records only
    matter when ``TORCH_TRACE`` asks torch to write them for tlparse.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return bool(os.environ.get("TORCH_TRACE"))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("syncfree_xla", "sync and recompile budgets (syncfree_xla)")
    group.addoption("--syncfree-baseline", metavar="FILE", default=None,
                    help="fail a @pytest.mark.syncfree test whose counters went up since "
                         "FILE was written")
    group.addoption("--syncfree-update", action="store_true",
                    help="write this run's counters to --syncfree-baseline instead")
    group.addoption("--syncfree-tolerance", metavar="F", type=float, default=None,
                    help="allowed growth of a timing ratio measured with a reference "
                         "step (default: the baseline entry's, else 0.25)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", f"{MARKER}(warmup=3, steps=None, max_syncs_per_step=0, max_compiles=0, "
        "max_recompiles=0, max_executions_per_step=None, max_graph_breaks=None): the "
        "budgets syncfree_budget.run() asserts (syncfree_xla)")
    if config.getoption("--syncfree-update") and not config.getoption("--syncfree-baseline"):
        raise pytest.UsageError("--syncfree-update needs --syncfree-baseline FILE")
    config.stash[_RESULTS] = {}
    trace = logging.getLogger(TORCH_TRACE_LOGGER)
    if not any(isinstance(f, _TorchTraceOnlyWhenTraced) for f in trace.filters):
        trace.addFilter(_TorchTraceOnlyWhenTraced())


class SyncfreeBudget:
    """The ``syncfree_budget`` fixture: measures a step against its test's marker."""

    def __init__(self, request: pytest.FixtureRequest) -> None:
        self._request = request
        marker = request.node.get_closest_marker(MARKER)
        kwargs = dict(marker.kwargs) if marker is not None else {}
        unknown = sorted(set(kwargs) - set(BUDGET_KEYS) - set(RUN_KEYS))
        if marker is not None and marker.args:
            unknown.append(f"positional arguments {marker.args!r}")
        if unknown:
            raise pytest.UsageError(
                f"@pytest.mark.{MARKER} on {request.node.nodeid}: unknown {', '.join(unknown)}"
                f"; accepted: {', '.join(RUN_KEYS + BUDGET_KEYS)}")
        self.warmup = kwargs.pop("warmup", 3)
        self.steps = kwargs.pop("steps", None)
        self.budget = kwargs

    def run(self, step: Callable[..., Any], batches: Iterable[Any],
            reference: Callable[..., Any] | None = None) -> Any:
        """Warms ``step`` up, measures it, asserts the budgets and the baseline.

        ``reference`` (opt-in timing, see ``xla_backend.testing.measure``): a step timed
        against ``step`` on the same batches; the ratio joins the baseline entry.
        """
        from xla_backend import testing

        measurement = testing.measure(step, batches, warmup=self.warmup, steps=self.steps,
                                      reference=reference)
        config = self._request.config
        config.stash[_RESULTS][self._request.node.nodeid] = measurement.entry()
        testing.assert_budget(measurement, **self.budget)
        path = config.getoption("--syncfree-baseline")
        if path and not config.getoption("--syncfree-update"):
            recorded = _read(Path(path)).get(self._request.node.nodeid)
            if recorded is not None:
                worse = testing.compare_with_baseline(
                    measurement, recorded, config.getoption("--syncfree-tolerance"))
                if worse:
                    raise testing.BudgetExceeded(testing.failure_message(
                        measurement, [f"{self._request.node.nodeid}: {w}" for w in worse]))
        return measurement


@pytest.fixture
def syncfree_budget(request: pytest.FixtureRequest) -> SyncfreeBudget:
    """Measures a training step against the test's ``@pytest.mark.syncfree`` budgets."""
    return SyncfreeBudget(request)


def _read(path: Path) -> dict[str, dict[str, float]]:
    from xla_backend import testing

    try:
        return testing.read_baseline(path)
    except ValueError as e:
        raise pytest.UsageError(f"--syncfree-baseline: {e}") from None


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist's controller, as each worker ends: gathers that worker's results, so
    the baseline is written once, by the controller. Workers each writing their own
    would race (read, merge, replace) and lose one another's entries."""
    results = getattr(node, "workeroutput", {}).get(_WORKER_RESULTS)
    if results:
        node.config.stash[_RESULTS].update(results)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    path = config.getoption("--syncfree-baseline")
    results = config.stash.get(_RESULTS, {})
    if not (path and config.getoption("--syncfree-update") and results):
        return
    workeroutput = getattr(config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: the controller writes them
        workeroutput[_WORKER_RESULTS] = results
        return
    from xla_backend import testing

    try:
        testing.write_baseline(Path(path), results)
    except ValueError as e:
        raise pytest.UsageError(f"--syncfree-baseline: {e}") from None
