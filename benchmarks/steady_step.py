"""Steady step time of one workload under eager, openxla and syncfree_xla.

    python benchmarks/steady_step.py [--workload transformer_lm] [--steps 10]

A shortcut for ``syncfree-xla bench --loops plain --backends eager openxla syncfree_xla
--models WORKLOAD``: the measurement lives in ``xla_backend.tools.bench``, one fresh process
per backend. Compare the backends' ratios from the same run.
"""

from __future__ import annotations

import argparse
import sys

from xla_backend.tools import bench, cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="transformer_lm", choices=list(bench.MODELS))
    parser.add_argument("--backends", nargs="+", default=["eager", "openxla", "syncfree_xla"],
                        choices=bench.BACKENDS)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    return cli.main(["bench", "--models", args.workload, "--loops", "plain",
                     "--backends", *args.backends, "--warmup", str(args.warmup),
                     "--steps", str(args.steps)])


if __name__ == "__main__":
    sys.exit(main())
