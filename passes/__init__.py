"""Pure FX-to-FX rewrites of Dynamo graphs: host syncs out, traced optimizer steps exact.

Imports torch only, never torch_xla.
"""

from .base import GraphPass, PassResult
from .device_moves import hoist_device_moves
from .int_inputs import tensorify_int_inputs
from .negated_scalars import hoist_scalar_negation
from .pipeline import run_pipeline
from .tensorify_scalars import tensorify_scalar_reads
from .zero_lr_denominator import fold_step_size_last

#: Passes for Dynamo graphs (torch-level ops), run in this order before AOTAutograd.
DYNAMO_PASSES: tuple[GraphPass, ...] = (
    tensorify_scalar_reads, hoist_scalar_negation, fold_step_size_last,
)

__all__ = [
    "DYNAMO_PASSES",
    "fold_step_size_last",
    "GraphPass",
    "PassResult",
    "hoist_device_moves",
    "hoist_scalar_negation",
    "run_pipeline",
    "tensorify_int_inputs",
    "tensorify_scalar_reads",
]
