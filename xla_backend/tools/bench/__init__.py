"""The measurement engine behind ``syncfree-xla bench`` and the perf-regression gate.

A run is a matrix of cells, one per (model, loop, backend). Each cell runs in a fresh
Python process (``python -m xla_backend.tools.bench --cell SPEC``) because a process carries
state that would leak from one cell into the next and falsify its figures: Dynamo's
caches, torch_xla's compiled-graph cache and metrics, autograd's per-device queues,
the resident set. A crash, a hang or a segfault ends only that cell: the parent
records it as failed, with its error, and goes on.

What a cell measures (after ``warmup`` steps, over ``steps`` steps, each followed by a
device barrier):

* cold first-step time (Dynamo, AOTAutograd, tracing, compiles and the execution;
  on-disk caches off: syncfree_xla runs with ``cache=False``, inductor with an empty
  cache directory of its own) and the time of all warm-up steps, since recompiles
  often land in the second step;
* steady step time, the median of the per-step wall times, and the pipelined step
  time (``steps`` more steps with a single barrier at the end, divided by ``steps``),
  which is what an asynchronous backend buys;
* host syncs, XLA executions and XLA compiles per step from torch_xla's own metrics,
  and graphs Dynamo compiled after warm-up;
* peak memory: the host RSS high-water mark of the cell's process (``getrusage``
  ``ru_maxrss``, imports included) -- see :data:`MEMORY_METRIC`.

Timings on a shared machine are noisy: compare backends as ratios within one run, or
interleave a second backend's steps in the same process (``CellSpec.paired``), which
the perf gate does with eager, or the plain loop's with a loop A or B cell
(``CellSpec.paired_loop``, ``bench --pair-loops``).
"""

from ..backends import BACKEND_DOCS, BACKENDS, XLA_BACKENDS
from .cell import PreparedStep, measure_cell, prepare
from .commands import add_bench_commands, bench_command
from .plot import matplotlib_available, write_plot
from .report import (
    SCHEMA_VERSION,
    TABLE_HEADER,
    eager_times,
    environment,
    format_table,
    make_report,
    progress_line,
    table_row,
    write_json,
)
from .runner import is_timeout, plan, run_cell, run_matrix
from .spec import (
    DEFAULT_LOOPS,
    DEFAULT_MODELS,
    DEFAULT_STEPS,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WARMUP,
    LOOPS,
    MEMORY_METRIC,
    MODELS,
    RESULT_PREFIX,
    CellResult,
    CellSpec,
    one_line,
)

__all__ = [
    "BACKENDS",
    "BACKEND_DOCS",
    "DEFAULT_LOOPS",
    "DEFAULT_MODELS",
    "DEFAULT_STEPS",
    "DEFAULT_TIMEOUT_S",
    "DEFAULT_WARMUP",
    "LOOPS",
    "MEMORY_METRIC",
    "MODELS",
    "RESULT_PREFIX",
    "SCHEMA_VERSION",
    "TABLE_HEADER",
    "XLA_BACKENDS",
    "CellResult",
    "CellSpec",
    "PreparedStep",
    "add_bench_commands",
    "bench_command",
    "eager_times",
    "environment",
    "format_table",
    "is_timeout",
    "make_report",
    "matplotlib_available",
    "measure_cell",
    "one_line",
    "plan",
    "prepare",
    "progress_line",
    "run_cell",
    "run_matrix",
    "table_row",
    "write_json",
    "write_plot",
]
