"""Why a compiled step still syncs, breaks or recompiles: ``xla_backend.tools.explain``.

A sync-free step is only as good as the proof that it is one. Counting host syncs
(torch_xla's ``TransferFromDeviceTime``) says *that* a step syncs; this module says
*where* and *why*, per graph:

* every sync point in each Dynamo graph handed to ``syncfree_xla`` (``.item()``,
  ``float(t)``, data-dependent-shape ops), with the user's file and line from
  ``node.meta["stack_trace"]``, and whether a pass removed it (which one, told by the
  hook in ``passes.pipeline``) or why it was kept (the value crosses a graph break, it
  sizes a tensor, an op cannot take a 0-d tensor...);
* for each of its AOTAutograd graphs (forward / backward / inference), whether it runs
  as one XLA computation or op by op, and the sync points that decided so
  (``graph_split`` is asked the same question lowering asks);
* ``GradScaler`` steps taken with the masked, branch-free step (no host read) or the
  stock one (one host read), and why;
* graph breaks (``torch._dynamo.graph_break_reasons``) and recompiles with the guard
  that failed (Dynamo's compilation metrics, ``recompile_reason``);
* the host syncs that actually happened, from torch_xla's own metric.

Graph breaks and recompiles are Dynamo-wide: frames compiled with any backend while a
session is active are listed. Nothing is recorded while no session is active: the
hooks in ``backend.OBSERVERS`` and ``passes.pipeline.OBSERVERS`` are empty lists then.

Entry points: :func:`explain` (one function, called twice), :class:`ExplainSession`
(any code in a ``with`` block), :func:`run_script` (``syncfree-xla explain``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import runpy
import sys
import threading
import traceback
import types
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch.fx
from torch._guards import CompileContext

from passes import pipeline as pass_pipeline
from passes.dynamo_graph import is_dynamo_float_input, is_sym, value

from .. import backend, counters, xla_metrics
from ..dynamo import grad_scaler
from ..lower import split as graph_split
from ..runtime import partition

log = logging.getLogger(__name__)

__all__ = [
    "AtenGraphReport",
    "ExplainReport",
    "ExplainSession",
    "GraphBreak",
    "GraphReport",
    "Location",
    "MASKED_GRAD_SCALER_STEP",
    "Recompile",
    "ScriptRun",
    "StepLimitReached",
    "SyncPoint",
    "explain",
    "run_script",
]

#: How many times :func:`explain` calls the step: the second call exposes recompiles
#: (a float that changed, optimizer state that exists now) and their reasons.
CALLS = 2

#: The name a removal by ``grad_scaler.masked_maybe_opt_step`` is reported under.
MASKED_GRAD_SCALER_STEP = "masked GradScaler step"

#: What each rewrite does for a sync, in the report's words.
PASS_EFFECTS: dict[str, str] = {
    "tensorify_scalar_reads": "the read is now 0-d tensor math on the device",
    "hoist_scalar_negation": "a negated float input (-lr) now feeds its op as lr, so the "
                             "float stays a graph input instead of a constant recompiled "
                             "for each value",
    MASKED_GRAD_SCALER_STEP: "found_inf is applied as a mask on the device instead of an "
                             "`if` on the host",
}

_DATA_DEPENDENT_METHODS = frozenset({"nonzero", "masked_select", "unique"})
_DATA_DEPENDENT_FUNCTIONS = frozenset({torch.nonzero, torch.masked_select, torch.unique})
_CHECKS = frozenset({torch._check, torch._check_is_size})
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>[^\n]+)'
                    r'(?:\n(?P<code>[^\n]*))?')


# --------------------------------------------------------------------------- locations


def _package_dir(module: types.ModuleType | None) -> str | None:
    path = getattr(module, "__file__", None)
    return os.path.dirname(os.path.abspath(path)) + os.sep if path else None


def _library_dirs() -> tuple[str, ...]:
    """Where code that is not the user's lives: torch, torch_xla and this project."""
    import passes

    mods = [torch, sys.modules.get("torch_xla"), sys.modules[_BACKEND_PACKAGE], passes]
    dirs = [_package_dir(m) for m in mods]
    return tuple(d for d in dirs if d)


_BACKEND_PACKAGE = __package__.rpartition(".")[0]  # xla_backend, above its tools

#: Modules of this package that hold code written the way users write it (step
#: functions): a sync or graph break there is reported at its own line.
_USER_STYLE_MODULES = ("workloads.py", "demo.py")


def _is_library(filename: str) -> bool:
    if filename.startswith("<"):
        return True
    path = os.path.abspath(filename)
    ours = _package_dir(sys.modules[__package__])  # the tools: workloads.py, demo.py
    if ours and path.startswith(ours) and os.path.basename(path) in _USER_STYLE_MODULES:
        return False
    return path.startswith(_library_dirs())


def _display_path(filename: str) -> str:
    """Relative to the working directory when inside it: short, and still clickable."""
    try:
        rel = os.path.relpath(filename)
    except ValueError:  # another drive on Windows
        return filename
    return filename if rel.startswith("..") else rel


@dataclass(frozen=True)
class Location:
    """One source line: where a sync point, graph break or compiled function is."""

    filename: str
    lineno: int
    function: str = ""
    code: str = ""

    def __str__(self) -> str:
        return f"{_display_path(self.filename)}:{self.lineno}"

    def describe(self) -> str:
        """``file:line in function: code``, as much of it as is known."""
        text = str(self)
        if self.function:
            text += f" in {self.function}"
        return text + (f": {self.code}" if self.code else "")


def _frames_from_stack_trace(text: str) -> list[Location]:
    """The frames of an FX ``stack_trace`` string, outermost first."""
    return [Location(m["file"], int(m["line"]), m["func"].strip(), (m["code"] or "").strip())
            for m in _FRAME.finditer(text or "")]


def _frames_from_summaries(stack: Iterable[traceback.FrameSummary]) -> list[Location]:
    return [Location(f.filename, f.lineno or 0, f.name, (f.line or "").strip()) for f in stack]


def _innermost(frames: Sequence[Location]) -> tuple[Location | None, Location | None]:
    """(innermost frame, innermost frame in the user's code) of a stack."""
    if not frames:
        return None, None
    user = next((f for f in reversed(frames) if not _is_library(f.filename)), None)
    return frames[-1], user


def _node_frames(node: torch.fx.Node) -> list[Location]:
    return _frames_from_stack_trace(node.meta.get("stack_trace", ""))


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}()"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__.split('.')[0]}"
    module = getattr(target, "__module__", "") or ""
    name = getattr(target, "__name__", str(target))
    return f"{'torch.' if module.startswith('torch') else ''}{name}()"


def _where(node: torch.fx.Node) -> str:
    inner, user = _innermost(_node_frames(node))
    loc = user or inner
    return f"`{_op_name(node)}` at {loc}" if loc else f"`{_op_name(node)}`"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


# --------------------------------------------------------------------------- the report


@dataclass
class SyncPoint:
    """A place where a device value is (or was going to be) read on the host."""

    what: str
    location: Location | None
    user_location: Location | None = None
    removed_by: str | None = None
    reason: str = ""
    count: int = 1

    @property
    def removed(self) -> bool:
        return self.removed_by is not None

    @property
    def where(self) -> Location | None:
        """The user's line when the sync sits in library code (an optimizer), else its own."""
        return self.user_location or self.location

    def __str__(self) -> str:
        status = "removed" if self.removed else "KEPT"
        where = self.where.describe() if self.where else "unknown location"
        if (self.location and self.user_location
                and self.location != self.user_location):
            where += f" (inside {self.location})"
        times = f" (x{self.count})" if self.count > 1 else ""
        if self.removed:
            why = f"removed by {self.removed_by}"
            effect = PASS_EFFECTS.get(self.removed_by or "")
            why += f": {effect}" if effect else ""
        else:
            why = f"kept: {self.reason}" if self.reason else "kept"
        return f"{status:<8}{self.what} at {where}{times}\n          {why}"


@dataclass
class AtenGraphReport:
    """One AOTAutograd graph (forward, backward or inference) and how it runs."""

    name: str
    fallback_reason: str | None
    sync_points: list[SyncPoint] = field(default_factory=list)
    #: ops with no XLA lowering (``aten.histc``): the graph is cut around them
    eager_ops: list[str] = field(default_factory=list)

    @property
    def runs_op_by_op(self) -> bool:
        return self.fallback_reason is not None

    def __str__(self) -> str:
        if self.fallback_reason is None and self.eager_ops:
            return (f"{self.name}: compiled segments around ops with no XLA lowering, "
                    f"run eagerly: {', '.join(self.eager_ops)}")
        if self.fallback_reason is None:
            return f"{self.name}: one XLA computation"
        return f"{self.name}: op by op (op-by-op fallback: {self.fallback_reason})"


@dataclass
class GraphReport:
    """One Dynamo graph handed to ``syncfree_xla``, with the graphs AOTAutograd made of it."""

    compile_id: str
    function: str
    location: Location | None
    ended_by: str
    syncfree_passes: bool
    passes_fired: list[str] = field(default_factory=list)
    passes_failed: list[str] = field(default_factory=list)
    sync_points: list[SyncPoint] = field(default_factory=list)
    aten_graphs: list[AtenGraphReport] = field(default_factory=list)
    retraced: int = 0

    def __str__(self) -> str:
        where = f" ({self.location})" if self.location else ""
        lines = [f"Dynamo graph {self.compile_id}: {self.function or '?'}{where}, "
                 f"ends at {self.ended_by}"]
        if self.retraced:
            lines.append(f"  traced {self.retraced + 1} times (Dynamo restarted its analysis)")
        if not self.syncfree_passes:
            lines.append("  syncfree passes off (options={'syncfree_passes': False})")
        elif self.passes_fired:
            lines.append(f"  passes that rewrote it: {', '.join(self.passes_fired)}")
        for failed in self.passes_failed:
            lines.append(f"  pass failed and skipped, its host reads stay: {failed}")
        for sync in self.sync_points:
            lines.append(_indent(str(sync), "  "))
        for aten in self.aten_graphs:
            lines.append(f"  {aten}")
            lines.extend(_indent(str(sync), "    ") for sync in aten.sync_points)
        return "\n".join(lines)


@dataclass
class GraphBreak:
    """Dynamo split a function here; code between the graphs runs in Python."""

    reason: str
    location: Location | None
    user_location: Location | None = None
    count: int = 1

    @property
    def where(self) -> Location | None:
        """The user's line that led to the break, else the break's own line."""
        return self.user_location or self.location

    def __str__(self) -> str:
        where = self.where
        text = where.describe() if where else "unknown location"
        if self.location and where != self.location:
            text += f" (inside {self.location})"
        times = f" (x{self.count})" if self.count > 1 else ""
        return f"{text}{times}\n    {self.reason}"


@dataclass
class Recompile:
    """A function compiled again because a guard of its earlier compile failed."""

    function: str
    location: Location | None
    compile_id: str
    reason: str

    def __str__(self) -> str:
        where = f" ({self.location})" if self.location else ""
        return f"{self.function}{where}: recompile {self.compile_id}\n    {self.reason}"


@dataclass
class ExplainReport:
    """Everything one explain session saw. ``str(report)`` is the readable form."""

    graphs: list[GraphReport] = field(default_factory=list)
    eager_sync_points: list[SyncPoint] = field(default_factory=list)
    graph_breaks: list[GraphBreak] = field(default_factory=list)
    recompiles: list[Recompile] = field(default_factory=list)
    host_syncs: int = 0
    host_syncs_compiling: int = 0
    host_syncs_per_call: list[int] = field(default_factory=list)
    xla_compiles: int = 0
    op_by_op_runs: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def sync_points(self) -> list[SyncPoint]:
        """Every sync point: Dynamo graphs, their AOTAutograd graphs, then eager code."""
        found = [s for g in self.graphs for s in g.sync_points]
        found += [s for g in self.graphs for a in g.aten_graphs for s in a.sync_points]
        return found + list(self.eager_sync_points)

    @property
    def host_syncs_running(self) -> int:
        """Syncs outside compilation (compiling may read constants back, once)."""
        return self.host_syncs - self.host_syncs_compiling

    @property
    def aten_graphs(self) -> list[AtenGraphReport]:
        return [a for g in self.graphs for a in g.aten_graphs]

    def __str__(self) -> str:
        syncs = self.sync_points
        removed = sum(1 for s in syncs if s.removed)
        per_call = (f"; per call: {', '.join(map(str, self.host_syncs_per_call))}"
                    if self.host_syncs_per_call else "")
        op_by_op = sum(1 for a in self.aten_graphs if a.runs_op_by_op)
        lines = [
            "syncfree_xla explain",
            f"  host syncs observed: {self.host_syncs_running} while running, "
            f"{self.host_syncs_compiling} while compiling (torch_xla "
            f"TransferFromDeviceTime{per_call})",
            f"  Dynamo graphs: {len(self.graphs)}; AOT graphs: {len(self.aten_graphs)} "
            f"({op_by_op} op by op, {self.op_by_op_runs} op-by-op runs); "
            f"XLA compiles: {self.xla_compiles}",
            f"  sync points: {len(syncs)} ({removed} removed, {len(syncs) - removed} kept); "
            f"graph breaks: {sum(b.count for b in self.graph_breaks)}; "
            f"recompiles: {len(self.recompiles)}",
        ]
        lines += [f"  note: {note}" for note in self.notes]
        if self.graphs:
            lines += ["", "Graphs"]
            lines += [_indent(str(g), "  ") for g in self.graphs]
        if self.eager_sync_points:
            lines += ["", "Outside the graphs"]
            lines += [_indent(str(s), "  ") for s in self.eager_sync_points]
        lines += ["", "Graph breaks" + ("" if self.graph_breaks else ": none")]
        lines += [_indent(str(b), "  ") for b in self.graph_breaks]
        lines += ["", "Recompiles" + ("" if self.recompiles else ": none")]
        lines += [_indent(str(r), "  ") for r in self.recompiles]
        return "\n".join(lines)


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


# --------------------------------------------------------------------------- analysis


def _is_sync_node(node: torch.fx.Node) -> bool:
    """A Dynamo-graph node that reads a device value on the host, or sizes by data."""
    if node.op == "call_method":
        if node.target in ("item", "tolist"):
            # Dynamo's own float inputs (an lr it keeps symbolic) are host numbers already
            return bool(node.args) and not is_dynamo_float_input(node.args[0])
        return node.target in _DATA_DEPENDENT_METHODS
    return node.op == "call_function" and node.target in _DATA_DEPENDENT_FUNCTIONS


def _sym_closure(root: torch.fx.Node) -> list[torch.fx.Node]:
    """``root`` and every Python-scalar (Sym) value computed from it, in graph order."""
    seen = {root}
    order = [root]
    for node in order:
        for user in node.users:
            if user not in seen and is_sym(user):
                seen.add(user)
                order.append(user)
    return order


def _leaves_graph(node: torch.fx.Node) -> bool:
    """The value is a graph output: Dynamo hands it to Python (wrapped in scalar_tensor)."""
    if node.op == "output":
        return True
    return node.target is torch.scalar_tensor and any(u.op == "output" for u in node.users)


def _sizes_a_tensor(node: torch.fx.Node) -> bool:
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    val = value(node)
    if not isinstance(val, torch.Tensor):
        return False
    try:
        return bool(free_unbacked_symbols(val))
    except Exception:  # noqa: BLE001 - advisory
        return False


@dataclass
class _DynamoRecord:
    """A Dynamo graph while the session runs; turned into a GraphReport at the end."""

    gm: torch.fx.GraphModule
    compile_id: str
    attempt: int
    syncfree_passes: bool
    end: Any  # Dynamo's GraphCompileReason, or None
    syncs: dict[torch.fx.Node, SyncPoint] = field(default_factory=dict)
    passes_fired: list[str] = field(default_factory=list)
    passes_failed: list[str] = field(default_factory=list)
    aten: list[AtenGraphReport] = field(default_factory=list)
    retraced: int = 0

    @property
    def graph_break(self) -> bool:
        return bool(getattr(self.end, "graph_break", False))

    def end_location(self) -> Location | None:
        """Where the graph ends: the graph break, or the return (the user's line)."""
        frames = _frames_from_summaries(getattr(self.end, "user_stack", None) or [])
        inner, user = _innermost(frames)
        return user or inner

    def ended_by(self) -> str:
        if self.end is None:
            return "an unknown point"
        where = self.end_location()
        what = "a graph break" if self.graph_break else "the return"
        return f"{what} at {where}" if where else what

    def why_kept(self, node: torch.fx.Node) -> str:
        if not self.syncfree_passes:
            return "syncfree passes are off here (options={'syncfree_passes': False})"
        if node.target != "item":
            return ("data-dependent shape: the op's output size depends on the values, "
                    "so it is read on the host")
        closure = _sym_closure(node)
        members = set(closure)
        consumers = [u for n in closure for u in n.users if u not in members]
        if any(_leaves_graph(u) for u in consumers):
            if self.graph_break:
                where = self.end_location()
                return ("value read on the host across a graph break"
                        + (f" (at {where})" if where else "")
                        + ": Python code after the break gets it as a number")
            return "value read on the host: the number leaves the compiled graph"
        sizing = next((u for u in consumers if _sizes_a_tensor(u)), None)
        if sizing is not None:
            return (f"data-dependent shape: the value sizes a tensor ({_where(sizing)}); "
                    "XLA compiles static shapes, so it is read on the host")
        other = next((u for u in consumers if u.target not in _CHECKS), None)
        if other is not None:
            return (f"used by {_where(other)}, which tensorify_scalar_reads cannot give a "
                    "0-d tensor instead of a Python number")
        return "no pass rewrote it"

    def to_report(self, metrics: dict[str, Any]) -> GraphReport:
        alive = set(self.gm.graph.nodes)
        syncs = []
        for node, sync in self.syncs.items():
            if sync.removed_by is None:
                reason = self.why_kept(node) if node in alive else "no pass rewrote it"
                sync = dataclasses.replace(sync, reason=reason)
            syncs.append(sync)
        metric = metrics.get(self.compile_id)
        if metric is not None and metric.co_filename:
            function = metric.co_name or ""
            location: Location | None = Location(metric.co_filename, metric.co_firstlineno or 0,
                                                 function)
        else:
            frames = _frames_from_summaries(getattr(self.end, "user_stack", None) or [])
            location = frames[0] if frames else None
            function = location.function if location else ""
        return GraphReport(
            compile_id=self.compile_id, function=function, location=location,
            ended_by=self.ended_by(), syncfree_passes=self.syncfree_passes,
            passes_fired=list(self.passes_fired), passes_failed=list(self.passes_failed),
            sync_points=syncs,
            aten_graphs=list(self.aten), retraced=self.retraced,
        )


def _split_failure(gm: torch.fx.GraphModule) -> str | None:
    """Why lowering will run ``gm`` op by op (``graph_split`` says so), or None.

    Asks the question lowering asks, on a copy: ``split`` rewrites the graph it gets.
    """
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    try:
        graph_split.split(torch.fx.GraphModule(gm, graph))
    except graph_split.UnsplittableGraph as exc:
        return str(exc)
    except Exception:  # noqa: BLE001 - lowering will report its own error
        log.debug("explain: could not pre-split %s", gm, exc_info=True)
    return None


def _aten_syncs(gm: torch.fx.GraphModule) -> list[SyncPoint]:
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in graph_split.SYNC_TARGETS:
            inner, user = _innermost(_node_frames(node))
            found.append(SyncPoint(_op_name(node), inner, user,
                                   reason="op-by-op fallback: reads a device value on the host"))
    return found


def _short_split_reason(message: str) -> str:
    """``reads a device value on the host`` out of graph_split's full message."""
    return message.split(":", 1)[0].strip()


def _compile_id() -> tuple[str | None, int]:
    trace = CompileContext.current_trace_id()
    if trace is None:
        return None, 0
    return str(trace.compile_id), trace.attempt


# --------------------------------------------------------------------------- session


class ExplainSession:
    """Records every ``syncfree_xla`` compile and the syncs observed while active.

    Use as a context manager around any code (``with ExplainSession() as s: ...``),
    then :meth:`report`. Sessions nest; each sees everything compiled inside it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[_DynamoRecord] = []
        self._current: _DynamoRecord | None = None
        self._orphans: list[AtenGraphReport] = []
        self._eager: dict[tuple, SyncPoint] = {}
        self._metrics: dict[int, Any] = {}
        self._metrics_before: list[Any] = []
        self._breaks_before: list[Any] = []
        self._breaks: list[Any] = []
        self._per_call: list[int] = []
        self._start: tuple[int, int, float] = (0, 0, 0.0)
        self._compile_syncs = 0
        self._compile_start: int | None = None
        self._end: tuple[int, int, float] | None = None
        self._active = False

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
        self._drain_dynamo()
        self._end = self._counts()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Calls ``fn`` and records the host syncs of this one call."""
        before = xla_metrics.device_to_host_transfers()
        try:
            return fn(*args, **kwargs)
        finally:
            self._per_call.append(xla_metrics.device_to_host_transfers() - before)

    @staticmethod
    def _counts() -> tuple[int, int, float]:
        return (xla_metrics.device_to_host_transfers(), xla_metrics.compiles(),
                counters.counter(counters.EAGER_FALLBACKS))

    # -- hooks (called by Dynamo, backend.py and passes/pipeline.py)

    def _on_compile_start(self, args: Any) -> None:
        """Dynamo starts compiling: transfers from here on are compile-time, not steps'."""
        self._compile_start = xla_metrics.device_to_host_transfers()

    def _on_compile_end(self, args: Any) -> None:
        if self._compile_start is not None:
            self._compile_syncs += xla_metrics.device_to_host_transfers() - self._compile_start
            self._compile_start = None

    def on_dynamo_graph(self, gm: torch.fx.GraphModule, options: Any) -> None:
        """A Dynamo graph, before the passes: notes its sync points."""
        compile_id, attempt = _compile_id()
        record = _DynamoRecord(
            gm=gm, compile_id=compile_id or f"?{len(self._records)}", attempt=attempt,
            syncfree_passes=bool(getattr(options, "syncfree_passes", True)),
            end=getattr(gm, "compile_subgraph_reason", None),
        )
        for node in gm.graph.nodes:
            if _is_sync_node(node):
                inner, user = _innermost(_node_frames(node))
                record.syncs[node] = SyncPoint(_op_name(node), inner, user)
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

    def on_aten_graph(self, name: str, gm: torch.fx.GraphModule) -> None:
        """An AOTAutograd graph, before lowering: will it run as one computation?"""
        failure = _split_failure(gm)
        report = AtenGraphReport(
            name=name,
            fallback_reason=_short_split_reason(failure) if failure else None,
            sync_points=_aten_syncs(gm),
            eager_ops=list(dict.fromkeys(partition.op_name(n)
                                         for n in partition.unsupported_nodes(gm))),
        )
        compile_id, _ = _compile_id()
        with self._lock:
            owner = next((r for r in reversed(self._records) if r.compile_id == compile_id),
                         None)
            if owner is None and self._records:
                owner = self._records[-1]
            (owner.aten if owner is not None else self._orphans).append(report)

    # -- GradScaler

    def _grad_scaler_step(self, optimizer: torch.optim.Optimizer, masked: bool) -> None:
        inner, user = _innermost(_frames_from_summaries(traceback.extract_stack()))
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
                graph_breaks=_graph_breaks(self._breaks),
                recompiles=_recompiles(metrics),
                host_syncs=end[0] - self._start[0],
                host_syncs_compiling=self._compile_syncs,
                host_syncs_per_call=list(self._per_call),
                xla_compiles=end[1] - self._start[1],
                op_by_op_runs=int(end[2] - self._start[2]),
            )
            if self._orphans:
                report.graphs.append(GraphReport("?", "", None, "an unknown point", True,
                                                 aten_graphs=list(self._orphans)))
        if not graphs:
            report.notes.append(
                "no graph reached syncfree_xla: nothing was compiled with it while the "
                "session ran (already compiled before? call torch._dynamo.reset() first)")
        for metric in metrics:
            if _hit_recompile_limit(metric):
                name = _frame_code(metric, metrics)[0]
                report.notes.append(f"{name}: recompile limit reached; Dynamo now runs it "
                                    "without compiling")
        if report.host_syncs < report.host_syncs_compiling or report.host_syncs < 0:
            report.notes.append("torch_xla's metrics were cleared during the session: "
                                "the sync counts are incomplete")
        return report


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


def _graph_breaks(reasons: Sequence[Any]) -> list[GraphBreak]:
    """Dynamo's GraphCompileReasons, one entry per reason and place, counted."""
    merged: dict[tuple, GraphBreak] = {}
    for reason in reasons:
        frames = _frames_from_summaries(getattr(reason, "user_stack", None) or [])
        inner, user = _innermost(frames)
        text = _break_reason(str(getattr(reason, "reason", reason)))
        key = (text, inner)
        if key in merged:
            merged[key].count += 1
        else:
            merged[key] = GraphBreak(text, inner, user)
    return list(merged.values())


def _break_reason(text: str) -> str:
    """Dynamo's headline, plus its ``Explanation:`` line when it has one."""
    headline = _first_line(text)
    match = re.search(r"^\s*Explanation:\s*(\S.*)$", text, re.MULTILINE)
    return f"{headline}: {match[1].strip()}" if match else headline


def _frame_code(metric: Any, metrics: Sequence[Any]) -> tuple[str, Location | None]:
    """(function name, where it is defined) of a metric's frame.

    A failed compile's entry may lack them; another entry of the same frame has them.
    """
    frame = str(metric.compile_id).split("/")[0]
    for candidate in (metric, *metrics):
        if candidate.co_filename and str(candidate.compile_id).split("/")[0] == frame:
            name = candidate.co_name or "?"
            return name, Location(candidate.co_filename, candidate.co_firstlineno or 0, name)
    return "?", None


def _recompiles(metrics: Sequence[Any]) -> list[Recompile]:
    found = []
    for metric in metrics:
        reason = getattr(metric, "recompile_reason", None)
        if not reason:
            continue
        name, location = _frame_code(metric, metrics)
        text = _guard_failure(reason)
        if _hit_recompile_limit(metric):
            text += "; the recompile limit was reached, so this call ran without compiling"
        found.append(Recompile(name, location, str(metric.compile_id), text))
    return found


def _hit_recompile_limit(metric: Any) -> bool:
    return re.search(r"recompile[ _]limit", str(getattr(metric, "fail_reason", "") or ""),
                     re.IGNORECASE) is not None


_GUARD_FAILURE = re.compile(r"^(?P<id>\d+/\d+): (?P<guard>[^#]*?)\s*#\s*(?P<code>[^#]*?)\s*"
                            r"#\s*(?P<where>.*)$")


def _guard_failure(reason: str) -> str:
    """Dynamo's ``0/0: scale == 0.5   # code  # file:line in fn`` in a sentence."""
    text = re.sub(r"[ \t]+", " ", reason.strip())
    match = _GUARD_FAILURE.match(text) if "\n" not in text else None
    if match is None:
        return "guard failed: " + re.sub(r"\s+", " ", text)
    return (f"guard `{match['guard']}` of compile {match['id']} failed "
            f"(guarding `{match['code']}` at {match['where']})")


# --------------------------------------------------------------------------- entry points


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


class StepLimitReached(BaseException):
    """Ends a script after ``--steps`` calls; a BaseException so ``except Exception``
    in the script does not swallow it."""


@dataclass
class ScriptRun:
    """What ``syncfree-xla explain script.py`` saw: the report and how the script ended."""

    report: ExplainReport
    exit_code: int
    error: BaseException | None = None
    traceback: str = ""
    steps_run: int | None = None


def _is_ours(backend_arg: Any) -> bool:
    return backend_arg == "syncfree_xla" or getattr(backend_arg, "__name__", "") == "syncfree_xla"


class _StepCounter:
    """Counts calls of every function compiled with syncfree_xla; stops at the limit.

    Installed only for ``--steps``: it wraps ``torch.compile`` for the script's run.
    A compiled module gets a forward pre-hook (it stays the same object); a compiled
    function is wrapped with ``functools.wraps``.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.most = 0
        self._calls: dict[int, int] = {}

    def tick(self, key: int) -> None:
        calls = self._calls.get(key, 0)
        if calls >= self.limit:
            raise StepLimitReached(f"stopped after {self.limit} steps")
        self._calls[key] = calls + 1
        self.most = max(self.most, calls + 1)

    def wrap(self, compiled: Any) -> Any:
        key = id(compiled)
        if isinstance(compiled, torch.nn.Module):
            compiled.register_forward_pre_hook(lambda module, args: self.tick(key))
            return compiled

        @functools.wraps(compiled)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.tick(key)
            return compiled(*args, **kwargs)

        return counted

    def install(self) -> Callable[..., Any]:
        real = torch.compile

        @functools.wraps(real)
        def compile(model: Any = None, **kwargs: Any) -> Any:
            if model is None:  # decorator form: torch calls compile(model, ...) again
                return real(**kwargs)
            compiled = real(model, **kwargs)
            return self.wrap(compiled) if _is_ours(kwargs.get("backend")) else compiled

        torch.compile = compile  # type: ignore[assignment]
        return real


def _script_traceback(exc: BaseException, script: str) -> str:
    """The traceback from the script's own frames on (runpy's and ours left out)."""
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != script:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


@contextlib.contextmanager
def _as_main(script: str, argv: Sequence[str]) -> Iterator[None]:
    """``sys.argv`` and ``sys.path[0]`` as ``python script.py ARGS`` would have them."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(script))
    try:
        yield
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


def run_script(path: str | os.PathLike[str], argv: Sequence[str] = (),
               steps: int | None = None) -> ScriptRun:
    """Runs a user's script as ``__main__`` inside an :class:`ExplainSession`.

    The script needs no change: every ``torch.compile(..., backend="syncfree_xla")``
    in it is recorded. With ``steps``, the script is stopped once any function it
    compiled with syncfree_xla is about to be called the ``steps + 1``-th time.
    An exception from the script is returned (with its traceback), not raised.
    Raises FileNotFoundError when ``path`` is not a file.
    """
    script = os.path.abspath(os.fspath(path))
    if not Path(script).is_file():
        raise FileNotFoundError(f"no such script: {os.fspath(path)}")
    counter = _StepCounter(steps) if steps is not None else None
    real_compile = counter.install() if counter is not None else None
    error: BaseException | None = None
    exit_code = 0
    text = ""
    try:
        with ExplainSession() as session, _as_main(script, argv):
            try:
                runpy.run_path(script, run_name="__main__")
            except StepLimitReached:
                pass
            except SystemExit as exc:
                if exc.code not in (None, 0):
                    error = exc
                    exit_code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:  # noqa: BLE001 - the user's error, reported
                error, exit_code = exc, 130 if isinstance(exc, KeyboardInterrupt) else 1
                text = _script_traceback(exc, script)
    finally:
        if real_compile is not None:
            torch.compile = real_compile  # type: ignore[assignment]
    report = session.report()
    steps_run = counter.most if counter is not None else None
    if counter is not None and steps_run is not None and steps_run >= counter.limit:
        report.notes.append(f"script stopped after {steps_run} steps (--steps)")
    return ScriptRun(report, exit_code, error, text, steps_run)
