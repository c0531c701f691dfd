"""Keeps the host and the device busy at once: a compile pool and in-flight accounting.

XLA compiles release the GIL, so the graphs of one step (forward and backward arrive
together from AOTAutograd) compile side by side on ``compile_threads`` workers while
the host goes on. Executions are asynchronous in torch_xla already; this module makes a
call block until its results exist when ``async_dispatch`` is off (for measuring what
the overlap buys) and counts the time the host spends waiting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .. import counters, xla_internals, xla_metrics
from . import host_memory

log = logging.getLogger(__name__)

_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}
_compiling: dict[str, Future] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    with _lock:
        pool = _pools.get(threads)
        if pool is None:
            pool = ThreadPoolExecutor(max_workers=threads,
                                      thread_name_prefix=f"syncfree-xla-compile-{threads}")
            _pools[threads] = pool
        return pool


def compile_once(key: str, compile_fn: Callable[[], None], threads: int) -> Future:
    """Runs ``compile_fn`` on the compile pool unless ``key`` is already compiling or done.

    Two graphs with the same key (the same computation reached from two threads or
    two compiled functions) share one compile.
    """
    with _lock:
        future = _compiling.get(key)
        if future is not None:
            counters.incr(counters.COMPILES_SHARED)
            return future
        future = Future()
        _compiling[key] = future

    def run() -> None:
        started = time.perf_counter()
        try:
            compile_fn()
        except BaseException as exc:  # the caller re-raises it with its traceback
            with _lock:
                _compiling.pop(key, None)
            future.set_exception(exc)
            return
        counters.incr(counters.COMPILE_SECONDS, time.perf_counter() - started)
        host_memory.release()
        future.set_result(None)

    _pool(threads).submit(run)
    return future


def forget(key: str) -> None:
    """Lets ``key`` compile again: torch_xla evicted what it compiled."""
    with _lock:
        _compiling.pop(key, None)


def reset() -> None:
    """Forgets finished compiles: the next graph with one of their keys compiles again.

    torch_xla keeps its own executable cache, so such a compile is a lookup there.
    Compiles still running stay known until they finish.
    """
    with _lock:
        for key in [k for k, f in _compiling.items() if f.done()]:
            del _compiling[key]


def wait_compiled(future: Future) -> None:
    """Blocks until a compile finished; the time counts as waiting on the runtime."""
    if future.done():
        future.result()
        return
    started = time.perf_counter()
    try:
        future.result()
    finally:
        counters.incr(counters.COMPILE_WAIT_SECONDS, time.perf_counter() - started)


def dispatched(results: list[torch.Tensor], async_dispatch: bool) -> None:
    """Accounts one enqueued execution; without async dispatch, waits for its results.

    The queue depth is what was dispatched (our executions and input materializations)
    minus what torch_xla has finished (it records ``ExecuteTime`` on completion).
    torch_xla's ready callbacks are not used: a Python callback needs the GIL on the
    execution thread while ``_run_cached_graph`` may hold it waiting on that execution.
    """
    if not results:
        return
    issued = counters.counter(counters.EXECUTIONS) + counters.counter(
        counters.INPUT_MATERIALIZATIONS)
    counters.set_max(counters.QUEUE_DEPTH_MAX, max(0, issued - xla_metrics.executions()))
    if not async_dispatch:
        started = time.perf_counter()
        xla_internals.wait_device_ops()
        counters.incr(counters.DISPATCH_WAIT_SECONDS, time.perf_counter() - started)


def timed_wait(fn: Callable[[], Any]) -> Any:
    """Runs a call that may block on the device and counts the time as dispatch waiting."""
    started = time.perf_counter()
    try:
        return fn()
    finally:
        counters.incr(counters.DISPATCH_WAIT_SECONDS, time.perf_counter() - started)
