"""Runs SPMD training cases in a fresh process and prints one JSON object per case.

The pytest process has already started torch_xla's runtime on one device, and SPMD
(several virtual CPU devices) must be chosen before that happens, so tests/e2e/test_spmd.py
starts this module with ``CPU_NUM_DEVICES=N`` and asserts on what it prints:

    CPU_NUM_DEVICES=4 python -m tests.e2e.spmd_worker A-dp B-fsdp key

Each training case trains the MLP workload under ``syncfree_xla`` over a data-parallel
mesh (``dp``: replicated parameters; ``fsdp``: parameters and optimizer state split on
the data axis) next to eager PyTorch on the CPU with the same global batch, and reports
the worst relative errors, torch_xla's counters over the warm steps and the shardings.

A ``join-<loop>`` case (``join-plain``, ``join-B``) trains that loop data parallel twice,
with ``join_graphs`` off and on, and reports both runs and how far the joined run's
losses and final parameters are from the per-graph run's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import torch

from xla_backend import sharding, xla_internals  # noqa: I001  (imports torch_xla after PJRT_DEVICE is set)

STEPS = 20
WARMUP = 3
INF_STEPS = (5, 11)  # loop B: a non-finite input; the whole mesh must skip these steps


def _rel_errors(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float]:
    """Worst per-tensor ||got - want|| / ||want||, and worst element error / max |want|."""
    norm_err, elem_err = 0.0, 0.0
    for g, w in zip(got, want):
        g, w = g.detach().cpu().double(), w.detach().double()
        norm_err = max(norm_err, float((g - w).norm()) / max(float(w.norm()), 1e-12))
        elem_err = max(elem_err, float((g - w).abs().max()) / max(float(w.abs().max()), 1.0))
    return norm_err, elem_err


def _train(loop: str, fsdp: bool) -> dict[str, Any]:
    return _run(loop, fsdp)[0]


def _run(loop: str, fsdp: bool, join: bool = True
         ) -> tuple[dict[str, Any], list[torch.Tensor], list[torch.Tensor]]:
    """One training case: its report, and its losses and final parameters on the CPU.

    ``loop``: ``plain`` (forward, backward, AdamW step, zero_grad), ``A`` (clip and a
    scheduler) or ``B`` (GradScaler, with an inf in one device's shard at INF_STEPS).
    ``join``: the ``join_graphs`` option (on by default).
    """
    import torch._dynamo
    import torch_xla

    from tests.xla_helpers import MetricWindow, settle
    from xla_backend import counters
    from xla_backend.tools import workloads

    torch._dynamo.reset()
    mesh = sharding.data_parallel_mesh()
    device = torch_xla.device()
    work = workloads.get_workload("mlp")
    model, reference = work.build_model().to(device), work.build_model()
    layout = sharding.shard_model(model, mesh, fsdp=fsdp)

    def batch(i: int, dev: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = work.make_batch(i)
        if loop == "B" and i in INF_STEPS:
            x[0, 0] = float("inf")  # lands in the first device's shard only
        if dev == "cpu":
            return x, y
        return sharding.shard_batch(x, mesh), sharding.shard_batch(y, mesh)

    if loop == "plain":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
        step_fn: Callable[..., torch.Tensor] = workloads.train_step
        extra, ref_extra = {}, {}
        args, ref_args = (model, opt), (reference, ref_opt)
    elif loop == "A":
        def make(m: torch.nn.Module) -> tuple[torch.optim.Optimizer, dict[str, Any]]:
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.1 * s))
            return opt, {"scheduler": sched}
        step_fn = workloads.train_step_clip
        (opt, extra), (ref_opt, ref_extra) = make(model), make(reference)
        args, ref_args = (model, opt), (reference, ref_opt)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
        scaler = workloads.make_grad_scaler(device, init_scale=2.0**8)
        ref_scaler = workloads.make_grad_scaler("cpu", init_scale=2.0**8)
        step_fn = workloads.train_step_amp
        extra, ref_extra = {}, {}
        args, ref_args = (model, opt, scaler), (reference, ref_opt, ref_scaler)

    compiled = torch.compile(step_fn, backend="syncfree_xla",
                             options={"join_graphs": join})
    got, want = [], []
    resharded = 0
    for i in range(WARMUP):
        got.append(compiled(*args, *batch(i, device), **extra))
        want.append(step_fn(*ref_args, *batch(i, "cpu"), **ref_extra))
        if i == 1 and fsdp:  # after the first joined step
            resharded = sharding.shard_optimizer_state(opt, mesh)
    marks = [counters.GRAPHS_RECEIVED, counters.STEPS_JOINED, counters.STEPS_CUT]
    before = [counters.counter(name) for name in marks]
    with MetricWindow() as window:
        for i in range(WARMUP, STEPS):
            got.append(compiled(*args, *batch(i, device), **extra))
            want.append(step_fn(*ref_args, *batch(i, "cpu"), **ref_extra))
    frames, joined, cut = (counters.counter(name) - b for name, b in zip(marks, before))
    settle()
    finite = [i for i in range(STEPS) if not (loop == "B" and i in INF_STEPS)]
    loss_err, _ = _rel_errors([got[i] for i in finite], [want[i] for i in finite])
    param_err, elem_err = _rel_errors(list(model.parameters()), list(reference.parameters()))
    state_specs_match = all(
        sharding.spec_of(v) == sharding.spec_of(p)
        for p in model.parameters() for v in opt.state[p].values()
        if isinstance(v, torch.Tensor) and v.shape == p.shape)
    result: dict[str, Any] = {
        "loss_rel_err": loss_err, "param_rel_err": param_err, "param_elem_err": elem_err,
        "warm_steps": STEPS - WARMUP, "syncs": window.counts.transfers_to_host,
        "compiles": window.counts.compiles, "executions": window.counts.executions,
        "new_frames": int(frames), "layout_before": layout,
        "layout_after": {n: sharding.spec_of(p) for n, p in model.named_parameters()},
        "state_specs_match_params": state_specs_match, "resharded_state": resharded,
        "dynamo_graphs": window.counts.dynamo_graphs,
        "steps_joined": int(joined), "steps_cut": int(cut),
    }
    if loop == "B":
        result["scale"] = [float(scaler.get_scale()), float(ref_scaler.get_scale())]
        result["finite_steps"] = len(finite)
    return (result, [g.detach().cpu() for g in got],
            [p.detach().cpu() for p in model.parameters()])


def _joined_case(loop: str) -> dict[str, Any]:
    """``loop`` data parallel with ``join_graphs`` off, then on, from the same weights
    and batches: both runs' reports, and the joined run's distance from the other's."""
    per_graph, losses, params = _run(loop, fsdp=False, join=False)
    joined, joined_losses, joined_params = _run(loop, fsdp=False, join=True)
    finite = [i for i in range(STEPS) if not (loop == "B" and i in INF_STEPS)]
    loss_err, loss_elem = _rel_errors([joined_losses[i] for i in finite],
                                      [losses[i] for i in finite])
    param_err, param_elem = _rel_errors(joined_params, params)
    return {
        "per_graph": per_graph, "joined": joined,
        "losses_equal": all(torch.equal(a, b) for a, b in zip(joined_losses, losses)),
        "params_equal": all(torch.equal(a, b) for a, b in zip(joined_params, params)),
        "loss_rel_err": loss_err, "loss_elem_err": loss_elem,
        "param_rel_err": param_err, "param_elem_err": param_elem,
        "loss_max_abs": max(float((a - b).abs().max())
                            for a, b in zip(joined_losses, losses)),
        "param_max_abs": max(float((a - b).abs().max())
                             for a, b in zip(joined_params, params)),
    }


def _key_case() -> dict[str, Any]:
    """Same graph and shapes, other shardings: other cache keys and executables."""
    import numpy as np
    import torch._dynamo
    import torch_xla
    import torch_xla.distributed.spmd as xs

    from xla_backend import counters
    from xla_backend.cache import graph_cache as compile_cache
    from xla_backend.cache import key as key_mod
    from xla_backend.options import resolve

    torch._dynamo.reset()
    device = torch_xla.device()
    n = sharding.enable_spmd()
    forward = sharding.data_parallel_mesh()
    backward = xs.Mesh(np.arange(n)[::-1].copy(), (n,), ("data",))
    gm = torch.fx.symbolic_trace(lambda w, x: (x @ w).relu().sum(dim=0))

    def inputs(mesh: xs.Mesh | None, x_axis: tuple | None) -> list[torch.Tensor]:
        w = torch.ones(8, 4).to(device)
        x = torch.arange(32.0 * n).reshape(4 * n, 8).to(device)
        if mesh is not None:
            xs.mark_sharding(x, mesh, x_axis)
        return [w, x]

    layouts = {
        "replicated": inputs(None, None),
        "rows": inputs(forward, ("data", None)),
        "rows_reversed_mesh": inputs(backward, ("data", None)),
        "cols": inputs(forward, (None, "data")),
    }
    keys = {name: compile_cache.graph_key(gm, ins, resolve(None)) for name, ins in layouts.items()}
    base = keys["replicated"].component_hashes
    differing = {name: list(key_mod.differing_components(k.component_hashes, base))
                 for name, k in keys.items() if name != "replicated"}

    def step(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (x @ w).relu().sum(dim=0)

    compiled = torch.compile(step, backend="syncfree_xla")
    lowered, misses, outs = [], [], []
    for name in ("rows", "cols", "rows"):
        ins = layouts[name]
        outs.append(compiled(*ins).cpu())
        lowered.append(counters.counter(counters.GRAPHS_LOWERED))
        misses.append(counters.counter(counters.CACHE_GRAPH_MISSES))
    want = step(*[t.cpu() for t in layouts["replicated"]])
    return {
        "digests_distinct": len({k.digest for k in keys.values()}) == len(keys),
        "differing": differing,
        "graphs_lowered": lowered, "cache_misses": misses,
        "outputs_match": all(torch.allclose(o, want) for o in outs),
    }


def _errors_case() -> dict[str, str]:
    """The message of each misuse: a batch that does not divide, a wrong mesh, a CPU model."""
    mesh = sharding.data_parallel_mesh()
    attempts = {
        "batch": lambda: sharding.shard_batch(torch.zeros(6, 3), mesh),
        "mesh_size": lambda: sharding.data_parallel_mesh(3),
        "mesh_zero": lambda: sharding.data_parallel_mesh(0),
        "cpu_model": lambda: sharding.shard_model(torch.nn.Linear(4, 4), mesh, fsdp=True),
        "axis": lambda: sharding.shard_batch(torch.zeros(8, 3), mesh, axis="model"),
    }
    messages = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            messages[name] = "no error"
        except sharding.ShardingError as e:
            messages[name] = str(e)
    return messages


def _reshard_case() -> dict[str, Any]:
    """shard_optimizer_state lays state out like its parameter, whatever it had before,
    and whether or not its value is computed yet."""
    import torch_xla.distributed.spmd as xs

    mesh = sharding.data_parallel_mesh()
    n = sharding.enable_spmd()
    p = torch.nn.Parameter(sharding.shard_batch(torch.randn(4 * n, 3), mesh))
    values = {"replicated": torch.randn(4 * n, 3), "cols": torch.randn(4 * n, 2 * n)}
    # "replicated" is still being computed: a step's update right after its sync
    big = torch.randn(1024, 1024).to(p.device)
    slow = (big @ big @ big @ big).abs().sum()
    state = {"replicated": values["replicated"].to(p.device) + 0.0 * slow,
             "cols": values["cols"].to(p.device), "step": torch.tensor(3.0).to(p.device)}
    xs.mark_sharding(state["cols"], mesh, (None, "data"))
    q = torch.nn.Parameter(sharding.shard_batch(torch.randn(4 * n, 2 * n), mesh))
    opt = torch.optim.SGD([p, q], lr=0.1)
    opt.state[p] = {"exp_avg": state["replicated"], "step": state["step"]}
    opt.state[q] = {"exp_avg": state["cols"]}
    xla_internals.sync_live_tensors(p.device)  # enqueued, not waited for
    moved = sharding.shard_optimizer_state(opt, mesh)
    return {
        "moved": moved,
        "specs": {k: sharding.spec_of(v) for k, v in state.items()},
        "param_specs": [sharding.spec_of(p), sharding.spec_of(q)],
        "values_kept": all(torch.equal(state[k].cpu(), v) for k, v in values.items()),
    }


def main(cases: list[str]) -> None:
    results: dict[str, Any] = {"devices": sharding.enable_spmd()}
    for case in cases:
        if case == "key":
            results[case] = _key_case()
        elif case == "errors":
            results[case] = _errors_case()
        elif case == "reshard":
            results[case] = _reshard_case()
        elif case.startswith("join-"):
            results[case] = _joined_case(case.removeprefix("join-"))
        else:
            loop, layout = case.split("-")
            results[case] = _train(loop, fsdp=layout == "fsdp")
    print("SPMD_RESULTS " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
