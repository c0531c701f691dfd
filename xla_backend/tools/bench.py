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
the perf gate does with eager.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .argtypes import positive_float, positive_int
from .backends import BACKEND_DOCS, BACKENDS, XLA_BACKENDS

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

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
    "gpt": ("gpt", {}),
    "bert": ("bert", {}),
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


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class CellSpec:
    """What one cell runs; JSON round-trips it to the child process.

    ``backend`` may also be any other name torch.compile accepts, or ``module:function``
    naming a backend callable (run on the CPU); both are for experiments and tests.
    ``cache_dir`` turns syncfree_xla's on-disk cache on in that directory (warm-start
    checks); without it the cache is off, so first steps are cold. ``paired="eager"``
    interleaves eager's steps with the measured ones in the same process: both see the
    same machine load, so their ratio holds still on a busy machine where the timings
    of two separate processes do not. ``devices=N`` runs XLA backends data-parallel over
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
    syncs_per_step: float | None = None
    executions_per_step: float | None = None
    xla_compiles_after_warmup: int | None = None
    dynamo_graphs_after_warmup: int | None = None
    graph_breaks: int | None = None
    cache_graph_hits: int | None = None
    cache_graph_misses: int | None = None
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


# --------------------------------------------------------------------------- child side


def _rss_mb() -> float:
    import resource

    # Linux reports KiB, macOS bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _resolve_backend(name: str) -> Any:
    """What torch.compile gets as ``backend``: a name, or an imported ``module:function``."""
    if ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        return getattr(importlib.import_module(module), attr)
    return name


def _dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far, from Dynamo's own counters."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


@dataclass
class PreparedStep:
    """A cell's training step, ready to run: ``step(i)`` trains on batch ``i``.

    ``barrier()`` waits until all work queued so far has finished (a no-op on the
    CPU, whose ops are synchronous). Shared by the subprocess cells and the
    pytest-benchmark suites, so both time the very same step.
    """

    step: Callable[[int], Any]
    barrier: Callable[[], None]
    batches: int
    notes: list[str]


def prepare(spec: CellSpec, batches: int) -> PreparedStep:
    """Builds model, optimizer and ``batches`` batches on the backend's device, compiles."""
    from ..device import configure_pjrt

    configure_pjrt()  # before torch_xla is imported, anywhere
    import torch

    if spec.model not in MODELS:
        raise ValueError(f"unknown model {spec.model!r}; accepted: {', '.join(MODELS)}")
    if spec.loop not in LOOPS:
        raise ValueError(f"unknown loop {spec.loop!r}; accepted: {', '.join(LOOPS)}")
    if spec.threads:
        torch.set_num_threads(spec.threads)
    on_xla = spec.backend in XLA_BACKENDS
    mesh = None
    if on_xla:
        import torch_xla
        import torch_xla.core.xla_model as xm

        if spec.devices is not None:
            from .. import sharding

            mesh = sharding.data_parallel_mesh(spec.devices)  # before any device tensor
        # Autograd sizes its per-device queues at the first backward of the process.
        device = torch_xla.device()

        def barrier() -> None:
            torch_xla.sync()
            xm.wait_device_ops()
    else:
        device = torch.device("cpu")

        def barrier() -> None:  # CPU ops are synchronous
            pass

    from . import workloads

    workload_name, sizes = MODELS[spec.model]
    work = workloads.get_workload(workload_name, **sizes)
    model = work.build_model().to(device)
    # A plain AdamW everywhere: syncfree_xla moves its step counter to the device itself.
    notes: list[str] = []
    if mesh is not None:
        notes.append(f"SPMD data parallel over {spec.devices} devices")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    fn, extra_args, extra_kwargs = _loop_parts(spec.loop, opt, device)
    compiled = _compile(fn, spec)
    if mesh is None:
        data = [work.make_batch(i, device) for i in range(batches)]
    else:
        data = [tuple(sharding.shard_batch(t, mesh) for t in work.make_batch(i))
                for i in range(batches)]
    barrier()

    def step(i: int) -> Any:
        loss = compiled(model, opt, *extra_args, *data[i % batches], **extra_kwargs)
        if spec.backend == "lazy":
            torch_xla.sync()  # the lazy loop's step boundary (mark_step)
        return loss

    return PreparedStep(step, barrier, batches, notes)


def measure_cell(spec: CellSpec) -> CellResult:
    """Runs one cell in this process. Call it in a fresh process (see :func:`run_cell`)."""
    from .. import counters, xla_metrics

    result = CellResult(spec.model, spec.loop, spec.backend, steps=spec.steps,
                        warmup=spec.warmup)
    total = spec.warmup + spec.steps * (2 if spec.pipelined else 1)
    prepared = prepare(spec, total)
    import torch  # only now: prepare() configures PJRT before anything imports torch_xla

    one, barrier = prepared.step, prepared.barrier
    result.notes = prepared.notes
    result.threads = torch.get_num_threads()
    on_xla = spec.backend in XLA_BACKENDS
    result.start_rss_mb = _rss_mb()

    started = time.perf_counter()
    loss = one(0)
    barrier()
    result.first_step_s = time.perf_counter() - started
    for i in range(1, spec.warmup):
        loss = one(i)
    barrier()
    # Recompiles often land in the second step (a step counter or lr that changed),
    # so the first step alone can understate the cold cost.
    result.warmup_s = time.perf_counter() - started

    other = _prepare_paired(spec, total)
    syncs, execs = xla_metrics.device_to_host_transfers(), xla_metrics.executions()
    compiles = xla_metrics.compiles()
    graphs, _ = _dynamo_counts()
    times, paired_times = [], []
    for i in range(spec.warmup, spec.warmup + spec.steps):
        started = time.perf_counter()
        loss = one(i)
        barrier()
        times.append(time.perf_counter() - started)
        if other is not None:
            started = time.perf_counter()
            other.step(i)
            other.barrier()
            paired_times.append(time.perf_counter() - started)
    result.steady_ms = statistics.median(times) * 1e3
    result.steady_ms_min = min(times) * 1e3
    if paired_times:
        result.paired_steady_ms = statistics.median(paired_times) * 1e3
        result.paired_steady_ms_min = min(paired_times) * 1e3
        result.paired_ratio = statistics.median(t / p for t, p in zip(times, paired_times))
    result.dynamo_graphs_after_warmup = _dynamo_counts()[0] - graphs
    if spec.backend in ("eager", "lazy"):
        result.dynamo_graphs_after_warmup = None  # nothing is compiled by Dynamo
    if on_xla:
        result.syncs_per_step = (xla_metrics.device_to_host_transfers() - syncs) / spec.steps
        result.executions_per_step = (xla_metrics.executions() - execs) / spec.steps
        result.xla_compiles_after_warmup = xla_metrics.compiles() - compiles

    if spec.pipelined:
        start = spec.warmup + spec.steps
        started = time.perf_counter()
        for i in range(start, start + spec.steps):
            loss = one(i)
        barrier()
        result.pipelined_ms = (time.perf_counter() - started) / spec.steps * 1e3

    result.graph_breaks = _dynamo_counts()[1]
    if spec.backend == "syncfree_xla":
        stats = counters.stats()
        result.cache_graph_hits = int(stats.get(counters.CACHE_GRAPH_HITS, 0))
        result.cache_graph_misses = int(stats.get(counters.CACHE_GRAPH_MISSES, 0))
        result.eager_fallbacks = int(stats.get(counters.EAGER_FALLBACKS, 0))
    result.final_loss = float(loss)  # a host read, after everything was measured
    result.peak_rss_mb = _rss_mb()
    return result


def _prepare_paired(spec: CellSpec, batches: int) -> PreparedStep | None:
    """The paired backend's step, warmed up, or None without ``spec.paired``."""
    if spec.paired is None:
        return None
    if spec.paired != "eager":
        # A compiled backend would share Dynamo's state with the measured one, and an
        # XLA one its metrics: only eager leaves the measured cell's counters alone.
        raise ValueError(f"paired must be 'eager', got {spec.paired!r}")
    other = prepare(CellSpec(spec.model, spec.loop, spec.paired, threads=spec.threads),
                    batches)
    for i in range(spec.warmup):
        other.step(i)
    other.barrier()
    return other


def _loop_parts(loop: str, opt: Any, device: Any) -> tuple[Callable, tuple, dict]:
    """The step function of ``loop`` and the arguments it takes besides model, opt, x, y."""
    import torch

    from . import workloads

    if loop == "plain":
        return workloads.train_step, (), {}
    if loop == "A":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
        return workloads.train_step_clip, (), {"scheduler": sched}
    # train_step_amp takes the scaler between opt and the batch.
    return workloads.train_step_amp, (workloads.make_grad_scaler(device),), {}


def _compile(fn: Callable, spec: CellSpec) -> Callable:
    """``fn`` as the backend runs it: itself for eager and lazy, else torch.compile'd."""
    import torch

    if spec.backend in ("eager", "lazy"):
        return fn
    if spec.backend == "syncfree_xla":
        options = {"cache_dir": spec.cache_dir} if spec.cache_dir else {"cache": False}
        return torch.compile(fn, backend="syncfree_xla", options=options)
    return torch.compile(fn, backend=_resolve_backend(spec.backend))


def _child_main(argv: Sequence[str]) -> int:
    """``python -m xla_backend.tools.bench --cell SPEC``: measure, print one result line."""
    if len(argv) != 2 or argv[0] != "--cell":
        print("usage: python -m xla_backend.tools.bench --cell SPEC_JSON "
              "(internal; use `syncfree-xla bench`)", file=sys.stderr)
        return 2
    spec = CellSpec.from_json(argv[1])
    try:
        result = measure_cell(spec)
    except BaseException as exc:  # noqa: BLE001 - every failure is a result to report
        import traceback

        detail = traceback.format_exc()
        sys.stderr.write(detail)
        result = CellResult(spec.model, spec.loop, spec.backend, status="failed",
                            error=one_line(f"{type(exc).__name__}: {exc}"),
                            detail=detail[-4000:], steps=spec.steps, warmup=spec.warmup)
    sys.stdout.write("\n" + RESULT_PREFIX + json.dumps(asdict(result)) + "\n")
    sys.stdout.flush()
    return 0 if result.ok else 1


# --------------------------------------------------------------------------- parent side


def _signal_name(returncode: int) -> str:
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def _last_error_line(stderr: str) -> str:
    """The most telling line of a dead child's stderr: its last exception line, or last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line) or \
                "Fatal Python error" in line or line.startswith("F0000") or "Check failed" in line:
            return line
    return lines[-1] if lines else "no output"


def run_cell(spec: CellSpec, timeout_s: float = DEFAULT_TIMEOUT_S,
             python: str | None = None) -> CellResult:
    """Runs ``spec`` in a fresh process; a crash or a timeout becomes a failed result.

    The child gets its own session so that, on a timeout, its whole process group
    (inductor's compile workers included) is killed, not only the child.
    """
    env = dict(os.environ)
    if spec.devices is not None:
        # The CPU client's device count; read once, when torch_xla starts in the child.
        env["CPU_NUM_DEVICES"] = str(spec.devices)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="syncfree-bench-") as scratch:
        if spec.backend == "inductor":
            # Its compiled-kernel cache would make a "cold" first step warm. Other
            # backends keep the default directory: Dynamo builds C++ shape guards
            # there too, and a one-time probe of the compiler (seconds) is a cost of
            # the machine, not of the backend.
            env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(scratch) / "inductor")
        env.setdefault("PYTHONWARNINGS", "ignore")
        proc = subprocess.Popen(
            [python or sys.executable, "-m", "xla_backend.tools.bench", "--cell", spec.to_json()],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            text=True, env=env, start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            result = CellResult(spec.model, spec.loop, spec.backend, status="failed",
                                error=f"timed out after {timeout_s:g} s",
                                detail=stderr[-4000:], steps=spec.steps, warmup=spec.warmup)
            result.wall_s = time.perf_counter() - started
            return result
        finally:
            if proc.poll() is None:
                _kill_group(proc)
    result = _parse_child(spec, proc.returncode, stdout, stderr)
    result.wall_s = time.perf_counter() - started
    return result


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def _parse_child(spec: CellSpec, returncode: int, stdout: str, stderr: str) -> CellResult:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return CellResult.from_dict(json.loads(line[len(RESULT_PREFIX):]))
    how = (f"killed by {_signal_name(returncode)}" if returncode < 0
           else f"exited with status {returncode}")
    return CellResult(spec.model, spec.loop, spec.backend, status="failed",
                      error=one_line(f"process {how}: {_last_error_line(stderr)}"),
                      detail=stderr[-4000:], steps=spec.steps, warmup=spec.warmup)


def is_timeout(result: CellResult) -> bool:
    return result.status == "failed" and (result.error or "").startswith("timed out")


def plan(models: Sequence[str], loops: Sequence[str], backends: Sequence[str]
         ) -> list[tuple[str, str, str]]:
    """Cells in run order: eager first in each (model, loop), so ratios print as we go."""
    ordered = sorted(backends, key=lambda b: (b != "eager", list(backends).index(b)))
    return [(m, lp, b) for m in models for lp in loops for b in ordered]


def run_matrix(
    models: Sequence[str],
    loops: Sequence[str],
    backends: Sequence[str],
    *,
    steps: int = DEFAULT_STEPS,
    warmup: int = DEFAULT_WARMUP,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int | None = None,
    skip: Mapping[tuple[str, str], str] | None = None,
    progress: Callable[[CellResult, int, int], None] | None = None,
    runner: Callable[[CellSpec, float], CellResult] | None = None,
    devices: int | None = None,
) -> list[CellResult]:
    """Every cell, one fresh process each; failures are results and the run goes on.

    ``skip`` maps (model, backend) to a reason: those cells are recorded as skipped.
    A (model, backend) that timed out on one loop is skipped on the later loops
    (its compile would most likely time out again and cost another timeout).
    ``devices`` runs the XLA backends over an SPMD mesh of that many devices.
    """
    skip = dict(skip or {})
    cells = plan(models, loops, backends)
    results: list[CellResult] = []
    for index, (model, loop, backend) in enumerate(cells, 1):
        reason = skip.get((model, backend))
        if reason is not None:
            result = CellResult(model, loop, backend, status="skipped", error=reason)
        else:
            spec = CellSpec(model, loop, backend, steps=steps, warmup=warmup, threads=threads,
                            devices=devices if backend in XLA_BACKENDS else None)
            logger.debug("running %s", spec)
            result = (runner or run_cell)(spec, timeout_s)
            if is_timeout(result):
                skip[(model, backend)] = f"loop {loop} timed out after {timeout_s:g} s"
        results.append(result)
        if progress is not None:
            progress(result, index, len(cells))
    return results


# --------------------------------------------------------------------------- report


def environment() -> dict[str, Any]:
    """Versions and machine facts a reader needs to judge the numbers."""
    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "python": platform.python_version(),
        "torch": version("torch"),
        "torch_xla": version("torch_xla"),
        "syncfree_xla": version("syncfree-xla"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "pjrt_device": os.environ.get("PJRT_DEVICE", "CPU"),
    }


def make_report(results: Sequence[CellResult], config: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON document: schema, when, where, how, and every cell with ratios to eager."""
    eager = eager_times(results)
    cells = []
    for r in results:
        data = asdict(r)
        base = eager.get((r.model, r.loop))
        data["vs_eager"] = (r.steady_ms / base) if (r.ok and base and r.steady_ms) else None
        cells.append(data)
    return {
        "schema": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "config": dict(config),
        "memory_metric": MEMORY_METRIC,
        "loops": {k: v for k, v in LOOPS.items() if k in config.get("loops", LOOPS)},
        "backends": {k: v for k, v in BACKEND_DOCS.items()
                     if k in config.get("backends", BACKENDS)},
        "cells": cells,
    }


def eager_times(results: Iterable[CellResult]) -> dict[tuple[str, str], float]:
    return {(r.model, r.loop): r.steady_ms for r in results
            if r.backend == "eager" and r.ok and r.steady_ms}


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


TABLE_HEADER = ("model", "loop", "backend", "first step", "warm-up", "steady (median)",
                "pipelined", "vs eager", "syncs/step", "execs/step", "XLA compiles",
                "Dynamo graphs", "peak RSS", "status")


def table_row(r: CellResult, eager_ms: float | None) -> tuple[str, ...]:
    if not r.ok:
        status = f"{r.status}: {one_line(r.error or '', 120)}"
        return (r.model, r.loop, r.backend, *(["-"] * 10), status)
    ratio = r.steady_ms / eager_ms if (eager_ms and r.steady_ms) else None
    return (
        r.model, r.loop, r.backend,
        _fmt(r.first_step_s, ".2f", " s"),
        _fmt(r.warmup_s, ".2f", " s"),
        _fmt(r.steady_ms, ".1f", " ms"),
        _fmt(r.pipelined_ms, ".1f", " ms"),
        _fmt(ratio, ".2f", "x"),
        _fmt(r.syncs_per_step, ".2f"),
        _fmt(r.executions_per_step, ".2f"),
        _fmt(r.xla_compiles_after_warmup, "d"),
        _fmt(r.dynamo_graphs_after_warmup, "d"),
        _fmt(r.peak_rss_mb, ".0f", " MiB"),
        "ok" + (f" ({', '.join(r.notes)})" if r.notes else ""),
    )


def format_table(results: Sequence[CellResult]) -> str:
    """A Markdown table, padded so it also reads well in a terminal."""
    eager = eager_times(results)
    rows = [TABLE_HEADER] + [table_row(r, eager.get((r.model, r.loop))) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE_HEADER))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"

    out = [line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(row) for row in rows[1:]]
    return "\n".join(out)


def progress_line(r: CellResult, index: int, total: int,
                  eager: Mapping[tuple[str, str], float] | None = None) -> str:
    """One line per finished cell, for stderr while the run goes on."""
    head = f"[{index}/{total}] {r.model} loop {r.loop} {r.backend}:"
    wall = f" ({r.wall_s:.0f} s)" if r.wall_s is not None else ""
    if not r.ok:
        return f"{head} {r.status}: {one_line(r.error or '', 160)}{wall}"
    base = (eager or {}).get((r.model, r.loop))
    ratio = f", {r.steady_ms / base:.2f}x eager" if base and r.steady_ms else ""
    counts = ""
    if r.syncs_per_step is not None:
        counts = (f", {r.syncs_per_step:.2f} syncs/step, {r.executions_per_step:.2f} execs/step, "
                  f"{r.xla_compiles_after_warmup} compiles after warm-up")
    return (f"{head} first step {r.first_step_s:.2f} s, warm-up {r.warmup_s:.2f} s, "
            f"steady {r.steady_ms:.1f} ms"
            f"{ratio}{counts}{wall}")


def write_json(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def matplotlib_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def write_plot(results: Sequence[CellResult], path: str | os.PathLike[str]) -> None:
    """A PNG bar chart: steady step time relative to eager, per (model, loop), log scale.

    Cells without a figure (failed, skipped, or no eager to compare with) are marked
    with a label instead of a bar, so a missing bar never reads as "fast".
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eager = eager_times(results)
    groups = list(dict.fromkeys((r.model, r.loop) for r in results))
    backends = list(dict.fromkeys(r.backend for r in results))
    by_cell = {(r.model, r.loop, r.backend): r for r in results}
    width = 0.8 / max(len(backends), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) + 2), 4.5))
    for j, backend in enumerate(backends):
        xs, ys = [], []
        for i, (model, loop) in enumerate(groups):
            r = by_cell.get((model, loop, backend))
            x = i + (j - (len(backends) - 1) / 2) * width
            base = eager.get((model, loop))
            if r is not None and r.ok and base and r.steady_ms:
                xs.append(x)
                ys.append(r.steady_ms / base)
            elif r is not None:
                label = r.status if not r.ok else "no eager"
                ax.text(x, 1.0, label, rotation=90, ha="center", va="bottom", fontsize=7,
                        color="dimgray")
        bars = ax.bar(xs, ys, width, label=backend)
        for bar, y in zip(bars, ys):
            ax.text(bar.get_x() + bar.get_width() / 2, y, f"{y:.2f}", ha="center",
                    va="bottom", fontsize=6)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([f"{m}\nloop {lp}" for m, lp in groups], fontsize=8)
    ax.set_ylabel("steady step time / eager (lower is faster)")
    ax.set_title("Steady step time relative to eager CPU")
    ax.legend(fontsize=8, ncol=min(len(backends), 5))
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- command line




def _skip_pair(text: str) -> tuple[str, str]:
    model, sep, backend = text.partition(":")
    if not sep or model not in MODELS or backend not in BACKENDS:
        raise argparse.ArgumentTypeError(
            f"expected MODEL:BACKEND, got {text!r}; models: {', '.join(MODELS)}; "
            f"backends: {', '.join(BACKENDS)}")
    return model, backend


def _output_path(text: str) -> Path:
    path = Path(text)
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"directory {str(path.parent)!r} does not exist")
    return path


def _png_path(text: str) -> Path:
    path = _output_path(text)
    if path.suffix.lower() != ".png":
        raise argparse.ArgumentTypeError(f"the plot is a PNG file: expected a name ending in "
                                         f".png, got {text!r}")
    if not matplotlib_available():
        raise argparse.ArgumentTypeError(
            "--plot needs matplotlib, which is not installed: pip install -e '.[dev]'")
    return path


def add_bench_commands(subparsers: Any) -> None:
    """Register ``bench``: the backend-by-workload matrix, one fresh process per cell."""
    bench = subparsers.add_parser(
        "bench", help="benchmark the backends against each other on the reference workloads",
        description="Runs every (model, loop, backend) cell in a fresh process and prints a "
                    "table; a backend that fails is listed with its error and the run goes "
                    "on. Progress goes to stderr, one line per cell.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="loops:\n" + "\n".join(f"  {k:<6} {v}" for k, v in LOOPS.items())
               + "\nbackends:\n"
               + "\n".join(f"  {k:<13} {v}" for k, v in BACKEND_DOCS.items()),
    )
    bench.add_argument("--models", nargs="+", choices=list(MODELS), default=list(DEFAULT_MODELS),
                       metavar="MODEL", help=f"workloads, from: {', '.join(MODELS)} "
                                             f"(default: {' '.join(DEFAULT_MODELS)})")
    bench.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS),
                       metavar="BACKEND",
                       help=f"backends, from: {', '.join(BACKENDS)} (default: all)")
    bench.add_argument("--loops", nargs="+", choices=list(LOOPS), default=list(DEFAULT_LOOPS),
                       metavar="LOOP", help=f"training loops, from: {', '.join(LOOPS)} "
                                            f"(default: {' '.join(DEFAULT_LOOPS)})")
    bench.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, metavar="N",
                       help=f"measured steps per cell (default: {DEFAULT_STEPS})")
    bench.add_argument("--warmup", type=positive_int, default=DEFAULT_WARMUP, metavar="N",
                       help=f"steps before measuring, the first included "
                            f"(default: {DEFAULT_WARMUP})")
    bench.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT_S,
                       metavar="SECONDS",
                       help=f"per-cell time limit (default: {DEFAULT_TIMEOUT_S:g})")
    bench.add_argument("--threads", type=positive_int, default=None, metavar="N",
                       help="torch.set_num_threads(N) in every cell (default: torch's choice)")
    bench.add_argument("--devices", type=positive_int, default=None, metavar="N",
                       help="run the XLA backends data-parallel over an SPMD mesh of N "
                            "devices (on the CPU: N virtual devices); each batch is split "
                            "over them, so N must divide the batch (default: one device, "
                            "no SPMD)")
    bench.add_argument("--skip", type=_skip_pair, action="append", default=[],
                       metavar="MODEL:BACKEND", help="record this cell as skipped (repeatable)")
    bench.add_argument("--json", type=_output_path, metavar="FILE",
                       help="also write every figure to this JSON file")
    bench.add_argument("--plot", type=_png_path, metavar="FILE",
                       help="also draw step time relative to eager to this PNG (matplotlib)")
    bench.set_defaults(func=bench_command)


def bench_command(args: argparse.Namespace) -> int:
    """Runs the matrix; exit status 1 only when no cell at all succeeded."""
    config = {"models": args.models, "backends": args.backends, "loops": args.loops,
              "steps": args.steps, "warmup": args.warmup, "timeout_s": args.timeout,
              "threads": args.threads, "devices": args.devices}
    skip = {pair: "skipped on request (--skip)" for pair in args.skip}
    done: list[CellResult] = []

    def report_progress(result: CellResult, index: int, total: int) -> None:
        done.append(result)
        print(progress_line(result, index, total, eager_times(done)), file=sys.stderr,
              flush=True)

    total = len(plan(args.models, args.loops, args.backends))
    print(f"syncfree-xla bench: {total} cells, one process each "
          f"({args.warmup} warm-up + {args.steps} measured steps)", file=sys.stderr, flush=True)
    results = run_matrix(args.models, args.loops, args.backends, steps=args.steps,
                         warmup=args.warmup, timeout_s=args.timeout, threads=args.threads,
                         skip=skip, progress=report_progress, devices=args.devices)
    print(format_table(results))
    print(f"\nfirst step and warm-up ({args.warmup} steps) are cold: no on-disk graph cache. "
          f"steady = median step time with a device barrier after each step; pipelined = "
          f"{args.steps} steps, one barrier. syncs, executions and compiles are torch_xla's "
          f"counts per measured step; peak RSS = {MEMORY_METRIC}. torch threads per cell: "
          f"{args.threads or 'torch default'}.")
    if args.json:
        write_json(make_report(results, config), args.json)
        print(f"wrote {args.json}")
    if args.plot:
        write_plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0 if any(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
