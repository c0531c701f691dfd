"""Lowers an aten FX graph to one XLA computation, compiled once per input signature.

The graph is traced once with placeholder tensors on the XLA device, which builds
torch_xla's lazy IR; that IR is compiled and kept in torch_xla's computation cache
under its graph hash. Each later call hands the real device buffers straight to
the compiled executable (``_run_cached_graph``): no Python tracing, no IR, no sync.

The trace happens when the backend compiles the graph; the XLA compile then runs on
the runtime's thread pool, so graphs handed over together compile side by side.

Mutated inputs are returned as extra outputs and the caller's tensors are rebound
to the new device buffers, so the next computation reads them without an extra
execution. CPU-side pieces (optimizer step counters) run eagerly on the host; see
``graph_split``.
"""

from __future__ import annotations

import logging
import os
import threading
import traceback
from typing import Any, Sequence

import torch
import torch.fx
import torch_xla
from torch._subclasses.fake_tensor import unset_fake_temporarily

from . import compile_cache, counters, runtime, sharding, xla_metrics
from .device import NO_SPECIAL_SCALARS
from .executable import (
    Computed,
    Executable,
    Input,
    Value,
    any_symbolic,
    constants_as_buffers,
    placeholder_tensor,
    run_hlo,
    trace_lock,
)
from .graph_split import OutputSlot, SplitGraph, split
from .options import Options

log = logging.getLogger(__name__)
_XLAC = torch_xla._XLAC
# torch_xla reads its environment variable at import, which may precede ours
_XLAC._set_xla_handle_special_scalars(os.environ.get(NO_SPECIAL_SCALARS, "1") != "1")

class DeviceMismatchError(TypeError):
    """An argument is not on the XLA device the graph was compiled for."""


class UnsupportedOnXla(NotImplementedError):
    """The graph needs something torch_xla cannot do at all (sparse gradients)."""


class OpsFellBackInTrace(Exception):
    """torch_xla ran ops through its CPU fallback while tracing: the trace is unusable.

    On stand-in buffers the fallback's result would be baked in as a constant.
    """

    def __init__(self, ops: list[str]) -> None:
        super().__init__("torch_xla has no lowering for " + ", ".join(ops))
        self.ops = ops


def _is_alias(node: Any) -> bool:
    """Whether a graph output is the input itself or a view of it, not a copy."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function":
        target = node.target
        returns = getattr(getattr(target, "_schema", None), "returns", ())
        if not returns or returns[0].alias_info is None:
            return False
        node = node.args[0] if node.args else None
    return isinstance(node, torch.fx.Node) and node.op == "placeholder"


def _signature(args: Sequence[Any], positions: Sequence[int], spmd: bool = False) -> tuple:
    """What selects an executable: shapes and dtypes, and under SPMD each input's sharding.

    A compiled SPMD executable takes its parameters in the sharding it was compiled for
    and does not reshard them, so a resharded input must get an executable of its own.
    """
    sig = []
    for i in positions:
        a = args[i]
        if isinstance(a, torch.Tensor):
            sig.append((tuple(a.shape), a.dtype))
        else:
            sig.append(a)
    if spmd:
        sig.append(tuple(sharding.spec_of(args[i]) for i in positions))
    return tuple(sig)


# --- graph cache hook (begin): compile_cache owns everything about entries and keys ---
def _trace_and_compile(device_gm: torch.fx.GraphModule, inputs: list[Any],
                       device: torch.device, options: Options | None = None,
                       pinned: dict[int, int] | None = None) -> Executable:
    """A stored entry for this graph and inputs, else a trace that is stored; then a compile.

    A hit skips tracing and HLO lowering; on CPU the XLA compile itself still runs. The
    compile runs on the runtime's pool and ``exe.ready`` says when it is done.
    """
    lookup = compile_cache.lookup(device_gm, inputs, device, options, pinned)
    if lookup.executable is not None:
        exe, to_compile = lookup.executable, lookup.to_compile
    else:
        exe, to_compile = _trace(device_gm, inputs, device, lookup, pinned)
        lookup.store(exe)
    if to_compile and exe.ready is None:
        threads = (options or Options()).resolved_compile_threads()
        exe.ready = runtime.compile_once(_hash_key(exe.graph_hash),
                                         lambda: _compile_and_release(to_compile), threads)
    return exe
# --- graph cache hook (end) ---


def _compile_and_release(tensors: list[torch.Tensor]) -> None:
    """Compiles the traced stand-ins, then lets them go, whether or not it worked.

    Their lazy IR must not outlive the compile: a later sync of all live tensors would
    run it (and hit a failed compile's error again) and keep the memory held.
    """
    try:
        _XLAC._xla_warm_up_cache(tensors, [])
    finally:
        tensors.clear()


def _hash_key(graph_hash: Any) -> str:
    return graph_hash.hex() if isinstance(graph_hash, bytes) else str(graph_hash)


def _trace(device_gm: torch.fx.GraphModule, inputs: list[Any], device: torch.device,
           lookup: compile_cache.Lookup, pinned: dict[int, int] | None = None
           ) -> tuple[Executable, list[torch.Tensor]]:
    """Traces ``device_gm`` on stand-in buffers: the executable and the tensors to compile.

    ``pinned`` maps a device output to the input it updates in place; under SPMD that
    output keeps the input's sharding, so a parameter rebound to it stays sharded.
    """
    with trace_lock, torch.no_grad(), constants_as_buffers():
        try:
            return _trace_on_standins(device_gm, inputs, device, lookup, pinned)
        except BaseException as exc:
            # The trace's frames hold its stand-ins and lazy results. An exception kept
            # anywhere (by the caller, in a log record) would keep them alive, and the
            # next _materialize would sync that IR again: re-raising this error in an
            # unrelated call, after which torch_xla's half-done sync crashes the next
            # one ("Check failed: tensor_data"). The traceback's text is unchanged.
            traceback.clear_frames(exc.__traceback__)
            raise


def _trace_on_standins(device_gm: torch.fx.GraphModule, inputs: list[Any],
                       device: torch.device, lookup: compile_cache.Lookup,
                       pinned: dict[int, int] | None
                       ) -> tuple[Executable, list[torch.Tensor]]:
    """``_trace``'s work, under its lock and settings; its own frame, cleared on failure."""
    standins = [
        placeholder_tensor(x, device) if isinstance(x, torch.Tensor) else x
        for x in inputs
    ]
    ids = {
        _XLAC._xla_get_tensor_id(t): k
        for k, t in enumerate(standins)
        if isinstance(t, torch.Tensor)
    }
    fallbacks_before = xla_metrics.fallback_counts()
    results = device_gm(*standins)
    fell_back = xla_metrics.fell_back_since(fallbacks_before)
    if fell_back:
        raise OpsFellBackInTrace(fell_back)
    for out_index, position in (pinned or {}).items():
        r = results[out_index]
        if isinstance(r, torch.Tensor) and r.device.type == "xla" and \
                _XLAC._check_tensor_need_materialization([r])[0]:
            sharding.copy_sharding(standins[position], r)
    tensors: list[torch.Tensor] = []
    result_index: dict[int, int] = {}
    output_values: list[Any] = []
    xla_results = [r for r in results
                   if isinstance(r, torch.Tensor) and r.device.type == "xla"]
    needs_compute = dict(zip(map(id, xla_results),
                             _XLAC._check_tensor_need_materialization(xla_results)))
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
            tid = _XLAC._xla_get_tensor_id(r)
            if tid not in result_index:
                result_index[tid] = len(tensors)
                tensors.append(r)
            output_values.append(Computed(result_index[tid]))
        else:
            # already a buffer: one of the inputs passed through, or a constant
            (data_id,), (data,) = _XLAC._get_tensors_xla_device_data_node([r])
            if data_id not in ids:
                output_values.append(Value(data))
            else:
                output_values.append(Input(ids[data_id], copy=not _is_alias(node)))
    if not tensors:
        return Executable(None, [], output_values), []
    param_ids, param_values = _XLAC._get_tensors_xla_device_data_node(tensors)
    kinds = [("input", ids[pid]) if pid in ids else ("const", value)
             for pid, value in zip(param_ids, param_values)]
    # fresh stand-ins: the traced ones may have been updated in place, and are IR now
    operands = [placeholder_tensor(inputs[ids[pid]], device) if pid in ids else value
                for pid, value in zip(param_ids, param_values)]
    hlo = _XLAC._get_xla_tensors_hlo_proto(tensors)
    lookup.capture(hlo, kinds, tensors)  # graph cache hook: the entry keeps this HLO
    # with no parameter there is no wiring to confuse (see run_hlo), nor an operand
    computed, order = run_hlo(hlo, operands) if operands else (tensors, [])
    for out_index, position in (pinned or {}).items():
        value = output_values[out_index]
        if isinstance(value, Computed):
            sharding.copy_sharding(standins[position], computed[value.index])
    counters.incr(counters.GRAPHS_LOWERED)
    return Executable(_XLAC._get_graph_hash(computed), [kinds[k] for k in order],
                      output_values, dtypes=tuple(t.dtype for t in tensors)), computed


class LoweredDtypeMismatch(TypeError):
    """torch_xla lowered an op to another dtype than eager gives (``xla_backend.rewrites``)."""


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


def _materialize(tensors: list[torch.Tensor], device: torch.device) -> None:
    """Turns inputs that are still lazy IR (autograd's ones_like seed, user ops) into data.

    A compiled executable can only take device buffers. All pending tensors on the
    device are materialized together, as a lazy-mode step boundary would: syncing only
    some of them lets torch_xla donate a buffer that another pending tensor still reads
    (an eager optimizer's momentum reads the old parameter). This is one asynchronous
    execution, never a transfer to the host.
    """
    if any(_XLAC._check_tensor_need_materialization(tensors)):
        counters.incr(counters.INPUT_MATERIALIZATIONS)
        with trace_lock:  # a trace in progress on another thread must stay lazy IR
            _XLAC._xla_sync_live_tensors(str(device), [], False)


def _to_device_data(feed: list[Any], device: torch.device) -> None:
    """Moves the host tensors in ``feed`` to the device, in place, as device data.

    ``Tensor.to`` turns a 0-d tensor holding 0 or 1 into a torch_xla "special scalar"
    (an IR literal), which costs a compile and an execution to materialize on every
    call; a direct upload is a plain buffer whatever the value.
    """
    host = [k for k, t in enumerate(feed) if t.device.type != "xla"]
    if host:
        uploaded = _XLAC._xla_tensors_from_aten([feed[k] for k in host],
                                                [str(device)] * len(host))
        for k, t in zip(host, uploaded):
            feed[k] = t


def _passed_through(t: torch.Tensor, copy: bool) -> torch.Tensor:
    # A lazy clone costs nothing now; it only runs if the caller keeps using it.
    return t.clone() if copy else t


def _check_writable(view: torch.Tensor, position: int, name: str) -> None:
    """Refuses an in-place update of an expanded input, as eager PyTorch does.

    torch_xla reports every tensor's strides as contiguous, so overlap is found by
    counting: a view with more elements than its base repeats some of them.
    """
    base = view._base
    if base is not None and view.numel() > base.numel():
        raise RuntimeError(
            f"syncfree_xla: input {position} of {name} is updated in place, but it is an "
            f"expanded view ({tuple(base.shape)} -> {tuple(view.shape)}): more than one element "
            f"of the written-to tensor refers to a single memory location. Clone it first."
        )


def _write_back(t: torch.Tensor, value: torch.Tensor, is_view: bool) -> None:
    """Gives an input updated in place its new value.

    A whole tensor is rebound to the computation's output buffer, free of any copy.
    A view is written through (a lazy ``copy_``), so that its base and sibling views
    see the update too.
    """
    if is_view:
        with torch.no_grad():
            t.copy_(value)
    else:
        _XLAC._replace_xla_tensor(t, value)


class LoweredGraph:
    """A boxed callable (takes a list of args) that runs an aten graph on XLA."""

    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any],
                 name: str = "graph", options: Options | None = None) -> None:
        self.name = name
        self._options = options  # graph cache hook: where and whether to keep entries
        self._async_dispatch = (options or Options()).async_dispatch
        self._split: SplitGraph = split(gm)
        self._device = torch_xla.device()
        self._executables: dict[tuple, Executable] = {}
        self._compile_lock = threading.Lock()
        self._device_arg_positions = [i for kind, i in self._split.device_inputs if kind == "arg"]
        self._spmd = sharding.spmd_active()
        # device output -> the device input it updates in place (kept sharded alike)
        self._pinned = {out: self._split.device_inputs.index(("arg", arg))
                        for arg, out in self._split.device_mutations.items()
                        if ("arg", arg) in self._split.device_inputs}
        self._signature_positions = self._device_arg_positions + [
            i for kind, i in self._split.device_inputs if kind == "cpu_arg"
        ] + self._split.scalar_inputs
        self._prepare(list(example_inputs))

    def _prepare(self, examples: list[Any]) -> None:
        """Traces for the example inputs now and starts their compile on the pool.

        AOTAutograd hands over the forward and the backward graph together, so both
        compile side by side while the forward starts running. Examples carrying
        symbolic sizes are left to the first call, which sees real ones.
        """
        if any_symbolic(examples):
            return
        host_examples = None
        if self._split.host is not None:
            out = next(n for n in self._split.host.graph.nodes if n.op == "output")
            host_examples = [n.meta.get("val") for n in out.args[0]]
            if not all(isinstance(v, torch.Tensor) for v in host_examples):
                return
        self._executable_for(examples, host_examples)

    def _device_inputs(self, args: Sequence[Any], host_values: Sequence[Any] | None) -> list[Any]:
        values: list[Any] = []
        for kind, i in self._split.device_inputs:
            if kind in ("arg", "cpu_arg", "scalar"):
                values.append(args[i])
            else:
                values.append(host_values[i] if host_values is not None else None)
        return values

    def _executable_for(self, args: Sequence[Any], host_values: Sequence[Any] | None,
                        at_call: bool = False) -> Executable:
        key = _signature(args, self._signature_positions, self._spmd)
        if host_values is not None:
            key += tuple((tuple(h.shape), h.dtype) for h in host_values
                         if isinstance(h, torch.Tensor))
        exe = self._executables.get(key)
        if exe is not None:
            return exe
        with self._compile_lock:
            exe = self._executables.get(key)
            if exe is None:
                inputs = self._device_inputs(args, host_values)
                # Dynamo may still have its fake-tensor mode active while it compiles;
                # stand-ins must be real device buffers.
                try:
                    with unset_fake_temporarily():
                        exe = _trace_and_compile(self._split.device, inputs, self._device,
                                                 self._options, self._pinned)
                except OpsFellBackInTrace as exc:
                    if not at_call:
                        raise  # at compile time the caller partitions the graph instead
                    # a new signature seen only now: never replay a baked-in constant
                    log.warning("syncfree_xla: %s runs op by op for this input signature: %s",
                                self.name, str(exc))  # text: see compile_cache._warn_once
                    exe = Executable(None, [], [], op_by_op=True)
                self._executables[key] = exe
        return exe

    def _check_devices(self, args: Sequence[Any]) -> None:
        for i in self._device_arg_positions:
            a = args[i]
            if not isinstance(a, torch.Tensor) or a.device.type != "xla":
                where = (f"a {a.device.type} tensor" if isinstance(a, torch.Tensor)
                         else repr(type(a)))
                raise DeviceMismatchError(
                    f"syncfree_xla: input {i} of {self.name} is {where} but the graph was "
                    f"compiled for the XLA device; move it with .to(torch_xla.device())"
                )

    def __call__(self, args: list[Any]) -> Any:
        self._check_devices(args)
        # inputs updated in place that are views: written through, checked first
        views = {i for i in self._split.device_mutations if args[i]._is_view()}
        for arg_index in views:
            _check_writable(args[arg_index], arg_index, self.name)
        split_ = self._split
        host_values = None
        if split_.host is not None:
            host_values = split_.host(*[args[i] for i in split_.host_inputs])
        exe = self._executable_for(args, host_values, at_call=True)
        dev_inputs = self._device_inputs(args, host_values)
        computed: list[Any] = []
        if exe.op_by_op:
            counters.incr(counters.EAGER_FALLBACKS)
            with torch.no_grad():
                computed = list(self._split.device(*dev_inputs))
            exe = Executable(None, [], [Computed(i) for i in range(len(computed))])
        elif exe.graph_hash is not None:
            feed = [dev_inputs[value] if kind == "input" else value
                    for kind, value in exe.params]
            _to_device_data(feed, self._device)
            if exe.ready is not None:
                runtime.wait_compiled(exe.ready)
            _materialize(feed, self._device)
            computed = runtime.timed_wait(lambda: _XLAC._run_cached_graph(exe.graph_hash, feed))
            counters.incr(counters.EXECUTIONS)
            runtime.dispatched(computed, self._async_dispatch)
            if exe.casts is None:
                exe.casts = [(k, d) for k, (c, d) in enumerate(zip(computed, exe.dtypes))
                             if c.dtype != d]
            for k, dtype in exe.casts:
                computed[k] = computed[k].to(dtype)  # lazy
        device_results = [
            computed[v.index] if isinstance(v, Computed)
            else _passed_through(dev_inputs[v.position], v.copy) if isinstance(v, Input)
            else v.value
            for v in exe.output_values
        ]
        for arg_index, out_index in split_.device_mutations.items():
            _write_back(args[arg_index], device_results[out_index], arg_index in views)
        outs = [self._output(slot, args, host_values, device_results) for slot in split_.outputs]
        return outs if split_.output_is_sequence else outs[0]

    @staticmethod
    def _output(slot: OutputSlot, args: Sequence[Any], host_values: Any,
                device_results: Sequence[Any]) -> Any:
        if slot.kind == "device":
            return device_results[slot.index]
        if slot.kind == "host":
            return host_values[slot.index]
        if slot.kind == "input":
            return args[slot.index]
        return slot.value


def xla_device() -> torch.device:
    return torch_xla.device()
