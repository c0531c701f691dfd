"""Why a compiled step still syncs, breaks or recompiles: ``xla_backend.tools.explain``.

A sync-free step is only as good as the proof that it is one. Counting host syncs
(torch_xla's ``TransferFromDeviceTime``) says *that* a step syncs; this module says
*where* and *why*, per graph:

* every sync point in each Dynamo graph handed to ``syncfree_xla`` (``.item()``,
  ``float(t)``, data-dependent-shape ops), with the user's file and line from
  ``node.meta["stack_trace"]``, and whether a pass removed it (which one, told by the
  hook in ``passes.pipeline``) or why it was kept (the value crosses a graph break, it
  sizes a tensor, an op cannot take a 0-d tensor...);
* for each of its AOTAutograd graphs (forward / backward / inference), whether it runs
  as one XLA computation or op by op, and the sync points that decided so
  (``lower.split`` is asked the same question lowering asks);
* ``GradScaler`` steps taken with the masked, branch-free step (no host read) or the
  stock one (one host read), and why;
* graph breaks (``torch._dynamo.graph_break_reasons``) and recompiles with the guard
  that failed (Dynamo's compilation metrics, ``recompile_reason``);
* the host syncs that actually happened, from torch_xla's own metric.

Graph breaks and recompiles are Dynamo-wide: frames compiled with any backend while a
session is active are listed. Nothing is recorded while no session is active: the
hooks in ``backend.OBSERVERS`` and ``passes.pipeline.OBSERVERS`` are empty lists then.

Entry points: :func:`explain` (one function, called twice), :class:`ExplainSession`
(any code in a ``with`` block), :func:`run_script` (``syncfree-xla explain``).
"""

from .location import Location
from .report import (
    MASKED_GRAD_SCALER_STEP,
    AtenGraphReport,
    ExplainReport,
    GraphBreak,
    GraphReport,
    Recompile,
    SyncPoint,
)
from .script import ScriptRun, StepLimitReached, run_script
from .session import ExplainSession, explain

__all__ = [
    "AtenGraphReport",
    "ExplainReport",
    "ExplainSession",
    "GraphBreak",
    "GraphReport",
    "Location",
    "MASKED_GRAD_SCALER_STEP",
    "Recompile",
    "ScriptRun",
    "StepLimitReached",
    "SyncPoint",
    "explain",
    "run_script",
]
