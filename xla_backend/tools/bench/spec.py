"""What a bench cell is: the models, loops and defaults, and the spec and result records.

Both sides of the process boundary use them: the parent sends a :class:`CellSpec` to the
child as JSON and reads back a :class:`CellResult` from the line after
:data:`RESULT_PREFIX`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

# Bench model name -> (workload name in xla_backend.tools.workloads, size overrides).
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "mlp": ("mlp", {}),
    "cnn": ("cnn", {}),
    "resnet": ("resnet", {}),
    "transformer_lm": ("transformer_lm", {}),  # the DESIGN.md anchor size
    "transformer_lm_small": (
        "transformer_lm",
        {"batch": 8, "seq": 32, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256},
    ),
    # issue 13's memory workload: 12 x Linear(2048, 2048), 50M parameters
    "mlp50m": ("mlp", {"batch": 64, "in_features": 2048, "hidden": 2048, "depth": 12}),
    "gpt": ("gpt", {}),
    "bert": ("bert", {}),
    # library models nobody here tuned for (torchvision, transformers: the dev extra)
    "tv_resnet18": ("tv_resnet18", {}),
    "hf_gpt2": ("hf_gpt2", {}),
    "hf_bert": ("hf_bert", {}),
}
DEFAULT_MODELS = ("mlp", "resnet", "transformer_lm", "bert")


LOOPS = {
    "plain": "train_step: forward, backward, AdamW step",
    "A": "train_step_clip: backward, clip_grad_norm_, AdamW, LambdaLR stepped every step",
    "B": "train_step_amp: GradScaler scale/backward/unscale_/clip/step/update, AdamW",
}
DEFAULT_LOOPS = ("A", "B")

MEMORY_METRIC = ("peak host RSS of the cell's own process in MiB (getrusage ru_maxrss: a "
                 "high-water mark, imports and the runtime included)")

RESULT_PREFIX = "BENCH-RESULT "
DEFAULT_STEPS = 10
DEFAULT_WARMUP = 3
DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class CellSpec:
    """What one cell runs; JSON round-trips it to the child process.

    ``backend`` may also be any other name torch.compile accepts, or ``module:function``
    naming a backend callable (run on the CPU); both are for experiments and tests.
    ``cache_dir`` turns syncfree_xla's on-disk cache on in that directory (warm-start
    checks); without it the cache is off, so first steps are cold. ``paired="eager"``
    interleaves eager's steps with the measured ones in the same process: both see the
    same machine load, so their ratio holds still on a busy machine where the timings
    of two separate processes do not. ``paired_loop="plain"`` does the same with another
    loop of the same model and backend, after everything else was measured (its second
    model and compile would otherwise count in this cell's counters and memory): how
    much a loop's clipping or GradScaler adds is a few percent, less than two processes
    differ on a shared machine. ``devices=N`` runs XLA backends data-parallel over
    an SPMD mesh of N devices (N virtual CPU devices on the CPU client), each batch
    split over them (``xla_backend.sharding``); None is the plain single-device run.
    """

    model: str
    loop: str
    backend: str
    steps: int = DEFAULT_STEPS
    warmup: int = DEFAULT_WARMUP
    threads: int | None = None
    cache_dir: str | None = None
    pipelined: bool = True
    paired: str | None = None
    paired_loop: str | None = None
    devices: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> CellSpec:
        return cls(**json.loads(text))


@dataclass
class CellResult:
    """One cell's figures; ``None`` where a figure does not apply or was not reached."""

    model: str
    loop: str
    backend: str
    status: str = "ok"  # "ok", "failed" or "skipped"
    error: str | None = None
    detail: str | None = None  # a failure's traceback or stderr tail (JSON only)
    first_step_s: float | None = None
    warmup_s: float | None = None  # all warm-up steps, the first included
    steady_ms: float | None = None
    steady_ms_min: float | None = None
    pipelined_ms: float | None = None
    paired_steady_ms: float | None = None  # the paired backend's steps, interleaved
    paired_steady_ms_min: float | None = None
    paired_ratio: float | None = None  # median over steps of this step / the paired step
    paired_loop_steady_ms: float | None = None  # the paired loop's steps, interleaved
    loop_ratio: float | None = None  # median over steps of this step / the paired loop's
    syncs_per_step: float | None = None
    executions_per_step: float | None = None
    xla_compiles_after_warmup: int | None = None
    dynamo_graphs_after_warmup: int | None = None
    graph_breaks: int | None = None
    cache_graph_hits: int | None = None
    cache_graph_misses: int | None = None
    cache_aot_hits: int | None = None
    cache_aot_misses: int | None = None
    eager_fallbacks: int | None = None
    peak_rss_mb: float | None = None
    start_rss_mb: float | None = None
    final_loss: float | None = None
    threads: int | None = None
    steps: int | None = None
    warmup: int | None = None
    wall_s: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CellResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def one_line(text: str, limit: int = 300) -> str:
    """An error message squeezed onto one line, for tables and progress output."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
