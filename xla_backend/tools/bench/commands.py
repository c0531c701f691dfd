"""``syncfree-xla bench``: its arguments, and the command that runs the matrix.

Imported by the ``syncfree-xla`` command at startup, so it stays cheap: no torch here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..argtypes import positive_float, positive_int
from ..backends import BACKEND_DOCS, BACKENDS
from . import plot
from .report import eager_times, format_table, make_report, progress_line, write_json
from .runner import plan, run_matrix
from .spec import (
    DEFAULT_LOOPS,
    DEFAULT_MODELS,
    DEFAULT_STEPS,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WARMUP,
    LOOPS,
    MEMORY_METRIC,
    MODELS,
    CellResult,
)


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
    if not plot.matplotlib_available():
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
    bench.add_argument("--pair-loops", action="store_true",
                       help="also time each loop A and B cell's steps interleaved with the "
                            "plain loop's, in the same process, and report their ratio "
                            "('vs plain'): the loops differ by less than two processes do "
                            "on a shared machine (costs the plain loop's compile and "
                            "2 x steps more per cell)")
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
              "threads": args.threads, "devices": args.devices, "pair_loops": args.pair_loops}
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
                         skip=skip, progress=report_progress, devices=args.devices,
                         pair_loops=args.pair_loops)
    print(format_table(results))
    print(f"\nfirst step and warm-up ({args.warmup} steps) are cold: no on-disk graph cache. "
          f"steady = median step time with a device barrier after each step; pipelined = "
          f"{args.steps} steps, one barrier; vs plain (--pair-loops) = median ratio of this "
          f"loop's steps to the plain loop's, interleaved in one process. syncs, executions "
          f"and compiles are torch_xla's counts per measured step; peak RSS = {MEMORY_METRIC}. "
          f"torch threads per cell: {args.threads or 'torch default'}.")
    if args.json:
        write_json(make_report(results, config), args.json)
        print(f"wrote {args.json}")
    if args.plot:
        plot.write_plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0 if any(r.ok for r in results) else 1
