"""Validated backend options, from ``torch.compile(options=...)`` and ``SYNCFREE_XLA_*``.

Every option, its default, and how its text form is parsed are declared once in
``_SPECS``; the README's table of environment variables mirrors it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

ENV_PREFIX = "SYNCFREE_XLA_"
DEFAULT_CACHE_MAX_BYTES = 2 * 1024**3


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


SIZE_FORMS = ("a number of bytes (1048576) or a number with a K, M, G or T suffix "
              "(500M, 2G, 1.5GiB)")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(text: str) -> int:
    """A byte count from ``123``, ``500M``, ``2G``, ``1.5GiB``; ValueError naming ``text``."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected {SIZE_FORMS}")
    number, unit = match.groups()
    return int(float(number) * _SIZE_UNITS[unit.lower()])


@dataclass(frozen=True)
class _Spec:
    kind: type
    default: Any
    doc: str
    parse: Callable[[str], Any]
    check: Callable[[Any], bool] = lambda value: True
    accepted: str = ""


def _positive(value: Any) -> bool:
    return value > 0


_SPECS: dict[str, _Spec] = {
    "cache": _Spec(bool, True, "keep compiled graphs in the on-disk cache", _parse_bool,
                   accepted="True or False"),
    "cache_dir": _Spec(str, None, "on-disk cache directory (default: $XDG_CACHE_HOME/syncfree_xla)",
                       str, lambda v: v is None or bool(str(v)), "a directory path"),
    "cache_max_bytes": _Spec(int, DEFAULT_CACHE_MAX_BYTES, "size cap of the on-disk cache",
                             parse_size, _positive, "a positive byte count, e.g. 2G"),
    "compile_threads": _Spec(int, None, "threads compiling graphs in parallel (default: cores)",
                             int, lambda v: v is None or v > 0, "a positive integer"),
    "async_dispatch": _Spec(bool, True, "return from a step as soon as its work is enqueued",
                            _parse_bool, accepted="True or False"),
    "join_graphs": _Spec(bool, True, "run a step's graphs as one XLA computation",
                         _parse_bool, accepted="True or False"),
    "syncfree_passes": _Spec(bool, True, "rewrite host syncs out of the graphs", _parse_bool,
                             accepted="True or False"),
    "cpu_rewrites": _Spec(bool, True, "on the CPU client, rewrite ops XLA:CPU runs slowly "
                          "(small-output convolutions as a matmul)", _parse_bool,
                          accepted="True or False"),
    "fallback": _Spec(str, "warn", "what to do with a graph XLA cannot run as one computation",
                      str, lambda v: v in ("warn", "error"), "'warn' or 'error'"),
}


@dataclass(frozen=True)
class Options:
    cache: bool = _SPECS["cache"].default
    cache_dir: str | None = _SPECS["cache_dir"].default
    cache_max_bytes: int = _SPECS["cache_max_bytes"].default
    compile_threads: int | None = _SPECS["compile_threads"].default
    async_dispatch: bool = _SPECS["async_dispatch"].default
    join_graphs: bool = _SPECS["join_graphs"].default
    syncfree_passes: bool = _SPECS["syncfree_passes"].default
    cpu_rewrites: bool = _SPECS["cpu_rewrites"].default
    fallback: str = _SPECS["fallback"].default

    def resolved_compile_threads(self) -> int:
        return self.compile_threads or (os.cpu_count() or 1)


def _check(name: str, value: Any, source: str) -> Any:
    spec = _SPECS[name]
    if value is not None or spec.default is not None:
        if spec.kind is bool and not isinstance(value, bool):
            raise ValueError(f"syncfree_xla option {name!r} from {source}: got {value!r}; "
                             f"accepted: {spec.accepted}")
        if spec.kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"syncfree_xla option {name!r} from {source}: got {value!r}; "
                             f"accepted: {spec.accepted}")
        if spec.kind is str and not isinstance(value, str):
            raise ValueError(f"syncfree_xla option {name!r} from {source}: got {value!r}; "
                             f"accepted: {spec.accepted}")
    if not spec.check(value):
        raise ValueError(f"syncfree_xla option {name!r} from {source}: got {value!r}; "
                         f"accepted: {spec.accepted}")
    return value


def resolve(options: Mapping[str, Any] | None = None,
            environ: Mapping[str, str] | None = None) -> Options:
    """Defaults, overridden by ``SYNCFREE_XLA_*`` variables, overridden by ``options``."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for key, text in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in _SPECS:
            continue
        try:
            parsed = _SPECS[name].parse(text)
        except ValueError as exc:
            raise ValueError(f"syncfree_xla: environment variable {key}={text!r}: {exc}; "
                             f"accepted: {_SPECS[name].accepted}") from None
        values[name] = _check(name, parsed, f"environment variable {key}")
    for name, value in (options or {}).items():
        if name not in _SPECS:
            raise ValueError(f"syncfree_xla: unknown option {name!r}; accepted options: "
                             f"{', '.join(sorted(_SPECS))}")
        values[name] = _check(name, value, "options={...}")
    return dataclasses.replace(Options(), **values)


def check_mode(mode: str | None) -> None:
    """Refuses ``torch.compile(mode=...)`` other than the default, naming what it takes.

    The modes (``reduce-overhead``, ``max-autotune``) are inductor's and mean nothing
    here; without this a user coming from inductor got a TypeError about ``__call__``.
    """
    if mode not in (None, "default"):
        raise ValueError(f"syncfree_xla: torch.compile(mode={mode!r}) is an inductor mode; "
                         f"this backend takes mode=None or 'default', and its own settings "
                         f"as options={{...}}: {', '.join(sorted(_SPECS))}")
