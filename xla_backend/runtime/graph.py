"""Runs an aten FX graph as one compiled XLA computation: the replay hot path.

The first call for an input signature asks the graph cache for the graph's HLO, else
traces it (``lower.trace``) and stores the trace; the XLA compile then runs on the
compile pool, so the forward and backward handed over together compile side by side.
Each later call hands the real device buffers straight to the compiled executable
(``_run_cached_graph``): no Python tracing, no IR, no sync.

Mutated inputs are returned as extra outputs and the caller's tensors are rebound to
the new device buffers, so the next computation reads them without an extra execution.
CPU-side pieces (optimizer step counters) run eagerly on the host; see ``lower.split``.
During a masked GradScaler step (``dynamo.grad_scaler``) a graph that updates inputs
runs as its masked twin instead, which keeps each old value where found_inf is set.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any, Sequence

import torch
import torch.fx
import torch_xla
from torch._subclasses.fake_tensor import unset_fake_temporarily

from .. import counters, spmd, xla_internals
from ..cache import graph_cache
from ..dynamo import grad_scaler
from ..errors import DeviceMismatchError
from ..lower.executable import (
    Computed,
    Executable,
    Input,
    any_symbolic,
    constants_as_buffers,
    held_elsewhere,
    name_for_donation,
    standins,
    trace_lock,
)
from ..lower.split import OutputSlot, SplitGraph, masked, split
from ..lower.trace import OpsFellBackInTrace, trace
from ..options import Options, resolve
from . import compile_pool, host_memory, step

log = logging.getLogger(__name__)

#: Called with True as a graph starts lowering (tracing, or rebuilding from the cache,
#: and storing what it traced) and with False as it ends. A graph may lower at its
#: first call, outside Dynamo's compile: ``explain`` counts the host reads in between
#: (the constants the cache stores) as compile time all the same.
LOWERING_OBSERVERS: list[Callable[[bool], None]] = []


@contextlib.contextmanager
def _lowering() -> Iterator[None]:
    for observer in list(LOWERING_OBSERVERS):
        observer(True)
    try:
        yield
    finally:
        for observer in list(LOWERING_OBSERVERS):
            observer(False)


def _signature(args: Sequence[Any], positions: Sequence[int], sharded: bool = False) -> tuple:
    """What selects an executable: shapes and dtypes, and under SPMD each input's sharding.

    A compiled SPMD executable takes its parameters in the sharding it was compiled for
    and does not reshard them, so a resharded input must get an executable of its own.
    """
    sig = []
    for i in positions:
        a = args[i]
        if isinstance(a, torch.Tensor):
            sig.append((a.shape, a.dtype))  # torch.Size: a hashable tuple already
        else:
            sig.append(a)
    if sharded:
        sig.append(tuple(spmd.spec_of(args[i]) for i in positions))
    return tuple(sig)


def trace_and_compile(device_gm: torch.fx.GraphModule, inputs: list[Any],
                      device: torch.device, options: Options | None = None,
                      pinned: dict[int, int] | None = None, compile_now: bool = True,
                      share: bool = False) -> Executable:
    """A stored entry for this graph and inputs, else a trace that is stored; then a compile.

    A hit skips tracing and HLO lowering; on CPU the XLA compile itself still runs. The
    compile runs on the runtime's pool and ``exe.ready`` says when it is done. With
    ``join_graphs`` the graph compiles as part of its step instead, so nothing is
    compiled here (:func:`start_compile` does it if the graph ever runs alone); nor
    without ``compile_now``. ``share``: the stand-ins may share the inputs' buffers
    (``executable.standins``).
    """
    options = options if options is not None else resolve(None)
    with _lowering():
        found = graph_cache.lookup(device_gm, inputs, device, options, pinned, share)
        if found.executable is not None:
            exe, to_compile = found.executable, found.to_compile
        else:
            traced = trace(device_gm, inputs, device, pinned, share)
            exe, to_compile = traced.executable, traced.to_compile
            found.store(traced)
    # a computation that reads no buffer cannot be a lazy node of its own: it runs alone;
    # before joining starts, graphs run alone too (the first step, see ``step``)
    joins_later = options.join_graphs and exe.hlo_params and step.joiner.started
    if to_compile and exe.ready is None and compile_now and not joins_later:
        exe.ready = compile_pool.compile_once(
            _hash_key(exe.graph_hash), lambda: _compile_and_release(to_compile),
            options.resolved_compile_threads())
    return exe


def start_compile(exe: Executable, feed: list[Any], device: torch.device,
                  options: Options) -> None:
    """Starts the compile of a graph traced without one (under ``join_graphs``).

    ``feed`` is what the graph is about to run on, in HLO parameter order: stand-ins of
    its shapes and shardings make the lazy node to compile, as a trace would.
    """
    with trace_lock, torch.no_grad(), constants_as_buffers(special_scalars=True):
        read = [t for (kind, _), t in zip(exe.hlo_params, feed) if kind == "input"]
        of_input = iter(standins(read, device)[0])
        to_compile = exe.apply([next(of_input) if kind == "input" else t
                                for (kind, _), t in zip(exe.hlo_params, feed)])
    exe.ready = compile_pool.compile_once(
        _hash_key(exe.graph_hash), lambda: _compile_and_release(to_compile),
        options.resolved_compile_threads())


def _compile_and_release(tensors: list[torch.Tensor]) -> None:
    """Compiles the traced stand-ins, then lets them go, whether or not it worked.

    Their lazy IR must not outlive the compile: a later sync of all live tensors would
    run it (and hit a failed compile's error again) and keep the memory held.
    """
    try:
        xla_internals.compile(tensors)
    finally:
        tensors.clear()


def _hash_key(graph_hash: Any) -> str:
    return graph_hash.hex() if isinstance(graph_hash, bytes) else str(graph_hash)


def _materialize(tensors: list[torch.Tensor], device: torch.device) -> None:
    """Turns inputs that are still lazy IR (autograd's ones_like seed, user ops) into data.

    A compiled executable can only take device buffers. All pending tensors on the
    device are materialized together, as a lazy-mode step boundary would: syncing only
    some of them lets torch_xla donate a buffer that another pending tensor still reads
    (an eager optimizer's momentum reads the old parameter). This is one asynchronous
    execution, never a transfer to the host.
    """
    if any(xla_internals.needs_materialization(tensors)):
        counters.incr(counters.INPUT_MATERIALIZATIONS)
        with trace_lock:  # a trace in progress on another thread must stay lazy IR
            xla_internals.sync_live_tensors(device)


def _to_device_data(feed: list[Any], device: torch.device) -> None:
    """Moves the host tensors in ``feed`` to the device, in place, as device data.

    ``Tensor.to`` turns a 0-d tensor holding 0 or 1 into a torch_xla "special scalar"
    (an IR literal), which costs a compile and an execution to materialize on every
    call; a direct upload is a plain buffer whatever the value.
    """
    host = [k for k, t in enumerate(feed) if not t.is_xla]  # cheaper than t.device.type
    if host:
        uploaded = xla_internals.upload([feed[k] for k in host], device)
        for k, t in zip(host, uploaded):
            feed[k] = t


def _feed(params: list[tuple[str, Any]], dev_inputs: list[Any]) -> list[Any]:
    """What an executable's parameters take: a device input by position, or a constant."""
    return [dev_inputs[value] if kind == "input" else value for kind, value in params]


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


def _write_back(updates: list[tuple[torch.Tensor, torch.Tensor, bool]]) -> None:
    """Gives the inputs updated in place their new values: ``(tensor, value, through)``.

    A whole tensor is rebound to the computation's output buffer, free of any copy.
    ``through``: written through instead (a lazy ``copy_``), as a view must be, so that
    its base and sibling views see the update too; and as a joined step does, whose
    sync then updates the tensor's buffer in place (torch_xla aliases an in-place
    update's result to the buffer it replaces). Each ``copy_`` bumps the tensor's
    version counter, as autograd and the GradScaler check need (``_foreach_copy_``
    would not); one ``no_grad`` for all of them halves the cost of an optimizer's
    hundred-odd write-backs.
    """
    with torch.no_grad():
        for t, value, through in updates:
            if through:
                t.copy_(value)
            else:
                xla_internals.rebind(t, value)


class LoweredGraph:
    """A boxed callable (takes a list of args) that runs an aten graph on XLA."""

    def __init__(self, gm: torch.fx.GraphModule | SplitGraph, example_inputs: Sequence[Any],
                 name: str = "graph", options: Options | None = None,
                 twin: bool = False) -> None:
        """``gm``: an aten graph, or one already split. ``twin``: this is the masked
        twin of another graph (see :meth:`_masked_variant`)."""
        self.name = name
        self._options = options  # where and whether the graph cache keeps entries
        resolved = options if options is not None else resolve(None)
        self._async_dispatch = resolved.async_dispatch
        self._join = resolved.join_graphs
        self._split: SplitGraph = gm if isinstance(gm, SplitGraph) else split(gm)
        # an optimizer step (not a forward, whose buffer updates compile beside its
        # backward): until joining starts, it runs alone and updates in place
        self._alone_first = (self._join and bool(self._split.device_mutations)
                             and step.kind(name) != "forward")
        self._twin = twin  # made ahead of need: compiled when it first runs alone
        # the twin a masked GradScaler step runs: False until made, None if none
        self._masked: LoweredGraph | bool | None = (
            False if self._split.device_mutations and not twin else None)
        self._device = torch_xla.device()
        self._executables: dict[tuple, Executable] = {}
        self._compile_lock = threading.Lock()
        self._device_arg_positions = [i for kind, i in self._split.device_inputs if kind == "arg"]
        self._spmd = spmd.spmd_active()
        # device output -> the device input it updates in place (kept sharded alike)
        self._pinned = {out: self._split.device_inputs.index(("arg", arg))
                        for arg, out in self._split.device_mutations.items()
                        if ("arg", arg) in self._split.device_inputs}
        self._signature_positions = self._device_arg_positions + [
            i for kind, i in self._split.device_inputs if kind == "cpu_arg"
        ] + self._split.scalar_inputs
        self._prepare(list(example_inputs))
        if self._masked is False and grad_scaler.active_mask() is not None \
                and not any_symbolic(example_inputs):
            # compiled inside a masked GradScaler step: its masked twin is needed next
            with unset_fake_temporarily():
                skip = torch.zeros((), dtype=torch.bool, device=self._device)
            self._masked_variant(list(example_inputs), skip)

    def _prepare(self, examples: list[Any]) -> None:
        """Traces for the example inputs now and starts their compile on the pool.

        AOTAutograd hands over the forward and the backward graph together, so both
        compile side by side while the forward starts running. Examples carrying
        symbolic sizes are left to the first call, which sees real ones. So is a graph
        that runs alone first (an optimizer step): traced at its first call, it shares
        its inputs' buffers (``executable.standins``), where stand-ins made here would
        be a second copy of its parameters, gradients and state.
        """
        if any_symbolic(examples) or self._alone_first:
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
                alone = self._alone_first and at_call and not step.joiner.started
                if alone:  # inputs that are buffers already are shared by the trace
                    # the first step's peak is ahead (its gradients, new optimizer state
                    # and parameters alive at once): what compiles and the forward and
                    # backward freed is given back before it, not kept in glibc's arenas
                    host_memory.release()
                    _materialize([t for t in inputs if isinstance(t, torch.Tensor)
                                  and t.is_xla], self._device)
                # Dynamo may still have its fake-tensor mode active while it compiles;
                # stand-ins must be real device buffers.
                try:
                    with unset_fake_temporarily():
                        # running alone, it compiles as its sync runs
                        exe = trace_and_compile(self._split.device, inputs, self._device,
                                                self._options, self._pinned,
                                                compile_now=not (self._twin or alone),
                                                share=alone)
                except OpsFellBackInTrace as exc:
                    if not at_call:
                        raise  # at compile time the caller partitions the graph instead
                    # a new signature seen only now: never replay a baked-in constant
                    log.warning("syncfree_xla: %s runs op by op for this input signature: %s",
                                self.name, str(exc))  # text: see warn_once.WarnOnce
                    exe = Executable(None, [], [], op_by_op=True)
                self._executables[key] = exe
        return exe

    def _wait_compiled(self, exe: Executable, dev_inputs: Sequence[Any]) -> None:
        """Waits for ``exe``'s compile, starting it where none was (under ``join_graphs``
        a graph is traced without one)."""
        if exe.ready is None:
            start_compile(exe, _feed(exe.hlo_params, dev_inputs), self._device,
                          self._options or resolve(None))
        compile_pool.wait_compiled(exe.ready)

    def _check_devices(self, args: Sequence[Any]) -> None:
        for i in self._device_arg_positions:
            a = args[i]
            if not isinstance(a, torch.Tensor) or not a.is_xla:
                where = (f"a {a.device.type} tensor" if isinstance(a, torch.Tensor)
                         else repr(type(a)))
                raise DeviceMismatchError(
                    f"syncfree_xla: input {i} of {self.name} is {where} but the graph was "
                    f"compiled for the XLA device; move it with .to(torch_xla.device())"
                )

    def _masked_variant(self, args: list[Any], skip: torch.Tensor) -> LoweredGraph | None:
        """This graph with its input updates undone where ``skip`` is set, made once."""
        if self._masked is False:
            with self._compile_lock:
                if self._masked is False:
                    variant = masked(self._split, len(args))
                    self._masked = None if variant is None else LoweredGraph(
                        variant, [*args, skip], f"{self.name} (masked)", self._options,
                        twin=True)
        return self._masked if isinstance(self._masked, LoweredGraph) else None

    def __call__(self, args: list[Any]) -> Any:
        mask = grad_scaler.active_mask() if self._masked is not None else None
        if mask is not None and mask.skip is not None:
            variant = self._masked_variant(args, mask.skip)
            if variant is not None:
                result = variant([*args, mask.skip])
                for arg_index in self._split.device_mutations:
                    mask.wrote(args[arg_index])
                return result
        self._check_devices(args)
        # inputs updated in place that are views: written through, checked first
        views = {i for i in self._split.device_mutations if args[i]._is_view()}
        for arg_index in views:
            _check_writable(args[arg_index], arg_index, self.name)
        split_ = self._split
        if self._alone_first and not step.joiner.started and held_elsewhere(
                [args[i] for i in split_.device_mutations]):
            # donating would delete the buffer under its other holder: run as a graph
            # of its own, whose results are new buffers
            log.debug("syncfree_xla: %s updates a buffer another tensor holds; it "
                      "runs without donating until steps join", self.name)
            self._alone_first = False
        host_values = None
        if split_.host is not None:
            host_values = split_.host(*[args[i] for i in split_.host_inputs])
        exe = self._executable_for(args, host_values, at_call=True)
        dev_inputs = self._device_inputs(args, host_values)
        computed: list[Any] = []
        joined = alone = False
        if exe.op_by_op:
            counters.incr(counters.EAGER_FALLBACKS)
            with torch.no_grad():
                computed = list(self._split.device(*dev_inputs))
            exe = Executable(None, [], [Computed(i) for i in range(len(computed))])
        elif exe.graph_hash is not None and self._join and exe.hlo_params and (
                (joined := step.joiner.joins(id(self), self.name))
                or (alone := self._alone_first and not step.joiner.started)):
            # alone: a step of its own, synced below, which donates the buffers it
            # updates; run from its executable, the old and new parameters and
            # optimizer state would be alive at once
            feed = _feed(exe.hlo_params, dev_inputs)
            _to_device_data(feed, self._device)
            if joined:
                step.joiner.before(id(self), self._device)
            else:
                name_for_donation(feed, [args[i] for i in split_.device_mutations])
            computed = exe.apply(feed)
        elif exe.graph_hash is not None:
            feed = _feed(exe.params, dev_inputs)
            _to_device_data(feed, self._device)
            self._wait_compiled(exe, dev_inputs)
            _materialize(feed, self._device)

            def run() -> list[torch.Tensor]:
                return compile_pool.timed_wait(
                    lambda: xla_internals.run_cached(exe.graph_hash, feed))

            try:
                computed = run()
            except xla_internals.ComputationEvicted:
                # more computations than torch_xla's cache holds: compile this one again
                log.debug("syncfree_xla: %s was evicted from torch_xla's computation "
                          "cache; compiling it again", self.name)
                compile_pool.forget(_hash_key(exe.graph_hash))
                exe.ready = None
                self._wait_compiled(exe, dev_inputs)
                computed = run()
            counters.incr(counters.EXECUTIONS)
            compile_pool.dispatched(computed, self._async_dispatch)
        if computed and exe.graph_hash is not None:
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
        if self._join and split_.device_mutations:
            step.joiner.updating(args, split_.device_mutations)
        updates = []
        for arg_index, out_index in split_.device_mutations.items():
            t, value = args[arg_index], device_results[out_index]
            # joined or alone: written through, so the sync can donate the old buffer
            through = arg_index in views or joined or alone
            updates.append((t, value if mask is None else mask.select(t, value), through))
        _write_back(updates)
        if mask is not None:
            for t, _, _ in updates:
                mask.wrote(t)
        if joined:
            step.joiner.after(id(self), self.name, self._device, wait=not self._async_dispatch)
        outs = [self._output(slot, args, host_values, device_results) for slot in split_.outputs]
        if alone:
            # a result kept here would be one more output of the sync, beside the
            # tensor it was written to: a buffer of its own, not the donated one
            del computed, device_results, updates
            step.run_pending(self._device, wait=not self._async_dispatch)
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


__all__ = ["LOWERING_OBSERVERS", "LoweredGraph", "trace_and_compile", "xla_device"]
