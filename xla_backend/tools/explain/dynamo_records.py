"""Dynamo's own records of a run, as report entries: graph breaks and recompiles.

Dynamo keeps why it broke a graph (``graph_break_reasons``) and which guard failed
(compilation metrics' ``recompile_reason``); this module turns them into sentences.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .location import Location, frames_from_summaries, innermost
from .report import GraphBreak, Recompile


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


def graph_breaks(reasons: Sequence[Any]) -> list[GraphBreak]:
    """Dynamo's GraphCompileReasons, one entry per reason and place, counted."""
    merged: dict[tuple, GraphBreak] = {}
    for reason in reasons:
        frames = frames_from_summaries(getattr(reason, "user_stack", None) or [])
        inner, user = innermost(frames)
        text = _break_reason(str(getattr(reason, "reason", reason)))
        key = (text, inner)
        if key in merged:
            merged[key].count += 1
        else:
            merged[key] = GraphBreak(text, inner, user)
    return list(merged.values())


def _break_reason(text: str) -> str:
    """Dynamo's headline, plus its ``Explanation:`` line when it has one."""
    headline = _first_line(text)
    match = re.search(r"^\s*Explanation:\s*(\S.*)$", text, re.MULTILINE)
    return f"{headline}: {match[1].strip()}" if match else headline


def frame_code(metric: Any, metrics: Sequence[Any]) -> tuple[str, Location | None]:
    """(function name, where it is defined) of a metric's frame.

    A failed compile's entry may lack them; another entry of the same frame has them.
    """
    frame = str(metric.compile_id).split("/")[0]
    for candidate in (metric, *metrics):
        if candidate.co_filename and str(candidate.compile_id).split("/")[0] == frame:
            name = candidate.co_name or "?"
            return name, Location(candidate.co_filename, candidate.co_firstlineno or 0, name)
    return "?", None


def recompiles(metrics: Sequence[Any]) -> list[Recompile]:
    """Dynamo's compilation metrics that carry a ``recompile_reason``, one entry each."""
    found = []
    for metric in metrics:
        reason = getattr(metric, "recompile_reason", None)
        if not reason:
            continue
        name, location = frame_code(metric, metrics)
        text = _guard_failure(reason)
        if hit_recompile_limit(metric):
            text += "; the recompile limit was reached, so this call ran without compiling"
        found.append(Recompile(name, location, str(metric.compile_id), text))
    return found


def hit_recompile_limit(metric: Any) -> bool:
    """Whether this compile failed because its frame reached Dynamo's recompile limit."""
    return re.search(r"recompile[ _]limit", str(getattr(metric, "fail_reason", "") or ""),
                     re.IGNORECASE) is not None


_GUARD_FAILURE = re.compile(r"^(?P<id>\d+/\d+): (?P<guard>[^#]*?)\s*#\s*(?P<code>[^#]*?)\s*"
                            r"#\s*(?P<where>.*)$")


def _guard_failure(reason: str) -> str:
    """Dynamo's ``0/0: scale == 0.5   # code  # file:line in fn`` in a sentence."""
    text = re.sub(r"[ \t]+", " ", reason.strip())
    match = _GUARD_FAILURE.match(text) if "\n" not in text else None
    if match is None:
        return "guard failed: " + re.sub(r"\s+", " ", text)
    return (f"guard `{match['guard']}` of compile {match['id']} failed "
            f"(guarding `{match['code']}` at {match['where']})")
