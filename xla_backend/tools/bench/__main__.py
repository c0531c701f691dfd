"""``python -m xla_backend.tools.bench --cell SPEC``: the child process of one cell.

``runner.run_cell`` starts it, so each cell gets a process of its own; it measures the
cell and prints one :data:`~.spec.RESULT_PREFIX` line with the result as JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict

from .cell import measure_cell
from .spec import RESULT_PREFIX, CellResult, CellSpec, one_line


def main(argv: Sequence[str]) -> int:
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
