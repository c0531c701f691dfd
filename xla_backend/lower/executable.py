"""The data model lowering and the graph cache share: what an executable feeds and returns.

Lowering builds an :class:`Executable` from a trace, the cache rebuilds one from a stored
entry; both run the graph's HLO through :func:`run_hlo`, so neither needs the other.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from passes.dynamo_graph import SYM_TYPES

from .. import spmd, xla_internals

# Tracing enters torch_xla's global lazy-tensor state (RNG seed, device data cache);
# one trace at a time keeps traces from seeing each other's pending IR.
trace_lock = threading.Lock()


@dataclass(frozen=True)
class Value:
    """An output known when the graph was traced (a constant, a host value)."""

    value: Any


@dataclass(frozen=True)
class Computed:
    """An output the computation computes: its ``index`` among the computation's results."""

    index: int


@dataclass(frozen=True)
class Input:
    """An output that is one of the device inputs, passed through (or a clone of it)."""

    position: int
    copy: bool = False  # a clone of the input: the caller must get a tensor of its own


@dataclass
class Executable:
    """One compiled computation: which buffers to feed it and where results go."""

    graph_hash: Any
    params: list[tuple[str, Any]]  # ("input", device-input position) or ("const", tensor)
    output_values: list[Any]  # per device output: Computed, Value or Input
    ready: Future | None = None  # the compile; None when there is nothing to compile
    op_by_op: bool = False  # torch_xla fell back to the CPU while tracing: run eagerly
    # per computed output, the dtype the traced tensor had; a few torch_xla lowerings
    # (cummax's indices) emit a narrower one in the HLO, which replay would hand out
    dtypes: tuple[torch.dtype, ...] = ()
    # (output index, dtype) for each replayed output to cast back; found on the first run
    casts: list[tuple[int, torch.dtype]] | None = None
    # The HLO module and what feeds each of its parameters (``params``' kinds, in HLO
    # order): a step joined into one computation applies it as a lazy-IR node.
    hlo: bytes | None = None
    hlo_params: list[tuple[str, Any]] = field(default_factory=list)
    _computation: Any = field(default=None, repr=False)
    _name: str = field(default="", repr=False)

    def apply(self, operands: list[torch.Tensor]) -> list[torch.Tensor]:
        """The HLO applied to ``operands`` (in HLO parameter order): lazy results, no run.

        The results join whatever lazy IR reads them, and compile with it at the next
        sync. The node's hash covers the HLO module (see :func:`run_hlo`).
        """
        if self._computation is None:  # once: hashing and parsing the HLO is not per step
            self._name = hlo_name(self.hlo or b"")
            self._computation = xla_internals.computation_from_hlo(self._name, self.hlo)
        return xla_internals.apply_computation(self._name, self._computation, operands)


def hlo_name(hlo: bytes) -> str:
    """The name a graph's computation has in torch_xla's IR: one per HLO module."""
    return "syncfree_graph_" + hashlib.sha256(hlo).hexdigest()[:32]


@contextlib.contextmanager
def constants_as_buffers(special_scalars: bool = False) -> Iterator[None]:
    """While in force, each constant a trace creates is a device buffer of its own.

    torch_xla's device-data cache would hand traces one shared buffer per scalar value,
    and with ``special_scalars`` also off a 0-d 0 or 1 is not inlined as an IR literal.
    Both are process-wide torch_xla settings: saved, set, and given back on the way out.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(xla_internals.device_data_cache(False))
        if special_scalars:
            stack.enter_context(xla_internals.special_scalars(False))
        yield


def any_symbolic(values: Sequence[Any]) -> bool:
    """Whether Dynamo left a size or scalar symbolic: no stand-in can be made for it."""
    return any(isinstance(v, SYM_TYPES) for v in values)


def placeholder_tensor(example: torch.Tensor, device: torch.device,
                       fills: dict[tuple[tuple[int, ...], torch.dtype], torch.Tensor] | None = None
                       ) -> torch.Tensor:
    """A device buffer that traces as a computation parameter, sharded as ``example`` is.

    torch_xla inlines 0-d tensors holding 0 or 1 as literals ("special scalars"),
    which would bake a stand-in's value into the computation; 2 never is. Under SPMD
    the stand-in carries the example's sharding, so the computation is partitioned for
    the buffers it will be fed. ``fills``: host tensors by shape and dtype, shared by the
    stand-ins of one graph, which for an optimizer are as large as its parameters and
    state; a host tensor for each would only add to the first step's peak memory. Each
    is still copied on its own: one call copying them all (``xla_internals.upload``)
    left 0.1-0.3 GB more resident after training (``benchmarks/memory_bench.py``).
    """
    key = (tuple(example.shape), example.dtype)
    fills = {} if fills is None else fills
    if key not in fills:
        fills[key] = torch.full(key[0], False if key[1] == torch.bool else 2, dtype=key[1])
    standin = fills[key].to(device)
    spmd.copy_sharding(example, standin)
    return standin


def standins(inputs: Sequence[Any], device: torch.device, share: bool = False
             ) -> tuple[list[Any], list[int]]:
    """Stand-ins to trace or rebuild a graph on, and the positions that share a buffer.

    Each tensor input gets a buffer of its own (:func:`placeholder_tensor`). With
    ``share`` (a graph that runs alone at its first call, before joining starts), an
    input that already is a device buffer is stood in for by a new tensor on that same
    buffer instead, so the trace holds no second copy of it: for an optimizer, as large
    as its parameters, gradients and state. Ops may run on it, as a CPU fallback does.
    torch_xla makes one computation parameter of one buffer, so of inputs on one buffer
    only the first shares it; 0-d inputs (which torch_xla's scalar cache may share
    with other tensors) and views never do, nor does anything under SPMD.

    torch_xla donates a buffer at a sync only to the tensor that last made an IR node of
    it, which a stand-in now is: :func:`name_for_donation` names the buffers the graph
    updates after their tensors again before it runs.
    """
    stand = list(inputs)
    shared: list[int] = []
    if share and not spmd.spmd_active():
        candidates = [k for k, x in enumerate(inputs) if _holds_buffer(x)]
        seen: set[int] = set()
        for k, handle in zip(candidates, xla_internals.buffer_handles(
                [inputs[k] for k in candidates])):
            if handle not in seen:
                seen.add(handle)
                shared.append(k)
                stand[k] = xla_internals.buffer_alias(inputs[k])
    fills: dict = {}
    owned = set(shared)
    for k, x in enumerate(inputs):
        if isinstance(x, torch.Tensor) and k not in owned:
            stand[k] = placeholder_tensor(x, device, fills)
    return stand, shared


def name_for_donation(operands: Sequence[Any], updated: Sequence[torch.Tensor]) -> None:
    """Names each buffer a computation updates after its tensor, in the order that lets
    XLA update it in place.

    At a sync torch_xla donates a buffer only to the tensor that last made an IR node of
    it (a trace's stand-in, until this runs). XLA then pairs donated parameters with
    results of the same size by order alone: the parameters in the order the sync's
    walk of the IR meets them, which for a computation's operands is last to first; the
    results in the order of their tensors' ids. A result paired with another tensor's
    buffer costs a copy of that buffer per execution, and for an optimizer step as
    many temporaries as it has parameters. Rebinding each updated tensor, last operand
    first, to a new tensor (a new id) on its own buffer makes the two orders agree; ids
    outlive a sync, so once is enough. Not under SPMD, where stand-ins never share.
    """
    if spmd.spmd_active():
        return
    wanted = {id(t) for t in updated}
    order: list[torch.Tensor] = []
    for x in reversed(operands):
        if id(x) in wanted and _holds_buffer(x):
            wanted.discard(id(x))
            order.append(x)
    ids = [xla_internals.tensor_id(x) for x in order]
    if all(a < b for a, b in zip(ids, ids[1:])):
        return
    for x in order:
        xla_internals.rebind(x, xla_internals.buffer_alias(x))


def held_elsewhere(tensors: Sequence[Any]) -> bool:
    """Whether a live tensor other than ``tensors`` holds one of their device buffers.

    torch_xla's ``copy_`` between two device tensors of one dtype (``load_state_dict``,
    ``teacher_p.copy_(student_p)``) makes the destination read the source's buffer
    rather than a copy of it, and after a sync both hold that one buffer. A sync that
    then donates the buffer to the source's update deletes it under the destination
    (torch_xla's own lazy mode fails alike once a ``torch_xla.sync()`` came between).
    Python tensors are all the graph's caller can hold, so a scan of the garbage
    collector's objects finds every other holder. That scan takes about 0.08 s in a
    process holding half a million objects (torchvision and transformers imported), so
    only an optimizer graph's calls before steps join, the first step's, ask it; the
    objects are sorted by their type first, without a Python call each (0.16 s).
    """
    mine = [t for t in tensors if _holds_buffer(t)]
    if not mine:
        return False
    skip = {id(t) for t in tensors}
    alike = {(t.dtype, t.shape) for t in mine}  # a buffer shared by copy_ has both
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_SCAN_NOISE)
        others = [o for o in gc.get_objects() if type(o) in _TENSOR_TYPES
                  and id(o) not in skip and _holds_buffer(o, alike)]
    if not others:
        return False
    # a Python tensor on the same lazy tensor (a detach(), an argument list's alias)
    # follows the update; only another lazy tensor on the same buffer loses it
    holders = {(h, xla_internals.tensor_id(t))
               for h, t in zip(xla_internals.buffer_handles(mine), mine)}
    handles = {h for h, _ in holders}
    return any(h in handles and (h, xla_internals.tensor_id(o)) not in holders
               for h, o in _handles(others))


def _handles(tensors: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """(buffer handle, tensor) for each tensor torch_xla can name a buffer of.

    A tensor on the XLA device that torch_xla does not own (in a long test session,
    one left over from earlier tests failed with "Expected XLA tensor. Got:
    XLABoolType") holds no buffer of torch_xla's, so it is passed over.
    """
    try:
        return list(zip(xla_internals.buffer_handles(tensors), tensors))
    except RuntimeError:
        found = []
        for t in tensors:
            try:
                found.append((xla_internals.buffer_handles([t])[0], t))
            except RuntimeError:
                continue
        return found


def sharing_intact(stand: Sequence[Any], shared: Sequence[int]) -> bool:
    """Whether each stand-in at ``shared`` still names the parameter of its buffer.

    torch_xla names a buffer's parameter after the last tensor that made an IR node of
    it. Another tensor on the same buffer doing so meanwhile (on another thread) takes
    the name over, and a trace would read that buffer as a constant of the computation.
    """
    tensors = [stand[k] for k in shared]
    if not tensors:
        return True
    ids, _ = xla_internals.device_data(tensors)
    return {xla_internals.tensor_id(t) for t in tensors} <= set(ids)


# What torch prints when the scan asks torch_xla about a tensor torch keeps for its
# C++ side (a module buffer written outside the graph, as a MoCo queue is): the tensor
# stays usable and its Python references are intact (measured), and the user did
# nothing to cause it.
_SCAN_NOISE = "Deallocating Tensor that still has live PyObject references"


_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})


def _holds_buffer(x: Any, alike: set[tuple[torch.dtype, torch.Size]] | None = None) -> bool:
    """A whole tensor of one or more dimensions on a device buffer, not pending IR; of a
    (dtype, shape) in ``alike`` when given, checked before torch_xla is asked anything.

    The garbage collector also hands back undefined tensors, Python objects torch kept
    after their tensor was freed, which have no device to ask about.
    """
    if type(x) not in _TENSOR_TYPES:
        return False
    try:
        if x.device.type != "xla" or x.dim() == 0 or x._is_view():
            return False
    except RuntimeError:
        return False  # undefined: freed under its Python object before this scan
    if alike is not None and (x.dtype, x.shape) not in alike:
        return False
    return not xla_internals.needs_materialization([x])[0]


def run_hlo(hlo: bytes, operands: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """``hlo`` applied to ``operands`` as one lazy-IR node, ready to compile and replay.

    Returns the node's results and, per parameter of the compiled computation, the index
    of the operand it takes. Why not compile the traced IR itself: torch_xla hashes a
    graph by its ops and shapes, not by which input feeds which op (pytorch/xla#8353),
    so ``x * x + y`` and ``x * y + y`` on inputs of one shape share a hash and the
    second would replay the first's executable: a silently wrong result. A user
    computation's hash covers the HLO module, whose parameters say exactly that.
    """
    name = hlo_name(hlo)
    ids = {xla_internals.tensor_id(t): k for k, t in enumerate(operands)}
    results = xla_internals.user_computation(name, hlo, operands)
    param_ids, _ = xla_internals.device_data(results)
    if not all(pid in ids for pid in param_ids):
        raise RuntimeError(f"syncfree_xla: computation {name} reads a buffer it was not given")
    return list(results), [ids[pid] for pid in param_ids]


__all__ = [
    "Computed",
    "Executable",
    "Input",
    "Value",
    "any_symbolic",
    "constants_as_buffers",
    "hlo_name",
    "name_for_donation",
    "placeholder_tensor",
    "run_hlo",
    "sharing_intact",
    "standins",
    "trace_lock",
]
