"""The CI performance-regression gate: exact counters and timing ratios against a baseline.

    python benchmarks/perf_check.py             # measure, compare with perf_baseline.json
    python benchmarks/perf_check.py --update    # measure, rewrite the baseline (make perf-baseline)
    python benchmarks/perf_check.py --current FILE [--update]   # use figures saved by --json

Counters are deterministic, so they are compared exactly: syncs, executions and XLA
compiles per step, Dynamo graphs after warm-up, and both cache tiers on a warm start (a
second process sharing the first one's cache directory). Any change for the worse
fails, naming the metric, the workload, the old and the new value: for the cache hits
that is a decrease, for everything else an increase. Timings are not deterministic,
so the only timing checked is a ratio measured in the same run, syncfree_xla's steady
step over eager's, and it may grow by ``tolerance`` (25%) before the gate fails. A
ratio past the tolerance is measured again (twice at most) and the best run counts:
load from other processes comes and goes, a regression does not. ``--update`` records
the median ratio of three runs.

Every cell runs in a fresh process (``xla_backend.tools.bench.run_cell``) with one torch
thread: with two threads, eager CPU on a busy two-core machine waits on a descheduled
OpenMP worker and its step time swings by 100x, which no tolerance absorbs. Eager's
steps are interleaved with syncfree_xla's in that process and the ratio is the median
of per-step ratios, so a load that comes and goes slows both sides of each ratio.
An intended change (fewer graphs, a new workload) is recorded with ``--update``.

One implementation with users' CI: the cells count with ``xla_backend.testing``'s
snapshots, the baseline is a baseline file of ``xla_backend.testing`` (the pytest
plugin's and ``syncfree-xla check``'s format: one entry per workload, its timing ratio
under ``ratios`` with its ``tolerance``, plus an ``_about`` record), and each workload
is judged by ``testing.compare_entry``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xla_backend import testing
from xla_backend.tools import bench

BASELINE = Path(__file__).resolve().parent / "perf_baseline.json"
REFRESH = "make perf-baseline (python benchmarks/perf_check.py --update)"
SCHEMA_VERSION = 2  # 2: an xla_backend.testing baseline file

CHECKS: tuple[tuple[str, str], ...] = (
    ("mlp", "A"),
    ("mlp", "B"),
    ("transformer_lm_small", "A"),
    ("transformer_lm_small", "B"),
)
STEPS = 20
WARMUP = 3
THREADS = 1
TOLERANCE = testing.DEFAULT_TOLERANCE
TIMEOUT_S = 300.0
RETRIES = 2  # re-measurements of a ratio past the tolerance before it counts as a regression
UPDATE_RATIO_SAMPLES = 3  # --update records the median of this many ratio runs

# Counter -> which direction is a regression.
LOWER_IS_BETTER = (
    "syncs_per_step",
    "executions_per_step",
    "compiles",
    "recompiles",
    "eager_fallbacks",
    "warm_cache_graph_misses",
    "warm_cache_aot_misses",
)
HIGHER_IS_BETTER = ("warm_cache_graph_hits", "warm_cache_aot_hits")
RATIO = "syncfree_xla_over_eager"


def key_of(model: str, loop: str) -> str:
    return f"{model}/{loop}"


# --------------------------------------------------------------------------- measuring


def measure(steps: int = STEPS, warmup: int = WARMUP, timeout_s: float = TIMEOUT_S,
            checks: Sequence[tuple[str, str]] = CHECKS, verbose: bool = True,
            ratio_samples: int = 1) -> dict[str, Any]:
    """Runs every check (syncfree_xla cold with eager interleaved, then warm); the figures.

    With ``ratio_samples`` > 1 (``--update``) the timing ratio is the median of that
    many runs, so one lucky or unlucky run does not become the baseline.
    """
    current: dict[str, Any] = {"schema": SCHEMA_VERSION, "counters": {}, "ratios": {},
                               "timings_ms": {}, "failures": {}}
    for model, loop in checks:
        key = key_of(model, loop)
        with tempfile.TemporaryDirectory(prefix="perf-check-cache-") as cache_dir:
            specs = {
                # eager's steps are interleaved with the measured ones (``paired``), so
                # both see the same machine load and their ratio holds still.
                "cold": bench.CellSpec(model, loop, "syncfree_xla", steps, warmup, THREADS,
                                       cache_dir=cache_dir, pipelined=False, paired="eager"),
                # The warm start only has to reach every graph once: warm-up plus a step.
                "warm": bench.CellSpec(model, loop, "syncfree_xla", 1, warmup, THREADS,
                                       cache_dir=cache_dir, pipelined=False),
            }
            cells = {}
            for name, spec in specs.items():
                cells[name] = bench.run_cell(spec, timeout_s)
                if verbose:
                    print(f"  {key} {name}: " + _describe(cells[name]), file=sys.stderr,
                          flush=True)
        failed = {n: c.error for n, c in cells.items() if not c.ok}
        if failed:
            current["failures"][key] = "; ".join(f"{n}: {e}" for n, e in failed.items())
            continue
        cold, warm = cells["cold"], cells["warm"]
        current["counters"][key] = {
            "syncs_per_step": cold.syncs_per_step,
            "executions_per_step": cold.executions_per_step,
            "compiles": cold.xla_compiles_after_warmup,
            "recompiles": cold.dynamo_graphs_after_warmup,
            "eager_fallbacks": cold.eager_fallbacks,
            "warm_cache_graph_hits": warm.cache_graph_hits,
            "warm_cache_graph_misses": warm.cache_graph_misses,
            "warm_cache_aot_hits": warm.cache_aot_hits,
            "warm_cache_aot_misses": warm.cache_aot_misses,
        }
        ratios = [cold.paired_ratio]
        for _ in range(ratio_samples - 1):
            ratios.append(measure_ratio(model, loop, steps, warmup, timeout_s, verbose))
        measured = [r for r in ratios if r is not None]
        current["ratios"][key] = {RATIO: statistics.median(measured)}
        current["timings_ms"][key] = {"syncfree_xla": cold.steady_ms,
                                      "eager": cold.paired_steady_ms,
                                      "syncfree_xla_min": cold.steady_ms_min,
                                      "eager_min": cold.paired_steady_ms_min}
    return current


def measure_ratio(model: str, loop: str, steps: int = STEPS, warmup: int = WARMUP,
                  timeout_s: float = TIMEOUT_S, verbose: bool = True) -> float | None:
    """One more sample of syncfree_xla's step over eager's (cache off), or None if it failed."""
    spec = bench.CellSpec(model, loop, "syncfree_xla", steps, warmup, THREADS,
                          pipelined=False, paired="eager")
    cell = bench.run_cell(spec, timeout_s)
    if verbose:
        print(f"  {key_of(model, loop)} ratio: " + _describe(cell), file=sys.stderr, flush=True)
    return cell.paired_ratio if cell.ok else None


def _describe(cell: bench.CellResult) -> str:
    if not cell.ok:
        return f"{cell.status}: {cell.error}"
    text = f"steady {cell.steady_ms:.2f} ms"
    if cell.paired_ratio is not None:
        text += f" ({cell.paired_ratio:.3f}x interleaved eager, {cell.paired_steady_ms:.2f} ms)"
    if cell.syncs_per_step is not None:
        text += (f", {cell.syncs_per_step:g} syncs/step, {cell.executions_per_step:g} "
                 f"execs/step, {cell.xla_compiles_after_warmup} compiles after warm-up, "
                 f"cache hits {cell.cache_graph_hits} misses {cell.cache_graph_misses}, "
                 f"AOTAutograd hits {cell.cache_aot_hits} misses {cell.cache_aot_misses}")
    return text + f" ({cell.wall_s:.0f} s)"


# --------------------------------------------------------------------------- comparing


def _entries(baseline: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The baseline's workload entries: every key but the ``_about`` record."""
    return {key: entry for key, entry in baseline.items() if not key.startswith("_")}


def _current_entry(current: Mapping[str, Any], key: str) -> dict[str, Any]:
    """One workload's measured figures in the shape of a baseline entry."""
    return {**current["counters"][key], testing.RATIOS: current.get("ratios", {}).get(key, {})}


def compare(baseline: Mapping[str, Any], current: Mapping[str, Any],
            tolerance: float | None = None) -> tuple[list[str], list[str]]:
    """(failures, notes): every regression of ``current`` against ``baseline``, in words.

    Each workload is judged by ``xla_backend.testing.compare_entry``, as a marked test
    of the pytest plugin is: counters must not move the wrong way at all; the timing
    ratio may grow by ``tolerance`` (default: the entry's, else 25%). Improvements and
    new workloads are notes: they pass, and ``--update`` records them.
    """
    failures: list[str] = []
    notes: list[str] = []
    cur_counters = current.get("counters", {})
    cur_failures = current.get("failures", {})
    entries = _entries(baseline)
    for key, recorded in sorted(entries.items()):
        if key in cur_failures:
            failures.append(f"{key}: the measurement failed: {cur_failures[key]}")
            continue
        if key not in cur_counters:
            failures.append(f"{key}: in the baseline but not measured")
            continue
        if recorded.get(testing.RATIOS) and not current.get("ratios", {}).get(key):
            failures.append(f"{key}: timing ratio not measured")
        worse, better = testing.compare_entry(recorded, _current_entry(current, key),
                                              HIGHER_IS_BETTER, tolerance, where=key)
        failures += worse
        notes += better
    for key in sorted(set(cur_counters) - set(entries)):
        notes.append(f"{key}: not in the baseline yet")
    for key, error in sorted(cur_failures.items()):
        if key not in entries:
            failures.append(f"{key}: the measurement failed: {error}")
    return failures, notes


def ratio_regressions(baseline: Mapping[str, Any], current: Mapping[str, Any],
                      tolerance: float | None = None) -> list[str]:
    """Workload keys whose timing ratio grew past the tolerance (candidates to confirm)."""
    keys = []
    for key, entry in _entries(baseline).items():
        tol = testing.tolerance_of(entry, tolerance)
        new = current.get("ratios", {}).get(key, {}).get(RATIO)
        old = entry.get(testing.RATIOS, {}).get(RATIO)
        if new is not None and old is not None and new > old * (1 + tol):
            keys.append(key)
    return sorted(keys)


def confirm_ratios(baseline: Mapping[str, Any], current: dict[str, Any],
                   tolerance: float | None, steps: int, warmup: int,
                   retries: int = RETRIES) -> None:
    """Re-measures each ratio past the tolerance up to ``retries`` times; keeps the best.

    Load from other processes only ever slows a step down, and it comes and goes; a
    real regression is there every time. Passing runs pay nothing for this.
    """
    by_key = {key_of(m, lp): (m, lp) for m, lp in CHECKS}
    for key in ratio_regressions(baseline, current, tolerance):
        if key not in by_key:
            continue
        for attempt in range(1, retries + 1):
            print(f"perf-check: {key}: {RATIO} {current['ratios'][key][RATIO]:.3f} is past the "
                  f"tolerance; measuring again ({attempt}/{retries})", file=sys.stderr,
                  flush=True)
            again = measure_ratio(*by_key[key], steps, warmup)
            if again is not None:
                current["ratios"][key][RATIO] = min(current["ratios"][key][RATIO], again)
            if key not in ratio_regressions(baseline, current, tolerance):
                break


def make_baseline(current: Mapping[str, Any], tolerance: float = TOLERANCE) -> dict[str, Any]:
    """The file ``--update`` writes: a baseline file of ``xla_backend.testing`` (one entry
    per workload: counters, the timing ratio and its tolerance), plus an ``_about``
    record of how and where it was measured."""
    baseline: dict[str, Any] = {"_about": {
        "schema": SCHEMA_VERSION,
        "about": "CI perf gate baseline (an xla_backend.testing baseline file); counters "
                 f"are exact, ratios allow the tolerance. Refresh with {REFRESH}.",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": bench.environment(),
        "settings": {"steps": STEPS, "warmup": WARMUP, "threads": THREADS},
        "timings_ms": current.get("timings_ms", {}),
    }}
    for key in sorted(current["counters"]):
        baseline[key] = {**_current_entry(current, key), testing.TOLERANCE: tolerance}
    return baseline


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, default=BASELINE,
                        help=f"baseline file (default: {BASELINE.name} beside this script)")
    parser.add_argument("--update", action="store_true",
                        help="write the measured figures to the baseline instead of comparing")
    parser.add_argument("--current", type=Path,
                        help="compare (or record) figures saved earlier with --json")
    parser.add_argument("--json", type=Path, help="also write the measured figures here")
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"allowed growth of timing ratios (default: the baseline's, "
                             f"else {TOLERANCE})")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.current is not None:
        current = json.loads(args.current.read_text(encoding="utf-8"))
    else:
        print(f"perf-check: measuring {len(CHECKS)} workloads (syncfree_xla cold with eager "
              f"interleaved, then warm from the cache; {args.steps} steps)", file=sys.stderr)
        current = measure(args.steps, args.warmup,
                          ratio_samples=UPDATE_RATIO_SAMPLES if args.update else 1)
    if args.json is not None:
        args.json.write_text(json.dumps(current, indent=2) + "\n", encoding="utf-8")

    if args.update:
        if current.get("failures"):
            for key, error in current["failures"].items():
                print(f"FAIL {key}: the measurement failed: {error}")
            print("perf-check: not updating the baseline while a measurement fails")
            return 1
        tolerance = args.tolerance if args.tolerance is not None else TOLERANCE
        testing.write_baseline(args.baseline, make_baseline(current, tolerance), merge=False)
        print(f"perf-check: wrote {args.baseline} ({len(current['counters'])} workloads) "
              f"in {time.perf_counter() - started:.0f} s")
        return 0

    try:
        baseline = testing.read_baseline(args.baseline)
    except ValueError as e:
        print(f"perf-check: {e}; refresh it with {REFRESH}")
        return 1
    if not baseline:
        print(f"perf-check: no baseline at {args.baseline}; create one with {REFRESH}")
        return 1
    if args.current is None:
        confirm_ratios(baseline, current, args.tolerance, args.steps, args.warmup)
    failures, notes = compare(baseline, current, args.tolerance)
    for key, ratios in sorted(current.get("ratios", {}).items()):
        old = baseline.get(key, {}).get(testing.RATIOS, {}).get(RATIO)
        print(f"  {key}: {RATIO} {ratios[RATIO]:.3f}"
              + (f" (baseline {old:.3f})" if old is not None else ""))
    for note in notes:
        print(f"note: {note}")
    for failure in failures:
        print(f"FAIL {failure}")
    elapsed = time.perf_counter() - started
    if failures:
        print(f"perf-check: {len(failures)} regression(s) in {elapsed:.0f} s. If intended, "
              f"refresh the baseline with {REFRESH} and commit it.")
        return 1
    print(f"perf-check: passed ({len(_entries(baseline))} workloads) in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
