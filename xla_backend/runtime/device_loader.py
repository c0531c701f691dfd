"""Moves batches to the XLA device on background threads, so the training loop never waits on it.

``DeviceLoader(loader)`` wraps any iterable of batches (a ``torch.utils.data.DataLoader``
above all). Worker threads pull batches from the loader, copy every tensor in them to the
device and keep up to ``prefetch`` batches ready; the consumer gets them in the loader's
order. The copy is a host-to-device transfer, not a sync, so it overlaps the step running
on the device.

Shutting down must never hang a job: workers are daemon threads that poll a stop flag,
they hold the shared pass state and never the iterator (so dropping or garbage-collecting
the iterator stops them), and an exit hook stops whatever is left before the interpreter
tears torch_xla down.
"""

from __future__ import annotations

import atexit
import collections.abc
import copy
import dataclasses
import itertools
import logging
import threading
import time
import weakref
from typing import Any, Generic, Iterable, Iterator, TypeVar

import torch

from .. import counters

__all__ = ["DeviceLoader"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_PREFETCH = 2
# One thread reads the loader while another transfers; more rarely help, since
# torch_xla serializes transfers to one device anyway.
DEFAULT_THREADS = 2
# How often blocked threads re-check the stop flag; bounds shutdown latency.
_POLL_SECONDS = 0.05
# How long close() and interpreter exit wait for workers that are mid-transfer.
_JOIN_SECONDS = 2.0

_loader_ids = itertools.count()
_live_passes: weakref.WeakSet[_Pass] = weakref.WeakSet()
_exit_hook_lock = threading.Lock()
_exit_hook_registered = False


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means torch_xla's default device; torch_xla is imported only when needed."""
    if device is None:
        return _import_torch_xla().device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"DeviceLoader: device={device!r} is not a device; pass None (torch_xla's default "
            "device), a torch.device, or a string such as 'xla:0' or 'cpu'"
        ) from exc
    if resolved.type == "xla":
        _import_torch_xla()  # registers the device's tensor transfers
    return resolved


def _import_torch_xla() -> Any:
    from ..device import configure_pjrt

    configure_pjrt()  # torch_xla must see PJRT_DEVICE before it is imported
    import torch_xla

    return torch_xla


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Copies every tensor in a nested batch to ``device``; anything else is returned as is.

    Containers (tuples, namedtuples, lists, dicts, dataclasses) are rebuilt around the
    moved tensors, keeping their type; a container holding no tensor is returned unchanged.
    A tensor that appears twice is moved once, so aliasing survives the move.
    """
    return _move(batch, device, {})


def _move(obj: Any, device: torch.device, memo: dict[int, tuple[Any, Any]]) -> Any:
    if isinstance(obj, torch.Tensor):
        seen = memo.get(id(obj))
        if seen is None:
            # Keep the source alive in the memo so its id cannot be reused mid-walk.
            seen = memo[id(obj)] = (obj, obj.to(device, non_blocking=True))
        return seen[1]
    if isinstance(obj, (str, bytes, bytearray)):
        return obj
    if isinstance(obj, tuple):
        items = [_move(item, device, memo) for item in obj]
        if _unchanged(obj, items):
            return obj
        if hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*items)
        try:
            return type(obj)(items)
        except TypeError:
            return tuple(items)
    if isinstance(obj, list):
        items = [_move(item, device, memo) for item in obj]
        if _unchanged(obj, items):
            return obj
        new_list = copy.copy(obj)  # keeps a subclass and its attributes
        new_list[:] = items
        return new_list
    if isinstance(obj, collections.abc.Mapping):
        moved = {key: _move(value, device, memo) for key, value in obj.items()}
        if _unchanged(obj.values(), moved.values()):
            return obj
        if isinstance(obj, collections.abc.MutableMapping):
            new_map = copy.copy(obj)  # keeps defaultdict factories, OrderedDict, subclasses
            for key, value in moved.items():
                new_map[key] = value
            return new_map
        try:
            return type(obj)(moved)
        except TypeError:
            return moved
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = dataclasses.fields(obj)
        values = [getattr(obj, field.name) for field in fields]
        moved_values = [_move(value, device, memo) for value in values]
        if _unchanged(values, moved_values):
            return obj
        new_obj = copy.copy(obj)
        for field, value in zip(fields, moved_values):
            object.__setattr__(new_obj, field.name, value)  # works for frozen dataclasses too
        return new_obj
    return obj


def _unchanged(before: Iterable[Any], after: Iterable[Any]) -> bool:
    return all(a is b for a, b in zip(before, after))


class _Failure:
    """An exception raised on a worker, delivered to the consumer at its place in the order."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc: BaseException | None = exc


_END = object()


class _Pass:
    """One pass over the loader, shared by the workers and the consumer.

    Everything here is guarded by ``cond`` except reading the source, which ``source_lock``
    serializes (a loader's iterator is not thread-safe) and which also hands out sequence
    numbers, so batches are numbered in the loader's order whatever thread reads them.
    Lock order: ``source_lock`` before ``cond``.
    """

    def __init__(
        self, source: Iterator[Any], device: torch.device, prefetch: int, threads: int, name: str
    ) -> None:
        self.source = source
        self.device = device
        self.prefetch = prefetch
        self.name = name
        self.cond = threading.Condition()
        self.source_lock = threading.Lock()
        self.stopped = False
        self.next_to_read = 0  # guarded by source_lock
        self.reader: threading.Thread | None = None  # the worker inside next(source), if any
        self.next_to_yield = 0
        self.claimed = 0  # batches being read, moved or ready but not yet taken
        self.ready: dict[int, Any] = {}  # sequence number -> moved batch or _Failure
        self.end: int | None = None  # no batch has this sequence number or a later one
        self.threads = [
            threading.Thread(target=_work, args=(self,), name=f"{name}-worker-{i}", daemon=True)
            for i in range(threads)
        ]

    def start(self) -> None:
        _register_exit_hook()
        _live_passes.add(self)
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        """Tells every worker to finish; returns at once (safe from a finalizer)."""
        with self.cond:
            self.stopped = True
            self.ready.clear()  # drop moved batches nobody will take
            self.cond.notify_all()

    def join(self, timeout: float) -> bool:
        """Waits up to ``timeout`` for workers; True when all have exited.

        A worker blocked inside the loader's ``next()`` is not waited for: that is user
        code that may never return, and the worker exits by itself if it does.
        """
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            if thread is self.reader:
                continue
            thread.join(max(0.0, deadline - time.monotonic()))
        alive = [thread.name for thread in self.threads if thread.is_alive()]
        if alive:
            log.debug(
                "%s: workers still running after stop (blocked in the loader?): %s",
                self.name,
                alive,
            )
        return not alive

    def release_claim(self) -> None:
        """Gives back a slot taken for a batch that will never be produced."""
        with self.cond:
            self.claimed -= 1
            self.cond.notify_all()

    def finish(self, seq: int, result: Any) -> None:
        with self.cond:
            if not self.stopped:
                self.ready[seq] = result
            self.cond.notify_all()


def _work(state: _Pass) -> None:
    """A worker's loop: claim a slot, read the next batch in order, move it, hand it over."""
    while True:
        with state.cond:
            while not state.stopped and state.end is None and state.claimed >= state.prefetch:
                state.cond.wait(_POLL_SECONDS)
            if state.stopped or state.end is not None:
                return
            state.claimed += 1
        read = _read_next(state)
        if read is None:
            return
        seq, batch = read
        del read
        try:
            moved = move_to_device(batch, state.device)
        except BaseException as exc:
            with state.cond:
                state.end = seq + 1 if state.end is None else min(state.end, seq + 1)
            state.finish(seq, _Failure(exc))
            return
        del batch
        state.finish(seq, moved)
        del moved


def _read_next(state: _Pass) -> tuple[int, Any] | None:
    """Reads one batch and numbers it; None when this worker should exit.

    The source lock is taken with a timeout so that workers queued behind one stuck in
    the loader's ``next()`` still notice a stop.
    """
    while not state.source_lock.acquire(timeout=_POLL_SECONDS):
        if state.stopped:
            state.release_claim()
            return None
    try:
        with state.cond:
            if state.stopped or state.end is not None:
                state.release_claim()
                return None
        seq = state.next_to_read
        state.next_to_read += 1
        state.reader = threading.current_thread()
        try:
            return seq, next(state.source)
        except StopIteration:
            with state.cond:
                state.end = seq
            state.release_claim()
            return None
        except BaseException as exc:  # delivered to the consumer, in order
            with state.cond:
                state.end = seq + 1
            state.finish(seq, _Failure(exc))
            return None
        finally:
            state.reader = None
    finally:
        state.source_lock.release()


def _register_exit_hook() -> None:
    global _exit_hook_registered
    with _exit_hook_lock:
        if not _exit_hook_registered:
            atexit.register(_stop_all_at_exit)
            _exit_hook_registered = True


def _stop_all_at_exit() -> None:
    """Stops live passes and waits for mid-transfer workers before torch_xla shuts down.

    Without this, exiting while a daemon worker is inside a transfer aborts the process
    ("terminate called without an active exception", SIGABRT) in torch_xla 2.9.
    """
    passes = list(_live_passes)
    for state in passes:
        state.stop()
    deadline = time.monotonic() + _JOIN_SECONDS
    for state in passes:
        state.join(max(0.0, deadline - time.monotonic()))


class DeviceLoader(Generic[T]):
    """Wraps an iterable of batches and yields them, in order, already on the device.

    Args:
        loader: any iterable of batches; typically a ``torch.utils.data.DataLoader``.
            Each ``iter()`` of the DeviceLoader starts a new pass over it.
        prefetch: how many batches may be read or moved ahead of the consumer (>= 1).
        threads: worker threads (>= 1); default ``min(2, prefetch)``: one can read the
            loader while another transfers. More than ``prefetch`` would sit idle.
        device: target device; ``None`` means ``torch_xla.device()``.

    ``wait_seconds`` is the time the consumer spent blocked waiting for batches, summed
    over every pass; it is also added to the process-wide counter ``input_wait_seconds``.
    """

    def __init__(
        self,
        loader: Iterable[T],
        prefetch: int = DEFAULT_PREFETCH,
        threads: int | None = None,
        device: str | torch.device | None = None,
    ) -> None:
        if not _is_iterable(loader):
            raise ValueError(
                f"DeviceLoader: loader must be an iterable of batches (a DataLoader, list, "
                f"generator, ...); got {type(loader).__name__} {_short_repr(loader)}"
            )
        if not _is_int(prefetch) or prefetch < 1:
            raise ValueError(
                f"DeviceLoader: prefetch={prefetch!r} is invalid; it must be an int >= 1 "
                "(the number of batches kept ready ahead of the consumer)"
            )
        if threads is not None and (not _is_int(threads) or threads < 1):
            raise ValueError(
                f"DeviceLoader: threads={threads!r} is invalid; it must be None (default "
                f"min({DEFAULT_THREADS}, prefetch)) or an int >= 1"
            )
        self.loader = loader
        self.prefetch = prefetch
        requested = min(DEFAULT_THREADS, prefetch) if threads is None else threads
        if requested > prefetch:
            log.debug(
                "DeviceLoader: threads=%d > prefetch=%d; using %d threads",
                requested,
                prefetch,
                prefetch,
            )
        self.threads = min(requested, prefetch)
        self.device = _resolve_device(device)
        self._name = f"DeviceLoader-{next(_loader_ids)}"
        self._wait_lock = threading.Lock()
        self._wait_seconds = 0.0

    @property
    def wait_seconds(self) -> float:
        """Seconds consumers of this loader spent blocked waiting for a batch, all passes."""
        with self._wait_lock:
            return self._wait_seconds

    def _add_wait(self, seconds: float) -> None:
        with self._wait_lock:
            self._wait_seconds += seconds

    def __iter__(self) -> DeviceLoaderIterator[T]:
        return DeviceLoaderIterator(self)

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]  # TypeError when it has none

    def __bool__(self) -> bool:
        # Without this, truth-testing would call __len__ and fail for unsized loaders.
        return True

    def __repr__(self) -> str:
        return (
            f"DeviceLoader({type(self.loader).__name__}, prefetch={self.prefetch}, "
            f"threads={self.threads}, device={self.device})"
        )


class DeviceLoaderIterator(Generic[T]):
    """One pass: starts the workers; ``close()`` (or ``with``, or dropping it) stops them."""

    def __init__(self, owner: DeviceLoader[T]) -> None:
        self._owner = owner
        self.wait_seconds = 0.0
        self.batches = 0
        source = iter(owner.loader)  # in the caller's thread: DataLoader starts its workers here
        state = _Pass(source, owner.device, owner.prefetch, owner.threads, owner._name)
        self._state: _Pass | None = state
        # Workers never reference this iterator, so garbage collection reaches it and
        # the finalizer stops them; it only signals, since a finalizer must not block.
        self._finalizer = weakref.finalize(self, _Pass.stop, state)
        self._finalizer.atexit = False  # the module's exit hook stops and joins instead
        state.start()

    def __iter__(self) -> DeviceLoaderIterator[T]:
        return self

    def __next__(self) -> T:
        state = self._state
        if state is None:
            raise StopIteration
        started = time.perf_counter()
        with state.cond:
            while True:
                seq = state.next_to_yield
                if seq in state.ready:
                    result = state.ready.pop(seq)
                    state.next_to_yield += 1
                    state.claimed -= 1
                    state.cond.notify_all()
                    break
                if state.stopped or (state.end is not None and seq >= state.end):
                    result = _END
                    break
                state.cond.wait(_POLL_SECONDS)
        waited = time.perf_counter() - started
        self.wait_seconds += waited
        self._owner._add_wait(waited)
        counters.incr(counters.INPUT_WAIT_SECONDS, waited)
        if result is _END:
            self.close()
            raise StopIteration
        if isinstance(result, _Failure):
            exc = result.exc
            result.exc = None  # the consumer's frame is the only holder from here on
            assert exc is not None
            self.close()
            try:
                raise exc  # the original object: its traceback still holds the worker frames
            finally:
                del exc
        self.batches += 1
        counters.incr(counters.INPUT_BATCHES)
        return result

    def close(self) -> None:
        """Stops the workers and waits briefly for any mid-transfer; idempotent."""
        state = self._state
        if state is None:
            return
        self._state = None
        self._finalizer.detach()
        state.stop()
        # The loader's iterator is released, not closed, as a for loop's break would: the
        # caller may still hold it (a generator passed in directly) and go on with it.
        state.join(_JOIN_SECONDS)

    def __enter__(self) -> DeviceLoaderIterator[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._owner)


def _is_iterable(obj: object) -> bool:
    if isinstance(obj, (str, bytes)):
        return False  # iterable, but never a batch source; almost certainly a mistake
    return isinstance(obj, collections.abc.Iterable) or hasattr(type(obj), "__getitem__")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short_repr(obj: object) -> str:
    text = repr(obj)
    return text if len(text) <= 60 else text[:57] + "..."
