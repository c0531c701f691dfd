"""Every ``torch.optim`` optimizer as people configure it: param groups, scheduled lr.

Each case trains a whole compiled step and the same step eagerly on the CPU, with
three param groups (decay, no decay, a group of its own lr), an lr that changes every
step, momentum and beta1 cycled as OneCycleLR and CyclicLR cycle them, a weight decay
schedule (DINO-style) and a changing eps, and compares losses, parameters and
``optimizer.state_dict()``. After warm-up a step must cost no host sync and no XLA
compile.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch_xla

from tests.xla_helpers import (
    MetricWindow,
    assert_same_optimizer_state,
    assert_same_state,
    twin,
    warm_then_measure,
)
from xla_backend.tools import workloads  # noqa: E402

torch_xla.device()  # autograd sizes its device queues at the first backward

STEPS = 8
WARMUP = 3
RTOL = 1e-4


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3))


def _groups(model: torch.nn.Module, **first: Any) -> list[dict[str, Any]]:
    """Decay (matrices), no decay (biases, norms) and a last layer with its own lr."""
    head = list(model[-1].parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    return [
        {"params": [p for p in body if p.dim() >= 2], **first},
        {"params": [p for p in body if p.dim() < 2], "weight_decay": 0.0},
        {"params": head, "lr": 3e-3},
    ]


# name -> the optimizer over param groups, with settings shared by all groups
OPTIMIZERS: dict[str, Callable[[list[dict[str, Any]]], torch.optim.Optimizer]] = {
    "SGD": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, nesterov=True,
                                     weight_decay=1e-2),
    "SGD-foreach": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, weight_decay=1e-2,
                                             foreach=True),
    "Adam": lambda g: torch.optim.Adam(g, lr=1e-2, weight_decay=1e-2),
    "Adam-amsgrad-maximize": lambda g: torch.optim.Adam(g, lr=1e-2, amsgrad=True,
                                                        maximize=True),
    "AdamW": lambda g: torch.optim.AdamW(g, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1),
    "AdamW-foreach": lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1, foreach=True),
    "Adamax": lambda g: torch.optim.Adamax(g, lr=1e-2, weight_decay=1e-2),
    "NAdam": lambda g: torch.optim.NAdam(g, lr=1e-2, weight_decay=1e-2),
    "NAdam-decoupled": lambda g: torch.optim.NAdam(g, lr=1e-2, weight_decay=1e-2,
                                                   decoupled_weight_decay=True),
    "RAdam": lambda g: torch.optim.RAdam(g, lr=1e-2, weight_decay=1e-2),
    "RAdam-decoupled": lambda g: torch.optim.RAdam(g, lr=1e-2, weight_decay=1e-2,
                                                   decoupled_weight_decay=True),
    # its rectification cancels: float32 puts it 30% off at the 6th step
    "RAdam-foreach-beta2-0.9999": lambda g: torch.optim.RAdam(g, lr=1e-2, betas=(0.9, 0.9999),
                                                              foreach=True),
    "ASGD": lambda g: torch.optim.ASGD(g, lr=1e-2, t0=2, weight_decay=1e-2),
    "Rprop": lambda g: torch.optim.Rprop([{k: v for k, v in d.items() if k != "weight_decay"}
                                          for d in g], lr=1e-2),
    "RMSprop-centered": lambda g: torch.optim.RMSprop(g, lr=1e-2, momentum=0.5, centered=True,
                                                      weight_decay=1e-2),
    "RMSprop-foreach": lambda g: torch.optim.RMSprop(g, lr=1e-2, momentum=0.5, foreach=True),
    "RMSprop-foreach-plain": lambda g: torch.optim.RMSprop(g, lr=1e-2, foreach=True),
    "Adagrad": lambda g: torch.optim.Adagrad(g, lr=1e-2, weight_decay=1e-2),
    "Adadelta": lambda g: torch.optim.Adadelta(g, lr=1.0, weight_decay=1e-2),
    "Adadelta-foreach": lambda g: torch.optim.Adadelta(g, lr=1.0, foreach=True),
    "Adafactor": lambda g: torch.optim.Adafactor(g, lr=1e-2, weight_decay=1e-2),
}


def _schedule(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.3 * s))


def _initial(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    return [{k: g[k] for k in ("momentum", "betas", "weight_decay", "eps") if k in g}
            for g in opt.param_groups]


def _cycle_the_others(opt: torch.optim.Optimizer, initial: list[dict[str, Any]],
                      i: int) -> None:
    """Changes each group's momentum, beta1, weight decay and eps, where set, for step ``i``.

    A setting at zero stays zero: turning one on takes another branch of the optimizer,
    a new graph by design.
    """
    for group, base in zip(opt.param_groups, initial):
        if base.get("momentum"):
            group["momentum"] = base["momentum"] * (1.0 - 0.03 * (i % 4))
        if "betas" in base:
            group["betas"] = (base["betas"][0] * (1.0 - 0.02 * (i % 3)), base["betas"][1])
        if base.get("weight_decay"):
            group["weight_decay"] = base["weight_decay"] * (1.0 + 0.5 * i)
        if isinstance(base.get("eps"), float):  # Adafactor's is a pair
            group["eps"] = base["eps"] * (1.0 + i)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
          y: torch.Tensor) -> torch.Tensor:
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def _batch(i: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(5, 6, generator=g).to(device), torch.randn(5, 3, generator=g).to(device)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_param_groups_and_scheduled_hyperparameters_match_eager(xla, name):
    model, reference = twin(_mlp(), xla)
    opt, ref_opt = OPTIMIZERS[name](_groups(model)), OPTIMIZERS[name](_groups(reference))
    initial = _initial(opt)
    sched, ref_sched = _schedule(opt), _schedule(ref_opt)
    step = torch.compile(_step, backend="syncfree_xla")
    got, want = [], []

    def one(i: int) -> None:
        _cycle_the_others(opt, initial, i)
        _cycle_the_others(ref_opt, initial, i)
        got.append(step(model, opt, *_batch(i, xla)))
        want.append(_step(reference, ref_opt, *_batch(i)))
        sched.step()
        ref_sched.step()

    window = warm_then_measure(one, WARMUP, STEPS)
    assert window.counts.transfers_to_host == 0, window.counts
    assert window.counts.compiles == 0, window.counts
    assert window.counts.dynamo_graphs == 0, window.counts
    torch.testing.assert_close(torch.stack([g.cpu() for g in got]), torch.stack(want),
                               rtol=RTOL, atol=RTOL * 0.1)
    assert_same_state(model, reference, rtol=RTOL)
    assert_same_optimizer_state(opt, ref_opt, rtol=RTOL)


def _two_linears(device: torch.device | str) -> tuple[torch.nn.Module, torch.nn.Module]:
    a, b = torch.nn.Linear(4, 1, bias=False), torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.ones_(a.weight)
    torch.nn.init.ones_(b.weight)
    return a.to(device), b.to(device)


def _issue_repro(device: torch.device | str, compiled: bool) -> tuple[list[float], Any]:
    a, b = _two_linears(device)
    opt = torch.optim.AdamW([{"params": a.parameters(), "weight_decay": 0.1},
                             {"params": b.parameters(), "weight_decay": 0.0}], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s + 1)

    def step(x: torch.Tensor) -> None:
        loss = (a(x) + b(x)).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    run = torch.compile(step, backend="syncfree_xla") if compiled else step
    out = []
    for _ in range(4):
        run(torch.ones(1, 4, device=device))
        sched.step()
        out += [float(a.weight[0, 0].detach().cpu()), float(b.weight[0, 0].detach().cpu())]
    return out, opt


def test_adamw_two_groups_with_a_changing_lr(xla):
    """Issue 12, bug 1: the first group's step counter was orphaned at the first trace.

    Dynamo moved it to the device after the graph had captured the host tensor; the
    retrace for the changing lr then read a counter stuck at 0.
    """
    got, opt = _issue_repro(xla, compiled=True)
    want, ref_opt = _issue_repro("cpu", compiled=False)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert [float(s["step"]) for s in opt.state_dict()["state"].values()] == [4.0, 4.0]
    assert_same_optimizer_state(opt, ref_opt, rtol=1e-5)


def test_lbfgs_with_a_compiled_closure_matches_eager(xla):
    """LBFGS: Dynamo never traces its step (torch marks it ``compiler.disable``: the line
    search branches on host values). The supported form compiles the model and calls
    ``opt.step(closure)`` eagerly; each inner iteration reads the loss on the host."""
    model, reference = twin(_mlp(), xla)
    compiled = torch.compile(model, backend="syncfree_xla")
    runs = []
    for net, params, device in ((compiled, model.parameters(), xla),
                                (reference, reference.parameters(), "cpu")):
        opt = torch.optim.LBFGS(params, lr=0.5, max_iter=4, history_size=3)
        losses = []
        for i in range(3):
            x, y = _batch(i, device)

            def closure(net=net, opt=opt, x=x, y=y) -> torch.Tensor:
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(net(x), y)
                loss.backward()
                return loss

            losses.append(float(opt.step(closure).detach()))
        runs.append(losses)
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)
    assert_same_state(model, reference, rtol=1e-4)


def _poisoned_amp_step(model: torch.nn.Module, opt: torch.optim.Optimizer,
                       scaler: torch.amp.GradScaler, x: torch.Tensor, y: torch.Tensor,
                       poison: torch.Tensor) -> torch.Tensor:
    """A GradScaler step whose gradients get ``poison`` added: 0, or inf to force a skip."""
    loss = workloads.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    for p in model.parameters():
        p.grad.add_(poison)
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def test_grad_scaler_transitions_after_warm_up_compile_nothing(xla):
    """Issue 12, bug 3: skip + back-off, recovery and growth after a finite warm-up.

    A 0-d tensor holding 0 was a torch_xla "special scalar" (an IR literal): every
    finite step paid an extra execution to materialize it, and the first inf step
    compiled a new graph. ``XLA_NO_SPECIAL_SCALARS`` (set by the backend) keeps it a
    buffer whatever its value.
    """
    work = workloads.get_workload("mlp")
    model, reference = twin(work.build_model(), xla)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-3)
    scaler = workloads.make_grad_scaler(xla, init_scale=2.0**10, growth_interval=3)
    ref_scaler = workloads.make_grad_scaler("cpu", init_scale=2.0**10, growth_interval=3)
    step = torch.compile(_poisoned_amp_step, backend="syncfree_xla")
    bad = {6, 7}
    executions, scales = [], []
    for i in range(14):
        x, y = work.make_batch(i)
        poison = torch.tensor(float("inf") if i in bad else 0.0)
        with MetricWindow() as window:
            step(model, opt, scaler, x.to(xla), y.to(xla), poison.to(xla))
        _poisoned_amp_step(reference, ref_opt, ref_scaler, x, y, poison)
        scales.append(ref_scaler.get_scale())
        if i >= 4:
            assert window.counts.compiles == 0, (i, window.counts)
            assert window.counts.transfers_to_host == 0, (i, window.counts)
            executions.append(window.counts.executions)
    # the reference backs off twice, recovers, then grows: every transition was measured
    assert scales[6] == scales[5] / 2 and scales[7] == scales[6] / 2, scales
    assert scales[10] == 2 * scales[9], scales
    assert len(set(executions)) == 1, executions
    assert float(scaler.get_scale()) == ref_scaler.get_scale()
    assert_same_state(model, reference, rtol=RTOL)
    assert_same_optimizer_state(opt, ref_opt, rtol=RTOL)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_first_step_at_lr_zero_keeps_untouched_rows(xla, amsgrad):
    """A warm-up from lr = 0 (``get_linear_schedule_with_warmup``) and an embedding row no
    batch has touched yet: capturable Adam, as Dynamo traces it, divided 0 by -0 there
    and wrote NaN (pytorch#126514); eager adds nothing."""
    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2))

    model, reference = twin(build(), xla)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, amsgrad=amsgrad)
            for m in (model, reference)]
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: min(s / 3, 1.0)) for o in opts]

    compiled = torch.compile(_step, backend="syncfree_xla")
    for i in range(5):
        idx = torch.tensor([[i % 3, 1 + i % 3]])  # rows 4-9 never get a gradient
        y = torch.ones(1, 2, 2)
        compiled(model, opts[0], idx.to(xla), y.to(xla))
        _step(reference, opts[1], idx, y)
        for sched in scheds:
            sched.step()
    assert torch.isfinite(model[0].weight.detach().cpu()).all()
    assert_same_state(model, reference, rtol=RTOL)
    assert_same_optimizer_state(opts[0], opts[1], rtol=RTOL)


def test_muon_matches_eager_to_bfloat16_rounding(xla):
    """Muon orthogonalizes its update in bfloat16 with ``addmm(beta=, alpha=)``, which
    torch_xla ran on the CPU (rewrites.scaled_addmm): now sync-free, and equal to eager
    to bfloat16's rounding (eager's CPU gemm and XLA's dot sum in other orders)."""
    model, reference = twin(_mlp(), xla)

    def make(m: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.Muon([{"params": [m[0].weight]}, {"params": [m[3].weight],
                                                               "lr": 3e-3}], lr=1e-2)

    opt, ref_opt = make(model), make(reference)
    sched, ref_sched = _schedule(opt), _schedule(ref_opt)
    step = torch.compile(_step, backend="syncfree_xla")

    def one(i: int) -> None:
        step(model, opt, *_batch(i, xla))
        _step(reference, ref_opt, *_batch(i))
        sched.step()
        ref_sched.step()

    window = warm_then_measure(one, WARMUP, STEPS)
    assert window.counts.transfers_to_host == 0, window.counts
    assert window.counts.compiles == 0, window.counts
    assert_same_state(model, reference, rtol=1e-2)
    assert_same_optimizer_state(opt, ref_opt, rtol=1e-2)
