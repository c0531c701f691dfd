"""AOTAutograd for one Dynamo graph, with its result as data a restarted process can reuse.

What ``torch._dynamo.backends.common.aot_autograd`` does, in the same steps
(``prepare_aot_module_simplified``, ``create_aot_state``, the graph capture, the
compile), with two additions that torch 2.9 has only for Inductor:

- ``compile_graph`` hands a ``Captured`` to its caller once it is complete: the
  forward / inference graph and the backward graph AOTAutograd made (as the
  compilers received them, before any rewrite), and AOTAutograd's runtime metadata
  (``ViewAndMutationMeta``) as plain JSON. ``cache.aot_cache`` stores it.
- ``from_artifacts`` skips the metadata pass, the joint-graph trace and the
  partitioner: it compiles the stored graphs with the same compilers and wraps them
  in the same runtime wrappers AOTAutograd's own cache uses on a hit
  (``GenericAOTAutogradCacheEntry.wrap_post_compile``).

Only graphs whose metadata has an exact JSON form are captured: no tensor subclass,
no output view whose replay takes symbolic sizes, no duplicated or overlapping
inputs, no effect tokens, no symbolic sizes. Every captured
metadata is decoded again and compared field by field with the original before it
counts as captured, so a field this module does not know about cannot be lost
silently. This module is the one place that touches AOTAutograd's internals.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch._C import _functionalization
from torch._dynamo import compiled_autograd
from torch._functorch import aot_autograd as aot_mod
from torch._functorch._aot_autograd import autograd_cache, functional_utils, schemas
from torch._functorch._aot_autograd.graph_compile import (
    aot_stage1_graph_capture,
    aot_stage2_compile,
)
from torch._functorch.partitioners import default_partition
from torch._guards import TracingContext
from torch.fx.experimental.symbolic_shapes import SymIntEqByExpr
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .dynamo import grad_scaler

log = logging.getLogger(__name__)

#: Bump when what ``Captured.meta`` holds, or how it is read back, changes.
META_FORMAT = 2  # 2: bw_donated_idxs as the first backward left it

Compiler = Callable[[torch.fx.GraphModule, Sequence[Any]], Callable]


class NotCapturable(Exception):
    """AOTAutograd's result for this graph has no exact stored form."""


@dataclass
class Compilers:
    """The three AOTAutograd compilers of one Dynamo graph."""

    forward: Compiler
    backward: Compiler
    inference: Compiler
    decompositions: dict[Any, Callable]


@dataclass
class Captured:
    """What a restarted process needs to skip AOTAutograd for one Dynamo graph.

    ``forward`` is the inference graph when ``backward`` is None. ``backward_inputs``
    are the (fake) tensors the backward compiler got, whose metadata is stored.
    """

    meta: dict[str, Any]
    forward: torch.fx.GraphModule | None = None
    backward: torch.fx.GraphModule | None = None
    backward_inputs: list[torch.Tensor] = field(default_factory=list)
    detach: list[int] = field(default_factory=list)
    problem: str | None = None  # why it cannot be stored, once known
    runtime_meta: Any = None  # the live ViewAndMutationMeta ``meta`` encodes; not stored
    handed_over: bool = False


# ---------------------------------------------------------------------------
# ViewAndMutationMeta <-> JSON


def _bools(obj: Any) -> dict[str, bool]:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not isinstance(value, bool):
            raise NotCapturable(f"{type(obj).__name__}.{f.name} is {value!r}")
        out[f.name] = value
    return out


#: An output's Python type; AOTAutograd only asks whether it is a tensor (FakeTensor,
#: FunctionalTensor and Parameter outputs alike read back as torch.Tensor).
_RAW_TYPES: dict[str, type] = {"Tensor": torch.Tensor, "int": int, "float": float,
                               "bool": bool}


def _raw_type_name(raw_type: type) -> str | None:
    if issubclass(raw_type, torch.Tensor):
        return "Tensor"
    return next((name for name, t in _RAW_TYPES.items() if raw_type is t), None)


def _view_argument(value: Any, k: int) -> Any:
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, _functionalization.InverseReturnMode):
        return {"mode": value.name}
    if isinstance(value, (list, tuple)):
        return [_view_argument(v, k) for v in value]
    raise NotCapturable(f"output {k} is a view with a {type(value).__name__} argument")


def _read_view_argument(item: Any) -> Any:
    if isinstance(item, dict):
        return _functionalization.InverseReturnMode.__members__[item["mode"]]
    if isinstance(item, list):
        return [_read_view_argument(v) for v in item]
    return item


def _views(sequence: Any, k: int) -> dict[str, Any] | None:
    """An output's view replay (functionalization's ViewMeta objects, by class and args)."""
    if sequence is None:
        return None
    steps = []
    for vm in sequence.sequence:
        name = type(vm).__name__
        if vm.has_symbolic_inputs or getattr(_functionalization, name, None) is not type(vm):
            raise NotCapturable(f"output {k} is a view made by {name}")
        steps.append([name, _view_argument(list(vm.as_tuple()), k)])
    key = sequence.metadata
    if key.is_sparse:
        raise NotCapturable(f"output {k} is a sparse view")
    return {"steps": steps, "size": [int(s.val) for s in key.size],
            "stride": [int(s.val) for s in key.stride],
            "storage_offset": int(key.storage_offset.val),
            "layout": str(key.layout).removeprefix("torch."),
            "conj": bool(key.is_conj), "neg": bool(key.is_neg)}


def _read_views(doc: dict[str, Any] | None) -> Any:
    if doc is None:
        return None
    sequence = functional_utils.ViewMetaSequence.__new__(functional_utils.ViewMetaSequence)
    steps = []
    for name, args in doc["steps"]:
        cls = getattr(_functionalization, name)
        if not name.endswith("_ViewMeta") or not isinstance(cls, type):
            raise ValueError(f"no view replay {name!r}")
        steps.append(cls(tuple(_read_view_argument(args))))
    sequence.sequence = steps
    if doc["layout"] != "strided":
        raise ValueError(f"a view of layout {doc['layout']!r}")
    sequence.metadata = functional_utils.MetadataKey(
        size=tuple(SymIntEqByExpr(int(s)) for s in doc["size"]), layout=torch.strided,
        is_sparse=False, stride=tuple(SymIntEqByExpr(int(s)) for s in doc["stride"]),
        storage_offset=SymIntEqByExpr(int(doc["storage_offset"])),
        is_conj=bool(doc["conj"]), is_neg=bool(doc["neg"]))
    return sequence


def _output_info(info: schemas.OutputAliasInfo, k: int) -> dict[str, Any]:
    raw = _raw_type_name(info.raw_type)
    if raw is None:
        raise NotCapturable(f"output {k} is a {info.raw_type.__name__}")
    return {"type": info.output_type.name, "raw_type": raw, "base_idx": info.base_idx,
            "dynamic_dims": None if info.dynamic_dims is None else sorted(info.dynamic_dims),
            "requires_grad": bool(info.requires_grad),
            "views": _views(info.view_meta_sequence, k)}


def _plain_meta(m: Any) -> dict[str, Any]:
    if not isinstance(m, schemas.PlainTensorMeta):
        raise NotCapturable("a tensor subclass is an input or output")
    fmt = m.memory_format
    if fmt is None:
        return {"index": m.unwrapped_idx, "format": None}
    mf = None if fmt.memory_format is None else str(fmt.memory_format).removeprefix("torch.")
    return {"index": m.unwrapped_idx, "format": {
        "size": None if fmt.size is None else [int(s) for s in fmt.size],
        "stride": None if fmt.stride is None else [int(s) for s in fmt.stride],
        "memory_format": mf}}


_MEMORY_FORMATS = {str(v).removeprefix("torch."): v
                   for v in (torch.contiguous_format, torch.channels_last,
                             torch.channels_last_3d, torch.preserve_format)}


def _read_plain_meta(item: dict[str, Any]) -> schemas.PlainTensorMeta:
    fmt = item["format"]
    if fmt is None:
        return schemas.PlainTensorMeta(int(item["index"]))
    return schemas.PlainTensorMeta(int(item["index"]), schemas.MemoryFormatMeta(
        size=None if fmt["size"] is None else torch.Size(fmt["size"]),
        stride=None if fmt["stride"] is None else tuple(fmt["stride"]),
        memory_format=(None if fmt["memory_format"] is None
                       else _MEMORY_FORMATS[fmt["memory_format"]])))


#: Fields only tracing reads; a runtime-safe metadata has dropped or never uses them.
_TRACING_ONLY = ("traced_tangents", "traced_tangents_descs", "output_types")
_INT_LISTS = ("static_input_indices", "indices_of_inputs_that_requires_grad_with_mutations_in_bw")
_OPTIONAL = ("num_symints_saved_for_bw", "grad_enabled_mutation", "deterministic",
             "bw_donated_idxs", "graphsafe_rng_state_index")


def encode_meta(meta: schemas.ViewAndMutationMeta) -> dict[str, Any]:
    """A runtime-safe ``ViewAndMutationMeta`` as JSON; NotCapturable where that is not exact."""
    if meta.tokens or meta.num_backward_tokens or meta.num_graphsafe_rng_states:
        raise NotCapturable("the graph has effect tokens or graph-safe RNG state")
    if meta.traced_tangents or meta.traced_tangent_metas is None:
        raise NotCapturable("the metadata is not runtime-safe yet")
    if any(m is not None for m in meta.traced_tangent_metas):
        raise NotCapturable("a tangent is a tensor subclass")
    doc: dict[str, Any] = {
        "format": META_FORMAT,
        "input_info": [_bools(i) for i in meta.input_info],
        "output_info": [_output_info(o, k) for k, o in enumerate(meta.output_info)],
        "num_intermediate_bases": meta.num_intermediate_bases,
        "keep_input_mutations": bool(meta.keep_input_mutations),
        "subclass_inp_meta": [_plain_meta(m) for m in meta.subclass_inp_meta],
        "subclass_fw_graph_out_meta": [_plain_meta(m) for m in meta.subclass_fw_graph_out_meta],
        "subclass_tangent_meta": [_plain_meta(m) for m in meta.subclass_tangent_meta],
        "is_train": bool(meta.is_train),
        "num_tangents": len(meta.traced_tangent_metas),
    }
    for name in _INT_LISTS:
        doc[name] = [int(i) for i in getattr(meta, name)]
    for name in _OPTIONAL:
        value = getattr(meta, name)
        doc[name] = list(value) if isinstance(value, list) else value
    return doc


def decode_meta(doc: dict[str, Any]) -> schemas.ViewAndMutationMeta:
    """The runtime-safe metadata ``encode_meta`` wrote; KeyError/ValueError/TypeError if bad."""
    if doc.get("format") != META_FORMAT:
        raise ValueError(f"metadata format {doc.get('format')!r}, expected {META_FORMAT}")
    outputs = [schemas.OutputAliasInfo(
        output_type=schemas.OutputType[o["type"]], raw_type=_RAW_TYPES[o["raw_type"]],
        base_idx=o["base_idx"],
        dynamic_dims=None if o["dynamic_dims"] is None else set(o["dynamic_dims"]),
        requires_grad=bool(o["requires_grad"]),
        view_meta_sequence=_read_views(o["views"])) for o in doc["output_info"]]
    meta = schemas.ViewAndMutationMeta(
        input_info=[schemas.InputAliasInfo(**i) for i in doc["input_info"]],
        output_info=outputs,
        num_intermediate_bases=int(doc["num_intermediate_bases"]),
        keep_input_mutations=bool(doc["keep_input_mutations"]),
        traced_tangents=[],
        traced_tangents_descs=[],
        subclass_inp_meta=[_read_plain_meta(m) for m in doc["subclass_inp_meta"]],
        subclass_fw_graph_out_meta=[_read_plain_meta(m)
                                    for m in doc["subclass_fw_graph_out_meta"]],
        subclass_tangent_meta=[_read_plain_meta(m) for m in doc["subclass_tangent_meta"]],
        is_train=bool(doc["is_train"]),
        traced_tangent_metas=[None] * int(doc["num_tangents"]),
        **{name: [int(i) for i in doc[name]] for name in _INT_LISTS},
        **{name: doc[name] for name in _OPTIONAL},
    )
    return meta


def _replay(info: schemas.OutputAliasInfo) -> list[Any]:
    sequence = info.view_meta_sequence
    if sequence is None:
        return []
    return [(type(vm).__name__, _view_argument(list(vm.as_tuple()), 0)) for vm in sequence.sequence]


def _check_round_trip(meta: schemas.ViewAndMutationMeta, doc: dict[str, Any]) -> None:
    """NotCapturable unless ``doc`` decodes to metadata equal to ``meta`` in every field."""
    again = vars(decode_meta(doc))
    for name, value in vars(meta).items():
        if name in _TRACING_ONLY:
            continue
        if name == "output_info":
            value = [dataclasses.replace(o, raw_type=_RAW_TYPES[_raw_type_name(o.raw_type)])
                     for o in value]
            for mine, theirs in zip(value, again[name]):  # ViewMetaSequence == compares
                if _replay(mine) != _replay(theirs):        # only the final shape
                    raise NotCapturable("an output's view replay does not survive storing")
        if name not in again or again[name] != value:
            raise NotCapturable(f"metadata field {name} does not survive storing")


# ---------------------------------------------------------------------------
# Running AOTAutograd


def _backward_disabled(compiler: Compiler) -> Compiler:
    """As Dynamo's aot_autograd: Dynamo traces neither the compiler nor what it returns."""

    def compile_backward(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        compiled = torch._dynamo.disable(compiler, reason="backward compiler")(gm, example_inputs)
        return torch._dynamo.disable(compiled, reason="compiled backward")

    return compile_backward


def _partition(joint: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
    """``default_partition``, after giving each tensor node the ``tensor_meta`` it expects.

    AOTAutograd's ``tensorify_python_scalars`` turns float math it keeps symbolic (a
    cosine schedule written with ``math.cos`` on a step index) into ``scalar_tensor``
    ops that carry a ``val`` but no ``tensor_meta``, and ``default_partition`` takes
    such a node for a tuple and fails an assertion (torch's own
    ``aot_eager_default_partitioner`` fails alike on the CPU).
    """
    for node in joint.graph.nodes:
        val = node.meta.get("val")
        if (node.op == "call_function" and "tensor_meta" not in node.meta
                and isinstance(val, torch.Tensor)):
            node.meta["tensor_meta"] = _extract_tensor_metadata(val)
    return default_partition(joint, *args, **kwargs)


def _prepare(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
             compilers: Compilers, backward: Compiler) -> tuple:
    return aot_mod.prepare_aot_module_simplified(
        gm, list(example_inputs), None, compilers.forward, backward, _partition,
        compilers.decompositions, True, compilers.inference, None, False, flatten=False)


def _detach_indices(meta: schemas.ViewAndMutationMeta, bw: torch.fx.GraphModule) -> list[int]:
    """Inputs AOTAutograd detaches at runtime: non-leaves that get no gradient."""
    grads = list(next(iter(reversed(bw.graph.find_nodes(op="output")))).args[0])
    out = []
    for i, (info, grad) in enumerate(zip(meta.input_info, grads)):
        set_in_graph = (info.mutation_type == schemas.MutationType.MUTATED_IN_GRAPH
                        and info.mutates_storage_metadata)
        if grad is None and not set_in_graph and info.requires_grad and not info.is_leaf:
            out.append(i)
    return out


def moved_example(example: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``example`` as AOTAutograd should see it once moved to ``device``: a fake tensor of
    the backend's fake mode, with the example's own sizes. (A tensor made here is one
    Dynamo never saw: AOTAutograd would give it symbolic sizes.)"""
    context = TracingContext.try_get()
    if context is None or context.fake_mode is None:
        return example.to(device)
    mode = context.fake_mode
    with mode:
        return mode.from_tensor(example, static_shapes=True).to(device)


def compile_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                  compilers: Compilers,
                  on_captured: Callable[[Captured], None] | None = None) -> Callable:
    """AOTAutograd on ``gm``; ``on_captured`` gets what a later process needs to skip it.

    It is called once, when the capture is complete: for a training graph when its
    backward compiles, at the first ``backward()`` (AOTAutograd compiles it lazily);
    ``Captured.problem`` then says why it cannot be stored, if it cannot.
    """
    captured = Captured(meta={})

    def recording(compiler: Compiler, slot: str) -> Compiler:
        def compile_recorded(g: torch.fx.GraphModule, inputs: Sequence[Any]) -> Callable:
            if on_captured is not None and not captured.handed_over:
                if slot == "backward":
                    captured.backward = _graph_copy(g)
                    captured.backward_inputs = list(inputs)
                else:
                    captured.forward = _graph_copy(g)
            compiled = compiler(g, inputs)
            if on_captured is not None and slot == "backward":
                _complete(captured, on_captured)
            return compiled

        return compile_recorded

    backward = _backward_disabled(recording(compilers.backward, "backward"))
    recorded = Compilers(recording(compilers.forward, "forward"), backward,
                         recording(compilers.inference, "inference"), compilers.decompositions)
    with contextlib.ExitStack() as stack:
        (functional_call, params_buffers_flat, _, _, fake_flat_args, args_descs, aot_config,
         fake_mode, shape_env, _, _) = _prepare(gm, example_inputs, recorded, backward)
        guards_before = len(shape_env.guards) if shape_env is not None else 0
        stack.enter_context(compiled_autograd._disable())
        state = aot_mod.create_aot_state(stack, functional_call, fake_flat_args, args_descs,
                                         aot_config, fake_mode, shape_env)
        graph_capture = aot_stage1_graph_capture(state, functional_call)
        compiled_fn, _ = aot_stage2_compile(state, graph_capture)
    if on_captured is not None:
        new_guards = shape_env.guards[guards_before:] if shape_env is not None else []
        _finish_capture(captured, state, graph_capture, new_guards)
        _complete(captured, on_captured)
    return _calling_convention(compiled_fn, params_buffers_flat)


def _graph_copy(g: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of the graph the compilers get, made before they rewrite it in place."""
    copied = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in g.graph.nodes:
        env[node] = copied.node_copy(node, lambda n: env[n])
    return torch.fx.GraphModule(g, copied)


def _finish_capture(captured: Captured, state: Any, graph_capture: Any,
                    new_guards: Sequence[Any]) -> None:
    meta = state.fw_metadata
    try:
        if new_guards:
            # e.g. a float hyperparameter AOTAutograd could not keep symbolic: its graphs
            # hold that value as a constant, and the key cannot tell the next value apart
            raise NotCapturable("AOTAutograd specialized on an input's value ("
                                + ", ".join(str(g.expr) for g in new_guards[:3]) + ")")
        if graph_capture.maybe_subclass_meta is not None:
            raise NotCapturable("a tensor subclass is an input or output")
        if any(getattr(w, "needs_post_compile", True) for w in graph_capture.wrappers):
            raise NotCapturable("inputs are duplicated or overlap")
        if state.aot_config.dynamic_shapes and any(
                not isinstance(s, int) for a in state.flat_args
                if isinstance(a, torch.Tensor) for s in a.shape):
            raise NotCapturable("symbolic sizes")
        doc = encode_meta(meta)
        _check_round_trip(meta, doc)
    except NotCapturable as e:
        captured.problem = str(e)
        return
    doc["autograd"] = bool(state.needs_autograd)
    captured.meta = doc
    captured.runtime_meta = meta


def _complete(captured: Captured, on_captured: Callable[[Captured], None]) -> None:
    """Hands the capture over once both halves are known, or once it is known to fail."""
    if captured.handed_over:
        return
    if captured.runtime_meta is None and captured.problem is None:
        return  # the backward compiled inside AOTAutograd, before its metadata was final
    if captured.problem is None:
        if captured.forward is None:
            captured.problem = "no forward graph was compiled"
        elif captured.meta["autograd"]:
            if captured.backward is None:
                return  # the backward compiles at the first backward()
            captured.detach = _detach_indices(captured.runtime_meta, captured.backward)
            # as that first backward left it: AOTAutograd empties the list when it retains
            # the graph, and a rebuilt result, whose backward is compiled already, would
            # otherwise refuse backward(retain_graph=True) where the first process did not
            donated = captured.runtime_meta.bw_donated_idxs
            captured.meta["bw_donated_idxs"] = None if donated is None else list(donated)
    captured.handed_over = True
    on_captured(captured)
    # the compiled function keeps this object alive: keep no graph copies in it
    captured.forward = captured.backward = captured.runtime_meta = None
    captured.backward_inputs = []


def _calling_convention(compiled_fn: Callable, params_buffers_flat: list[Any]) -> Callable:
    def forward(*runtime_args: Any) -> Any:
        mask = grad_scaler.active_mask()
        if mask is None:
            return compiled_fn([*params_buffers_flat, *runtime_args])
        # a masked GradScaler step: credit the in-place updates made in this call
        args = [*params_buffers_flat, *runtime_args]
        versions = [a._version if isinstance(a, torch.Tensor) else None for a in args]
        try:
            return compiled_fn(list(args))
        finally:
            mask.credit(args, versions)

    return torch._dynamo.disable(forward, reason="AOT-compiled graph")


# ---------------------------------------------------------------------------
# A stored result


@dataclass(frozen=True)
class TensorMeta:
    """A stored node value: the metadata a fake tensor for it is made from."""

    shape: list[int]
    stride: list[int]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool


#: A node that had no ``meta["val"]``, in ``Artifacts.forward_values``.
ABSENT = object()


@dataclass
class Artifacts:
    """A decoded stored result: graphs without ``meta["val"]``, specs of backward inputs,
    and per graph node, the value to give it (None: propagate fakes instead)."""

    meta: dict[str, Any]
    forward: torch.fx.GraphModule
    backward: torch.fx.GraphModule | None
    backward_inputs: list[tuple[list[int], list[int], torch.dtype, torch.device]]
    detach: list[int]
    forward_values: list[Any] | None = None
    backward_values: list[Any] | None = None


@dataclass
class _Ready(autograd_cache.InductorOutput):
    """A graph our compilers already compiled, in the shape AOTAutograd's cache loads."""

    compiled: Callable

    def pre_save(self) -> None:
        return None

    def load(self, example_inputs: Any) -> Callable:
        return self.compiled

    def post_compile(self, result: Callable, fx_config: Any) -> Callable:
        return result


@dataclass
class _ReadyBackward(_Ready, autograd_cache.GenericCompiledBackward):
    """A compiled backward, with what AOTAutograd's backward wrapper reads beside it."""


def _with_values(gm: torch.fx.GraphModule, values: list[Any] | None, fake_mode: Any,
                 inputs: Sequence[Any]) -> None:
    """Fills ``meta["val"]`` of every node, as AOTAutograd's own graphs have it.

    From the stored values where there are (fakes made from metadata), else by fake
    propagation over the graph, which costs several times more.
    """
    if values is None:
        FakeTensorProp(gm, mode=fake_mode).propagate_dont_convert_inputs(*inputs)
        return
    nodes = list(gm.graph.nodes)
    if len(values) != len(nodes):
        raise ValueError(f"{len(values)} stored node values for {len(nodes)} nodes")

    def fake(value: Any) -> Any:
        if isinstance(value, TensorMeta):
            return torch.empty_strided(value.shape, value.stride, dtype=value.dtype,
                                       device=value.device, requires_grad=value.requires_grad)
        if isinstance(value, (list, tuple)):
            return type(value)(fake(v) for v in value)
        return value

    with fake_mode:
        for node, value in zip(nodes, values):
            if value is not ABSENT:
                node.meta["val"] = fake(value)


def _boxed(compiled: Callable) -> Callable:
    """AOTAutograd's runtime calls compiled graphs with one list; box those that do not."""
    return compiled if getattr(compiled, "_boxed_call", False) else aot_mod.make_boxed_func(
        compiled)


def from_artifacts(gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                   compilers: Compilers, stored: Artifacts) -> Callable:
    """The callable AOTAutograd would return for ``gm``, built from a stored result.

    Raises (ValueError and the like) if the stored result does not fit these inputs;
    the caller then runs AOTAutograd as if nothing was stored.
    """
    backward = _backward_disabled(compilers.backward)
    meta = decode_meta(stored.meta)
    autograd = bool(stored.meta.get("autograd"))
    if autograd != (stored.backward is not None):
        raise ValueError("a training graph without its backward")
    (_, params_buffers_flat, _, _, fake_flat_args, _, aot_config, fake_mode, _, _, _) = _prepare(
        gm, example_inputs, compilers, backward)
    if len(meta.input_info) != len(fake_flat_args):
        raise ValueError(f"{len(meta.input_info)} stored inputs, {len(fake_flat_args)} given")
    for info, arg in zip(meta.input_info, fake_flat_args):
        if isinstance(arg, torch.Tensor) and bool(arg.requires_grad) != info.requires_grad:
            raise ValueError("an input's requires_grad differs from the stored graph's")
    # the compilers see inputs as AOTAutograd's trace leaves them: detached
    fw_inputs = [a.detach() if isinstance(a, torch.Tensor) else a for a in fake_flat_args]
    with fake_mode:
        bw_inputs = [torch.empty_strided(shape, stride, dtype=dtype, device=device)
                     for shape, stride, dtype, device in stored.backward_inputs]
    _with_values(stored.forward, stored.forward_values, fake_mode, fw_inputs)
    if stored.backward is not None:
        _with_values(stored.backward, stored.backward_values, fake_mode, bw_inputs)
    if tracing_context := TracingContext.try_get():
        tracing_context.fw_metadata = meta
    if autograd:
        compiled_fw = _boxed(compilers.forward(stored.forward, fw_inputs))
        compiled_bw = _boxed(backward(stored.backward, bw_inputs))
        bw_entry = _ReadyBackward(compiled=compiled_bw, backward_state_indices=[],
                                  num_symints_saved_for_bw_=int(meta.num_symints_saved_for_bw
                                                                or 0))
    else:
        compiled_fw = _boxed(compilers.inference(stored.forward, fw_inputs))
        bw_entry = None
    entry = autograd_cache.GenericAOTAutogradCacheEntry(
        compiled_fw=_Ready(compiled_fw), compiled_bw=bw_entry,
        aot_joint_graph_str=None, aot_forward_graph_str=None, aot_backward_graph_str=None,
        runtime_metadata=meta, dispatch_wrappers=[], maybe_subclass_meta=None,
        num_fw_outs_saved_for_bw=None, indices_of_inps_to_detach=list(stored.detach),
        forward_time_taken_ns=0, backward_time_taken_ns=0, sanitized_aot_config=aot_config,
        guards_expr=None, serialized_bw_module=None)
    with compiled_autograd._disable():
        compiled_fn = entry.wrap_post_compile(list(fake_flat_args), aot_config, {})
    return _calling_convention(compiled_fn, params_buffers_flat)
