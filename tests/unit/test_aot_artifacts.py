"""AOTAutograd's result as data (``xla_backend.aot``, ``cache.fx_codec``), on CPU.

A Dynamo backend here runs ``aot.compile_graph`` with plain FX-interpreting compilers
and keeps each capture as JSON text and blobs, as the cache would store it. A second
compile of the same function (after ``torch._dynamo.reset()``) rebuilds from those
instead of running AOTAutograd. Outputs, gradients and updated buffers must be the
same as the first compile's, bitwise, and as eager's.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
import torch.fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from xla_backend import aot
from xla_backend.cache import fx_codec


def _interpreting(gm: torch.fx.GraphModule, inputs: Any) -> Any:
    def run(args: list[Any]) -> Any:
        return torch.fx.Interpreter(gm).run(*args)

    run._boxed_call = True  # type: ignore[attr-defined]
    return run


def _value_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.stride(), value.dtype, value.device,
                value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_value_meta(v) for v in value)
    return value


class Storing:
    """A backend that captures on the first compile of each graph, rebuilds on the second.

    ``values``: node values are stored (else a rebuild propagates fakes); ``seen`` has,
    per graph a compiler got, each node's name and value metadata.
    """

    def __init__(self, values: bool = True) -> None:
        self.stored: list[tuple[str, list[bytes]]] = []
        self.problems: list[str] = []
        self.rebuilt = 0
        self.values = values
        self.seen: list[list[Any]] = []
        self._next = 0

    def compilers(self) -> aot.Compilers:
        def recording(gm: torch.fx.GraphModule, inputs: Any) -> Any:
            self.seen.append([(n.name, _value_meta(n.meta.get("val", "absent")))
                              for n in gm.graph.nodes])
            return _interpreting(gm, inputs)

        return aot.Compilers(recording, recording, recording, {})

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        k, self._next = self._next, self._next + 1
        if k < len(self.stored):
            text, blobs = self.stored[k]
            self.rebuilt += 1
            return aot.from_artifacts(gm, example_inputs, self.compilers(), _decode(text, blobs))
        self.stored.append(("", []))
        return aot.compile_graph(gm, example_inputs, self.compilers(),
                                 lambda c: self._keep(k, c))

    def _keep(self, k: int, captured: aot.Captured) -> None:
        if captured.problem is not None:
            self.problems.append(captured.problem)
            return
        blobs: list[bytes] = []
        doc = {
            "meta": captured.meta,
            "forward": fx_codec.encode_graph(captured.forward, blobs),
            "backward": (None if captured.backward is None
                         else fx_codec.encode_graph(captured.backward, blobs)),
            "backward_inputs": [fx_codec.tensor_spec(t) for t in captured.backward_inputs],
            "detach": captured.detach,
            "values": [None if g is None or not self.values else fx_codec.encode_values(g.graph)
                       for g in (captured.forward, captured.backward)],
        }
        self.stored[k] = (json.dumps(doc), blobs)

    def again(self) -> None:
        torch._dynamo.reset()
        self._next = 0


def _decode(text: str, blobs: list[bytes]) -> aot.Artifacts:
    doc = json.loads(text)
    return aot.Artifacts(
        meta=doc["meta"], forward=fx_codec.decode_graph(doc["forward"], blobs),
        backward=(None if doc["backward"] is None
                  else fx_codec.decode_graph(doc["backward"], blobs)),
        backward_inputs=[fx_codec.read_tensor_spec(s)[:4] for s in doc["backward_inputs"]],
        detach=doc["detach"],
        **{name: None if v is None else fx_codec.read_values(v, aot.TensorMeta, aot.ABSENT)
           for name, v in zip(("forward_values", "backward_values"), doc["values"])})


class Net(nn.Module):
    """Norms with running stats (buffers the forward mutates), a view as an output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        self.ln = nn.LayerNorm(8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.ln(torch.relu(self.bn(self.fc1(x))))
        out = self.fc2(h)
        return out.sum() * 0.5, out.t()


def _train(model: nn.Module, fn: Any, steps: int = 3) -> dict[str, Any]:
    torch.manual_seed(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses, views = [], []
    for _ in range(steps):
        x = torch.randn(5, 6)
        loss, view = fn(x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach().clone())
        views.append(view.detach().clone())
    return {"losses": losses, "views": views, "state": copy.deepcopy(model.state_dict())}


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for x, y in zip(a["losses"] + a["views"], b["losses"] + b["views"]):
        assert torch.equal(x, y)
    assert a["state"].keys() == b["state"].keys()
    for name in a["state"]:
        assert torch.equal(a["state"][name], b["state"][name]), name


def test_a_rebuilt_training_graph_matches_the_first_compile_bitwise_and_eager():
    torch.manual_seed(0)
    start = Net()
    backend = Storing()
    model = copy.deepcopy(start)
    first = _train(model, torch.compile(model, backend=backend))
    assert backend.problems == [] and len(backend.stored) == 1
    backend.again()
    model = copy.deepcopy(start)
    second = _train(model, torch.compile(model, backend=backend))
    assert backend.rebuilt == 1
    _same(first, second)
    model = copy.deepcopy(start)
    eager = _train(model, model)
    for x, y in zip(first["losses"], eager["losses"]):
        torch.testing.assert_close(x, y)
    for name, value in eager["state"].items():
        torch.testing.assert_close(first["state"][name], value)


@pytest.mark.parametrize("values", [True, False], ids=["stored-values", "propagated"])
def test_the_compilers_see_the_node_values_the_first_compile_saw(values, monkeypatch):
    """A rebuild gives each node the fake value AOTAutograd's graph had, made from
    stored metadata; for an entry without them, fake propagation gives the same, and a
    value for the output node, which AOTAutograd's graphs have none for."""
    torch.manual_seed(0)
    start = Net()
    backend = Storing(values=values)
    model = copy.deepcopy(start)
    _train(model, torch.compile(model, backend=backend), steps=1)
    first, backend.seen = backend.seen, []
    stored = json.loads(backend.stored[0][0])["values"]
    assert (stored[0] is not None and stored[1] is not None) == values
    if values:  # made from metadata: no propagation through the graph
        monkeypatch.setattr(aot, "FakeTensorProp", None)
    backend.again()
    model = copy.deepcopy(start)
    _train(model, torch.compile(model, backend=backend), steps=1)
    assert backend.rebuilt == 1
    if not values:
        first = [[n for n in graph if n[0] != "output"] for graph in first]
        backend.seen = [[n for n in graph if n[0] != "output"] for graph in backend.seen]
    assert len(first) == 2 and backend.seen == first


def test_node_values_read_back_as_written():
    gm = _traced()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(torch.randn(2, 3), torch.randn(2, 3))
    doc = json.loads(json.dumps(fx_codec.encode_values(gm.graph)))
    read = fx_codec.read_values(doc, aot.TensorMeta, aot.ABSENT)
    assert len(read) == len(gm.graph.nodes)
    def meta(value: Any) -> Any:
        if isinstance(value, aot.TensorMeta):
            return (tuple(value.shape), tuple(value.stride), value.dtype, value.device,
                    value.requires_grad)
        if isinstance(value, (list, tuple)):
            return type(value)(meta(v) for v in value)
        return "absent" if value is aot.ABSENT else value

    assert any(isinstance(v, list) for v in read)  # split's list of tensors
    for node, value in zip(gm.graph.nodes, read):
        assert meta(value) == _value_meta(node.meta.get("val", "absent")), node.name
    with pytest.raises(fx_codec.BadGraph):
        fx_codec.read_values([{"val": {"tensor": {"shape": [2]}}}], aot.TensorMeta, aot.ABSENT)


def test_a_non_leaf_input_without_gradient_is_detached_as_aotautograd_does():
    """A graph break inside the forward hands the second graph an activation (a
    non-leaf that requires grad); an input it does not differentiate is detached."""
    w = nn.Parameter(torch.randn(4))

    def f(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return (x * w).sum() + h.detach().sum()

    backend = Storing()
    results = []
    for _ in range(2):
        torch.manual_seed(3)
        x = torch.randn(4, requires_grad=True)
        h = (x * 2).exp()
        out = torch.compile(f, backend=backend)(x, h)
        out.backward()
        results.append((out.detach(), x.grad.clone(), w.grad.clone()))
        w.grad = None
        backend.again()
    assert backend.rebuilt == 1
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_in_place_updates_of_an_inference_graph_survive_the_rebuild():
    buf = torch.zeros(3)

    @torch.no_grad()
    def update(p: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        p.add_(g, alpha=-0.5)
        buf.mul_(0.9).add_(g)
        return p.norm()

    backend = Storing()
    outs = []
    for _ in range(2):
        p, g = torch.ones(3), torch.arange(3.0)
        buf.zero_()
        norm = torch.compile(update, backend=backend)(p, g)
        outs.append((norm, p.clone(), buf.clone()))
        backend.again()
    assert backend.rebuilt == 1
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert torch.equal(outs[0][1], torch.tensor([1.0, 0.5, 0.0]))


def test_the_metadata_round_trips_field_by_field():
    backend = Storing()
    model = Net()
    torch.compile(model, backend=backend)(torch.randn(5, 6))[0].backward()
    meta = json.loads(backend.stored[0][0])["meta"]
    rebuilt = aot.decode_meta(meta)
    assert aot.encode_meta(rebuilt) == {k: v for k, v in meta.items() if k != "autograd"}
    with pytest.raises(ValueError, match="format"):
        aot.decode_meta({**meta, "format": aot.META_FORMAT + 1})


# ---------------------------------------------------------------------------
# The graph codec


def _traced() -> torch.fx.GraphModule:
    def f(x: torch.Tensor, y: torch.Tensor) -> Any:
        a = torch.ops.aten.add.Tensor(x, y, alpha=0.5)
        b = torch.ops.aten.full.default([2, 3], float("inf"), dtype=torch.float32,
                                        device=torch.device("cpu"), pin_memory=False)
        c = torch.ops.aten.split.Tensor(a, 1, 0)
        return torch.ops.aten.mul.Tensor(c[0], b[:1]), torch.ops.aten.sum.dim_IntList(a, [0, 1])

    return torch.fx.symbolic_trace(f)


def test_graphs_read_back_as_written_and_compute_the_same():
    gm = _traced()
    gm.register_buffer("_tensor_constant0", torch.arange(6.0).reshape(2, 3))
    with gm.graph.inserting_before(next(iter(reversed(gm.graph.nodes)))):
        gm.graph.get_attr("_tensor_constant0")
    gm.recompile()
    blobs: list[bytes] = []
    doc = json.loads(json.dumps(fx_codec.encode_graph(gm, blobs)))
    assert fx_codec.round_trips(doc, blobs)
    again = fx_codec.decode_graph(doc, blobs)
    assert [n.name for n in again.graph.nodes] == [n.name for n in gm.graph.nodes]
    assert torch.equal(again._tensor_constant0, gm._tensor_constant0)
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    for got, want in zip(again(x, y), gm(x, y)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("target", [["fn", "os", "system"], ["fn", "operator", "__import__"],
                                    ["op", "aten", "no_such_op", "default"], ["code", "x"]])
def test_an_entry_cannot_name_arbitrary_python(target):
    """Decoding resolves only operator overloads and ``operator``'s functions."""
    blobs: list[bytes] = []
    doc = fx_codec.encode_graph(_traced(), blobs)
    call = next(n for n in doc["nodes"] if n["op"] == "call_function")
    call["target"] = target
    with pytest.raises(fx_codec.BadGraph):
        fx_codec.decode_graph(doc, blobs)


def test_malformed_graphs_are_refused_by_name():
    blobs: list[bytes] = []
    doc = fx_codec.encode_graph(_traced(), blobs)
    dangling = json.loads(json.dumps(doc))
    dangling["nodes"][2]["args"] = {"tuple": [{"node": "nowhere"}]}
    with pytest.raises(fx_codec.BadGraph, match="unknown node 'nowhere'"):
        fx_codec.decode_graph(dangling, blobs)
    with pytest.raises(fx_codec.BadGraph, match="no node list"):
        fx_codec.decode_graph({"nodes": "x"}, blobs)


def test_what_has_no_exact_form_is_not_encoded():
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2)))  # call_module
    with pytest.raises(fx_codec.Unencodable, match="call_module"):
        fx_codec.encode_graph(gm, [])
