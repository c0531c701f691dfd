"""Host syncs, executions, compiles and step time of the sync-free loops, per backend.

    python benchmarks/syncfree_loops.py [--loops A B] [--steps 10] [--json out.json]

Loop A is ``workloads.train_step_clip`` (backward, clip_grad_norm_, AdamW, LambdaLR
stepped inside the step, so the float lr changes every step); loop B is
``workloads.train_step_amp`` (GradScaler scale / backward / unscale_ / clip / step /
update). Both use AdamW as a user creates it (no ``capturable=True``: its step counter
starts on the host; syncfree_xla moves it to the device for its device-side skip of a
non-finite step). Backends, all in one process on the same MLP and data:

* ``openxla``: torch_xla's own torch.compile backend;
* ``lazy``: the step uncompiled on XLA tensors, ``torch_xla.sync()`` after each step;
* ``syncfree_xla``: this project's backend, and ``syncfree_xla-nopasses`` with
  ``options={"syncfree_passes": False}`` (stock Dynamo settings, no rewrites).

Counts come from torch_xla's metrics over the measured steps after warm-up. A
backend that raises is a result too: it is listed as failed, with its error. Step
times are medians with a device barrier after every step; on a shared machine
compare them as ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

from xla_backend.device import configure_pjrt

configure_pjrt()

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.core.xla_model as xm  # noqa: E402

from xla_backend import xla_metrics  # noqa: E402
from xla_backend.tools import workloads  # noqa: E402

BACKENDS = ("openxla", "lazy", "syncfree_xla", "syncfree_xla-nopasses")
LOOPS = ("A", "B")


def _barrier() -> None:
    torch_xla.sync()
    xm.wait_device_ops()


def _compiled(step: Callable, backend: str) -> Callable:
    if backend == "lazy":
        return step
    if backend == "syncfree_xla-nopasses":
        return torch.compile(step, backend="syncfree_xla", options={"syncfree_passes": False})
    return torch.compile(step, backend=backend)


def _loop(loop: str, backend: str, device: torch.device) -> Callable[[int], Any]:
    """One training step of ``loop`` as a function of the step index."""
    work = workloads.get_workload("mlp")
    model = work.build_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    if loop == "A":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
        step = _compiled(workloads.train_step_clip, backend)
        return lambda i: step(model, opt, *work.make_batch(i, device), scheduler=sched)
    scaler = workloads.make_grad_scaler(device)
    step = _compiled(workloads.train_step_amp, backend)
    return lambda i: step(model, opt, scaler, *work.make_batch(i, device))


def measure(loop: str, backend: str, warmup: int, steps: int) -> dict[str, Any]:
    torch._dynamo.reset()
    device = torch_xla.device()
    step = _loop(loop, backend, device)

    def one(i: int) -> None:
        step(i)
        if backend == "lazy":
            torch_xla.sync()  # the lazy loop's step boundary (mark_step)
    started = time.perf_counter()
    one(0)
    _barrier()
    first = time.perf_counter() - started
    for i in range(1, warmup):
        one(i)
    _barrier()
    syncs, execs = xla_metrics.device_to_host_transfers(), xla_metrics.executions()
    compiles = xla_metrics.compiles()
    times = []
    for i in range(warmup, warmup + steps):
        started = time.perf_counter()
        one(i)
        _barrier()
        times.append(time.perf_counter() - started)
    return {
        "loop": loop,
        "backend": backend,
        "syncs_per_step": (xla_metrics.device_to_host_transfers() - syncs) / steps,
        "executions_per_step": (xla_metrics.executions() - execs) / steps,
        "warm_compiles": xla_metrics.compiles() - compiles,
        "first_step_s": first,
        "step_ms": statistics.median(times) * 1e3,
    }


def _table(rows: list[dict[str, Any]], steps: int) -> str:
    lines = [
        f"| loop | backend | host syncs/step | XLA executions/step | "
        f"XLA compiles in {steps} warm steps | step (median) | first step |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['loop']} | {r['backend']} | failed: {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['loop']} | {r['backend']} | {r['syncs_per_step']:.2f} | "
            f"{r['executions_per_step']:.2f} | {r['warm_compiles']} | {r['step_ms']:.1f} ms | "
            f"{r['first_step_s']:.1f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    torch_xla.device()  # autograd must see the XLA device before the first backward
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loops", nargs="+", default=list(LOOPS), choices=LOOPS)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = []
    for loop in args.loops:
        for backend in args.backends:
            try:
                rows.append(measure(loop, backend, args.warmup, args.steps))
            except Exception as exc:  # a failing backend is a result, not the end of the run
                message = " ".join(f"{type(exc).__name__}: {exc}".split())[:160]
                rows.append({"loop": loop, "backend": backend, "error": message})
                try:
                    _barrier()
                except Exception:  # noqa: BLE001 - the device state is the failure's business
                    pass
    print(_table(rows, args.steps))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
