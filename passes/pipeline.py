"""Runs a list of passes in order and says which ones changed the graph."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch.fx

from .base import GraphPass

log = logging.getLogger(__name__)

__all__ = ["OBSERVERS", "copy_graph", "reset", "run_pipeline"]

#: Callbacks ``observer(pass_name, gm, error)``, told with ``None`` before the first pass,
#: with a pass's name after that pass changed ``gm``, and with a pass's name and the
#: exception it raised after a failed pass was undone, so ``xla_backend.tools.explain`` can
#: say which pass removed which sync, and which one could not run. Empty unless something
#: watches; must not modify ``gm``.
OBSERVERS: list[Callable[[str | None, torch.fx.GraphModule, BaseException | None], None]] = []
_warned: set[str] = set()  # passes that failed once: later failures log at debug level


def reset() -> None:
    """Forgets which passes failed, so the next failure warns again."""
    _warned.clear()


def _notify(pass_name: str | None, gm: torch.fx.GraphModule,
            error: BaseException | None = None) -> None:
    for observer in list(OBSERVERS):
        observer(pass_name, gm, error)


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    """A copy of ``graph`` to go back to, with the attributes Dynamo sets on nodes
    (``_dynamo_source``)."""
    copied = torch.fx.Graph()
    val_map: dict[torch.fx.Node, torch.fx.Node] = {}
    copied.output(copied.graph_copy(graph, val_map))
    for old, new in val_map.items():
        for name, value in vars(old).items():
            vars(new).setdefault(name, value)
    return copied


def run_pipeline(gm: torch.fx.GraphModule, pipeline: Sequence[GraphPass]) -> list[str]:
    """Rewrites ``gm`` in place with each pass; returns the names of those that fired.

    A pass that raises is undone and skipped with one warning per pass: the graph keeps
    what it would have rewritten (a host read stays a host read), which is slower but
    never wrong, where a half-rewritten graph could be. ``fired`` never names it.
    """
    _notify(None, gm)
    fired: list[str] = []
    # The graph to go back to, copied only when the last copy went stale: most passes
    # change nothing, and a copy per pass was most of a warm start's rewrite time.
    before: torch.fx.Graph | None = None
    for p in pipeline:
        if before is None:
            before = copy_graph(gm.graph)
        try:
            modified = p(gm).modified
        except Exception as exc:  # a bug in a pass must not cost the user's step
            gm.graph, before = before, None
            gm.recompile()
            if p.name not in _warned:
                _warned.add(p.name)
                log.warning("syncfree_xla: pass %s failed and was skipped, so this graph keeps "
                            "what it would have rewritten (%s: %s); after passes %s. Please "
                            "report this.", p.name, type(exc).__name__, exc,
                            ", ".join(fired) or "none")
            _notify(p.name, gm, exc)
            continue
        if modified:
            before = None
            fired.append(p.name)
            _notify(p.name, gm)
    if fired:
        log.debug("passes that rewrote the graph: %s", ", ".join(fired))
    return fired
