"""The figures of a run, written out: the JSON report, the Markdown table, progress lines.

Every ratio is to eager in the same (model, loop), from the same run.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from ..backends import BACKEND_DOCS, BACKENDS
from .spec import LOOPS, MEMORY_METRIC, CellResult, one_line

SCHEMA_VERSION = 1


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
        data["rss_growth_mb"] = rss_growth_mb(r)
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


def rss_growth_mb(r: CellResult) -> float | None:
    """How far training raised the resident-set high-water mark above its pre-training
    value (model, optimizer and batches built): what a step holds, without the runtime."""
    if r.peak_rss_mb is None or r.start_rss_mb is None:
        return None
    return r.peak_rss_mb - r.start_rss_mb


def eager_times(results: Iterable[CellResult]) -> dict[tuple[str, str], float]:
    """Eager's steady step time per (model, loop): what every ratio is taken against."""
    return {(r.model, r.loop): r.steady_ms for r in results
            if r.backend == "eager" and r.ok and r.steady_ms}


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


TABLE_HEADER = ("model", "loop", "backend", "first step", "warm-up", "steady (median)",
                "pipelined", "vs eager", "vs plain", "syncs/step", "execs/step", "XLA compiles",
                "Dynamo graphs", "peak RSS", "RSS growth", "status")


def table_row(r: CellResult, eager_ms: float | None) -> tuple[str, ...]:
    if not r.ok:
        status = f"{r.status}: {one_line(r.error or '', 120)}"
        return (r.model, r.loop, r.backend, *(["-"] * (len(TABLE_HEADER) - 4)), status)
    ratio = r.steady_ms / eager_ms if (eager_ms and r.steady_ms) else None
    return (
        r.model, r.loop, r.backend,
        _fmt(r.first_step_s, ".2f", " s"),
        _fmt(r.warmup_s, ".2f", " s"),
        _fmt(r.steady_ms, ".1f", " ms"),
        _fmt(r.pipelined_ms, ".1f", " ms"),
        _fmt(ratio, ".2f", "x"),
        _fmt(r.loop_ratio, ".2f", "x"),
        _fmt(r.syncs_per_step, ".2f"),
        _fmt(r.executions_per_step, ".2f"),
        _fmt(r.xla_compiles_after_warmup, "d"),
        _fmt(r.dynamo_graphs_after_warmup, "d"),
        _fmt(r.peak_rss_mb, ".0f", " MiB"),
        _fmt(rss_growth_mb(r), ".0f", " MiB"),
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
    if r.loop_ratio is not None:
        ratio += f", {r.loop_ratio:.2f}x plain (interleaved)"
    counts = ""
    if r.syncs_per_step is not None:
        counts = (f", {r.syncs_per_step:.2f} syncs/step, {r.executions_per_step:.2f} execs/step, "
                  f"{r.xla_compiles_after_warmup} compiles after warm-up")
    return (f"{head} first step {r.first_step_s:.2f} s, warm-up {r.warmup_s:.2f} s, "
            f"steady {r.steady_ms:.1f} ms"
            f"{ratio}{counts}{wall}")


def write_json(report: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
