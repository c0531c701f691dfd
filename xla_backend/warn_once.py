"""One warning per kind of trouble per process, then debug lines: the backend's warn-once.

A compile or cache problem tends to repeat at every graph; the first warning says what
and why, repeats go to debug. ``torch._dynamo.reset()`` (through the backend's
``reset``) forgets what was said, as a fresh process would.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Hashable

_instances: weakref.WeakSet[WarnOnce] = weakref.WeakSet()


class WarnOnce:
    """Warns the first time a key comes up; later ones are logged at debug level."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._seen: set[Hashable] = set()
        self._lock = threading.Lock()
        _instances.add(self)

    def __call__(self, key: Hashable, message: str, *args: object) -> bool:
        """Logs ``message % args``; whether it was the first time for ``key``.

        Exceptions are logged as their text. A record keeps its arguments for as long
        as a handler keeps the record (pytest's log capture, a memory handler), and an
        exception raised inside a trace keeps the trace's frames alive through its
        traceback: the stand-ins and lazy results, which the next input
        materialization would sync again.
        """
        args = tuple(str(a) if isinstance(a, BaseException) else a for a in args)
        with self._lock:
            first = key not in self._seen
            self._seen.add(key)
        (self._log.warning if first else self._log.debug)(message, *args)
        return first

    def seen(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._seen

    def reset(self) -> None:
        with self._lock:
            self._seen.clear()


def reset_all() -> None:
    """Forgets every warning given in this process."""
    for instance in list(_instances):
        instance.reset()


__all__ = ["WarnOnce", "reset_all"]
