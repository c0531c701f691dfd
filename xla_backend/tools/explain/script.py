"""``syncfree-xla explain script.py``: a user's script run unchanged inside a session.

Runs the script as ``__main__`` (``runpy``) with its own ``sys.argv``, and for ``--steps``
stops it once a function it compiled with syncfree_xla has been called that many times.
"""

from __future__ import annotations

import contextlib
import functools
import os
import runpy
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .report import ExplainReport
from .session import ExplainSession


class StepLimitReached(BaseException):
    """Ends a script after ``--steps`` calls; a BaseException so ``except Exception``
    in the script does not swallow it."""


@dataclass
class ScriptRun:
    """What ``syncfree-xla explain script.py`` saw: the report and how the script ended."""

    report: ExplainReport
    exit_code: int
    error: BaseException | None = None
    traceback: str = ""
    steps_run: int | None = None


def _is_ours(backend_arg: Any) -> bool:
    return backend_arg == "syncfree_xla" or getattr(backend_arg, "__name__", "") == "syncfree_xla"


class _StepCounter:
    """Counts calls of every function compiled with syncfree_xla; stops at the limit.

    Installed only for ``--steps``: it wraps ``torch.compile`` for the script's run.
    A compiled module gets a forward pre-hook (it stays the same object); a compiled
    function is wrapped with ``functools.wraps``.
    """

    def __init__(self, limit: int, on_step: Callable[[int], None] | None = None) -> None:
        self.limit = limit
        self.most = 0
        self._calls: dict[int, int] = {}
        self._on_step = on_step

    def tick(self, key: int) -> None:
        calls = self._calls.get(key, 0)
        if calls >= self.limit:
            raise StepLimitReached(f"stopped after {self.limit} steps")
        self._calls[key] = calls + 1
        if calls + 1 > self.most:
            self.most = calls + 1
            if self._on_step is not None:
                self._on_step(self.most)

    def wrap(self, compiled: Any) -> Any:
        key = id(compiled)
        if isinstance(compiled, torch.nn.Module):
            compiled.register_forward_pre_hook(lambda module, args: self.tick(key))
            return compiled

        @functools.wraps(compiled)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.tick(key)
            return compiled(*args, **kwargs)

        return counted

    def install(self) -> Callable[..., Any]:
        real = torch.compile

        @functools.wraps(real)
        def compile(model: Any = None, **kwargs: Any) -> Any:
            if model is None:  # decorator form: torch calls compile(model, ...) again
                return real(**kwargs)
            compiled = real(model, **kwargs)
            return self.wrap(compiled) if _is_ours(kwargs.get("backend")) else compiled

        torch.compile = compile  # type: ignore[assignment]
        return real


def _script_traceback(exc: BaseException, script: str) -> str:
    """The traceback from the script's own frames on (runpy's and ours left out)."""
    tb = exc.__traceback__
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename) != script:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb or exc.__traceback__))


@contextlib.contextmanager
def _as_main(script: str, argv: Sequence[str]) -> Iterator[None]:
    """``sys.argv`` and ``sys.path[0]`` as ``python script.py ARGS`` would have them."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(script))
    try:
        yield
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path


def run_script(path: str | os.PathLike[str], argv: Sequence[str] = (),
               steps: int | None = None,
               on_step: Callable[[int], None] | None = None) -> ScriptRun:
    """Runs a user's script as ``__main__`` inside an :class:`ExplainSession`.

    The script needs no change: every ``torch.compile(..., backend="syncfree_xla")``
    in it is recorded. With ``steps``, the script is stopped once any function it
    compiled with syncfree_xla is about to be called the ``steps + 1``-th time, and
    ``on_step(n)`` is called just before step ``n`` starts (the first call that makes
    some compiled function's count ``n``), as ``syncfree-xla check`` measures from one.
    An exception from the script is returned (with its traceback), not raised.
    Raises FileNotFoundError when ``path`` is not a file.
    """
    script = os.path.abspath(os.fspath(path))
    if not Path(script).is_file():
        raise FileNotFoundError(f"no such script: {os.fspath(path)}")
    counter = _StepCounter(steps, on_step) if steps is not None else None
    real_compile = counter.install() if counter is not None else None
    error: BaseException | None = None
    exit_code = 0
    text = ""
    try:
        with ExplainSession() as session, _as_main(script, argv):
            try:
                runpy.run_path(script, run_name="__main__")
            except StepLimitReached:
                pass
            except SystemExit as exc:
                if exc.code not in (None, 0):
                    error = exc
                    exit_code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:  # noqa: BLE001 - the user's error, reported
                error, exit_code = exc, 130 if isinstance(exc, KeyboardInterrupt) else 1
                text = _script_traceback(exc, script)
    finally:
        if real_compile is not None:
            torch.compile = real_compile  # type: ignore[assignment]
    report = session.report()
    steps_run = counter.most if counter is not None else None
    if counter is not None and steps_run is not None and steps_run >= counter.limit:
        report.notes.append(f"script stopped after {steps_run} steps (--steps)")
    return ScriptRun(report, exit_code, error, text, steps_run)
