"""Steady step time of one workload under several backends, measured in one process.

    python benchmarks/steady_step.py [--workload transformer_lm] [--steps 10]

Timings on a shared machine are noisy; compare the backends' ratios from the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time

from xla_backend.device import configure_pjrt

configure_pjrt()

import torch  # noqa: E402
import torch._dynamo  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.core.xla_model as xm  # noqa: E402

from xla_backend import workloads, xla_metrics  # noqa: E402

BACKENDS = ("eager", "openxla", "syncfree_xla")


def measure(backend: str, workload: str, warmup: int, steps: int) -> dict:
    torch._dynamo.reset()
    work = workloads.get_workload(workload)
    device = torch.device("cpu") if backend == "eager" else torch_xla.device()
    model = work.build_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = (workloads.train_step if backend == "eager"
            else torch.compile(workloads.train_step, backend=backend))
    batches = [work.make_batch(i, device) for i in range(warmup + steps)]

    def barrier() -> None:
        if backend != "eager":
            torch_xla.sync()
            xm.wait_device_ops()

    started = time.perf_counter()
    step(model, opt, *batches[0])
    barrier()
    first = time.perf_counter() - started
    for batch in batches[1:warmup]:
        step(model, opt, *batch)
    barrier()
    syncs, compiles = xla_metrics.device_to_host_transfers(), xla_metrics.compiles()
    times = []
    for batch in batches[warmup:]:
        started = time.perf_counter()
        step(model, opt, *batch)
        barrier()
        times.append(time.perf_counter() - started)
    return {
        "backend": backend,
        "first_step_s": first,
        "steady_ms": statistics.median(times) * 1e3,
        "syncs_per_step": (xla_metrics.device_to_host_transfers() - syncs) / steps,
        "warm_compiles": xla_metrics.compiles() - compiles,
    }


def main() -> None:
    torch_xla.device()  # autograd sizes its device queues at the first backward of the process
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="transformer_lm",
                        choices=sorted(workloads.WORKLOADS))
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for backend in args.backends:
        try:
            rows.append(measure(backend, args.workload, args.warmup, args.steps))
        except Exception as exc:  # a failing backend is a result, not the end of the run
            rows.append({"backend": backend, "error": f"{type(exc).__name__}: {exc}"[:200]})
    eager = next((r["steady_ms"] for r in rows if r["backend"] == "eager" and "error" not in r),
                 None)
    print(f"{'backend':<14}{'first step':>12}{'steady':>12}{'vs eager':>10}"
          f"{'syncs/step':>12}{'warm compiles':>15}")
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<14}failed: {r['error']}")
            continue
        ratio = f"{r['steady_ms'] / eager:.2f}x" if eager else "-"
        print(f"{r['backend']:<14}{r['first_step_s']:>11.2f}s{r['steady_ms']:>10.1f}ms{ratio:>10}"
              f"{r['syncs_per_step']:>12.2f}{r['warm_compiles']:>15}")


if __name__ == "__main__":
    main()
