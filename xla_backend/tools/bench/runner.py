"""Running the matrix from the parent: one fresh process per cell, failures as results.

A crash, a hang or a segfault ends only that cell's process: it is recorded as a
failed :class:`~.spec.CellResult`, with its error, and the run goes on.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ..backends import XLA_BACKENDS
from .spec import (
    DEFAULT_STEPS,
    DEFAULT_TIMEOUT_S,
    DEFAULT_WARMUP,
    RESULT_PREFIX,
    CellResult,
    CellSpec,
    one_line,
)

logger = logging.getLogger(__name__)


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
    pair_loops: bool = False,
) -> list[CellResult]:
    """Every cell, one fresh process each; failures are results and the run goes on.

    ``skip`` maps (model, backend) to a reason: those cells are recorded as skipped.
    A (model, backend) that timed out on one loop is skipped on the later loops
    (its compile would most likely time out again and cost another timeout).
    ``devices`` runs the XLA backends over an SPMD mesh of that many devices.
    ``pair_loops``: every loop A and B cell also times its steps interleaved with the
    plain loop's, in its own process (``CellSpec.paired_loop``).
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
                            devices=devices if backend in XLA_BACKENDS else None,
                            paired_loop="plain" if pair_loops and loop != "plain" else None)
            logger.debug("running %s", spec)
            result = (runner or run_cell)(spec, timeout_s)
            if is_timeout(result):
                skip[(model, backend)] = f"loop {loop} timed out after {timeout_s:g} s"
        results.append(result)
        if progress is not None:
            progress(result, index, len(cells))
    return results
