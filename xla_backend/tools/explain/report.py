"""What an explain session reports: plain dataclasses and their readable ``str()``.

Kept apart from the recording (``session``) and the graph analysis (``analysis``) so the
report can be built, read and printed without any hooks installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .location import Location

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
    aot: str | None = None  # what the AOTAutograd cache did with it

    def __str__(self) -> str:
        where = f" ({self.location})" if self.location else ""
        lines = [f"Dynamo graph {self.compile_id}: {self.function or '?'}{where}, "
                 f"ends at {self.ended_by}"]
        if self.retraced:
            lines.append(f"  traced {self.retraced + 1} times (Dynamo restarted its analysis)")
        if self.aot:
            lines.append(f"  AOTAutograd: {self.aot}")
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
    steps_joined: int = 0  # steps run as one computation (join_graphs)
    graphs_joined: int = 0  # graph calls those steps joined
    steps_cut: int = 0  # joined steps a host read or a host op ran in parts
    last_step: list[str] = field(default_factory=list)  # the graphs the last step joined
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
            f"graph breaks: {_breaks(self.graph_breaks)}; "
            f"recompiles: {len(self.recompiles)}",
        ]
        lines.append("  " + self._steps_line())
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

    def _steps_line(self) -> str:
        """Whether the steps ran as one computation each, which graphs, and why not."""
        if not self.steps_joined:
            return ("one computation per step: no step was joined (join_graphs is off, "
                    "or no graph ran): each graph runs as an execution of its own")
        per_step = self.graphs_joined / self.steps_joined
        text = (f"one computation per step: {self.steps_joined} steps joined into one XLA "
                f"computation each, of {per_step:.1f} graph calls on average")
        if self.last_step:
            text += f"; the last one joined {', '.join(self.last_step)}"
        if self.steps_cut:
            text += (f"; {self.steps_cut} steps were cut into more executions by a host "
                     f"read or an op that runs on the host (see the sync points below)")
        return text


def _breaks(breaks: list[GraphBreak]) -> str:
    """Distinct places, as budgets count them, and how often Dynamo broke there."""
    places, hits = len(breaks), sum(b.count for b in breaks)
    return str(hits) if hits == places else f"{places} place{'s' * (places != 1)} ({hits} breaks)"


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())
