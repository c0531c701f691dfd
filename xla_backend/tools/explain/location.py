"""Where in the user's code a sync point, graph break or compiled function is.

The report names the user's own line, not torch's or this project's: this module reads
FX ``stack_trace`` strings and Python stacks and tells the user's frames from library ones.
"""

from __future__ import annotations

import os
import re
import sys
import traceback
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx

_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>[^\n]+)'
                    r'(?:\n(?P<code>[^\n]*))?')


def _package_dir(module: types.ModuleType | None) -> str | None:
    path = getattr(module, "__file__", None)
    return os.path.dirname(os.path.abspath(path)) + os.sep if path else None


def _library_dirs() -> tuple[str, ...]:
    """Where code that is not the user's lives: torch, torch_xla and this project."""
    import passes

    mods = [torch, sys.modules.get("torch_xla"), sys.modules[_BACKEND_PACKAGE], passes]
    dirs = [_package_dir(m) for m in mods]
    return tuple(d for d in dirs if d)


_TOOLS_PACKAGE = __package__.rpartition(".")[0]  # xla_backend.tools, above explain
_BACKEND_PACKAGE = _TOOLS_PACKAGE.rpartition(".")[0]  # xla_backend, above its tools

#: Modules of this package that hold code written the way users write it (step
#: functions): a sync or graph break there is reported at its own line.
_USER_STYLE_MODULES = ("workloads.py", "demo.py")


def _is_library(filename: str) -> bool:
    if filename.startswith("<"):
        return True
    path = os.path.abspath(filename)
    ours = _package_dir(sys.modules[_TOOLS_PACKAGE])  # the tools: workloads.py, demo.py
    if ours and path.startswith(ours) and os.path.basename(path) in _USER_STYLE_MODULES:
        return False
    return path.startswith(_library_dirs())


def _display_path(filename: str) -> str:
    """Relative to the working directory when inside it: short, and still clickable."""
    try:
        rel = os.path.relpath(filename)
    except ValueError:  # another drive on Windows
        return filename
    return filename if rel.startswith("..") else rel


@dataclass(frozen=True)
class Location:
    """One source line: where a sync point, graph break or compiled function is."""

    filename: str
    lineno: int
    function: str = ""
    code: str = ""

    def __str__(self) -> str:
        return f"{_display_path(self.filename)}:{self.lineno}"

    def describe(self) -> str:
        """``file:line in function: code``, as much of it as is known."""
        text = str(self)
        if self.function:
            text += f" in {self.function}"
        return text + (f": {self.code}" if self.code else "")


def _frames_from_stack_trace(text: str) -> list[Location]:
    """The frames of an FX ``stack_trace`` string, outermost first."""
    return [Location(m["file"], int(m["line"]), m["func"].strip(), (m["code"] or "").strip())
            for m in _FRAME.finditer(text or "")]


def frames_from_summaries(stack: Iterable[traceback.FrameSummary]) -> list[Location]:
    """The frames of a Python stack (``traceback.extract_stack()``, Dynamo's user_stack)."""
    return [Location(f.filename, f.lineno or 0, f.name, (f.line or "").strip()) for f in stack]


def innermost(frames: Sequence[Location]) -> tuple[Location | None, Location | None]:
    """(innermost frame, innermost frame in the user's code) of a stack."""
    if not frames:
        return None, None
    user = next((f for f in reversed(frames) if not _is_library(f.filename)), None)
    return frames[-1], user


def node_frames(node: torch.fx.Node) -> list[Location]:
    """The frames an FX node was traced from (its ``stack_trace``), outermost first."""
    return _frames_from_stack_trace(node.meta.get("stack_trace", ""))


def op_name(node: torch.fx.Node) -> str:
    """The node's op as the report names it: ``Tensor.item()``, ``aten.nonzero``..."""
    if node.op == "call_method":
        return f"Tensor.{node.target}()"
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"aten.{target.__name__.split('.')[0]}"
    module = getattr(target, "__module__", "") or ""
    name = getattr(target, "__name__", str(target))
    return f"{'torch.' if module.startswith('torch') else ''}{name}()"
