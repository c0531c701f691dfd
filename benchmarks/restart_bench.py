"""What the cache saves a restarted job: the same training run in two fresh processes.

    python benchmarks/restart_bench.py [--loop plain|B] [--steps 3] [--resume] [--keep-cache DIR]

Both processes train the DESIGN.md transformer LM (AdamW; ``--loop B`` is the
GradScaler step ``workloads.train_step_amp``, which Dynamo runs as several frames) with
one cache directory: the first fills it, the second reads it. With ``--resume`` the
second starts from the first's final model and optimizer state, as a job restarted from
its checkpoint does, instead of from the same initial weights. Reported per process:
the first step's wall time and where it went, by stage:

- Dynamo: bytecode tracing, guards and graph breaks (Dynamo's own compile time minus
  the time inside this backend);
- AOTAutograd: its metadata pass, joint trace and partitioner, or, on a hit of the
  AOTAutograd tier, rebuilding its result from the entry (both without the next stage);
- lowering: this backend's aten rewrites, tracing to HLO or rebuilding it from a graph
  entry, and starting the XLA compiles;
- XLA compile: torch_xla's CompileTime, spent on the compile pool, partly in parallel
  with the stages above (so the stages do not add up to the first step).

On the CPU PJRT client torch_xla 2.9 cannot reload a compiled executable, so the second
process still runs every XLA compile; and Dynamo's tracing cannot be skipped without
loading pickled guards and bytecode, which the cache does not do.
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

CACHE_COUNTERS = ("cache_aot_hits", "cache_aot_misses", "cache_aot_uncacheable",
                  "cache_graph_hits", "cache_graph_misses", "cache_disk_hits",
                  "cache_disk_writes", "cache_bad_entries", "cache_graph_rejected",
                  "cache_aot_rejected")


def _timed(owner: Any, name: str, total: list[float]) -> None:
    """Adds the wall time of every call of ``owner.name`` to ``total[0]``."""
    inner = getattr(owner, name)

    def timed(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            total[0] += time.perf_counter() - t

    setattr(owner, name, timed)


def child(cache_dir: str, steps: int, loop: str, save: str | None = None,
          load: str | None = None) -> dict[str, Any]:
    """One training run; everything it measures, as a dict."""
    started = time.perf_counter()
    from xla_backend.device import configure_pjrt

    configure_pjrt()
    import torch
    import torch._dynamo.utils as dynamo_utils
    import torch_xla
    import torch_xla.core.xla_model as xm
    import torch_xla.debug.metrics as met

    import xla_backend
    from xla_backend import aot, backend
    from xla_backend.runtime import partition
    from xla_backend.tools import workloads

    in_backend, in_aot, in_lowering = [0.0], [0.0], [0.0]
    _timed(backend.SyncfreeXla, "__call__", in_backend)
    _timed(aot, "compile_graph", in_aot)
    _timed(aot, "from_artifacts", in_aot)
    _timed(partition, "lower", in_lowering)
    device = torch_xla.device()  # autograd sizes its device queues at the first backward
    imported = time.perf_counter() - started
    work = workloads.transformer_lm_workload()
    model = work.build_model().to(device)
    opt = workloads.make_adamw(model)
    if load:
        state = torch.load(load)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
    fn = workloads.train_step if loop == "plain" else workloads.train_step_amp
    extra = () if loop == "plain" else (workloads.make_grad_scaler(device),)
    step = torch.compile(fn, backend="syncfree_xla", options={"cache_dir": cache_dir})
    batches = [work.make_batch(i, device) for i in range(steps)]
    torch_xla.sync()
    xm.wait_device_ops()

    t0 = time.perf_counter()
    losses = [step(model, opt, *extra, *batches[0])]
    torch_xla.sync()
    xm.wait_device_ops()
    first_step = time.perf_counter() - t0
    dynamo_s = sum(dynamo_utils.compilation_time_metrics.get("_compile.compile_inner", []))
    for batch in batches[1:]:
        losses.append(step(model, opt, *extra, *batch))
    torch_xla.sync()
    xm.wait_device_ops()

    if save:
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, save)
    compile_data = met.metric_data("CompileTime")
    stats = xla_backend.stats()
    # the backward compiles at the first backward(), outside the backend's call
    lowering_outside = max(in_lowering[0] - in_backend[0], 0.0)
    return {
        "import_s": imported,
        "first_step_s": first_step,
        "dynamo_s": dynamo_s - in_backend[0],
        "aot_s": in_aot[0] - in_lowering[0] + lowering_outside,
        "lowering_s": in_lowering[0],
        "compile_s": float(compile_data[1]) / 1e9 if compile_data else 0.0,
        "compile_wait_s": stats.get("compile_wait_seconds", 0.0),
        "compiles": int(compile_data[0]) if compile_data else 0,
        "cache": {name: int(stats.get(name, 0)) for name in CACHE_COUNTERS},
        "losses": [float(loss.cpu()).hex() for loss in losses],
        "total_s": time.perf_counter() - started,
    }


def run_child(cache_dir: str, steps: int, loop: str, *checkpoint: str) -> dict[str, Any]:
    env = dict(os.environ)
    done = subprocess.run(
        [sys.executable, __file__, "--child", cache_dir, "--steps", str(steps), "--loop", loop,
         *checkpoint],
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
    parser.add_argument("--loop", choices=("plain", "B"), default="plain")
    parser.add_argument("--resume", action="store_true",
                        help="the second process starts from the first's final state")
    parser.add_argument("--keep-cache", help="use (and keep) this directory, else a temporary one")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    parser.add_argument("--load", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, args.steps, args.loop, args.save, args.load)
        print("RESULT " + json.dumps(result))
        return
    with tempfile.TemporaryDirectory(prefix="restart-bench-") as tmp:
        cache_dir = args.keep_cache or str(Path(tmp) / "cache")
        checkpoint = str(Path(tmp) / "checkpoint.pt")
        first = run_child(cache_dir, args.steps, args.loop,
                          *(("--save", checkpoint) if args.resume else ()))
        second = run_child(cache_dir, args.steps, args.loop,
                           *(("--load", checkpoint) if args.resume else ()))
        runs = [("cold", first), ("warm", second)]
    print(f"loop {args.loop}; stages of the first step (XLA compile runs on the compile "
          f"pool, partly in parallel)")
    print(f"{'process':<16}{'1st step':>10}{'Dynamo':>9}{'AOTAutograd':>13}{'lowering':>10}"
          f"{'XLA compile':>13}{'waited':>8}{'AOT hits':>10}{'misses':>8}{'graph hits':>12}"
          f"{'misses':>8}")
    for name, r in runs:
        c = r["cache"]
        print(f"{name:<16}{r['first_step_s']:>9.2f}s{r['dynamo_s']:>8.2f}s{r['aot_s']:>12.2f}s"
              f"{r['lowering_s']:>9.2f}s{r['compile_s']:>12.2f}s{r['compile_wait_s']:>7.2f}s"
              f"{c['cache_aot_hits']:>10}{c['cache_aot_misses'] + c['cache_aot_uncacheable']:>8}"
              f"{c['cache_graph_hits']:>12}{c['cache_graph_misses']:>8}")
    ratio = second["first_step_s"] / max(first["first_step_s"], 1e-9)
    print(f"warm/cold first step: {ratio:.2f}")
    if args.resume:
        print("losses: the second process resumed training, so they differ by design")
    else:
        print(f"losses bitwise identical: {first['losses'] == second['losses']}")
    print("RESULTS " + json.dumps(dict(runs)))


if __name__ == "__main__":
    main()
