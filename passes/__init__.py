"""Pure FX-to-FX rewrites that remove host syncs. Imports torch only, never torch_xla."""

from .base import GraphPass, PassResult
from .negated_scalars import hoist_scalar_negation
from .pipeline import run_pipeline
from .tensorify_scalars import tensorify_scalar_reads

#: Passes for Dynamo graphs (torch-level ops), run in this order before AOTAutograd.
DYNAMO_PASSES: tuple[GraphPass, ...] = (tensorify_scalar_reads, hoist_scalar_negation)

__all__ = [
    "DYNAMO_PASSES",
    "GraphPass",
    "PassResult",
    "hoist_scalar_negation",
    "run_pipeline",
    "tensorify_scalar_reads",
]
