"""pytest-benchmark: steady step time of syncfree_xla against eager CPU (``make bench``).

    pytest benchmarks/ --benchmark-only

Each case times one training step followed by a device barrier, after warm-up, with
the step built by ``xla_backend.tools.bench.prepare`` (the same step ``syncfree-xla bench``
times). The cases of one workload form one group, so pytest-benchmark's table puts
syncfree_xla next to eager. All cases share a process (pytest-benchmark measures in
process); ``syncfree-xla bench`` isolates every cell in a process of its own instead.
"""

from __future__ import annotations

from xla_backend.device import configure_pjrt

configure_pjrt()

import pytest  # noqa: E402
import torch._dynamo  # noqa: E402
import torch_xla  # noqa: E402

from xla_backend.tools import bench  # noqa: E402

# Autograd sizes its per-device queues at the first backward of the process.
torch_xla.device()

WARMUP = 3
ROUNDS = 15
# One torch thread, as in the perf gate: on a busy two-core machine eager's second
# OpenMP worker gets descheduled and its step time swings by up to 100x.
THREADS = 1
CASES = [
    (model, loop, backend)
    for model in ("mlp", "transformer_lm_small")
    for loop in ("A",)
    for backend in ("eager", "syncfree_xla")
]


@pytest.mark.parametrize(("model", "loop", "backend"), CASES,
                         ids=[f"{m}-{lp}-{b}" for m, lp, b in CASES])
def test_steady_step(benchmark, model: str, loop: str, backend: str) -> None:
    torch._dynamo.reset()
    spec = bench.CellSpec(model, loop, backend, threads=THREADS)
    prepared = bench.prepare(spec, WARMUP + ROUNDS)
    for i in range(WARMUP):
        prepared.step(i)
    prepared.barrier()
    counter = iter(range(WARMUP, WARMUP + ROUNDS + 1))

    def one_step() -> None:
        prepared.step(next(counter))
        prepared.barrier()

    benchmark.group = f"{model} loop {loop}: steady step"
    benchmark.extra_info.update(model=model, loop=loop, backend=backend, threads=THREADS)
    benchmark.pedantic(one_step, rounds=ROUNDS, iterations=1, warmup_rounds=0)
