"""Recording a run: the hooks an :class:`ExplainSession` installs while it is active.

It registers itself on ``backend.OBSERVERS``, ``passes.pipeline.OBSERVERS``,
``grad_scaler.OBSERVERS`` and Dynamo's compile callbacks, keeps what they report, and
builds the :class:`~.report.ExplainReport` from it; :func:`explain` is the one-call form.
"""

from __future__ import annotations

import contextlib
import linecache
import sys
import threading
import traceback
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._dynamo
import torch.fx
from torch._guards import CompileContext

from passes import pipeline as pass_pipeline

from ... import backend, counters, xla_metrics
from ...dynamo import grad_scaler
from ...runtime import graph, step
from . import dynamo_records
from .analysis import DynamoRecord, aten_graph_report, dynamo_sync_points
from .location import frames_from_summaries, innermost
from .report import MASKED_GRAD_SCALER_STEP, AtenGraphReport, ExplainReport, GraphReport, SyncPoint

#: How many times :func:`explain` calls the step: the second call exposes recompiles
#: (a float that changed, optimizer state that exists now) and their reasons.
CALLS = 2


def _compile_id() -> tuple[str | None, int]:
    trace = CompileContext.current_trace_id()
    if trace is None:
        return None, 0
    return str(trace.compile_id), trace.attempt


class ExplainSession:
    """Records every ``syncfree_xla`` compile and the syncs observed while active.

    Use as a context manager around any code (``with ExplainSession() as s: ...``),
    then :meth:`report`. Sessions nest; each sees everything compiled inside it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[DynamoRecord] = []
        self._current: DynamoRecord | None = None
        self._orphans: list[AtenGraphReport] = []
        self._eager: dict[tuple, SyncPoint] = {}
        self._metrics: dict[int, Any] = {}
        self._metrics_before: list[Any] = []
        self._breaks_before: list[Any] = []
        self._breaks: list[Any] = []
        self._per_call: list[int] = []
        self._start: tuple[float, ...] = (0,) * 6
        self._compile_syncs = 0
        self._compile_start: int | None = None
        self._lowering_start: int | None = None  # a graph lowering at its first call
        self._end: tuple[float, ...] | None = None
        self._active = False
        self._previous_profiler: Any = None

    # -- lifetime

    def __enter__(self) -> ExplainSession:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        """Starts recording: hooks in, baselines taken."""
        if self._active:
            return
        self._metrics_before = torch._dynamo.utils.get_compilation_metrics()
        self._breaks_before = list(torch._dynamo.graph_break_reasons)
        self._start = self._counts()
        backend.OBSERVERS.append(self)
        pass_pipeline.OBSERVERS.append(self._on_pass)
        torch._dynamo.callback_handler.register_start_callback(self._on_compile_start)
        torch._dynamo.callback_handler.register_end_callback(self._on_compile_end)
        grad_scaler.OBSERVERS.append(self._grad_scaler_step)
        graph.LOWERING_OBSERVERS.append(self._on_lowering)
        self._previous_profiler = sys.getprofile()
        sys.setprofile(self._on_c_call)
        self._active = True

    def stop(self) -> None:
        """Stops recording; the report keeps what was seen."""
        if not self._active:
            return
        self._active = False
        _remove(backend.OBSERVERS, self)
        _remove(pass_pipeline.OBSERVERS, self._on_pass)
        # torch._dynamo.reset() clears Dynamo's callbacks: they may be gone already
        _remove(torch._dynamo.callback_handler.start_callbacks, self._on_compile_start)
        _remove(torch._dynamo.callback_handler.end_callbacks, self._on_compile_end)
        _remove(grad_scaler.OBSERVERS, self._grad_scaler_step)
        _remove(graph.LOWERING_OBSERVERS, self._on_lowering)
        if sys.getprofile() == self._on_c_call:
            sys.setprofile(self._previous_profiler)
        self._drain_dynamo()
        self._end = self._counts()

    @contextlib.contextmanager
    def unprofiled(self) -> Iterator[None]:
        """Steps run in here are not watched for eager host reads: for timing them, which
        the profile hook would slow down (counters are unaffected)."""
        if sys.getprofile() != self._on_c_call:
            yield
            return
        sys.setprofile(self._previous_profiler)
        try:
            yield
        finally:
            sys.setprofile(self._on_c_call)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Calls ``fn`` and records the host syncs of this one call."""
        before = xla_metrics.device_to_host_transfers()
        try:
            return fn(*args, **kwargs)
        finally:
            self._per_call.append(xla_metrics.device_to_host_transfers() - before)

    @staticmethod
    def _counts() -> tuple[float, ...]:
        return (xla_metrics.device_to_host_transfers(), xla_metrics.compiles(),
                counters.counter(counters.EAGER_FALLBACKS),
                counters.counter(counters.STEPS_JOINED), counters.counter(counters.GRAPHS_JOINED),
                counters.counter(counters.STEPS_CUT))

    # -- hooks (called by Dynamo, backend.py and passes/pipeline.py)

    def _on_compile_start(self, args: Any) -> None:
        """Dynamo starts compiling: transfers from here on are compile-time, not steps'."""
        self._compile_start = xla_metrics.device_to_host_transfers()

    def _on_compile_end(self, args: Any) -> None:
        if self._compile_start is not None:
            self._compile_syncs += xla_metrics.device_to_host_transfers() - self._compile_start
            self._compile_start = None

    def _on_lowering(self, started: bool) -> None:
        """A graph lowers outside Dynamo's compile (at its first call): its host reads
        (constants stored in the cache) are compile-time too."""
        if started:
            if self._compile_start is None and self._lowering_start is None:
                self._lowering_start = xla_metrics.device_to_host_transfers()
        elif self._lowering_start is not None:
            self._compile_syncs += xla_metrics.device_to_host_transfers() - self._lowering_start
            self._lowering_start = None

    def on_dynamo_graph(self, gm: torch.fx.GraphModule, options: Any) -> None:
        """A Dynamo graph, before the passes: notes its sync points."""
        compile_id, attempt = _compile_id()
        record = DynamoRecord(
            gm=gm, compile_id=compile_id or f"?{len(self._records)}", attempt=attempt,
            syncfree_passes=bool(getattr(options, "syncfree_passes", True)),
            end=getattr(gm, "compile_subgraph_reason", None),
        )
        record.syncs.update(dynamo_sync_points(gm))
        with self._lock:
            self._drain_dynamo()
            previous = next((i for i, r in enumerate(self._records)
                             if r.compile_id == record.compile_id), None)
            if previous is not None and self._records[previous].attempt != attempt:
                record.retraced = self._records[previous].retraced + 1
                self._records[previous] = record  # Dynamo restarted: the new trace counts
            else:
                self._records.append(record)
            self._current = record

    def _on_pass(self, pass_name: str | None, gm: torch.fx.GraphModule,
                 error: BaseException | None = None) -> None:
        record = self._current
        if pass_name is None or record is None or record.gm is not gm:
            return
        if error is not None:
            with self._lock:
                record.passes_failed.append(f"{pass_name} ({type(error).__name__}: {error})")
            return
        alive = set(gm.graph.nodes)
        with self._lock:
            record.passes_fired.append(pass_name)
            for node, sync in record.syncs.items():
                if sync.removed_by is None and node not in alive:
                    sync.removed_by = pass_name

    def on_aot(self, gm: torch.fx.GraphModule, outcome: str) -> None:
        """What the AOTAutograd cache did with the Dynamo graph ``gm``."""
        with self._lock:
            owner = next((r for r in reversed(self._records) if r.gm is gm), None)
            if owner is not None:
                owner.aot = outcome

    def on_aten_graph(self, name: str, gm: torch.fx.GraphModule) -> None:
        """An AOTAutograd graph, before lowering: will it run as one computation?"""
        report = aten_graph_report(name, gm)
        compile_id, _ = _compile_id()
        with self._lock:
            owner = next((r for r in reversed(self._records) if r.compile_id == compile_id),
                         None)
            if owner is None and self._records:
                owner = self._records[-1]
            (owner.aten if owner is not None else self._orphans).append(report)

    # -- host reads in eager code

    def _on_c_call(self, frame: types.FrameType, event: str, arg: Any) -> None:
        """A profile hook (this thread, while recording): notes eager host reads.

        ``loss.item()`` or ``t.cpu()`` on a device tensor, run eagerly (outside any
        graph: after a graph break, or between steps), is a host sync that no graph
        shows; this names its line. Reads through ``float(t)`` or ``if t:`` call no C
        function Python reports, so they are counted but not placed.
        """
        if event != "c_call" or getattr(arg, "__name__", None) not in _HOST_READS:
            return
        tensor = getattr(arg, "__self__", None)
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "xla" or \
                self._compile_start is not None or self._lowering_start is not None:
            return
        if arg.__name__ == "to" and not _to_host(frame):
            return
        self._note_host_read(frame, arg.__name__)

    @torch._dynamo.disable
    def _note_host_read(self, frame: types.FrameType, method: str) -> None:
        """Records one eager host read at ``frame``'s line. Dynamo must not trace this
        (it runs inside compiled calls): a graph break here would count as the user's."""
        inner, user = innermost(frames_from_summaries(traceback.extract_stack(frame)))
        key = (user or inner, method)
        with self._lock:
            sync = self._eager.get(key)
            if sync is not None:
                sync.count += 1
                return
            if any(k[0] == key[0] for k in self._eager):
                return  # a read the GradScaler hook already placed, and says why
            self._eager[key] = SyncPoint(
                f"Tensor.{method}() of a device tensor, run eagerly", inner, user,
                reason="a host read outside the compiled graphs (after a graph break, or "
                       "between steps)")

    # -- GradScaler

    def _grad_scaler_step(self, optimizer: torch.optim.Optimizer, masked: bool) -> None:
        inner, user = innermost(frames_from_summaries(traceback.extract_stack()))
        reason = "" if masked else _why_not_masked(optimizer)
        key = (user, masked, reason)
        with self._lock:
            sync = self._eager.get(key)
            if sync is not None:
                sync.count += 1
                return
            self._eager[key] = SyncPoint(
                "GradScaler.step() reading found_inf", user, user,
                removed_by=MASKED_GRAD_SCALER_STEP if masked else None, reason=reason)

    # -- Dynamo's own records

    def _drain_dynamo(self) -> None:
        """Takes Dynamo's new compilation metrics (a bounded deque) before they age out."""
        before = {id(m) for m in self._metrics_before}
        for metric in torch._dynamo.utils.get_compilation_metrics():
            if id(metric) not in before:
                self._metrics[id(metric)] = metric
        known = {id(r) for r in self._breaks_before} | {id(r) for r in self._breaks}
        self._breaks += [r for r in torch._dynamo.graph_break_reasons if id(r) not in known]

    # -- the result

    def report(self) -> ExplainReport:
        """What was seen so far (the session may still be active)."""
        with self._lock:
            if self._active:
                self._drain_dynamo()
            end = self._end if self._end is not None else self._counts()
            metrics = list(self._metrics.values())
            # a frame's own entry (backward and runtime entries share its id, not its code)
            by_id = {str(m.compile_id): m for m in metrics if m.compile_id and m.co_filename}
            graphs = [r.to_report(by_id) for r in self._records]
            report = ExplainReport(
                graphs=graphs,
                eager_sync_points=list(self._eager.values()),
                graph_breaks=dynamo_records.graph_breaks(self._breaks),
                recompiles=dynamo_records.recompiles(metrics),
                host_syncs=end[0] - self._start[0],
                host_syncs_compiling=self._compile_syncs,
                host_syncs_per_call=list(self._per_call),
                xla_compiles=end[1] - self._start[1],
                op_by_op_runs=int(end[2] - self._start[2]),
                steps_joined=int(end[3] - self._start[3]),
                graphs_joined=int(end[4] - self._start[4]),
                steps_cut=int(end[5] - self._start[5]),
                last_step=step.joiner.last_step(),
            )
            if self._orphans:
                report.graphs.append(GraphReport("?", "", None, "an unknown point", True,
                                                 aten_graphs=list(self._orphans)))
        if not graphs:
            report.notes.append(
                "no graph reached syncfree_xla: nothing was compiled with it while the "
                "session ran (already compiled before? call torch._dynamo.reset() first)")
        for metric in metrics:
            if dynamo_records.hit_recompile_limit(metric):
                name = dynamo_records.frame_code(metric, metrics)[0]
                report.notes.append(f"{name}: recompile limit reached; Dynamo now runs it "
                                    "without compiling")
        if report.host_syncs < report.host_syncs_compiling or report.host_syncs < 0:
            report.notes.append("torch_xla's metrics were cleared during the session: "
                                "the sync counts are incomplete")
        return report


#: Tensor methods that read a device tensor's value on the host.
_HOST_READS = frozenset({"item", "tolist", "cpu", "numpy", "to"})


def _to_host(frame: types.FrameType) -> bool:
    """Whether the ``Tensor.to`` being called from ``frame`` goes to the CPU: it is told
    by the call's own arguments, which the profile hook does not see, so by the source."""
    line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    return "cpu" in line


def _remove(items: list[Any], item: Any) -> None:
    for i, existing in enumerate(items):
        if existing == item:
            del items[i]
            return


def _why_not_masked(optimizer: torch.optim.Optimizer) -> str:
    """Why ``masked_maybe_opt_step`` fell back to the stock step (mirrors _step_tensors)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None and not optimizer.state.get(p):
                return ("the optimizer has no state yet (its first step): a skipped step "
                        "must leave the state absent, which a mask cannot express")
    return ("optimizer state is not a device tensor next to its parameter (a "
            "non-tensor value, or a parameter on the host): the stock step reads "
            "found_inf on the host")


def _is_compiled(fn: Any) -> bool:
    return (isinstance(fn, torch._dynamo.eval_frame.OptimizedModule)
            or hasattr(fn, "_torchdynamo_orig_callable"))


def explain(step_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> ExplainReport:
    """Compiles ``step_fn`` with ``syncfree_xla``, calls it twice, says where it syncs.

    ``step_fn`` may already be compiled (``torch.compile(..., backend="syncfree_xla")``,
    with options); a plain function or module is compiled here. The two calls take the
    same arguments, so a training step trains two steps. A function compiled earlier
    in the process may not compile again (Dynamo's cache): the report then says so.
    """
    compiled = step_fn if _is_compiled(step_fn) else torch.compile(step_fn,
                                                                   backend="syncfree_xla")
    with ExplainSession() as session:
        for _ in range(CALLS):
            session.call(compiled, *args, **kwargs)
    return session.report()
