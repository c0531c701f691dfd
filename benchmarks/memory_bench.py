"""How much memory training adds, per backend: resident-set growth over the pre-training baseline.

    python benchmarks/memory_bench.py [--steps 8] [--width 2048] [--layers 12] [--batch 64]

The workload is issue 13's: ``layers`` x ``Linear(width, width)`` (50M parameters at the
defaults) with AdamW, the whole step (forward, backward, optimizer, zero_grad) as one
function. Each backend runs in a fresh process; the baseline is the resident set once the
model, optimizer and batch exist (on the device for the XLA backends), before the first
step. Reported: the growth after the last step ("steady") and the high-water mark
(``ru_maxrss``, which includes the first step's tracing and compiles), in GB, and each as
a multiple of eager's. Peak RSS of the whole process would hide the growth behind the
runtime's own footprint, which is why the baseline is subtracted.

``syncfree_xla`` runs with its defaults (each step one joined computation, updating
parameters and optimizer state in place); ``syncfree_xla-per-graph`` with
``join_graphs=False``, one execution per graph, the fallback.
``syncfree_xla-one-arena`` is syncfree_xla with ``MALLOC_ARENA_MAX=1``: XLA:CPU buffers
are host memory freed on worker threads, and glibc keeps what is freed in each thread's
own arena, so one arena keeps much less. It is not the default: it slows small-tensor
workloads (the perf gate's transformer_lm_small loop A by 40-60%), see the README.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("eager", "lazy", "syncfree_xla", "syncfree_xla-per-graph",
            "syncfree_xla-one-arena")


def _rss_gb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1e6
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(backend: str, steps: int, width: int, layers: int, batch: int) -> dict[str, Any]:
    """Trains in this process; the baseline, steady and peak resident set, in GB."""
    sys.path.insert(0, str(ROOT))
    from xla_backend.device import configure_pjrt

    configure_pjrt()
    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm

    on_xla = backend != "eager"
    device = torch_xla.device() if on_xla else torch.device("cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    model = model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, width).to(device)

    def step(x: torch.Tensor) -> torch.Tensor:
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    if backend.startswith("syncfree_xla"):
        options = {"cache": False, "join_graphs": backend != "syncfree_xla-per-graph"}
        step = torch.compile(step, backend="syncfree_xla", options=options)
    if on_xla:
        torch_xla.sync()
        xm.wait_device_ops()
    base = _rss_gb()
    for _ in range(steps):
        step(x)
        if backend == "lazy":
            torch_xla.sync()
    if on_xla:
        xm.wait_device_ops()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return {"backend": backend, "baseline_gb": base, "steady_growth_gb": _rss_gb() - base,
            "peak_growth_gb": peak - base}


def run(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    env = dict(os.environ)
    env.pop("MALLOC_ARENA_MAX", None)
    if backend == "syncfree_xla-one-arena":
        env["MALLOC_ARENA_MAX"] = "1"
    proc = subprocess.run(
        [sys.executable, __file__, "--child", backend, "--steps", str(args.steps),
         "--width", str(args.width), "--layers", str(args.layers), "--batch", str(args.batch)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{backend} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.width, args.layers, args.batch)))
        return
    results = [run(b, args) for b in args.backends]
    eager = next((r for r in results if r["backend"] == "eager"), None)
    print(f"{'backend':<22}{'baseline GB':>12}{'steady +GB':>12}{'peak +GB':>10}"
          f"{'steady/eager':>14}{'peak/eager':>12}")
    for r in results:
        ratios = ("", "")
        if eager is not None:
            ratios = (f"{r['steady_growth_gb'] / eager['steady_growth_gb']:.2f}x",
                      f"{r['peak_growth_gb'] / eager['peak_growth_gb']:.2f}x")
        print(f"{r['backend']:<22}{r['baseline_gb']:>12.2f}{r['steady_growth_gb']:>12.2f}"
              f"{r['peak_growth_gb']:>10.2f}{ratios[0]:>14}{ratios[1]:>12}")


if __name__ == "__main__":
    main()
