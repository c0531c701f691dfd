"""FX graphs as data: JSON nodes plus raw tensor blobs, and back, never as code.

The AOTAutograd tier (``cache.aot_cache``) stores the aten graphs AOTAutograd made so a
restarted process can skip making them. Python's own ways of saving a graph
(``GraphModule`` pickling, its generated source) would run code from a file, which the
cache rules forbid; this codec writes each node as its op, the callable's qualified
name, and its arguments as tagged JSON values. Decoding resolves names only among
operator overloads and a short list of builtin modules, so an entry cannot name
arbitrary Python.

Anything the codec cannot describe exactly (a higher-order op, a call_module, a
symbolic size) raises ``Unencodable``, and the graph is simply not stored.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

#: Modules a plain-function target may come from; anything else is refused both ways.
_FUNCTION_MODULES = {"_operator": operator, "operator": operator}

_DTYPES: dict[str, torch.dtype] = {
    str(d).removeprefix("torch."): d
    for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
              torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
              torch.complex64, torch.complex128)
}
_LAYOUTS = {str(v).removeprefix("torch."): v for v in (torch.strided, torch.sparse_coo)}
_MEMORY_FORMATS = {str(v).removeprefix("torch."): v
                   for v in (torch.contiguous_format, torch.channels_last,
                             torch.channels_last_3d, torch.preserve_format)}


class Unencodable(Exception):
    """The graph holds something this codec cannot write down exactly."""


class BadGraph(ValueError):
    """Stored graph data that does not decode to a graph."""


def _target_name(target: Any) -> list[str]:
    if isinstance(target, torch._ops.OpOverload):
        return ["op", target.namespace, target._opname, target._overloadname]
    module = getattr(target, "__module__", None)
    name = getattr(target, "__name__", None)
    owner = _FUNCTION_MODULES.get(module or "")
    if owner is not None and name and getattr(owner, name, None) is target:
        return ["fn", "operator", name]
    raise Unencodable(f"call target {target!r} cannot be named across processes")


def _resolve_target(name: Any) -> Any:
    if not isinstance(name, list) or not name:
        raise BadGraph(f"bad call target {name!r}")
    if name[0] == "op" and len(name) == 4 and all(isinstance(p, str) for p in name):
        try:
            return getattr(getattr(getattr(torch.ops, name[1]), name[2]), name[3])
        except (AttributeError, RuntimeError) as e:
            raise BadGraph(f"no operator {'.'.join(name[1:])}") from e
    if name[0] == "fn" and len(name) == 3 and name[1] == "operator":
        target = getattr(operator, str(name[2]), None)
        if callable(target):
            return target
    raise BadGraph(f"bad call target {name!r}")


def _value(value: Any, names: dict[torch.fx.Node, str]) -> Any:
    """One FX argument as tagged JSON; strings stay strings, tags are one-key dicts."""
    if isinstance(value, torch.fx.Node):
        return {"node": names[value]}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"float": value.hex()}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):  # FX's immutable_list reads back as a list
        return {"tuple" if isinstance(value, tuple) else "list": [_value(v, names) for v in value]}
    if isinstance(value, slice):
        return {"slice": [_value(v, names) for v in (value.start, value.stop, value.step)]}
    raise Unencodable(f"argument of type {type(value).__name__} has no stored form")


def _lookup(table: dict[str, Any], key: Any, what: str) -> Any:
    if not isinstance(key, str) or key not in table:
        raise BadGraph(f"unknown {what} {key!r}")
    return table[key]


def _parsed(parse: Any, body: str, what: str) -> Any:
    try:
        return parse(body)
    except (ValueError, RuntimeError) as e:
        raise BadGraph(f"bad {what} {body!r}") from e


def _read_value(item: Any, nodes: dict[str, torch.fx.Node]) -> Any:
    if item is None or isinstance(item, (bool, int, str)):
        return item
    if not isinstance(item, dict) or len(item) != 1:
        raise BadGraph(f"bad argument {item!r}")
    (tag, body), = item.items()
    if tag == "node":
        return _lookup(nodes, body, "node")
    if tag == "float" and isinstance(body, str):
        return _parsed(float.fromhex, body, "float")
    if tag == "dtype":
        return _lookup(_DTYPES, body, "dtype")
    if tag == "device" and isinstance(body, str):
        return _parsed(torch.device, body, "device")
    if tag == "layout":
        return _lookup(_LAYOUTS, body, "layout")
    if tag == "memory_format":
        return _lookup(_MEMORY_FORMATS, body, "memory format")
    if tag in ("list", "tuple", "slice") and isinstance(body, list):
        values = [_read_value(v, nodes) for v in body]
        if tag == "list":
            return values
        if tag == "tuple":
            return tuple(values)
        if len(values) == 3:
            return slice(*values)
    raise BadGraph(f"bad argument {item!r}")


def tensor_spec(t: torch.Tensor) -> dict[str, Any]:
    """A tensor's metadata (no data) as JSON, as ``fake_from_spec`` reads it back."""
    if not all(isinstance(s, int) for s in (*t.shape, *t.stride(), t.storage_offset())):
        raise Unencodable("a tensor has symbolic sizes")
    if t.dtype not in _DTYPES.values():
        raise Unencodable(f"dtype {t.dtype} has no stored form")
    return {"shape": list(t.shape), "stride": list(t.stride()),
            "dtype": str(t.dtype).removeprefix("torch."), "device": str(t.device),
            "requires_grad": bool(t.requires_grad)}


def read_tensor_spec(spec: Any) -> tuple[list[int], list[int], torch.dtype, torch.device, bool]:
    """(shape, stride, dtype, device, requires_grad) of a ``tensor_spec``; BadGraph if malformed."""
    if not isinstance(spec, dict):
        raise BadGraph(f"bad tensor spec {spec!r}")
    shape, stride = spec.get("shape"), spec.get("stride")
    if not (isinstance(shape, list) and isinstance(stride, list) and len(shape) == len(stride)
            and all(isinstance(v, int) and v >= 0 for v in shape + stride)):
        raise BadGraph(f"bad tensor spec {spec!r}")
    dtype = _lookup(_DTYPES, spec.get("dtype"), "dtype")
    try:
        device = torch.device(spec.get("device"))
    except (RuntimeError, TypeError) as e:
        raise BadGraph(f"bad device in {spec!r}") from e
    return shape, stride, dtype, device, bool(spec.get("requires_grad"))


def _val(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return {"tensor": tensor_spec(value)}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_val(v) for v in value]}
    return _value(value, {})


def encode_values(graph: torch.fx.Graph) -> list[Any]:
    """Each node's ``meta["val"]`` as JSON, in node order: tensors by their metadata (no
    data), null where a node has none. Unencodable for a symbolic size or value.

    A graph read back without them needs fake-tensor propagation over every node
    before the rewrites can run, which costs more than making fakes from these.
    """
    return [{"val": _val(n.meta["val"])} if "val" in n.meta else None for n in graph.nodes]


def _read_val(item: Any, make_tensor: Callable[..., Any]) -> Any:
    if isinstance(item, dict) and len(item) == 1:
        (tag, body), = item.items()
        if tag == "tensor":
            return make_tensor(*read_tensor_spec(body))
        if tag in ("list", "tuple") and isinstance(body, list):
            values = [_read_val(v, make_tensor) for v in body]
            return values if tag == "list" else tuple(values)
    return _read_value(item, {})


def read_values(doc: Any, make_tensor: Callable[..., Any], absent: Any) -> list[Any]:
    """What ``encode_values`` wrote, each tensor as ``make_tensor(shape, stride, dtype,
    device, requires_grad)`` and ``absent`` for a node without a value; BadGraph if
    malformed."""
    if not isinstance(doc, list):
        raise BadGraph("bad node values")
    out = []
    for item in doc:
        if item is None:
            out.append(absent)
        elif isinstance(item, dict) and set(item) == {"val"}:
            out.append(_read_val(item["val"], make_tensor))
        else:
            raise BadGraph(f"bad node value {item!r}")
    return out


def encode_graph(gm: torch.nn.Module, blobs: list[bytes],
                 graph: torch.fx.Graph | None = None) -> dict[str, Any]:
    """``gm`` (or ``graph``, its constants on ``gm``) as JSON; tensor constants go to
    ``blobs`` (their index is in the JSON)."""
    names: dict[torch.fx.Node, str] = {}
    nodes: list[dict[str, Any]] = []
    for node in (graph if graph is not None else gm.graph).nodes:
        names[node] = node.name
        item: dict[str, Any] = {"op": node.op, "name": node.name}
        trace = node.meta.get("stack_trace")
        if isinstance(trace, str):
            item["trace"] = trace
        if node.op == "placeholder":
            pass
        elif node.op == "get_attr":
            value = getattr(gm, str(node.target), None)
            if not isinstance(value, torch.Tensor) or "." in str(node.target):
                raise Unencodable(f"get_attr {node.target} is not a tensor constant")
            data = value.detach().cpu().contiguous()
            item["target"] = str(node.target)
            item["tensor"] = {**tensor_spec(data), "device": str(value.device),
                              "blob": len(blobs)}
            blobs.append(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif node.op == "call_function":
            item["target"] = _target_name(node.target)
            item["args"] = _value(tuple(node.args), names)
            item["kwargs"] = {k: _value(v, names) for k, v in node.kwargs.items()}
        elif node.op == "output":
            item["args"] = _value(tuple(node.args), names)
        else:
            raise Unencodable(f"graph has a {node.op} node")
        nodes.append(item)
    return {"nodes": nodes}


def decode_graph(doc: Any, blobs: Sequence[bytes]) -> torch.fx.GraphModule:
    """The GraphModule ``encode_graph`` wrote; BadGraph if ``doc`` is not one."""
    root, graph = _decode(doc, blobs)
    return torch.fx.GraphModule(root, graph)


def round_trips(doc: dict[str, Any], blobs: Sequence[bytes]) -> bool:
    """Whether ``doc`` decodes to a graph that encodes to ``doc`` again (and its
    constants to the same bytes): the check made before anything is stored."""
    root, graph = _decode(doc, blobs)
    used = [n["tensor"]["blob"] for n in doc["nodes"] if n["op"] == "get_attr"]
    again = list(blobs[:min(used, default=len(blobs))])  # its constants' blobs come next
    return encode_graph(root, again, graph) == doc and again == list(blobs[:len(again)])


def _decode(doc: Any, blobs: Sequence[bytes]) -> tuple[torch.nn.Module, torch.fx.Graph]:
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list):
        raise BadGraph("no node list")
    graph = torch.fx.Graph()
    root = torch.nn.Module()
    nodes: dict[str, torch.fx.Node] = {}
    for item in doc["nodes"]:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadGraph(f"bad node {item!r}")
        op, name = item.get("op"), item["name"]
        if op == "placeholder":
            node = graph.create_node("placeholder", name, name=name)
        elif op == "get_attr":
            target = item.get("target")
            if not isinstance(target, str) or not target.isidentifier():
                raise BadGraph(f"bad get_attr target {target!r}")
            root.register_buffer(target, _read_tensor(item.get("tensor"), blobs))
            node = graph.create_node("get_attr", target, name=name)
        elif op == "call_function":
            args = _read_value(item.get("args"), nodes)
            kwargs = item.get("kwargs")
            if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                raise BadGraph(f"bad call {name}")
            node = graph.create_node(
                "call_function", _resolve_target(item.get("target")), args,
                {k: _read_value(v, nodes) for k, v in kwargs.items()}, name=name)
        elif op == "output":
            args = _read_value(item.get("args"), nodes)
            if not isinstance(args, tuple) or len(args) != 1:
                raise BadGraph("bad output node")
            node = graph.create_node("output", "output", args, name=name)
        else:
            raise BadGraph(f"bad node op {op!r}")
        if node.name != name:
            raise BadGraph(f"node name {name!r} given twice")
        if isinstance(item.get("trace"), str):
            node.meta["stack_trace"] = item["trace"]
        nodes[name] = node
    try:
        graph.lint()
    except Exception as e:
        raise BadGraph(f"the stored graph is malformed: {e}") from e
    return root, graph


def _read_tensor(spec: Any, blobs: Sequence[bytes]) -> torch.Tensor:
    shape, _, dtype, device, _ = read_tensor_spec(spec)
    index = spec.get("blob")
    if not isinstance(index, int) or not 0 <= index < len(blobs):
        raise BadGraph("a constant names no blob")
    data = bytearray(blobs[index])
    count = 1
    for s in shape:
        count *= s
    if len(data) != count * torch.empty((), dtype=dtype).element_size():
        raise BadGraph("a constant's blob has the wrong size")
    flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.view(dtype).reshape(shape).to(device)
