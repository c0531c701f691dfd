"""Joins the graphs of one training step into one XLA computation.

With ``join_graphs`` on, a compiled graph does not run when it is called: its HLO
becomes one lazy-IR node (``Executable.apply``) fed by the step's earlier results, and
the step's parameters and optimizer state are rebound to its outputs. At the step
boundary one torch_xla sync compiles everything pending into one executable (cached by
torch_xla, so a later step with the same graphs only runs it) and enqueues it. That
sync donates each parameter's old buffer to its new value, and nothing computed inside
the step (activations, gradients) outlives it as a buffer of its own.

Where the step boundary is, in the order the rules apply:

1. The compiled function returns (the last of our calls running; ``dynamo.scope``'s
   return hook) and every forward graph joined since the last boundary has had its
   backward: the step is run there. This is the whole-step form,
   ``torch.compile(train_step)``.
2. A graph that already joined since the last boundary is called again: the step
   before ended, so it is run first. The same when an op must run on the host
   (``runtime.partition``): the step so far runs, and counts as cut.
3. Outside a compiled call, the graphs joined since the last boundary are exactly the
   previous step's: the step is run right away. This is ``torch.compile(model)`` with
   an eager optimizer, whose backward runs after the compiled call returned; the
   optimizer's own lazy ops join the next step's computation.
4. Anything that syncs in torch_xla (a host read, ``torch_xla.sync()``,
   ``MpDeviceLoader``'s next batch) runs what is pending with it; a host read between
   two graphs of a step counts the step as cut.

torch_xla keys the step's executable by its lazy graph, including which of its inputs
share a buffer. Its cache of one device buffer per scalar value makes a 0-d input
moved to the device (a GradScaler poison, a loss weight) share the buffer of an equal
constant, so the same step would hash differently, and compile again, when the value
changes (0 to inf). From the first joined step on, that cache is off for the process
(each scalar of an eager op is then a buffer of its own, some microseconds more per
op); ``reset()`` turns it back on.

When joining starts: each graph's first call runs on its own (the per-graph path), and
the first call of a graph that has run before starts joining for the process. So the
first step, which traces and compiles every graph on the compile pool in parallel and
creates the optimizer's state, is not compiled a second time as a whole; from the
second step on, each step is one computation. Joining belongs to the thread that
started it (and to the backward passes autograd runs for it on its device thread): a
compiled graph called from another thread runs on its own, since one step's lazy IR
cannot be built from two threads at once.

A graph's name starts with its AOTAutograd kind (``forward``, ``backward``,
``inference``: ``backend.py`` names them), which is how rule 1 pairs them.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import counters, spmd, xla_internals, xla_metrics
from ..dynamo import scope
from ..lower.executable import trace_lock
from . import compile_pool, host_memory

log = logging.getLogger(__name__)

#: Below this many bytes of buffers updated in place a step, XLA's copies of the ones it
#: pairs wrongly cost less than the two lazy-IR nodes that order them (``_read_donors``).
DONOR_ORDER_MIN_BYTES = 1 << 20


@dataclass
class _DonorOrder:
    """What a step's start reads for one list of noted tensors (``_read_donors``)."""

    recorded: tuple[int, ...]  # id() of each tensor noted, in the order noted
    tensors: list[weakref.ref]  # those holding buffers, highest id first: the operands
    reads: Any  # the computation reading them
    keeps: Any = None  # the one that keeps the first tensor's value and reads the node


class StepJoiner:
    """Tracks the graphs joined since the last step boundary, and runs the step there."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._since: list[tuple[int, str]] = []  # (graph id, name) joined since the boundary
        self._previous: list[tuple[int, str]] | None = None  # the last step's
        self._syncs: tuple[int, float] = (0, 0)  # _syncs_so_far() as the step's first graph joined
        self._open = 0  # forwards joined since the boundary whose backward has not
        self._device: torch.device | None = None
        self._wait = False
        self._cache_was: bool | None = None  # torch_xla's scalar-buffer cache, before
        self._ran: list[tuple[int, str]] = []  # graph calls before joining started
        self._owner: int | None = None  # the thread that joins, once joining started
        # the tensors the step's graphs update in place, and whether to order their
        # buffers (None: not decided yet); what to read, and this step's node reading it
        self._updated: list[weakref.ref] = []
        self._order_donors: bool | None = None
        self._donor_order: _DonorOrder | None = None
        self._reading: torch.Tensor | None = None

    @property
    def started(self) -> bool:
        """Whether joining has started: graphs traced from now on compile as part of a
        step, not alone."""
        return self._owner is not None

    def joins(self, graph_id: int, name: str) -> bool:
        """Whether this call of graph ``graph_id`` joins the step (see the module's
        docstring: from the second call of any graph on, on the thread that made it,
        and in the backward passes autograd runs for it on its device thread)."""
        owner = self._owner
        if owner is not None:  # every call of every step comes here
            return owner == threading.get_ident() or torch._C._current_graph_task_id() != -1
        in_backward = torch._C._current_graph_task_id() != -1
        with self._lock:
            if self._owner is None:
                first = next((k for k, (gid, _) in enumerate(self._ran) if gid == graph_id), None)
                if first is None or in_backward:
                    self._ran.append((graph_id, name))
                    return False
                # the calls since this graph's first one were the step before
                self._previous, self._ran = self._ran[first:], []
                self._owner = threading.get_ident()
                log.debug("joining graphs from here on, on thread %d", self._owner)
            return self._owner == threading.get_ident()

    def returned(self) -> None:
        """The last running compiled call returned: the step ends here, unless a
        forward that joined still waits for its backward (``torch.compile(model)``,
        whose backward and optimizer run after it returns)."""
        if not self._since:  # every compiled call returns here; nothing joined, no lock
            return
        with self._lock:
            device, end = self._device, bool(self._since) and self._open <= 0
        if end and device is not None:
            self.flush(device)

    def before(self, graph_id: int, device: torch.device) -> None:
        """Called as a graph is about to join: runs the previous step if this starts one."""
        if self._cache_was is None:
            with trace_lock:  # a trace saves and gives back the same setting
                if self._cache_was is None:
                    self._cache_was = xla_internals.set_device_data_cache(False)
        with self._lock:
            again = any(gid == graph_id for gid, _ in self._since)
            starts = not self._since
        if again:
            self.flush(device)
        if again or starts:
            self._read_donors()

    def updating(self, args: Sequence[Any], positions: Iterable[int]) -> None:
        """Notes the tensors at ``positions`` of ``args`` that a graph updates in place:
        the next step donates their buffers, and :meth:`_read_donors` orders them."""
        if self._order_donors is not False:
            self._updated.extend(weakref.ref(args[i]) for i in positions)

    def _read_donors(self) -> None:
        """Makes the buffers the step updates in place its computation's first
        parameters, in the order of their tensors' ids.

        XLA pairs each donated parameter with a result of the same size by order alone
        (``executable.name_for_donation``): the parameters in the order the sync's walk
        meets them, the results in the order of their tensors' ids. The walk meets a
        parameter through the forward that reads it, while the ids follow the
        optimizer's operands, and a result paired with another tensor's buffer costs a
        copy of that buffer per step. So as a step starts, while the tensors the last
        step updated still hold their buffers, one node reads them; at the step's end
        the first of them in id order, which is the sync's first result, takes that
        node as an operand (:meth:`flush`), and the walk meets the buffers there first.
        """
        refs, self._updated, self._reading = self._updated, [], None
        if not refs or self._order_donors is False:
            return
        noted = [ref() for ref in refs]
        recorded = tuple(map(id, noted))
        order, tensors = self._donor_order, None
        if order is not None and order.recorded == recorded:
            tensors = [ref() for ref in order.tensors]
        if tensors is None or any(t is None for t in tensors):
            order = self._donor_order = self._order(noted, recorded)
            if order is None:
                return
            tensors = [ref() for ref in order.tensors]
        with trace_lock, torch.no_grad():
            self._reading = xla_internals.read(order.reads, tensors)

    def _order(self, noted: list[torch.Tensor | None],
               recorded: tuple[int, ...]) -> _DonorOrder | None:
        """Works out what :meth:`_read_donors` reads for these noted tensors, once.

        Whether to order at all is decided on the first list, by its size, and kept
        until :meth:`reset` (``torch._dynamo.reset()``)."""
        alive = list({id(t): t for t in noted
                      if t is not None and t.is_xla and not t._is_view()}.values())
        held = [t for t, pending in zip(alive, xla_internals.needs_materialization(alive))
                if not pending]
        if self._order_donors is None:
            size = sum(t.numel() * t.element_size() for t in held)
            self._order_donors = size >= DONOR_ORDER_MIN_BYTES and not spmd.spmd_active()
        if not self._order_donors or len(held) < 2:
            return None
        held.sort(key=xla_internals.tensor_id, reverse=True)  # met last operand first
        return _DonorOrder(recorded, [weakref.ref(t) for t in held],
                           xla_internals.reader(held, keep_first=False))

    def after(self, graph_id: int, name: str, device: torch.device, wait: bool = False) -> None:
        """Called once a graph joined; runs the step if it is the last step's whole list.

        ``wait``: the step's execution is waited for (``async_dispatch`` off).
        """
        syncs = None if self._since else self._syncs_so_far()
        with self._lock:
            if syncs is not None:
                self._syncs = syncs  # a step starts: syncs from now on cut it
            self._since.append((graph_id, name))
            self._device, self._wait = device, wait
            graph_kind = kind(name)
            self._open += (graph_kind == "forward") - (graph_kind == "backward")
            done = self._previous is not None and self._since == self._previous
        # inside a compiled call, rule 1 ends the step: eager code after its last graph
        # (GradScaler's masked step) belongs to it
        done = done and not scope.running()
        if done:
            self.flush(device)

    def flush(self, device: torch.device, cut: bool = False) -> None:
        """Runs everything pending on ``device`` as one asynchronous execution.

        ``cut``: the step is not over (an op must run on the host), so it is counted as
        a step that could not be joined whole. So is a step whose pending IR torch_xla
        ran before its end, as a host read of a tensor it computed (``.item()`` between
        two graphs) does.
        """
        syncs = self._syncs_so_far()
        with self._lock:
            joined, self._since, self._open = self._since, [], 0
            cut = cut or (syncs[0] != self._syncs[0] and syncs[1] == self._syncs[1])
            if joined:
                self._previous = joined
        if not joined:
            return
        node, self._reading = self._reading, None
        order = self._donor_order
        first = order.tensors[-1]() if node is not None and order is not None else None
        if first is not None:
            if order.keeps is None:
                order.keeps = xla_internals.reader([first, node], keep_first=True)
            with trace_lock, torch.no_grad():
                kept = xla_internals.read(order.keeps, [first, node])
                # through .data: the same lazy tensor, without a version counter bump
                first.data.copy_(kept)
            del kept
        del first, node
        run_pending(device, self._wait)
        counters.incr(counters.STEPS_JOINED)
        counters.incr(counters.GRAPHS_JOINED, len(joined))
        if cut:
            counters.incr(counters.STEPS_CUT)
        log.debug("ran a joined step of %d graph calls%s", len(joined), " (cut)" if cut else "")

    @staticmethod
    def _syncs_so_far() -> tuple[int, float]:
        """torch_xla's syncs so far, and graphs lowered: a step that lowered a graph may
        run constants while tracing, which does not cut it. Counters, not metrics: a
        metric's read copies its samples, and once a process had made a thousand host
        reads, a step's four reads cost 0.11-0.15 ms."""
        return xla_metrics.graph_syncs(), counters.counter(counters.GRAPHS_LOWERED)

    def last_step(self) -> list[str]:
        """The names of the graphs the last step joined, in the order they ran."""
        with self._lock:
            return [name for _, name in self._previous or []]

    def reset(self) -> None:
        """Forgets the last step (``torch._dynamo.reset``) and gives torch_xla its
        scalar-buffer cache back; pending IR stays pending."""
        with self._lock:
            self._since, self._previous, self._open = [], None, 0
            self._ran, self._owner = [], None
            self._updated, self._order_donors, self._reading = [], None, None
            self._donor_order = None
        with trace_lock:
            if self._cache_was is not None:
                xla_internals.set_device_data_cache(self._cache_was)
                self._cache_was = None


def run_pending(device: torch.device, wait: bool) -> None:
    """Runs everything pending on ``device`` as one execution: a joined step, or a
    graph that runs alone before joining starts (``runtime.graph``).

    A sync of every live tensor is what lets torch_xla donate the buffers the
    computation replaces. ``wait``: the execution is waited for.
    """
    misses, started = xla_metrics.uncached_graph_syncs(), time.perf_counter()
    with trace_lock:  # a trace in progress on another thread must stay lazy IR
        xla_internals.sync_live_tensors(device)
    if xla_metrics.uncached_graph_syncs() != misses:  # the sync compiled first
        counters.incr(counters.COMPILE_SECONDS, time.perf_counter() - started)
        host_memory.release()
    if wait:
        compile_pool.timed_wait(xla_internals.wait_device_ops)
    counters.incr(counters.EXECUTIONS)


def kind(name: str) -> str:
    """A graph's AOTAutograd kind, which its name starts with (``backend.py``)."""
    return name.split(" ", 1)[0]


joiner = StepJoiner()

__all__ = ["DONOR_ORDER_MIN_BYTES", "StepJoiner", "joiner", "kind", "run_pending"]
