"""The shape every pass has: a named callable that rewrites a GraphModule in place.

A pass reports whether it changed anything, so the pipeline can log what ran
and the cache key can record which passes fired.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.fx


@dataclass(frozen=True)
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool


@dataclass(frozen=True)
class GraphPass:
    """A pure FX-to-FX rewrite. ``version`` changes whenever its output could change."""

    name: str
    version: int
    run: Callable[[torch.fx.GraphModule], PassResult]

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        result = self.run(gm)
        if result.modified:
            result.graph_module.graph.lint()
            result.graph_module.recompile()
        return result
