"""What the graph cache saves a restarted job: the same training run in two fresh processes.

    python benchmarks/restart_bench.py [--steps 3] [--keep-cache DIR]

Both processes train the DESIGN.md transformer LM (AdamW, ``workloads.train_step``)
with one cache directory: the first fills it, the second reads it. Reported per
process: the first step's wall time (Dynamo, AOTAutograd, tracing, HLO lowering, XLA
compile, execution), torch_xla's total CompileTime, and the cache's hits and misses.

On the CPU PJRT client torch_xla 2.9 cannot reload a compiled executable, so the
second process still runs every XLA compile; only tracing and HLO lowering are
skipped. Its first step therefore stays far above 10% of the first process's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CACHE_COUNTERS = ("cache_graph_hits", "cache_graph_misses", "cache_memory_hits",
                  "cache_memory_misses", "cache_disk_hits", "cache_disk_misses",
                  "cache_disk_writes", "cache_bad_entries", "cache_graph_rejected")


def child(cache_dir: str, steps: int) -> dict[str, Any]:
    """One training run; everything it measures, as a dict."""
    started = time.perf_counter()
    from xla_backend.device import configure_pjrt

    configure_pjrt()
    import torch
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as met

    import xla_backend
    from xla_backend import counters
    from xla_backend.runtime import graph as runtime_graph
    from xla_backend.tools import workloads

    in_lowering = [0.0]  # seconds inside lowering's trace-or-cache hook, XLA compile included
    hook = runtime_graph.trace_and_compile

    def timed(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return hook(*a, **k)
        finally:
            in_lowering[0] += time.perf_counter() - t

    runtime_graph.trace_and_compile = timed
    device = torch_xla.device()  # autograd sizes its device queues at the first backward
    imported = time.perf_counter() - started
    work = workloads.transformer_lm_workload()
    model = work.build_model().to(device)
    opt = workloads.make_adamw(model)
    step = torch.compile(workloads.train_step, backend="syncfree_xla",
                         options={"cache_dir": cache_dir})
    batches = [work.make_batch(i, device) for i in range(steps)]
    torch_xla.sync()
    xm.wait_device_ops()

    t0 = time.perf_counter()
    losses = [step(model, opt, *batches[0])]
    torch_xla.sync()
    xm.wait_device_ops()
    first_step = time.perf_counter() - t0
    for batch in batches[1:]:
        losses.append(step(model, opt, *batch))
    torch_xla.sync()
    xm.wait_device_ops()

    compile_data = met.metric_data("CompileTime")
    stats = xla_backend.stats()
    return {
        "import_s": imported,
        "first_step_s": first_step,
        "compile_s": float(compile_data[1]) / 1e9 if compile_data else 0.0,
        "compiles": int(compile_data[0]) if compile_data else 0,
        "lowering_s": in_lowering[0],
        "graph_compile_s": stats.get(counters.COMPILE_SECONDS, 0.0),
        "cache": {name: int(stats.get(name, 0)) for name in CACHE_COUNTERS},
        "losses": [float(loss.cpu()).hex() for loss in losses],
        "total_s": time.perf_counter() - started,
    }


def run_child(cache_dir: str, steps: int) -> dict[str, Any]:
    env = dict(os.environ)
    done = subprocess.run(
        [sys.executable, __file__, "--child", cache_dir, "--steps", str(steps)],
        capture_output=True, text=True, env=env, cwd=ROOT, check=False,
    )
    if done.returncode != 0:
        sys.exit(f"child failed:\n{done.stderr[-4000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def describe_entries(cache_dir: str) -> list[dict[str, Any]]:
    from xla_backend.cache.store import Store

    return [{"digest": e.digest[:12], "bytes": e.size, **e.meta}
            for e in sorted(Store(cache_dir).entries(), key=lambda e: -e.size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--keep-cache", help="use (and keep) this directory, else a temporary one")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.steps)))
        return
    with tempfile.TemporaryDirectory(prefix="restart-bench-") as tmp:
        cache_dir = args.keep_cache or str(Path(tmp) / "cache")
        first = run_child(cache_dir, args.steps)
        second = run_child(cache_dir, args.steps)
        entries = describe_entries(cache_dir)
    print(f"{'process':<9}{'import':>8}{'1st step':>10}{'XLA compile':>13}{'trace+HLO':>11}"
          f"{'compiles':>10}{'hits':>6}{'misses':>8}{'disk hits':>11}{'disk writes':>13}")
    for name, r in (("first", first), ("second", second)):
        c = r["cache"]
        r["trace_s"] = r["lowering_s"] - r["graph_compile_s"]
        print(f"{name:<9}{r['import_s']:>7.2f}s{r['first_step_s']:>9.2f}s"
              f"{r['compile_s']:>12.2f}s{r['trace_s']:>10.2f}s{r['compiles']:>10}"
              f"{c['cache_graph_hits']:>6}{c['cache_graph_misses']:>8}"
              f"{c['cache_disk_hits']:>11}{c['cache_disk_writes']:>13}")

    def ratio(key: str) -> str:
        return f"{second[key] / max(first[key], 1e-9):.2f}"

    print(f"second/first: first step {ratio('first_step_s')}, XLA compile {ratio('compile_s')}, "
          f"trace+HLO (a hit: rebuild from the entry) {ratio('trace_s')}")
    print("trace+HLO = time in lowering's trace-or-cache hook minus its XLA compiles; the rest "
          "of a first step is Dynamo, AOTAutograd and execution, which no entry can skip.")
    print(f"losses bitwise identical: {first['losses'] == second['losses']}")
    print("entries:")
    for e in entries:
        print(f"  {e['digest']}  {e['bytes']:>9} bytes  hlo {e.get('hlo_bytes', '?'):>9} bytes  "
              f"{e.get('params', '?')} parameters")


if __name__ == "__main__":
    main()
