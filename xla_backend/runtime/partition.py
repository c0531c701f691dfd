"""Cuts an aten graph around ops torch_xla cannot lower: compiled segments, eager ops between.

torch_xla runs an aten op that has no XLA lowering through its CPU fallback. In an
op-by-op program that is only slow, but our graphs are traced once on stand-in buffers:
the fallback would copy the stand-ins to the host, compute on them and put the result
into the trace as a constant, so every replay would return that one stale value.

So such ops never reach a trace. They are found per node before tracing
(``unsupported_nodes``: no XLA kernel and no composite kernel that XLA can run), and,
as a safety net, by torch_xla's fallback counters during every trace
(``lower.trace.OpsFellBackInTrace``); a trace that fell back is discarded and the graph is
probed node by node to find the culprits.

The graph is then run as a sequence of stages. Each supported node gets a level: the
number of unsupported ops on its longest path from the inputs. The nodes of one level
form a segment, lowered with ``LoweredGraph`` (traced, compiled and replayed like any
graph); the unsupported ops of level k run after segment k. An unsupported op runs on
the CPU: its XLA inputs are copied to the host, the op runs there and its tensor
results are copied back. That is one device-to-host transfer per input, chosen over
torch_xla's own op-by-op fallback because it is explicit, and it does the same copies.

Input mutations (AOTAutograd's trailing ``copy_`` into inputs) all go to the last
segment, which runs after every eager op, so no stage reads an input that an earlier
stage already overwrote.
"""

from __future__ import annotations

import functools
import logging
import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import unset_fake_temporarily

from passes.pipeline import copy_graph

from .. import counters, xla_metrics
from ..lower.executable import any_symbolic, placeholder_tensor, trace_lock
from ..lower.split import SYNC_TARGETS, UnsplittableGraph
from ..lower.trace import OpsFellBackInTrace
from ..options import Options
from ..warn_once import WarnOnce
from . import step
from .graph import LoweredGraph, xla_device

log = logging.getLogger(__name__)

_no_lowering = WarnOnce(log)
_op_by_op = WarnOnce(log)


@functools.cache
def has_xla_lowering(op: torch._ops.OpOverload) -> bool:
    """Whether dispatching ``op`` on XLA tensors reaches something other than the fallback.

    An XLA kernel lowers it; a CompositeImplicitAutograd or CompositeExplicitAutograd
    kernel decomposes it into other ops, which the trace's safety net checks. The
    CompositeExplicitAutogradNonFunctional kernels do not apply to XLA.
    """
    name = op._schema.name
    if op._overloadname != "default":
        name += "." + op._overloadname
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return any(has(name, key) for key in
               ("XLA", "CompositeImplicitAutograd", "CompositeExplicitAutograd"))


def op_name(node: torch.fx.Node) -> str:
    """``aten.histc``: how warnings and reports name the op of ``node``."""
    target = node.target
    packet = getattr(target, "overloadpacket", None)
    return str(packet) if packet is not None else str(target)


def _touches_device(node: torch.fx.Node) -> bool:
    values = [node.meta.get("val")] + [n.meta.get("val") for n in node.all_input_nodes]
    return any(isinstance(leaf, torch.Tensor) and leaf.device.type == "xla"
               for leaf in pytree.tree_leaves(values))


def unsupported_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    """The nodes of ``gm`` on the XLA device whose op has no XLA lowering.

    Ops on host (CPU) values are left out: ``lower.split`` runs those eagerly anyway.
    """
    return [node for node in gm.graph.nodes
            if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and not has_xla_lowering(node.target) and _touches_device(node)]


def warn_once(names: Sequence[str]) -> None:
    """Logs one warning per op name for the whole process, however many graphs hold it."""
    for name in dict.fromkeys(names):
        if not _no_lowering.seen(name):
            _no_lowering(name, "syncfree_xla: %s has no XLA lowering; it runs eagerly, "
                         "outside the compiled graph", name)


def probe(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
          device: torch.device) -> list[torch.fx.Node] | None:
    """The nodes that make torch_xla fall back, found by running ``gm`` node by node.

    Runs on stand-in buffers, as a trace does, and reads torch_xla's fallback counters
    after each node. None when the examples carry symbolic sizes.
    """
    if any_symbolic(example_inputs):
        return None
    found: list[torch.fx.Node] = []

    class _Probe(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            before = xla_metrics.fallback_counts()
            result = super().run_node(n)
            if n.op == "call_function" and xla_metrics.fell_back_since(before):
                found.append(n)
            return result

    with unset_fake_temporarily(), trace_lock, torch.no_grad():
        standins = [_standin(e, device) for e in example_inputs]
        _Probe(gm).run(*standins)
    return found


def _standin(example: Any, device: torch.device) -> Any:
    if not isinstance(example, torch.Tensor):
        return example
    if example.device.type == "xla":
        return placeholder_tensor(example, device)
    return torch.zeros(tuple(example.shape), dtype=example.dtype)


def lower_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], name: str,
                fallback: str, options: Options | None,
                fresh: Callable[[], torch.fx.GraphModule]) -> Callable[[list[Any]], Any]:
    """One compiled graph, or compiled segments around the ops XLA cannot lower.

    Lowering rewrites the graph it is given; ``fresh`` makes a new copy of ``gm`` as it
    came, asked for only when a try fails (a copy walks every node of a large graph).
    Raises ``UnsplittableGraph`` when neither works (the caller runs the graph op by
    op) or, with ``fallback="error"``, when an op has no lowering.
    """
    eager = unsupported_nodes(gm)
    if not eager:
        try:
            return LoweredGraph(gm, example_inputs, name, options)
        except OpsFellBackInTrace as exc:
            log.debug("syncfree_xla: %s fell back while tracing (%s); probing", name,
                      str(exc))  # text: see warn_once.WarnOnce
        gm = fresh()
        eager = probe(gm, example_inputs, xla_device()) or []
        if not eager:
            raise UnsplittableGraph("torch_xla fell back to the CPU for an op that could "
                                    "not be told apart from the others")
    names = [op_name(n) for n in eager]
    if fallback == "error":
        raise UnsplittableGraph("no XLA lowering for " + ", ".join(dict.fromkeys(names)))
    warn_once(names)
    try:
        return PartitionedGraph(gm, example_inputs, eager, name, options)
    except OpsFellBackInTrace as exc:
        pristine = fresh()
        found = probe(pristine, example_inputs, xla_device())
        if not found:
            raise UnsplittableGraph(str(exc)) from exc
        eager_names = {n.name for n in eager} | {n.name for n in found}
        eager = [n for n in pristine.graph.nodes if n.name in eager_names]
        warn_once([op_name(n) for n in eager])
        try:
            return PartitionedGraph(pristine, example_inputs, eager, name, options)
        except OpsFellBackInTrace as again:
            raise UnsplittableGraph(str(again)) from again


def _is_input_mutation(node: torch.fx.Node) -> bool:
    return (node.op == "call_function" and node.target is torch.ops.aten.copy_.default
            and node.args[0].op == "placeholder" and not node.users)


class _Segment:
    """A compiled piece: which values it reads and which it hands on."""

    def __init__(self, run: Callable[[list[Any]], Any] | None, inputs: list[torch.fx.Node],
                 outputs: list[torch.fx.Node], build: Callable[[list[Any]], Callable] | None):
        self.run = run
        self.inputs = inputs
        self.outputs = outputs
        self.build = build  # set when the segment waits for real inputs (symbolic sizes)


class PartitionedGraph:
    """A boxed callable running compiled segments and, between them, ops XLA cannot lower."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                 eager: Sequence[torch.fx.Node], name: str = "graph",
                 options: Options | None = None) -> None:
        self.name = name
        self._device = xla_device()
        self._placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self._output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
        self._counted = set(eager)
        # tuple results stay in Python: their getitems run next to the op, not compiled
        eager_set = set(eager)
        for node in gm.graph.nodes:
            if node.target is operator.getitem and node.args[0] in eager_set:
                eager_set.add(node)
        levels = self._levels(gm, eager_set)
        examples = dict(zip(self._placeholders, example_inputs))
        symbolic = any_symbolic(example_inputs)
        # stages in run order: ("segment", _Segment) or ("eager", node)
        self._stages: list[tuple[str, Any]] = []
        for level in range(max(levels.values(), default=0) + 1):
            members = [n for n in gm.graph.nodes if levels.get(n) == level
                       and n not in eager_set and n.op != "placeholder"]
            if members:
                segment = self._segment(gm, members, examples, symbolic,
                                        f"{name} segment {level}", options)
                self._stages.append(("segment", segment))
            self._stages += [("eager", n) for n in gm.graph.nodes
                             if n in eager_set and levels[n] == level]
        counters.incr(counters.GRAPHS_PARTITIONED)
        log.info("syncfree_xla: %s runs as %d compiled segments around %d eager ops",
                 name, sum(kind == "segment" for kind, _ in self._stages), len(self._counted))

    @staticmethod
    def _levels(gm: torch.fx.GraphModule, eager: set[torch.fx.Node]) -> dict[torch.fx.Node, int]:
        """Per node, how many eager ops lie on its longest path from the inputs."""
        levels: dict[torch.fx.Node, int] = {}
        mutations = []
        for node in gm.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                levels[node] = 0
            elif node.op == "call_function":
                if _is_input_mutation(node):
                    mutations.append(node)
                    continue
                levels[node] = max((levels[i] + (i in eager and node not in eager)
                                    for i in node.all_input_nodes), default=0)
        last = max([levels[n] for n in levels if n not in eager]
                   + [levels[n] + 1 for n in eager], default=0)
        for node in mutations:
            levels[node] = last
        return levels

    def _segment(self, gm: torch.fx.GraphModule, members: list[torch.fx.Node],
                 examples: dict[torch.fx.Node, Any], symbolic: bool, name: str,
                 options: Options | None) -> _Segment:
        inside = set(members)
        inputs: list[torch.fx.Node] = []
        for node in members:
            for i in node.all_input_nodes:
                if i not in inside and i not in inputs:
                    inputs.append(i)
        final = set(n for n in pytree.tree_leaves(self._output) if isinstance(n, torch.fx.Node))
        outputs = [n for n in members if n in final or any(u not in inside for u in n.users)]
        graph = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for node in inputs:
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
        for node in members:
            env[node] = graph.node_copy(node, lambda n: env[n])
        graph.output(tuple(env[n] for n in outputs))
        segment_gm = torch.fx.GraphModule(gm, graph)

        def build(args: list[Any]) -> Callable:
            return LoweredGraph(segment_gm, args, name, options)

        if symbolic:
            return _Segment(None, inputs, outputs, build)
        segment_examples = [examples[n] if n in examples else n.meta.get("val") for n in inputs]
        return _Segment(build(segment_examples), inputs, outputs, None)

    def __call__(self, args: list[Any]) -> Any:
        env: dict[torch.fx.Node, Any] = dict(zip(self._placeholders, args))
        with torch.no_grad():
            for kind, stage in self._stages:
                if kind == "eager":
                    env[stage] = self._run_eager(stage, env)
                    continue
                segment_args = [env[n] for n in stage.inputs]
                if stage.run is None:
                    stage.run = stage.build(segment_args)
                results = stage.run(segment_args)
                env.update(zip(stage.outputs, results))
        return torch.fx.node.map_arg(self._output, lambda n: env[n])

    def _run_eager(self, node: torch.fx.Node, env: dict[torch.fx.Node, Any]) -> Any:
        """Runs one op on the CPU: XLA inputs copied to the host, tensor results copied back."""
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
        if node not in self._counted:  # a getitem of an eager op's tuple
            return node.target(*args, **kwargs)
        counters.incr(counters.OP_FALLBACK_EXECUTIONS)

        def to_host(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.device.type == "xla":
                return v.cpu()
            if isinstance(v, torch.device) and v.type == "xla":
                return torch.device("cpu")
            return v

        # the joined step so far runs first, as one execution: the copies below then
        # read buffers instead of running the pending IR they depend on a second time
        step.joiner.flush(self._device, cut=True)
        args, kwargs = pytree.tree_map(to_host, (args, kwargs))
        result = node.target(*args, **kwargs)
        leaves, spec = pytree.tree_flatten(result)
        wanted = pytree.tree_leaves(node.meta.get("val"))
        if len(wanted) != len(leaves):
            wanted = [None] * len(leaves)
        back = [
            v.to(self._device)
            if isinstance(v, torch.Tensor) and not (isinstance(w, torch.Tensor)
                                                    and w.device.type == "cpu")
            else v
            for v, w in zip(leaves, wanted)
        ]
        return pytree.tree_unflatten(back, spec)


class EagerOnXla:
    """Runs the graph op by op on XLA tensors (torch_xla lazy mode): slow but general."""

    def __init__(self, gm: torch.fx.GraphModule, reason: str, name: str) -> None:
        self._gm = gm
        message = "syncfree_xla: running %s op by op instead of as one computation: %s"
        if _reads_only(gm):  # a loop logging loss.item(): no computation to lose
            log.debug(message, name, reason)
        else:  # once per reason: a recompiled graph (a new lr, a new shape) says it again
            _op_by_op(reason, message, name, reason)

    def __call__(self, args: list[Any]) -> Any:
        counters.incr(counters.EAGER_FALLBACKS)
        with torch.no_grad():
            return self._gm(*args)


#: Ops that read a device value for the host, or pass a tensor through unchanged.
_READ_OR_PASS = SYNC_TARGETS | {torch.ops.aten.detach.default, torch.ops.aten.alias.default}


def _reads_only(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph's only device work is reading values on the host: the rest
    passes tensors through or runs on the host with what it read."""
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in _READ_OR_PASS:
            continue
        value = node.meta.get("val")
        leaves = pytree.tree_leaves(value)
        if value is None or any(isinstance(v, torch.Tensor) and v.device.type != "cpu"
                                for v in leaves):
            return False
    return True


def lower(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], name: str = "graph",
          fallback: str = "warn", options: Options | None = None) -> Callable[[list[Any]], Any]:
    """The lowering entry point: a compiled graph, compiled segments around ops XLA
    cannot lower (this module), or a logged op-by-op fallback.

    ``fallback="error"`` raises instead of running a graph op by op. ``options`` chooses
    the graph cache (None: defaults and ``SYNCFREE_XLA_*`` variables).
    """
    fallback_gm = torch.fx.GraphModule(gm, copy_graph(gm.graph))
    try:
        return lower_graph(gm, example_inputs, name, fallback, options,
                           lambda: torch.fx.GraphModule(fallback_gm, copy_graph(fallback_gm.graph)))
    except UnsplittableGraph as exc:
        if fallback == "error":
            raise
        return EagerOnXla(fallback_gm, str(exc), name)
