"""What the multi-threaded runtime buys, on the DESIGN.md transformer LM.

    python benchmarks/runtime_bench.py [--repeats 1] [--steps 10]

1. Cold first-step wall time with ``compile_threads=1`` and with the default (one per
   core), each in a fresh process with the on-disk cache off.
2. Steady step time with asynchronous dispatch on and off, in one process.
Both are reported as ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

FIRST_STEP = r"""
import json, sys, time
from xla_backend.device import configure_pjrt
configure_pjrt()
import torch, torch_xla
import torch_xla.core.xla_model as xm
from xla_backend.tools import workloads
options = json.loads(sys.argv[1])
device = torch_xla.device()
work = workloads.get_workload("transformer_lm")
model = work.build_model().to(device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
step = torch.compile(workloads.train_step, backend="syncfree_xla", options=options)
batch = work.make_batch(0, device)
started = time.perf_counter()
step(model, opt, *batch)
torch_xla.sync(); xm.wait_device_ops()
print(json.dumps({"first_step_s": time.perf_counter() - started}))
"""


def cold_first_step(options: dict) -> float:
    done = subprocess.run([sys.executable, "-c", FIRST_STEP, json.dumps(options)],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])["first_step_s"]


def steady_step(async_dispatch: bool, steps: int) -> float:
    from xla_backend.device import configure_pjrt

    configure_pjrt()
    import torch
    import torch._dynamo
    import torch_xla
    import torch_xla.core.xla_model as xm

    from xla_backend.tools import workloads

    torch._dynamo.reset()
    device = torch_xla.device()
    work = workloads.get_workload("transformer_lm")
    model = work.build_model().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    step = torch.compile(workloads.train_step, backend="syncfree_xla",
                         options={"async_dispatch": async_dispatch, "cache": False})
    batches = [work.make_batch(i, device) for i in range(steps + 3)]
    for batch in batches[:3]:
        step(model, opt, *batch)
    torch_xla.sync()
    xm.wait_device_ops()
    started = time.perf_counter()
    for batch in batches[3:]:
        step(model, opt, *batch)
    torch_xla.sync()
    xm.wait_device_ops()
    return (time.perf_counter() - started) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    one, default = [], []
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both
        one.append(cold_first_step({"compile_threads": 1, "cache": False}))
        default.append(cold_first_step({"cache": False}))
    t1, tn = statistics.median(one), statistics.median(default)
    print(f"cold first step: compile_threads=1 {t1:.2f} s, default {tn:.2f} s, "
          f"ratio {tn / t1:.2f}")
    on = steady_step(True, args.steps)
    off = steady_step(False, args.steps)
    print(f"steady step: async dispatch on {on * 1e3:.1f} ms, off {off * 1e3:.1f} ms, "
          f"ratio on/off {on / off:.2f}")


if __name__ == "__main__":
    main()
