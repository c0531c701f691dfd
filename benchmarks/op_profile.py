"""Where a compiled training step's device time goes, op by op, on XLA and in eager.

    python benchmarks/op_profile.py [--model tv_resnet18] [--reps 5] [--top 12]
                                    [--no-cpu-rewrites] [--threads N]

Compiles one training step of a bench workload (AdamW, the plain loop) with
``syncfree_xla`` and collects every heavy op of the aten graphs it lowers: convolutions
and their backward, matrix products, pooling and batch norm. Each distinct call (op,
shapes, arguments) then runs alone, on random inputs of the same shapes: on the XLA
device as its own computation, timed by torch_xla's ``ExecuteTime`` (device time, no
tracing), and eagerly on the CPU. The table is sorted by XLA time per step (the op's
time times how often the step calls it), so its first rows are the kernels to rewrite
around. Ops run alone lose the fusion XLA does inside a step, so the sum is a profile,
not the step time; the step time itself is the bench's.

``--no-cpu-rewrites`` profiles the graphs as torch_xla would lower them without this
backend's CPU rewrites (``cpu_rewrites=False``), which is how the slow convolutions of
issue 16 were found.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from xla_backend.device import configure_pjrt  # noqa: E402

configure_pjrt()

import torch  # noqa: E402
import torch_xla  # noqa: E402
import torch_xla.core.xla_model as xm  # noqa: E402

from xla_backend import backend, xla_metrics  # noqa: E402
from xla_backend.tools import workloads  # noqa: E402
from xla_backend.tools.bench.spec import MODELS  # noqa: E402

aten = torch.ops.aten
HEAVY = {
    aten.convolution.default, aten.convolution_backward.default, aten.mm.default,
    aten.bmm.default, aten.addmm.default, aten.max_pool2d_with_indices.default,
    aten.max_pool2d_with_indices_backward.default,
    aten._native_batch_norm_legit_functional.default,
    aten.native_batch_norm_backward.default,
}


class _Collect:
    """A backend observer keeping the heavy calls of every aten graph lowered."""

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.examples: dict[tuple, tuple[Any, tuple, dict]] = {}

    def on_dynamo_graph(self, gm: torch.fx.GraphModule, opts: Any) -> None:
        pass

    def on_aten_graph(self, name: str, gm: torch.fx.GraphModule) -> None:
        for node in gm.graph.nodes:
            if node.op == "call_function" and node.target in HEAVY:
                args = torch.fx.node.map_arg(node.args, lambda n: n.meta["val"])
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: n.meta["val"])
                key = (str(node.target), _describe(args), _describe(kwargs))
                self.calls[key] += 1
                self.examples[key] = (node.target, args, kwargs)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "x".join(map(str, value.shape)) or "scalar"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_describe(v)}" for k, v in value.items())
    return repr(value)


def _materialize(value: Any, device: torch.device, g: torch.Generator) -> Any:
    if isinstance(value, torch.Tensor):
        shape = [int(s) for s in value.shape]
        if value.dtype.is_floating_point:
            t = torch.randn(shape, generator=g, dtype=value.dtype)
        elif value.dtype == torch.bool:
            t = torch.ones(shape, dtype=torch.bool)
        else:
            t = torch.zeros(shape, dtype=value.dtype)
        return t.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_materialize(v, device, g) for v in value)
    if isinstance(value, dict):
        return {k: _materialize(v, device, g) for k, v in value.items()}
    return value


def _time_xla(target: Any, args: tuple, kwargs: dict, reps: int) -> float:
    device = torch_xla.device()
    args, kwargs = _materialize((args, kwargs), device, torch.Generator().manual_seed(0))
    torch_xla.sync()
    for _ in range(2):  # the first compiles
        out = target(*args, **kwargs)  # alive across the sync, or nothing runs
        torch_xla.sync()
        xm.wait_device_ops()
    start = xla_metrics.execute_time_ns()
    for _ in range(reps):
        out = target(*args, **kwargs)
        torch_xla.sync()
        xm.wait_device_ops()
    del out
    return (xla_metrics.execute_time_ns() - start) / reps / 1e6


def _time_eager(target: Any, args: tuple, kwargs: dict, reps: int) -> float:
    args, kwargs = _materialize((args, kwargs), torch.device("cpu"),
                                torch.Generator().manual_seed(0))
    target(*args, **kwargs)
    start = time.perf_counter()
    for _ in range(reps):
        target(*args, **kwargs)
    return (time.perf_counter() - start) / reps * 1e3


def collect(model: str, cpu_rewrites: bool) -> _Collect:
    """The heavy aten calls of one compiled AdamW training step of ``model``."""
    name, sizes = MODELS[model]
    work = workloads.get_workload(name, **sizes)
    device = torch_xla.device()
    net = work.build_model().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    step = torch.compile(workloads.train_step, backend="syncfree_xla",
                         options={"cpu_rewrites": cpu_rewrites, "cache": False})
    seen = _Collect()
    backend.OBSERVERS.append(seen)
    try:
        step(net, opt, *work.make_batch(0, device))
        torch_xla.sync()
    finally:
        backend.OBSERVERS.remove(seen)
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tv_resnet18", choices=list(MODELS))
    parser.add_argument("--reps", type=int, default=5, help="timed runs per op (default 5)")
    parser.add_argument("--top", type=int, default=12, help="rows to print (default 12)")
    parser.add_argument("--no-cpu-rewrites", action="store_true",
                        help="profile the graphs without the CPU rewrites")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    seen = collect(args.model, cpu_rewrites=not args.no_cpu_rewrites)
    rows = []
    for i, (key, count) in enumerate(seen.calls.items()):
        print(f"timing {i + 1}/{len(seen.calls)}: {key[0]}", file=sys.stderr, flush=True)
        target, op_args, op_kwargs = seen.examples[key]
        xla_ms = _time_xla(target, op_args, op_kwargs, args.reps)
        eager_ms = _time_eager(target, op_args, op_kwargs, args.reps)
        rows.append((xla_ms * count, eager_ms * count, xla_ms, eager_ms, count, key))
    rows.sort(key=lambda r: -r[0])
    total_xla, total_eager = sum(r[0] for r in rows), sum(r[1] for r in rows)
    rewrites = "off" if args.no_cpu_rewrites else "on"
    print(f"{args.model}: heavy ops of one AdamW step, cpu_rewrites {rewrites}, "
          f"{torch.get_num_threads()} threads; XLA {total_xla:.1f} ms, eager "
          f"{total_eager:.1f} ms per step in these ops")
    print("| op | arguments | calls/step | XLA ms | eager ms | XLA/eager | XLA ms/step | share |")
    print("|---|---|---|---|---|---|---|---|")
    for per_step, _, xla_ms, eager_ms, count, (op, shapes, kw) in rows[:args.top]:
        op = op.removeprefix("aten.").removesuffix(".default")
        print(f"| {op} | {shapes}{' ' + kw if kw else ''} | {count} | {xla_ms:.2f} | "
              f"{eager_ms:.2f} | {xla_ms / max(eager_ms, 1e-9):.1f} | {per_step:.1f} | "
              f"{per_step / max(total_xla, 1e-9):.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
