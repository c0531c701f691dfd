"""Traces an aten FX graph on the XLA device and exports it as one HLO module.

The graph runs once on stand-ins (``executable.standins``), which builds torch_xla's
lazy IR; that IR is lowered to an HLO module proto and wrapped back into one
user computation (``executable.run_hlo``), ready for the XLA compile. Nothing runs here
and nothing is cached: ``runtime.graph`` asks the graph cache first and keeps what this
returns. CPU-side pieces (optimizer step counters) were split off before (``split``).
"""

from __future__ import annotations

import logging
import operator
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx

from .. import counters, spmd, xla_internals, xla_metrics
from ..device import NO_SPECIAL_SCALARS
from ..errors import LoweredDtypeMismatch, LoweredShapeMismatch
from .executable import (
    Computed,
    Executable,
    Input,
    Value,
    constants_as_buffers,
    placeholder_tensor,
    run_hlo,
    sharing_intact,
    standins,
    trace_lock,
)

log = logging.getLogger(__name__)
# torch_xla reads its environment variable at import, which may precede ours
xla_internals.set_special_scalars(os.environ.get(NO_SPECIAL_SCALARS, "1") != "1")


class OpsFellBackInTrace(Exception):
    """torch_xla ran ops through its CPU fallback while tracing: the trace is unusable.

    On stand-in buffers the fallback's result would be baked in as a constant.
    """

    def __init__(self, ops: list[str]) -> None:
        super().__init__("torch_xla has no lowering for " + ", ".join(ops))
        self.ops = ops


@dataclass
class Trace:
    """What one trace gives: the executable, and what the graph cache keeps of it."""

    executable: Executable
    to_compile: list[torch.Tensor]  # the lazy results the XLA compile needs
    hlo: bytes | None = None  # the HLO module proto; None when nothing is computed
    # per HLO parameter, what feeds it: ("input", device-input position) or ("const", t)
    hlo_params: list[tuple[str, Any]] = field(default_factory=list)
    computed: list[tuple[tuple[int, ...], torch.dtype]] = field(default_factory=list)


def _is_alias(node: Any) -> bool:
    """Whether a graph output is the input itself or a view of it, not a copy."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        target = node.target
        returns = getattr(getattr(target, "_schema", None), "returns", ())
        if not returns or returns[0].alias_info is None:
            return False
        node = node.args[0] if node.args else None
    return isinstance(node, torch.fx.Node) and node.op == "placeholder"


def trace(device_gm: torch.fx.GraphModule, inputs: list[Any], device: torch.device,
          pinned: dict[int, int] | None = None, share: bool = False) -> Trace:
    """Traces ``device_gm`` on stand-in buffers: the executable, its HLO, what to compile.

    ``pinned`` maps a device output to the input it updates in place; under SPMD that
    output keeps the input's sharding, so a parameter rebound to it stays sharded.
    ``share``: stand-ins may share the inputs' buffers (``executable.standins``).
    """
    with trace_lock, torch.no_grad(), constants_as_buffers():
        try:
            try:
                return _trace_on_standins(device_gm, inputs, device, pinned, share)
            except _SharingLost:
                log.debug("syncfree_xla: an input's buffer was used elsewhere while it "
                          "was traced; tracing again on buffers of its own")
                return _trace_on_standins(device_gm, inputs, device, pinned, share=False)
        except BaseException as exc:
            # The trace's frames hold its stand-ins and lazy results. An exception kept
            # anywhere (by the caller, in a log record) would keep them alive, and the
            # next _materialize would sync that IR again: re-raising this error in an
            # unrelated call, after which torch_xla's half-done sync crashes the next
            # one ("Check failed: tensor_data"). The traceback's text is unchanged.
            traceback.clear_frames(exc.__traceback__)
            raise


class _SharingLost(Exception):
    """A stand-in on an input's buffer stopped naming its parameter (``sharing_intact``)."""


def _trace_on_standins(device_gm: torch.fx.GraphModule, inputs: list[Any],
                       device: torch.device, pinned: dict[int, int] | None,
                       share: bool) -> Trace:
    """``trace``'s work, under its lock and settings; its own frame, cleared on failure."""
    stand, shared = standins(inputs, device, share)
    return _trace(device_gm, inputs, device, pinned, stand, shared)


def _trace(device_gm: torch.fx.GraphModule, inputs: list[Any], device: torch.device,
           pinned: dict[int, int] | None, stand: list[Any], shared: list[int]) -> Trace:
    """Runs ``device_gm`` on the stand-ins ``stand`` and lowers what it computes."""
    ids = {
        xla_internals.tensor_id(t): k
        for k, t in enumerate(stand)
        if isinstance(t, torch.Tensor)
    }
    fallbacks_before = xla_metrics.fallback_counts()
    results = _CheckedRun(device_gm).run(*stand)
    fell_back = xla_metrics.fell_back_since(fallbacks_before)
    if fell_back:
        raise OpsFellBackInTrace(fell_back)
    for out_index, position in (pinned or {}).items():
        r = results[out_index]
        if isinstance(r, torch.Tensor) and r.device.type == "xla" and \
                xla_internals.needs_materialization([r])[0]:
            spmd.copy_sharding(stand[position], r)
    tensors: list[torch.Tensor] = []
    result_index: dict[int, int] = {}
    output_values: list[Any] = []
    xla_results = [r for r in results
                   if isinstance(r, torch.Tensor) and r.device.type == "xla"]
    needs_compute = dict(zip(map(id, xla_results),
                             xla_internals.needs_materialization(xla_results)))
    output_nodes = next(n for n in device_gm.graph.nodes if n.op == "output").args[0]
    _check_dtypes(results, output_nodes)
    for r, node in zip(results, output_nodes):
        if not isinstance(r, torch.Tensor):
            output_values.append(Value(r))
        elif r.device.type != "xla":
            output_values.append(Value(r.clone()))
        elif needs_compute[id(r)]:
            # torch_xla returns one result per distinct lazy tensor: outputs that
            # alias one (detach of a result) share it.
            tid = xla_internals.tensor_id(r)
            if tid not in result_index:
                result_index[tid] = len(tensors)
                tensors.append(r)
            output_values.append(Computed(result_index[tid]))
        else:
            # already a buffer: one of the inputs passed through, or a constant
            (data_id,), (data,) = xla_internals.device_data([r])
            if data_id not in ids:
                output_values.append(Value(data))
            else:
                output_values.append(Input(ids[data_id], copy=not _is_alias(node)))
    if not tensors:
        return Trace(Executable(None, [], output_values), [])
    param_ids, param_values = xla_internals.device_data(tensors)
    if not sharing_intact(stand, shared):
        raise _SharingLost()
    kinds = [("input", ids[pid]) if pid in ids else ("const", value)
             for pid, value in zip(param_ids, param_values)]
    # The traced stand-ins are still the buffers the IR reads, so they serve as the
    # operands too, rather than a second set as large as the graph's inputs (an
    # optimizer's parameters and state). One the trace updated in place is IR now and
    # gets a buffer of its own; so does each under SPMD, where torch_xla gives a sharded
    # buffer a new IR id at each use, which ``run_hlo`` could not map back (checked).
    reuse = not spmd.spmd_active()
    operands = []
    for pid, value in zip(param_ids, param_values):
        if pid not in ids:
            operands.append(value)  # a constant
            continue
        standin = stand[ids[pid]]
        if not reuse or xla_internals.needs_materialization([standin])[0]:
            standin = placeholder_tensor(inputs[ids[pid]], device)
        operands.append(standin)
    hlo = xla_internals.hlo_proto(tensors)
    # with no parameter there is no wiring to confuse (see run_hlo), nor an operand
    computed, order = run_hlo(hlo, operands) if operands else (tensors, [])
    for out_index, position in (pinned or {}).items():
        value = output_values[out_index]
        if isinstance(value, Computed):
            spmd.copy_sharding(stand[position], computed[value.index])
    counters.incr(counters.GRAPHS_LOWERED)
    exe = Executable(xla_internals.graph_hash(computed), [kinds[k] for k in order],
                     output_values, dtypes=tuple(t.dtype for t in tensors),
                     hlo=hlo, hlo_params=kinds)
    return Trace(exe, computed, hlo, kinds, [(tuple(t.shape), t.dtype) for t in tensors])


class _CheckedRun(torch.fx.Interpreter):
    """Runs the graph node by node and refuses a value whose shape differs from the one
    the node's metadata (torch's own rules) gives, or whose dtype holds less.

    torch_xla's IR carries a shape per node that its later nodes build on; where a
    lowering declares another shape than eager's (batched ``_linalg_svd``'s singular
    values), later ops compute on the wrong elements and a loss may keep the right
    shape with wrong values. A float computed as an integer, or in a narrower float,
    loses digits even where a later op converts it back (graph outputs must match
    exactly: ``_check_dtypes``). Checked once per trace, not per step. A tuple result
    is checked where a ``getitem`` takes its parts, so an unused part is not. Shapes are
    not compared in a graph traced for inputs of other shapes than its metadata's (a
    new signature at call time): the metadata does not describe that trace.
    """

    def run(self, *args: Any, **kwargs: Any) -> Any:
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.shapes_checked = all(_same_shape(a, n.meta.get("val"))
                                  for a, n in zip(args, placeholders))
        return super().run(*args, **kwargs)

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        want = n.meta.get("val")
        if _loses_values(result, want):
            raise LoweredDtypeMismatch(
                f"syncfree_xla: torch_xla lowered {_op_name(n)} ({n.name}) to {result.dtype}, "
                f"but eager PyTorch gives {want.dtype}; please report this op")
        if self.shapes_checked and not _same_shape(result, want):
            raise LoweredShapeMismatch(
                f"syncfree_xla: torch_xla lowered {_op_name(n)} ({n.name}) to shape "
                f"{tuple(result.shape)}, but eager PyTorch gives {tuple(want.shape)}; "
                f"please report this op")
        return result


def _op_name(n: torch.fx.Node) -> str:
    """The op a node computes; for a ``getitem``, the op it takes an output of."""
    if n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node):
        return f"{n.args[0].target} output {n.args[1]}"
    return str(n.target)


def _loses_values(value: Any, want: Any) -> bool:
    """Whether ``value``'s dtype cannot hold what ``want``'s does: a float or complex
    value as an integer or bool, complex as real, a float in another float no wider."""
    if not (isinstance(value, torch.Tensor) and isinstance(want, torch.Tensor)) or \
            value.dtype == want.dtype:
        return False
    if want.is_complex():
        return not value.is_complex()
    if want.is_floating_point():
        return not value.is_floating_point() or value.element_size() <= want.element_size()
    return want.dtype != torch.bool and value.dtype == torch.bool


def _same_shape(value: Any, want: Any) -> bool:
    """False only where both are tensors and ``want``'s static shape is not ``value``'s."""
    return not (isinstance(value, torch.Tensor) and isinstance(want, torch.Tensor)
                and all(type(d) is int for d in want.shape) and value.shape != want.shape)


def _check_dtypes(results: Sequence[Any], output_nodes: Sequence[Any]) -> None:
    """Refuses a trace whose outputs have other dtypes than the graph's metadata says.

    Such a result is silently wrong (a float truncated to an integer): an op whose
    torch_xla lowering skips type promotion and that no rewrite steps around yet.
    """
    for r, node in zip(results, output_nodes):
        want = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if isinstance(r, torch.Tensor) and isinstance(want, torch.Tensor) and r.dtype != want.dtype:
            raise LoweredDtypeMismatch(
                f"syncfree_xla: torch_xla lowered {node.name} ({node.target}) to {r.dtype}, "
                f"but eager PyTorch gives {want.dtype}; please report this op")


__all__ = ["OpsFellBackInTrace", "Trace", "trace"]
