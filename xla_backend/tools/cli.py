"""The ``syncfree-xla`` command.

Each subcommand group lives in its own ``add_*_commands(subparsers)`` function
listed in ``COMMAND_GROUPS``; adding another command group means
writing one such function and appending it there. Every command function takes
the parsed arguments and returns the exit status.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .. import options
from ..cache.store import CACHE_DIR_ENV, DEFAULT_MAX_BYTES, EntryInfo, Store, default_cache_dir
from .argtypes import non_negative_float, non_negative_int, positive_int
from .bench import add_bench_commands

if TYPE_CHECKING:
    from typing import TypeAlias

    Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"



# ---------------------------------------------------------------------------
# Formatting and parsing helpers


def parse_size(text: str) -> int:
    """A byte count from ``123``, ``500M``, ``2G``, ``1.5GiB`` (``options.parse_size``).

    Raises argparse.ArgumentTypeError naming the bad value and the accepted forms.
    """
    try:
        return options.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def format_size(size: float) -> str:
    """A byte count for humans: 512 B, 1.5 KiB, 2.0 GiB."""
    if size < 1024:
        return f"{int(size)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.1f} {unit}"


def _entries(count: int) -> str:
    return f"{count} entr{'y' if count == 1 else 'ies'}"


def format_age(seconds: float) -> str:
    """A duration for humans, coarsest unit only: 12s, 5m, 3h, 2d."""
    seconds = max(0.0, seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{int(seconds // length)}{unit}"
    return f"{int(seconds)}s"


# ---------------------------------------------------------------------------
# syncfree-xla cache ...


def add_cache_commands(subparsers: Subparsers) -> None:
    """Register ``cache stats|list|verify|prune|clear``."""
    default_help = (
        f"cache directory (default: ${CACHE_DIR_ENV}, else $XDG_CACHE_HOME/syncfree_xla, "
        "else ~/.cache/syncfree_xla)"
    )
    cache = subparsers.add_parser("cache", help="inspect and manage the compiled-graph cache")
    cache.add_argument("--cache-dir", type=Path, default=None, help=default_help)
    # Also accepted after the action (`cache stats --cache-dir X`); SUPPRESS keeps an
    # absent option there from overwriting one given before the action.
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--cache-dir", type=Path, default=argparse.SUPPRESS, help=default_help)
    actions = cache.add_subparsers(dest="cache_command", metavar="ACTION", required=True)

    stats = actions.add_parser("stats", parents=[where], help="entries, size, hits and misses")
    stats.set_defaults(func=cache_stats)

    listing = actions.add_parser("list", parents=[where], help="entries with size, age, last use")
    listing.set_defaults(func=cache_list)

    verify = actions.add_parser("verify", parents=[where], help="check every entry's checksum")
    verify.add_argument("--remove", action="store_true", help="also delete the bad entries")
    verify.set_defaults(func=cache_verify)

    prune = actions.add_parser("prune", parents=[where], help="evict least recently used entries")
    prune.add_argument(
        "--max-bytes", type=parse_size, default=DEFAULT_MAX_BYTES, metavar="SIZE",
        help=f"keep at most this much; {options.SIZE_FORMS} "
             f"(default: {format_size(DEFAULT_MAX_BYTES)})",
    )
    prune.set_defaults(func=cache_prune)

    clear = actions.add_parser("clear", parents=[where], help="delete every entry")
    clear.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    clear.set_defaults(func=cache_clear)


def _open_store(args: argparse.Namespace) -> Store | int:
    """The store for ``--cache-dir``, or an exit status if there is none to use.

    A missing directory is not created (inspecting must not leave one behind).
    """
    directory = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    if not directory.is_dir():
        print(f"no cache at {directory}")
        return 0
    store = Store(directory)
    if not store.disk_enabled:
        print(f"syncfree-xla: cannot use the cache at {directory} (see the warning above)",
              file=sys.stderr)
        return 2
    return store


def cache_stats(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if isinstance(store, int):
        return store
    entries = store.entries()
    totals = store.totals()
    hits = totals["memory_hits"] + totals["disk_hits"]
    lookups = hits + totals["misses"]
    rate = f"{100 * hits / lookups:.1f}%" if lookups else "n/a"
    print(f"cache directory: {store.directory}")
    print(f"entries:         {len(entries)}")
    total = sum(e.size for e in entries)
    print(f"total size:      {format_size(total)} ({total} bytes)")
    print(f"hits:            {hits} (memory {totals['memory_hits']}, disk {totals['disk_hits']})")
    print(f"misses:          {totals['misses']}")
    print(f"hit rate:        {rate}")
    return 0


def cache_list(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if isinstance(store, int):
        return store
    entries = sorted(store.entries(), key=lambda e: e.last_used, reverse=True)
    if not entries:
        print(f"no entries in {store.directory}")
        return 0
    print(_list_row("DIGEST", "SIZE", "AGE", "LAST USED"))
    now = time.time()
    for entry in entries:
        age, idle = format_age(now - entry.created), format_age(now - entry.last_used)
        print(_list_row(entry.digest[:16], format_size(entry.size), age, f"{idle} ago"))
    print(f"{_entries(len(entries))}, {format_size(sum(e.size for e in entries))}")
    return 0


def _list_row(digest: str, size: str, age: str, last_used: str) -> str:
    return f"{digest:<16}  {size:>10}  {age:>6}  {last_used:>10}"


def cache_verify(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if isinstance(store, int):
        return store
    report = store.verify(remove=args.remove)
    for bad in report.bad:
        print(f"BAD {bad.digest}: {bad.reason}{' (removed)' if args.remove else ''}")
    if report.ok:
        print(f"checked {_entries(report.checked)}: all good")
        return 0
    print(f"{len(report.bad)} of {_entries(report.checked)} bad")
    return 1


def cache_prune(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if isinstance(store, int):
        return store
    report = store.prune(args.max_bytes)
    print(f"removed {_entries(report.removed)} ({format_size(report.freed_bytes)}); "
          f"{format_size(report.remaining_bytes)} remain (limit {format_size(args.max_bytes)})")
    return 0


def cache_clear(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if isinstance(store, int):
        return store
    entries = store.entries()
    if not args.yes:
        question = (f"delete {_entries(len(entries))} ({_total_size(entries)}) "
                    f"from {store.directory}? [y/N] ")
        if _ask(question) not in ("y", "yes"):
            print("nothing deleted")
            return 1
    removed = store.clear()
    print(f"deleted {_entries(removed)} from {store.directory}")
    return 0


def _total_size(entries: Sequence[EntryInfo]) -> str:
    return format_size(sum(e.size for e in entries))


def _ask(question: str) -> str | None:
    """The user's answer, lowercased; None without a usable stdin (which means no)."""
    if sys.stdin is None:
        return None
    try:
        answer = input(question)
    except (EOFError, OSError, ValueError):
        print()
        return None
    return answer.strip().lower()


# ---------------------------------------------------------------------------
# syncfree-xla explain SCRIPT



_STEPS_HELP = ("stop the script after N calls of a function it compiled with syncfree_xla "
               "(default: run it to the end)")


def add_explain_commands(subparsers: Subparsers) -> None:
    """Register ``explain SCRIPT [--steps N] [-- SCRIPT_ARGS...]``."""
    explain = subparsers.add_parser(
        "explain", help="run a script; report its host syncs, graph breaks and recompiles",
        description="Runs a Python script unchanged and reports, per graph compiled with "
                    "syncfree_xla, each host sync point (file:line, removed by which pass or "
                    "why kept), graph breaks, recompiles and the host syncs observed. "
                    "Arguments for the script go after --.",
    )
    explain.add_argument("--steps", type=positive_int, default=None, metavar="N",
                         help=_STEPS_HELP)
    explain.add_argument("script", help="the Python script to run")
    explain.add_argument("rest", nargs=argparse.REMAINDER, metavar="[--steps N] [-- ARGS]",
                         help="--steps may also follow the script; ARGS become its sys.argv[1:]")
    explain.set_defaults(func=explain_script)


def _explain_options(args: argparse.Namespace) -> tuple[int | None, list[str]] | int:
    """(steps, script arguments) from what follows the script, or an exit status.

    Leading ``--steps N`` / ``--steps=N`` are ours, then an optional ``--``; the rest
    is the script's (argparse keeps or drops that ``--`` depending on the version).
    """
    rest, steps = list(args.rest), args.steps
    while rest and (rest[0] == "--steps" or rest[0].startswith("--steps=")):
        if "=" in rest[0]:
            text, rest = rest[0].split("=", 1)[1], rest[1:]
        elif len(rest) > 1:
            text, rest = rest[1], rest[2:]
        else:
            print("syncfree-xla explain: --steps needs a value N", file=sys.stderr)
            return 2
        try:
            steps = positive_int(text)
        except argparse.ArgumentTypeError as e:
            print(f"syncfree-xla explain: --steps: {e}", file=sys.stderr)
            return 2
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return steps, rest


def explain_script(args: argparse.Namespace) -> int:
    if not Path(args.script).is_file():
        print(f"syncfree-xla explain: no such script: {args.script}", file=sys.stderr)
        return 2
    options = _explain_options(args)
    if isinstance(options, int):
        return options
    steps, script_args = options
    from .explain import run_script  # imports torch_xla: only for this command

    run = run_script(args.script, script_args, steps=steps)
    print(f"\n=== syncfree-xla explain {args.script} ===")
    print(run.report)
    if run.error is not None:
        if run.traceback:
            print(run.traceback, end="", file=sys.stderr)
        what = (f"exited with status {run.exit_code}" if isinstance(run.error, SystemExit)
                else f"raised {type(run.error).__name__}")
        print(f"syncfree-xla explain: {args.script} {what}; the report covers what ran "
              "before that", file=sys.stderr)
    return run.exit_code


# ---------------------------------------------------------------------------
# syncfree-xla check SCRIPT


def add_check_commands(subparsers: Subparsers) -> None:
    """Register ``check SCRIPT [budgets] [--baseline FILE [--update]] [-- ARGS]``."""
    check = subparsers.add_parser(
        "check", help="run a script; fail if its step syncs or recompiles past a budget",
        description="Runs a Python script unchanged for --warmup + --steps calls of a "
                    "function it compiled with syncfree_xla, counts what the steps after "
                    "the warm-up cost (host syncs and executions per step, XLA compiles, "
                    "Dynamo recompiles, graph breaks) and exits 1 if a count is above its "
                    "budget or its --baseline value, listing where each sync, break and "
                    "recompile is. Options go before the script; its arguments after --.",
    )
    check.add_argument("--warmup", type=non_negative_int, default=3, metavar="N",
                       help="steps before measuring (default: %(default)s)")
    check.add_argument("--steps", type=positive_int, default=5, metavar="N",
                       help="steps measured after the warm-up (default: %(default)s)")
    check.add_argument("--max-syncs", type=non_negative_float, default=0.0, metavar="F",
                       help="host syncs per step allowed (default: %(default)g)")
    check.add_argument("--max-compiles", type=non_negative_int, default=0, metavar="N",
                       help="XLA compiles allowed after the warm-up (default: %(default)s)")
    check.add_argument("--max-recompiles", type=non_negative_int, default=0, metavar="N",
                       help="Dynamo recompiles allowed after the warm-up "
                            "(default: %(default)s)")
    check.add_argument("--max-executions", type=non_negative_float, default=None,
                       metavar="F", help="XLA executions per step allowed (default: any)")
    check.add_argument("--max-graph-breaks", type=non_negative_int, default=None,
                       metavar="N", help="distinct graph breaks allowed (default: any)")
    check.add_argument("--baseline", default=None, metavar="FILE",
                       help="also fail on any count above this file's entry for the script")
    check.add_argument("--update", action="store_true",
                       help="write this run's counts to --baseline instead of comparing")
    check.add_argument("--name", default=None,
                       help="the script's entry in --baseline and in the JUnit report "
                            "(default: its path as given)")
    check.add_argument("--junit-xml", default=None, metavar="FILE",
                       help="also write the verdict as JUnit XML, for CI dashboards")
    check.add_argument("script", help="the Python script to run")
    check.add_argument("rest", nargs=argparse.REMAINDER, metavar="-- ARGS",
                       help="the script's own arguments")
    check.set_defaults(func=check_script)


def check_script(args: argparse.Namespace) -> int:
    if not Path(args.script).is_file():
        print(f"syncfree-xla check: no such script: {args.script}", file=sys.stderr)
        return 2
    if args.update and not args.baseline:
        print("syncfree-xla check: --update needs --baseline FILE", file=sys.stderr)
        return 2
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    name = args.name or args.script
    from .. import testing  # imports torch: only for this command
    from .explain import run_script

    starts: list[testing.Snapshot] = []

    def on_step(n: int) -> None:
        if n == args.warmup + 1:
            starts.append(testing.snapshot())

    run = run_script(args.script, rest, steps=args.warmup + args.steps, on_step=on_step)
    end = testing.snapshot()
    if run.error is not None:
        if run.traceback:
            print(run.traceback, end="", file=sys.stderr)
        print(f"syncfree-xla check: {args.script} failed (status {run.exit_code}) before "
              "its steps were measured", file=sys.stderr)
        return 2
    measured = (run.steps_run or 0) - args.warmup
    if not starts or measured < args.steps:
        print(f"syncfree-xla check: {args.script} ran {run.steps_run or 0} step(s) of a "
              f"function compiled with syncfree_xla; --warmup {args.warmup} and --steps "
              f"{args.steps} need {args.warmup + args.steps}", file=sys.stderr)
        return 2
    measurement = testing.between(starts[0], end, measured, args.warmup, run.report)
    problems = testing.budget_problems(
        measurement, max_syncs_per_step=args.max_syncs, max_compiles=args.max_compiles,
        max_recompiles=args.max_recompiles, max_executions_per_step=args.max_executions,
        max_graph_breaks=args.max_graph_breaks)
    if args.baseline:
        path = Path(args.baseline)
        try:
            if args.update:
                testing.write_baseline(path, {name: measurement.entry()})
            else:
                recorded = testing.read_baseline(path).get(name)
                if recorded is not None:
                    problems += testing.compare_with_baseline(measurement, recorded)
        except (OSError, ValueError) as e:
            print(f"syncfree-xla check: {e}", file=sys.stderr)
            return 2
    counts = ", ".join(f"{k}={v:g}" for k, v in measurement.counters().items())
    if args.junit_xml:
        write_junit(Path(args.junit_xml), name,
                    testing.failure_message(measurement, problems) if problems else None)
    if problems:
        print(testing.failure_message(measurement, problems), file=sys.stderr)
        return 1
    print(f"syncfree-xla check: {name}: within budget ({counts})")
    return 0


def write_junit(path: Path, name: str, failure: str | None) -> None:
    """One test case, failed with ``failure`` or passed, as JUnit XML."""
    from xml.etree import ElementTree

    suite = ElementTree.Element("testsuite", name="syncfree-xla check", tests="1",
                                failures="1" if failure else "0")
    case = ElementTree.SubElement(suite, "testcase", classname="syncfree-xla check",
                                  name=name)
    if failure:
        element = ElementTree.SubElement(case, "failure",
                                         message=failure.splitlines()[1].strip())
        element.text = failure
    path.parent.mkdir(parents=True, exist_ok=True)
    ElementTree.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)


# ---------------------------------------------------------------------------
# Entry point

COMMAND_GROUPS: list[Callable[[Subparsers], None]] = [
    add_cache_commands, add_bench_commands, add_explain_commands, add_check_commands,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="syncfree-xla", description="Tools for the syncfree_xla torch.compile backend."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_commands in COMMAND_GROUPS:
        add_commands(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status instead of exiting."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
