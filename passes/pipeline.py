"""Runs a list of passes in order and says which ones changed the graph."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch.fx

from .base import GraphPass

log = logging.getLogger(__name__)

__all__ = ["OBSERVERS", "run_pipeline"]

#: Callbacks ``observer(pass_name, gm)``, told with ``None`` before the first pass and
#: with a pass's name after that pass changed ``gm``, so ``xla_backend.explain`` can say
#: which pass removed which sync. Empty unless something watches; must not modify ``gm``.
OBSERVERS: list[Callable[[str | None, torch.fx.GraphModule], None]] = []


def _notify(pass_name: str | None, gm: torch.fx.GraphModule) -> None:
    for observer in list(OBSERVERS):
        observer(pass_name, gm)


def run_pipeline(gm: torch.fx.GraphModule, pipeline: Sequence[GraphPass]) -> list[str]:
    """Rewrites ``gm`` in place with each pass; returns the names of those that fired."""
    _notify(None, gm)
    fired: list[str] = []
    for p in pipeline:
        if p(gm).modified:
            fired.append(p.name)
            _notify(p.name, gm)
    if fired:
        log.debug("passes that rewrote the graph: %s", ", ".join(fired))
    return fired
