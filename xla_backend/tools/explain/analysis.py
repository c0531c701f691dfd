"""What an FX graph says about its syncs: which nodes read on the host, and why they stay.

Reads the Dynamo graphs handed to ``syncfree_xla`` (before and after the passes) and the
AOTAutograd graphs before lowering; records nothing itself (``session`` does).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from passes.dynamo_graph import is_dynamo_float_input, is_sym, value

from ...lower import split as graph_split
from ...runtime import partition
from .location import Location, frames_from_summaries, innermost, node_frames, op_name
from .report import AtenGraphReport, GraphReport, SyncPoint

log = logging.getLogger(__name__)

_DATA_DEPENDENT_METHODS = frozenset({"nonzero", "masked_select", "unique"})
_DATA_DEPENDENT_FUNCTIONS = frozenset({torch.nonzero, torch.masked_select, torch.unique})
_CHECKS = frozenset({torch._check, torch._check_is_size})


def _where(node: torch.fx.Node) -> str:
    inner, user = innermost(node_frames(node))
    loc = user or inner
    return f"`{op_name(node)}` at {loc}" if loc else f"`{op_name(node)}`"


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
class DynamoRecord:
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
    aot: str | None = None  # what the AOTAutograd cache did with it

    @property
    def graph_break(self) -> bool:
        return bool(getattr(self.end, "graph_break", False))

    def end_location(self) -> Location | None:
        """Where the graph ends: the graph break, or the return (the user's line)."""
        frames = frames_from_summaries(getattr(self.end, "user_stack", None) or [])
        inner, user = innermost(frames)
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
            frames = frames_from_summaries(getattr(self.end, "user_stack", None) or [])
            location = frames[0] if frames else None
            function = location.function if location else ""
        return GraphReport(
            compile_id=self.compile_id, function=function, location=location,
            ended_by=self.ended_by(), syncfree_passes=self.syncfree_passes,
            passes_fired=list(self.passes_fired), passes_failed=list(self.passes_failed),
            sync_points=syncs,
            aten_graphs=list(self.aten), retraced=self.retraced, aot=self.aot,
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
            inner, user = innermost(node_frames(node))
            found.append(SyncPoint(op_name(node), inner, user,
                                   reason="op-by-op fallback: reads a device value on the host"))
    return found


def _short_split_reason(message: str) -> str:
    """``reads a device value on the host`` out of graph_split's full message."""
    return message.split(":", 1)[0].strip()


def dynamo_sync_points(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, SyncPoint]:
    """The sync points of a Dynamo graph (``.item()``, data-dependent shapes), by node."""
    found = {}
    for node in gm.graph.nodes:
        if _is_sync_node(node):
            inner, user = innermost(node_frames(node))
            found[node] = SyncPoint(op_name(node), inner, user)
    return found


def aten_graph_report(name: str, gm: torch.fx.GraphModule) -> AtenGraphReport:
    """An AOTAutograd graph before lowering: one computation or op by op, and its syncs."""
    failure = _split_failure(gm)
    return AtenGraphReport(
        name=name,
        fallback_reason=_short_split_reason(failure) if failure else None,
        sync_points=_aten_syncs(gm),
        eager_ops=list(dict.fromkeys(partition.op_name(n)
                                     for n in partition.unsupported_nodes(gm))),
    )
