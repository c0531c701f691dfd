"""Ctrl-C that lands in a Dynamo guard still interrupts the program.

torch 2.9 runs some of Dynamo's guards as Python functions: every frame carries at
least one (the saved-tensors-hooks guard), checked before each call of a compiled
frame. The C++ ``LAMBDA_GUARD`` that runs them treats any exception they raise as a
failed guard and clears it. A KeyboardInterrupt that Python's SIGINT handler raises
while one runs is therefore lost: the frame recompiles and the training loop goes on
as if Ctrl-C had never been pressed. In a busy loop on two loaded cores that was about
one press in thirty.

While Python's own SIGINT handler is in place, :func:`install` puts in one that acts
the same, except inside guard code: there it sets a profile function
(``sys.setprofile``) that raises the KeyboardInterrupt as the first Python function
called outside the guards starts (the compiled frame itself, or Dynamo's compile), then
removes itself. A handler the program installed itself is left alone, and so is a
profiler already running (then the interrupt may still be lost, as without this).
"""

from __future__ import annotations

import signal
import sys
import threading
import types

import torch._dynamo.guards

__all__ = ["install", "uninstall"]

_GUARDS_FILE = torch._dynamo.guards.__file__
#: Guard functions call a few helpers at most; a guard frame deeper than this is Dynamo
#: building guards (a compile), where a KeyboardInterrupt propagates normally.
_GUARD_DEPTH = 8


def _in_guard(frame: types.FrameType | None) -> bool:
    """Whether ``frame`` runs in a Python guard: a function of Dynamo's guards module, or
    the shape-guard function it builds from source (``def guard(L)``)."""
    for _ in range(_GUARD_DEPTH):
        if frame is None:
            return False
        code = frame.f_code
        if code.co_filename == _GUARDS_FILE or (
                code.co_filename == "<string>" and code.co_name == "guard"):
            return True
        frame = frame.f_back
    return False


def _raise_after_guards(frame: types.FrameType, event: str, arg: object) -> None:
    """Profile function: raises the deferred KeyboardInterrupt in the first function
    called outside guard code. Python removes a profile function that raises."""
    if event == "call" and not _in_guard(frame):
        signal.default_int_handler(signal.SIGINT, frame)


def _interrupt(signum: int, frame: types.FrameType | None) -> None:
    """Python's default SIGINT handler, deferred past Dynamo's guards."""
    profiling = sys.getprofile()
    if profiling is _raise_after_guards:
        return  # already pressed once, and not raised yet
    if profiling is None and _in_guard(frame):
        sys.setprofile(_raise_after_guards)
        return
    signal.default_int_handler(signum, frame)


def install() -> None:
    """Puts :func:`_interrupt` in place of Python's default SIGINT handler (main thread
    only, where Python allows it); any other handler stays."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupt)


def uninstall() -> None:
    """Gives Python's default SIGINT handler back, if ours is still the one in place."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) is _interrupt:
        signal.signal(signal.SIGINT, signal.default_int_handler)
