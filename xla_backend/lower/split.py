"""Splits an aten FX graph into the part that runs on the host and the part for XLA.

AOTAutograd graphs mix devices: optimizers keep their ``step`` counters in 0-d CPU
tensors, and the bias corrections derived from them are CPU scalars too. Tracing
those CPU ops into the XLA computation would bake one step's value in as a
constant, so they run eagerly on the host each call instead, and only their
results cross to the device. Anything that would need a value back from the
device (``.item()``, a copy to CPU) is reported, never traced.

This module knows FX and torch devices only; nothing here touches torch_xla.
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

HOST = "host"
DEVICE = "device"
SCALAR = "scalar"

_COPY_TARGETS = (torch.ops.aten.copy_.default,)
#: ``param.data = value`` (a momentum encoder's update in MoCo, BYOL, DINO): AOTAutograd
#: keeps it as ``set_``, which rebinds the input to ``value`` as an update does.
_SET_TARGETS = (torch.ops.aten.set_.source_Tensor,)
#: aten ops whose result needs a value on the host: a device-to-host transfer.
SYNC_TARGETS = {
    torch.ops.aten._local_scalar_dense.default,
    torch.ops.aten.item.default,
    torch.ops.aten.equal.default,
    torch.ops.aten.is_nonzero.default,
    torch.ops.aten.nonzero.default,
    torch.ops.aten.masked_select.default,
}


class UnsplittableGraph(Exception):
    """The graph cannot run as one device computation; the message says why."""


@dataclass(frozen=True)
class OutputSlot:
    """Where one output of the original graph comes from after the split."""

    kind: str  # "device", "host", "input", "const"
    index: int = 0
    value: Any = None


@dataclass
class SplitGraph:
    host: torch.fx.GraphModule | None
    host_inputs: list[int]
    device: torch.fx.GraphModule
    # ("arg", i): device tensor arg, ("cpu_arg", i), ("host", k) a host result,
    # ("scalar", i): a Python number or symbolic size, traced in as a constant
    device_inputs: list[tuple[str, int]]
    device_mutations: dict[int, int]  # arg index -> device output index
    outputs: list[OutputSlot]
    output_is_sequence: bool
    scalar_inputs: list[int] = field(default_factory=list)  # the numbers the device part reads


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def _devices(value: Any) -> set[str]:
    return {leaf.device.type for leaf in _leaves(value) if isinstance(leaf, torch.Tensor)}


def _describe(node: torch.fx.Node) -> str:
    stack = node.meta.get("stack_trace", "")
    where = stack.strip().splitlines()[-2].strip() if stack.strip() else ""
    return f"{node.format_node()}" + (f" ({where})" if where else "")


def classify(gm: torch.fx.GraphModule) -> dict[torch.fx.Node, str]:
    """Assigns each node to the host, the device, or scalar (shape arithmetic)."""
    kinds: dict[torch.fx.Node, str] = {}
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        val = _val(node)
        devices = _devices(val)
        if node.op == "placeholder":
            if not devices:
                kinds[node] = SCALAR
            elif devices == {"cpu"}:
                kinds[node] = HOST
            else:
                kinds[node] = DEVICE
            continue
        if node.op == "get_attr":
            kinds[node] = SCALAR
            continue
        if node.target in SYNC_TARGETS:
            raise UnsplittableGraph(f"reads a device value on the host: {_describe(node)}")
        inputs = {kinds[n] for n in node.all_input_nodes}
        if DEVICE in inputs:
            if "cpu" in devices or (not devices and node.target is not operator.getitem
                                    and val is not None and not _is_shape_value(node)):
                raise UnsplittableGraph(f"moves a device value to the host: {_describe(node)}")
            kinds[node] = DEVICE
        elif HOST in inputs:
            kinds[node] = DEVICE if devices - {"cpu"} else HOST
        elif devices - {"cpu"}:
            kinds[node] = DEVICE
        else:
            kinds[node] = SCALAR
    return kinds


def _merge_duplicate_host_nodes(gm: torch.fx.GraphModule, kinds: dict[torch.fx.Node, str]) -> None:
    """Computes each distinct host value once (common subexpressions, host part only).

    The host part runs eagerly at every call, and each of its results the device reads
    is one more upload and one more parameter. A foreach optimizer with a scheduled
    float lr casts the same lr once per parameter: 28 identical ``_to_copy`` nodes for a
    28-tensor model. Only pure ops merge (no in-place write, not seeded-random), none
    across an op that writes to anything, and nothing in a graph that writes into a
    value it computed (a merged value could then be changed under another reader);
    AOTAutograd's graphs write only into their inputs.
    """
    writes = [_written(node) for node in gm.graph.nodes]
    if any(w.op != "placeholder" for ws in writes if ws is not None for w in ws):
        return
    seen: dict[tuple[Any, ...], torch.fx.Node] = {}
    for node, written in zip(list(gm.graph.nodes), writes):
        if written is not None:
            seen.clear()
            continue
        if (node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload)
                or kinds.get(node) != HOST
                or torch.Tag.nondeterministic_seeded in node.target.tags):
            continue
        key = (node.target, _frozen(node.args), _frozen(node.kwargs))
        first = seen.setdefault(key, node)
        if first is not node:
            node.replace_all_uses_with(first)
            gm.graph.erase_node(node)
            kinds.pop(node, None)


def _written(node: torch.fx.Node) -> list[torch.fx.Node] | None:
    """The nodes an op writes into in place (its ``Tensor(a!)`` arguments); None if it
    writes nothing."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    written: list[torch.fx.Node] | None = None
    for position, arg in enumerate(node.target._schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = node.args[position] if position < len(node.args) else node.kwargs.get(arg.name)
        written = (written or []) + [v for v in _leaves(value) if isinstance(v, torch.fx.Node)]
    return written


def _frozen(value: Any) -> Any:
    """A hashable key for an FX argument that tells apart what compares equal in Python
    but computes differently (1, 1.0 and True; 0.0 and -0.0)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _frozen(v)) for k, v in value.items())))
    if isinstance(value, float):
        return ("float", value.hex())
    if isinstance(value, (bool, int, str)) or value is None:
        return (type(value).__name__, value)
    if isinstance(value, (torch.fx.Node, torch.dtype, torch.device, torch.layout,
                          torch.memory_format)):
        return value
    return ("id", id(value))  # anything else merges only with itself


def _is_shape_value(node: torch.fx.Node) -> bool:
    return str(node.target).startswith("aten.sym_") or node.target in (
        torch.ops.aten.sym_size.int,
        torch.ops.aten.sym_numel.default,
        torch.ops.aten.sym_stride.int,
    )


def _extract_input_mutations(
    gm: torch.fx.GraphModule, kinds: dict[torch.fx.Node, str]
) -> dict[torch.fx.Node, torch.fx.Node]:
    """Removes ``copy_(device_input, value)`` epilogues; returns input -> new value.

    AOTAutograd keeps input mutations as trailing ``copy_`` nodes. In a replayed
    XLA computation there is no input buffer to write into, so the new value
    becomes an extra output and the runtime rebinds the caller's tensor to it.
    """
    mutations: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _COPY_TARGETS + _SET_TARGETS:
            continue
        dst, src = node.args[0], node.args[1]
        if dst.op != "placeholder" or kinds.get(dst) != DEVICE:
            continue
        if node.target in _SET_TARGETS and not _replaces_in_kind(dst, src):
            continue
        if _val(src) is not None and (_val(src).shape != _val(dst).shape
                                      or _val(src).dtype != _val(dst).dtype):
            with gm.graph.inserting_before(node):
                src = gm.graph.call_function(
                    torch.ops.aten._to_copy.default, (src,), {"dtype": _val(dst).dtype}
                )
                src = gm.graph.call_function(
                    torch.ops.aten.expand.default, (src, list(_val(dst).shape))
                )
                src = gm.graph.call_function(torch.ops.aten.clone.default, (src,))
            kinds[src] = DEVICE
            for created in src.all_input_nodes:
                kinds.setdefault(created, DEVICE)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
        kinds.pop(node, None)
        mutations[dst] = src
    for node in gm.graph.nodes:
        if any(value.op == "placeholder" and kinds.get(value) == DEVICE
               for value in _written(node) or ()):
            raise UnsplittableGraph(f"mutates an input in an unsupported way: {_describe(node)}")
    return mutations


def _replaces_in_kind(dst: torch.fx.Node, src: torch.fx.Node) -> bool:
    """Whether ``set_(dst, src)`` is an update of ``dst``: ``src`` a value the graph made
    of ``dst``'s shape, dtype and strides, which nothing else sees. Otherwise the input
    would alias another tensor or change its metadata, which a rebinding cannot do."""
    new, old = _val(src), _val(dst)
    return (src.op != "placeholder" and isinstance(new, torch.Tensor)
            and isinstance(old, torch.Tensor) and new.shape == old.shape
            and new.dtype == old.dtype and new.stride() == old.stride()
            and all(user.op != "output" for user in src.users))


def _host_only_scalar_tensors(gm: torch.fx.GraphModule, kinds: dict[torch.fx.Node, str]) -> None:
    """Moves to the host part each host tensor made from numbers that only the host reads.

    A learning rate computed from the step index at the top of a step leaves the graph
    as ``scalar_tensor(lr)`` on the CPU. Computed in the device part, the index was a
    constant of the device computation: each new value traced it again, stored one more
    cache entry and read the result back. In the host part it costs a small eager op.

    The same holds for a host tensor made from an input number that the device part
    does read (a hand-written optimizer's ``1 - beta ** step`` from its int ``step``):
    computed on the host, it crosses as a 0-d input, one small upload a call, instead of
    making the number a constant of the device computation. A number computed from
    such an input that the graph only returns is computed on the host too.
    """
    varying = set()  # scalar nodes computed from a number the graph takes as input
    for node in gm.graph.nodes:
        if kinds.get(node) == SCALAR and (node.op == "placeholder" or any(
                a in varying for a in node.all_input_nodes)):
            varying.add(node)
    for node in reversed(gm.graph.nodes):
        if kinds.get(node) != SCALAR or node.op != "call_function":
            continue
        value = _val(node)
        host_users = all(user.op == "output" or kinds.get(user) == HOST for user in node.users)
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu" and (host_users or (node in varying and all(
                    kinds.get(user) != SCALAR for user in node.users))):
                kinds[node] = HOST
        elif node in varying and host_users:
            kinds[node] = HOST  # a number the graph returns (the optimizer's next step)


def _snapshot_written_host_inputs(gm: torch.fx.GraphModule,
                                  kinds: dict[torch.fx.Node, str]) -> None:
    """Gives the device part a copy of each host input that the host part writes into.

    The host part runs first, with its in-place updates of host inputs (an
    ``AveragedModel``'s host ``n_averaged.add_(1)``), and the device part then uploads
    the host inputs it reads: it would see the updated value where the graph reads the
    old one (an SWA average divided by ``n + 2``). A clone taken before any write is the
    old value, one small host op a call.
    """
    written = {w for node in gm.graph.nodes for w in _written(node) or ()}
    first_op = next(n for n in gm.graph.nodes if n.op != "placeholder")
    for node in list(gm.graph.nodes):
        if node.op != "placeholder" or kinds.get(node) != HOST or node not in written:
            continue
        readers = [u for u in node.users if kinds.get(u) == DEVICE]
        if not readers:
            continue
        with gm.graph.inserting_before(first_op):
            snapshot = gm.graph.call_function(torch.ops.aten.clone.default, (node,))
        snapshot.meta = {"val": _val(node)}
        kinds[snapshot] = HOST
        for user in readers:
            user.replace_input_with(node, snapshot)


def split(gm: torch.fx.GraphModule) -> SplitGraph:
    """Splits ``gm`` (modified in place: input mutations are turned into outputs)."""
    kinds = classify(gm)
    _host_only_scalar_tensors(gm, kinds)
    _snapshot_written_host_inputs(gm, kinds)
    mutations = _extract_input_mutations(gm, kinds)
    _merge_duplicate_host_nodes(gm, kinds)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    index_of = {n: i for i, n in enumerate(placeholders)}
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    raw_out = output_node.args[0]
    is_seq = isinstance(raw_out, (list, tuple))
    out_items = list(raw_out) if is_seq else [raw_out]

    device_nodes = [n for n in gm.graph.nodes if kinds.get(n) == DEVICE and n.op != "placeholder"]
    # host values that the device part reads
    host_to_device: list[torch.fx.Node] = []
    for n in device_nodes + [v for v in mutations.values()]:
        for src in n.all_input_nodes:
            if kinds.get(src) == HOST and src not in host_to_device:
                host_to_device.append(src)
    computed_host = [n for n in host_to_device if n.op != "placeholder"]
    host_outputs = [n for n in out_items if isinstance(n, torch.fx.Node) and kinds.get(n) == HOST
                    and n.op != "placeholder"]

    host_results = computed_host + [h for h in host_outputs if h not in computed_host]
    host_gm, host_inputs = _build_host(gm, kinds, host_results, index_of)
    host_index = {n: k for k, n in enumerate(host_results)}

    device_outputs: list[torch.fx.Node] = []
    outputs: list[OutputSlot] = []
    for item in out_items:
        if not isinstance(item, torch.fx.Node):
            outputs.append(OutputSlot("const", value=item))
        elif item.op == "placeholder":
            outputs.append(OutputSlot("input", index_of[item]))
        elif kinds.get(item) == HOST:
            outputs.append(OutputSlot("host", host_index[item]))
        else:
            if item not in device_outputs:
                device_outputs.append(item)
            outputs.append(OutputSlot("device", device_outputs.index(item)))
    device_mutations: dict[int, int] = {}
    for dst, src in mutations.items():
        if src.op == "placeholder" and src is dst:
            continue
        if src not in device_outputs:
            device_outputs.append(src)
        device_mutations[index_of[dst]] = device_outputs.index(src)

    device_gm, device_inputs = _build_device(
        gm, device_outputs, host_to_device, host_index, index_of
    )
    return SplitGraph(
        host=host_gm,
        host_inputs=host_inputs,
        device=device_gm,
        device_inputs=device_inputs,
        device_mutations=device_mutations,
        outputs=outputs,
        output_is_sequence=is_seq,
        scalar_inputs=[i for kind, i in device_inputs if kind == "scalar"],
    )


def masked(split_: SplitGraph, skip_index: int) -> SplitGraph | None:
    """``split_`` with one more input, a 0-d bool ``skip`` (argument ``skip_index``), whose
    device input updates each become ``where(skip, old, new)``: undone where skip is set.

    What a masked GradScaler step runs (``dynamo.grad_scaler``), so that undoing a skipped
    step costs no host op per tensor. Each masked value takes its update's output slot,
    so the graph has no more outputs than the plain one (each output is one more lazy
    tensor per call: 128 on a BERT's AdamW step). A user output that is also an update's
    value stays unmasked, as the plain graph returns it, and its masked value is a new
    output. None when an update's tensors have no fake value to make the new nodes'
    values from.
    """
    gm = split_.device
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    outputs = list(graph.graph_copy(gm.graph, env))
    placeholders = [env[n] for n in gm.graph.nodes if n.op == "placeholder"]
    arg_node = {index: placeholders[k]
                for k, (kind, index) in enumerate(split_.device_inputs) if kind == "arg"}
    pairs = [(a, o, arg_node.get(a), outputs[o]) for a, o in split_.device_mutations.items()]
    if not pairs or not all(isinstance(_val(old), torch.Tensor)
                            and isinstance(_val(new), torch.Tensor) for _, _, old, new in pairs):
        return None  # an update that does not read its old value: no placeholder for it
    fake_mode = torch._guards.detect_fake_mode([_val(old) for _, _, old, _ in pairs])
    if fake_mode is None:
        return None
    with graph.inserting_after(placeholders[-1]):
        skip = graph.placeholder("found_inf")
    with fake_mode:
        skip.meta["val"] = torch.empty((), dtype=torch.bool, device=_val(pairs[0][2]).device)
    # The old values are cloned before any node runs: torch_xla's functional
    # ``aten.copy(self, src)`` also writes ``src`` into ``self`` as it traces.
    olds: list[torch.fx.Node] = []
    with graph.inserting_after(skip):
        for _, _, old, _ in reversed(pairs):
            olds.insert(0, graph.call_function(torch.ops.aten.clone.default, (old,)))
            olds[0].meta["val"] = _val(old)
    kept = {slot.index for slot in split_.outputs if slot.kind == "device"}
    mutations: dict[int, int] = {}
    for (arg_index, index, _, new), old in zip(pairs, olds):
        node = graph.call_function(torch.ops.aten.where.self, (skip, old, new))
        with fake_mode:
            node.meta["val"] = torch.where(skip.meta["val"], _val(old), _val(new))
        if index in kept:
            index = len(outputs)
            outputs.append(node)
        else:
            outputs[index] = node
            kept.add(index)  # a second update of the same value gets a slot of its own
        mutations[arg_index] = index
    graph.output(tuple(outputs))
    return dataclasses.replace(
        split_, device=torch.fx.GraphModule(gm, graph),
        device_inputs=[*split_.device_inputs, ("arg", skip_index)],
        device_mutations=mutations)


def _copy_nodes(
    gm: torch.fx.GraphModule,
    graph: torch.fx.Graph,
    env: dict[torch.fx.Node, torch.fx.Node],
    wanted: set[torch.fx.Node],
) -> None:
    for node in gm.graph.nodes:
        if node in wanted and node not in env:
            env[node] = graph.node_copy(node, lambda n: env[n])


def _ancestors(roots: list[torch.fx.Node], stop: set[torch.fx.Node]) -> set[torch.fx.Node]:
    seen: set[torch.fx.Node] = set()
    stack = list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node not in stop:
            stack.extend(node.all_input_nodes)
    return seen


def _build_host(
    gm: torch.fx.GraphModule,
    kinds: dict[torch.fx.Node, str],
    results: list[torch.fx.Node],
    index_of: dict[torch.fx.Node, int],
) -> tuple[torch.fx.GraphModule | None, list[int]]:
    host_nodes = {n for n, k in kinds.items() if k == HOST}
    if not host_nodes - set(index_of):
        return None, []
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    # every host node runs, not only the ones feeding outputs: an in-place update of a
    # CPU input (an optimizer's step counter) is itself the result.
    needed = _ancestors([n for n in host_nodes if n.op != "placeholder"], stop=set())
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder" and n in needed]
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    _copy_nodes(gm, graph, env, needed)
    graph.output(tuple(env[n] for n in results))
    return torch.fx.GraphModule(gm, graph), [index_of[n] for n in inputs]


def _build_device(
    gm: torch.fx.GraphModule,
    device_outputs: list[torch.fx.Node],
    host_to_device: list[torch.fx.Node],
    host_index: dict[torch.fx.Node, int],
    index_of: dict[torch.fx.Node, int],
) -> tuple[torch.fx.GraphModule, list[tuple[str, int]]]:
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    boundary = set(host_to_device) | {n for n in index_of}
    needed = _ancestors(device_outputs, stop=boundary)
    inputs: list[tuple[str, int]] = []
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node in needed and node not in host_to_device:
            env[node] = graph.placeholder(node.name)
            env[node].meta = dict(node.meta)
            kind = "arg" if isinstance(_val(node), torch.Tensor) else "scalar"
            inputs.append((kind, index_of[node]))
    for node in host_to_device:
        if node in needed:
            env[node] = graph.placeholder(f"host_{node.name}")
            env[node].meta = dict(node.meta)
            if node.op == "placeholder":
                inputs.append(("cpu_arg", index_of[node]))
            else:
                inputs.append(("host", host_index[node]))
    _copy_nodes(gm, graph, env, needed - set(env))
    graph.output(tuple(env[n] for n in device_outputs))
    return torch.fx.GraphModule(gm, graph), inputs
