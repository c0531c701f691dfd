"""Runs a list of passes in order and says which ones changed the graph."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch.fx

from .base import GraphPass

log = logging.getLogger(__name__)

__all__ = ["run_pipeline"]


def run_pipeline(gm: torch.fx.GraphModule, pipeline: Sequence[GraphPass]) -> list[str]:
    """Rewrites ``gm`` in place with each pass; returns the names of those that fired."""
    fired = [p.name for p in pipeline if p(gm).modified]
    if fired:
        log.debug("passes that rewrote the graph: %s", ", ".join(fired))
    return fired
