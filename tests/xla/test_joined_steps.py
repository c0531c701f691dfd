"""``join_graphs`` (the default): a training step's graphs run as one XLA computation.

What must hold: after warm-up, each step of the plain loop, loop A (clip + scheduler)
and loop B (GradScaler) is exactly one XLA execution, with no host sync and no compile,
and the numbers are eager's (losses, parameters, optimizer state). torch_xla's own
metrics count the executions. The first step runs each graph on its own (it compiles
them in parallel; an optimizer graph is synced at once, updating in place); joining
starts at the second. With ``join_graphs=False`` a step is
one execution per graph, the fallback.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable

import pytest
import torch

from tests.xla_helpers import (
    MetricWindow,
    assert_same_optimizer_state,
    assert_same_state,
    settle,
    twin,
)
from xla_backend import counters, warn_once, xla_internals, xla_metrics
from xla_backend.runtime.step import DONOR_ORDER_MIN_BYTES
from xla_backend.tools import workloads
from xla_backend.tools.explain import ExplainSession

JOIN: dict = {}  # the default
PER_GRAPH = {"join_graphs": False}
WARMUP, STEPS = 3, 8


def _loop(kind: str, model: torch.nn.Module, device: torch.device):
    """The loop's optimizer and a step taking the batch; the CPU twin gets its own."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if kind == "plain":
        return opt, lambda step, x, y: step(model, opt, x, y)
    if kind == "A":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
        return opt, lambda step, x, y: step(model, opt, x, y, scheduler=sched)
    scaler = workloads.make_grad_scaler(device, init_scale=2.0**8, growth_interval=2)
    return opt, lambda step, x, y: step(model, opt, scaler, x, y)


STEP_FNS = {"plain": workloads.train_step, "A": workloads.train_step_clip,
            "B": workloads.train_step_amp}


@pytest.mark.parametrize("kind", ["plain", "A", "B"])
def test_each_loop_is_one_execution_per_step_with_eager_numbers(xla, kind):
    work = workloads.get_workload("mlp", hidden=48)
    model, reference = twin(work.build_model(), xla)
    opt, run = _loop(kind, model, xla)
    ref_opt, ref_run = _loop(kind, reference, torch.device("cpu"))
    compiled = torch.compile(STEP_FNS[kind], backend="syncfree_xla", options=JOIN)
    got, want = [], []
    for i in range(WARMUP):
        got.append(run(compiled, *work.make_batch(i, xla)))
        want.append(ref_run(STEP_FNS[kind], *work.make_batch(i)))
    with MetricWindow() as window:
        for i in range(WARMUP, STEPS):
            got.append(run(compiled, *work.make_batch(i, xla)))
            want.append(ref_run(STEP_FNS[kind], *work.make_batch(i)))
    steps = STEPS - WARMUP
    assert (window.counts.executions, window.counts.transfers_to_host,
            window.counts.compiles, window.counts.dynamo_graphs) == (steps, 0, 0, 0), window.counts
    torch.testing.assert_close(torch.stack([g.cpu() for g in got]), torch.stack(want),
                               rtol=1e-4, atol=1e-5)
    assert_same_state(model, reference, rtol=1e-4)
    assert_same_optimizer_state(opt, ref_opt, rtol=1e-4)


def _poisoned_amp_step(model, opt, scaler, x, y, poison):
    loss = workloads.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    for p in model.parameters():
        p.grad.add_(poison)  # 0 on finite steps, inf to force a skip
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def test_grad_scaler_transitions_compile_nothing_when_joined(xla):
    """A 0-d poison moved to the device as 0.0 shared torch_xla's cached buffer of the
    constant 0.0 and as inf did not: the joined step hashed differently and compiled at
    the first skip. The joiner turns that cache off, and ``reset()`` back on."""
    work = workloads.get_workload("mlp", hidden=32)
    model, reference = twin(work.build_model(), xla)
    opt, ref_opt = (torch.optim.Adam(m.parameters(), lr=1e-3) for m in (model, reference))
    scaler = workloads.make_grad_scaler(xla, init_scale=2.0**10, growth_interval=3)
    ref_scaler = workloads.make_grad_scaler("cpu", init_scale=2.0**10, growth_interval=3)
    step = torch.compile(_poisoned_amp_step, backend="syncfree_xla", options=JOIN)
    executions, scales = [], []
    for i in range(12):
        x, y = work.make_batch(i)
        poison = torch.tensor(float("inf") if i in (5, 6) else 0.0)
        with MetricWindow() as window:
            step(model, opt, scaler, x.to(xla), y.to(xla), poison.to(xla))
            settle()
        _poisoned_amp_step(reference, ref_opt, ref_scaler, x, y, poison)
        scales.append(ref_scaler.get_scale())
        if i >= 3:
            assert (window.counts.compiles, window.counts.transfers_to_host) == (0, 0), \
                (i, window.counts)
            executions.append(window.counts.executions)
    assert set(executions) == {1}, executions
    # measured: growth (step 2), two skips with back-off (5, 6), recovery and growth (9)
    assert scales[5] == scales[4] / 2 and scales[6] == scales[5] / 2, scales
    assert scales[9] == 2 * scales[8], scales
    assert float(scaler.get_scale()) == ref_scaler.get_scale()
    assert_same_state(model, reference, rtol=1e-4)
    assert_same_optimizer_state(opt, ref_opt, rtol=1e-4)
    assert not xla_internals.device_data_cache_enabled()
    torch._dynamo.reset()
    assert xla_internals.device_data_cache_enabled()


def test_adam_with_param_groups_and_a_changing_lr_matches_eager(xla):
    """Issue 12's first bug, joined: two groups, an lr that changes at every step."""
    def build(device):
        torch.manual_seed(0)
        a, b = torch.nn.Linear(6, 3), torch.nn.Linear(3, 1)
        a, b = a.to(device), b.to(device)
        opt = torch.optim.AdamW([{"params": a.parameters(), "weight_decay": 0.1},
                                 {"params": b.parameters(), "weight_decay": 0.0}], lr=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)

        def step(x):
            loss = b(torch.relu(a(x))).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return (a, b), opt, sched, step

    mods, opt, sched, step = build(xla)
    ref_mods, ref_opt, ref_sched, ref_step = build(torch.device("cpu"))
    compiled = torch.compile(step, backend="syncfree_xla", options=JOIN)
    for i in range(10):
        x = torch.randn(4, 6, generator=torch.Generator().manual_seed(i))
        got, want = compiled(x.to(xla)), ref_step(x)
        sched.step()
        ref_sched.step()
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-6)
    settle()
    for mod, ref in zip(mods, ref_mods):
        assert_same_state(mod, ref, rtol=1e-4)
    assert_same_optimizer_state(opt, ref_opt, rtol=1e-4)


def test_an_optimizer_steps_first_on_its_own_buffers_and_in_place(xla):
    """Before joining starts, an optimizer graph is traced at its first call, on its
    inputs' own buffers, and runs as a computation of its own that is synced at once,
    which donates the parameters and state it replaces. Traced at compile time it needed
    stand-in copies of its parameters, gradients and state, uploaded from the host; run
    from its executable it held the old and new parameters and state at once (0.8 and
    0.6 GB of the memory bench's first step). Both are counted here, exactly. Each
    update lands in its own tensor's buffer: paired with another one of the same size,
    XLA copies the buffer first (72 copies and 269 MB of temporaries in the bench's)."""
    torch.manual_seed(0)
    model, reference = twin(torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)]),
                            xla)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    params = list(model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    step = torch.compile(opt.step, backend="syncfree_xla", options=JOIN)
    for i in range(4):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(i))
        model(x.to(xla)).square().mean().backward()
        reference(x).square().mean().backward()
        settle()
        uploaded, donated = xla_metrics.host_to_device_bytes(), xla_metrics.buffers_donated()
        addresses = [xla_internals.buffer_address(p) for p in params]
        step()
        settle()
        if i == 0:
            assert [xla_internals.buffer_address(p) for p in params] == addresses
            uploaded = xla_metrics.host_to_device_bytes() - uploaded
            donated = xla_metrics.buffers_donated() - donated
            assert uploaded < param_bytes / 4, (uploaded, param_bytes)
            assert donated == 3 * len(params), donated  # parameters, exp_avg, exp_avg_sq
        ref_opt.step()
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    assert_same_state(model, reference, rtol=1e-4)
    assert_same_optimizer_state(opt, ref_opt, rtol=1e-4)


def _momentum_teacher(device, update: str = "in-place"):
    """A student, a teacher made from it with ``copy_`` (MoCo, BYOL, a mean teacher) and a
    copy kept aside with ``load_state_dict`` (the best weights so far). The step takes
    the step index, from which the teacher's momentum rises as in BYOL (given None, the
    momentum is fixed). ``update``: ``t.mul_(m).add_(s, alpha=1 - m)``, or as MoCo's
    code does it, ``t.data = t.data * m + s.data * (1 - m)`` ("data"), or as timm's
    ``ModelEmaV3`` does, ``torch._foreach_lerp_(ts, ss, weight=1 - m)`` ("foreach-lerp")."""
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                  torch.nn.Linear(32, 4)).to(device)
    teacher = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                  torch.nn.Linear(32, 4)).to(device)
    best = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                               torch.nn.Linear(32, 4)).to(device)
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters()):
            t.copy_(s)
            t.requires_grad_(False)
    best.load_state_dict(student.state_dict())
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)

    def step(x, y, i=None):
        with torch.no_grad():
            target = teacher(x).softmax(-1)
        loss = -(target * student(x).log_softmax(-1)).sum(-1).mean()
        loss = loss + torch.nn.functional.cross_entropy(student(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        momentum = 0.9 if i is None else 1 - 0.1 * (1 - i / STEPS)
        with torch.no_grad():
            if update == "foreach-lerp":
                torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()),
                                     weight=1 - momentum)
            for t, s in zip(teacher.parameters(), student.parameters()):
                if update == "data":
                    t.data = t.data * momentum + s.data * (1 - momentum)
                elif update == "in-place":
                    t.mul_(momentum).add_(s, alpha=1 - momentum)
        return loss.detach()

    return (student, teacher, best), step


@pytest.mark.parametrize("indexed, update", [
    (False, "in-place"), (True, "in-place"), (False, "data"), (True, "foreach-lerp")],
    ids=["fixed-momentum", "step-index", "data-assignment", "step-index-foreach-lerp"])
def test_a_momentum_teacher_trains_like_eager_in_one_execution_per_step(
        xla, indexed, update, caplog):
    """Two things this loop broke. torch_xla's ``copy_`` shares the source's buffer
    instead of copying it: the first step's optimizer graph, synced on its own, donated
    that buffer and deleted it under the teacher ("buffer ... is deleted" inside the
    step) and under the copy kept aside (at its next read). That step now runs without
    donating a buffer another tensor holds. And Dynamo makes the int step index
    symbolic at its second value: traced in as a constant, each new index retraced the
    graph, read values back to the host (12 transfers a step) and stored one more
    graph-cache entry. It is now a 0-d tensor input (``passes.tensorify_int_inputs``).
    Assigned through ``.data``, the teacher's update is an ``aten.set_`` of a graph input,
    which made the graph run op by op (logged); it is now an update like ``copy_``.
    Given to ``torch._foreach_lerp_`` as ``weight=``, a momentum from the step index
    stayed a constant of the graph (``tensorify_scalar_reads`` took it positionally
    only): each step traced the graph again and read 6 values back."""
    got_models, got_step = _momentum_teacher(xla, update)
    want_models, want_step = _momentum_teacher(torch.device("cpu"), update)
    compiled = torch.compile(got_step, backend="syncfree_xla", options=JOIN)
    batches = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(i)),
                torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(i)),
                i if indexed else None) for i in range(STEPS)]

    def lookups():  # one per executable built for a graph: traced or from the cache
        return sum(counters.counter(name) for name in (
            counters.CACHE_GRAPH_HITS, counters.CACHE_GRAPH_MISSES,
            counters.CACHE_GRAPH_UNCACHEABLE))

    got = [compiled(x.to(xla), y.to(xla), i) for x, y, i in batches[:WARMUP]]
    built = lookups()
    with MetricWindow() as window:
        got += [compiled(x.to(xla), y.to(xla), i) for x, y, i in batches[WARMUP:]]
    want = [want_step(*batch) for batch in batches]
    torch.testing.assert_close(torch.stack([g.cpu() for g in got]), torch.stack(want),
                               rtol=1e-4, atol=1e-5)
    for model, reference in zip(got_models, want_models):
        assert_same_state(model, reference, rtol=1e-4)
    assert (window.counts.executions, window.counts.transfers_to_host,
            window.counts.compiles, lookups() - built) == (STEPS - WARMUP, 0, 0, 0)
    assert "op by op" not in caplog.text


_AVERAGES = {
    # SWA's running mean; the counter on the device, the buffers copied
    "swa": lambda model, device: torch.optim.swa_utils.AveragedModel(model, device),
    # EMA over parameters and buffers, BatchNorm's integer counter included
    "ema-multi": lambda model, device: torch.optim.swa_utils.AveragedModel(
        model, device, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.8),
        use_buffers=True),
    # a per-tensor avg_fn with the counter left on the host (no device given)
    "avg-fn-host-counter": lambda model, device: torch.optim.swa_utils.AveragedModel(
        model, avg_fn=lambda avg, p, n: 0.7 * avg + 0.3 * p, use_buffers=True),
    # SWA as its docs write it (no device): the host counter divides on the device and
    # is incremented on the host in the same graph; the device must read the old value
    "swa-host-counter": lambda model, device: torch.optim.swa_utils.AveragedModel(model),
}


def _averaged_step(device: torch.device, make_average: Callable):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False), torch.nn.BatchNorm1d(32),
                                torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    averaged = make_average(model, device)

    def step(x, y):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        averaged.update_parameters(model)
        return loss.detach()

    return (model, averaged), step


def _train_averaged(xla: torch.device, make_average: Callable) -> MetricWindow:
    """Trains compiled and eagerly, resetting the counter after the first update as
    the reference scripts do during warm-up; checks the numbers, returns the window."""
    got_models, got_step = _averaged_step(xla, make_average)
    want_models, want_step = _averaged_step(torch.device("cpu"), make_average)
    compiled = torch.compile(got_step, backend="syncfree_xla", options=JOIN)
    batches = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(i)),
                torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(i)))
               for i in range(STEPS)]
    got, want = [], []
    for i, (x, y) in enumerate(batches[:WARMUP]):
        got.append(compiled(x.to(xla), y.to(xla)))
        want.append(want_step(x, y))
        if i == 0:
            got_models[1].n_averaged.fill_(0)
            want_models[1].n_averaged.fill_(0)
    with MetricWindow() as window:
        got += [compiled(x.to(xla), y.to(xla)) for x, y in batches[WARMUP:]]
    want += [want_step(x, y) for x, y in batches[WARMUP:]]
    torch.testing.assert_close(torch.stack([g.cpu() for g in got]), torch.stack(want),
                               rtol=1e-4, atol=1e-5)
    for model, reference in zip(got_models, want_models):
        assert_same_state(model, reference, rtol=1e-4)
    assert int(got_models[1].n_averaged) == STEPS - 1
    return window


@pytest.mark.parametrize("average", list(_AVERAGES))
def test_an_averaged_model_updated_in_the_step_costs_no_sync(xla, average):
    """``AveragedModel.update_parameters`` reads ``n_averaged`` on the host twice to
    choose between copying and averaging: two graph breaks, and with the counter on the
    device (torchvision's reference EMA) two syncs, 3-7 executions a step. Branch-free
    (``dynamo.averaged_model``), the step stays one execution with eager's numbers."""
    window = _train_averaged(xla, _AVERAGES[average])
    assert (window.counts.executions, window.counts.transfers_to_host,
            window.counts.compiles) == (STEPS - WARMUP, 0, 0)


def test_an_average_kept_on_the_host_is_updated_like_eager(xla):
    """An EMA kept in host memory reads the device's weights each update, whatever
    runs it; inside our step it was refused as a CPU graph input. It now runs eagerly."""
    window = _train_averaged(xla, lambda model, device: torch.optim.swa_utils.AveragedModel(
        model, torch.device("cpu"), multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.8)))
    assert window.counts.compiles == 0


class _IntStepAdam(torch.optim.Optimizer):
    """Adam as older repositories write it: ``state["step"]`` a Python int, bias
    corrections ``1 - beta ** step`` computed from it in Python."""

    def __init__(self, params, lr: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-6):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                state["step"] += 1
                state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                m_hat = state["m"] / (1 - beta1 ** state["step"])
                v_hat = state["v"] / (1 - beta2 ** state["step"])
                p.sub_(group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))


class _GroupStepAdam(torch.optim.Optimizer):
    """Adam as torch wrote it before 1.12, the step counted per group (as timm's
    optimizers do): ``step_size = lr * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)``."""

    def __init__(self, params, lr: float = 1e-2, betas=(0.9, 0.999), eps: float = 1e-8):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1
            beta1, beta2 = group["betas"]
            step_size = (group["lr"] * math.sqrt(1 - beta2 ** group["step"])
                         / (1 - beta1 ** group["step"]))
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["m"], state["v"] = torch.zeros_like(p), torch.zeros_like(p)
                state["m"].mul_(beta1).add_(p.grad, alpha=1 - beta1)
                state["v"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                p.addcdiv_(state["m"], state["v"].sqrt().add_(group["eps"]), value=-step_size)


@pytest.mark.parametrize("optimizer", [_IntStepAdam, _GroupStepAdam],
                         ids=["state-step", "group-step-math-sqrt-scheduled-lr"])
def test_an_optimizer_counting_steps_in_a_python_int_lowers_its_graph_once(xla, optimizer):
    """The int ``step`` is an input of the optimizer graph, which returns ``step + 1``.
    The bias corrections made from it were computed in the device part, so each new
    value was a constant of the computation: every step traced the graph again (90-102
    reads from the device), stored one more cache entry and counted as a lowering. They
    are now host values crossing as 0-d inputs (``lower.split``). And left symbolic,
    ``lr * math.sqrt(bias correction)`` made AOTAutograd specialize a scheduled lr: a
    recompile per step; it is tensor math now (``passes.tensorify_int_inputs``)."""
    def make(device):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 4)).to(device)
        opt = optimizer(model.parameters())
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)

        def step(x, y):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            return loss.detach()

        return model, opt, step

    model, opt, step = make(xla)
    reference, ref_opt, ref_step = make(torch.device("cpu"))
    compiled = torch.compile(step, backend="syncfree_xla", options=JOIN)
    batches = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(i)),
                torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(i)))
               for i in range(STEPS)]
    got = [compiled(x.to(xla), y.to(xla)) for x, y in batches[:WARMUP + 1]]
    lowered = counters.counter(counters.GRAPHS_LOWERED)
    with MetricWindow() as window:
        got += [compiled(x.to(xla), y.to(xla)) for x, y in batches[WARMUP + 1:]]
    want = [ref_step(x, y) for x, y in batches]
    torch.testing.assert_close(torch.stack([g.cpu() for g in got]), torch.stack(want),
                               rtol=1e-4, atol=1e-5)
    assert_same_state(model, reference, rtol=1e-4)
    counts = [s.get("step") for s in [*opt.state.values(), *opt.param_groups]]
    assert [c for c in counts if c is not None] == [STEPS] * len(
        opt.state if optimizer is _IntStepAdam else opt.param_groups)
    assert (window.counts.executions, window.counts.transfers_to_host, window.counts.compiles,
            counters.counter(counters.GRAPHS_LOWERED) - lowered,
            window.counts.dynamo_graphs) == (STEPS - WARMUP - 1, 0, 0, 0, 0)


_RAMPS = {
    # a cosine schedule of the step index, an int
    "int-math-cos": (lambda i: 0.5 * (1 + math.cos(math.pi * i / STEPS)), lambda i: i),
    # a cosine weight of the training progress, passed as a float
    "float-math-cos": (lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
                       lambda i: (i + 1) / STEPS),
    # a gradient reversal ramp (DANN); torch has no symbolic exp
    "float-math-exp": (lambda progress: 2.0 / (1.0 + math.exp(-10 * progress)) - 1,
                       lambda i: (i + 1) / STEPS),
}


@pytest.mark.parametrize("ramp", list(_RAMPS))
def test_a_ramp_through_math_compiles_once_and_trains_like_eager(xla, ramp):
    """An int index through ``math.cos`` stays float math AOTAutograd keeps symbolic, as
    ``scalar_tensor`` ops without the ``tensor_meta`` its default partitioner expects:
    compiling failed with a bare AssertionError (``xla_backend.aot``). Dynamo passes a
    float argument as a tensor it reads with ``.item()``. Through ``math.cos`` the read
    became ``torch._sym_cos``, which ``tensorify_scalar_reads`` did not rewrite, and
    through ``math.exp`` Dynamo evaluated it: either way the step was guarded on the
    value and recompiled every step until Dynamo's limit (then ran lazily, with host
    syncs). ``math.cos`` (and torch's other symbolic math) now becomes tensor math;
    ``math.exp`` is traced as a power of 2 (``dynamo.scope``)."""
    weight, argument = _RAMPS[ramp]

    def make(device):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                    torch.nn.Linear(32, 4)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

        def step(x, y, progress):
            loss = torch.nn.functional.cross_entropy(model(x), y) * weight(progress)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.detach()

        return model, step

    model, step = make(xla)
    reference, ref_step = make(torch.device("cpu"))
    compiled = torch.compile(step, backend="syncfree_xla", options=JOIN)
    batches = [(torch.randn(8, 16, generator=torch.Generator().manual_seed(i)),
                torch.randint(0, 4, (8,), generator=torch.Generator().manual_seed(i)),
                argument(i)) for i in range(STEPS)]
    got = [compiled(x.to(xla), y.to(xla), p) for x, y, p in batches[:WARMUP]]
    with MetricWindow() as window:
        got += [compiled(x.to(xla), y.to(xla), p) for x, y, p in batches[WARMUP:]]
    want = [ref_step(*batch) for batch in batches]
    torch.testing.assert_close(torch.stack([g.cpu() for g in got]), torch.stack(want),
                               rtol=1e-4, atol=1e-5)
    assert_same_state(model, reference, rtol=1e-4)
    assert (window.counts.executions, window.counts.transfers_to_host,
            window.counts.compiles) == (STEPS - WARMUP, 0, 0)


@pytest.mark.parametrize("kind", ["plain", "B"])
def test_steady_joined_steps_update_each_buffer_in_place(xla, kind):
    """A joined step donates each buffer it updates to that same tensor's new value, so
    parameters and optimizer state keep their buffers from step to step. XLA pairs
    donated buffers with results of the same size by order alone, and the sync's walk
    meets the parameters through the forward that reads them: same-sized weights were
    paired crosswise, their buffers traded places every step, and XLA copied each one
    first (34 copies of 16 MB a step on the memory bench's MLP)."""
    work = workloads.get_workload("mlp", in_features=256, hidden=256, depth=3)
    model, reference = twin(work.build_model(), xla)
    opt, run = _loop(kind, model, xla)
    ref_opt, ref_run = _loop(kind, reference, torch.device("cpu"))
    compiled = torch.compile(STEP_FNS[kind], backend="syncfree_xla", options=JOIN)
    params = list(model.parameters())
    assert sum(p.numel() * p.element_size() for p in params) * 3 > DONOR_ORDER_MIN_BYTES

    def buffers() -> list[int]:
        state = [opt.state[p][name] for p in params for name in ("exp_avg", "exp_avg_sq")]
        return [xla_internals.buffer_address(t) for t in params + state]

    got, want = [], []
    for i in range(WARMUP):
        got.append(run(compiled, *work.make_batch(i, xla)))
        want.append(ref_run(STEP_FNS[kind], *work.make_batch(i)))
    settle()
    before = buffers()
    with MetricWindow() as window:  # the ordering node neither syncs nor compiles
        for i in range(WARMUP, WARMUP + 3):
            got.append(run(compiled, *work.make_batch(i, xla)))
            want.append(ref_run(STEP_FNS[kind], *work.make_batch(i)))
            settle()
            assert buffers() == before, f"step {i}: buffers moved between tensors"
    assert (window.counts.executions, window.counts.transfers_to_host,
            window.counts.compiles, window.counts.dynamo_graphs) == (3, 0, 0, 0), window.counts
    assert torch.allclose(torch.stack(got).cpu(), torch.stack(want), rtol=1e-4, atol=1e-6)
    assert_same_state(model, reference, rtol=1e-4)
    assert_same_optimizer_state(opt, ref_opt, rtol=1e-4)


def test_compiled_model_with_an_eager_optimizer_joins_it_into_the_step(xla):
    """``torch.compile(model)``: forward, backward and the eager optimizer's lazy ops."""
    work = workloads.get_workload("mlp", hidden=40)
    model, reference = twin(work.build_model(), xla)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    compiled = torch.compile(model, backend="syncfree_xla", options=JOIN)

    def one(net, optimizer, i, device):
        x, y = work.make_batch(i, device)
        loss = workloads.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # Warm-up: the first step runs per graph, the next two join the optimizer's first
    # (state-creating) and second update; a sync at a step's end (as the window's
    # closing one) leaves the optimizer's update alone, then one step without it.
    for i in range(WARMUP + 2):
        one(compiled, opt, i, xla)
        one(reference, ref_opt, i, "cpu")
        if i == WARMUP - 1:
            settle()
    with MetricWindow() as window:
        for i in range(WARMUP + 2, STEPS + 2):
            one(compiled, opt, i, xla)
            one(reference, ref_opt, i, "cpu")
    # one per step; the last step's optimizer update (eager lazy ops, after the step's
    # backward) runs at the window's closing sync instead of joining a next step
    steps = STEPS - WARMUP
    assert (window.counts.executions, window.counts.transfers_to_host,
            window.counts.compiles) == (steps + 1, 0, 0), window.counts
    assert_same_state(model, reference, rtol=1e-4)


def test_compiled_model_with_an_eager_grad_scaler_reads_found_inf_once_a_step(xla):
    """``torch.compile(model)`` with torch's own ``GradScaler.step``: it reads found-inf
    on the host before stepping (README), which runs the step so far (forward,
    backward, unscale) as one execution; the update joins the next."""
    work = workloads.get_workload("mlp", hidden=40)
    model, reference = twin(work.build_model(), xla)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    scaler = workloads.make_grad_scaler(xla, init_scale=2.0**8, growth_interval=2)
    ref_scaler = workloads.make_grad_scaler(torch.device("cpu"), init_scale=2.0**8,
                                            growth_interval=2)
    compiled = torch.compile(model, backend="syncfree_xla", options=JOIN)

    def one(net, optimizer, grad_scaler, i, device):
        x, y = work.make_batch(i, device)
        loss = workloads.cross_entropy(net(x), y)
        grad_scaler.scale(loss).backward()
        grad_scaler.step(optimizer)
        grad_scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    for i in range(WARMUP + 2):  # with a step after a closing sync, as the window's first
        one(compiled, opt, scaler, i, xla)
        one(reference, ref_opt, ref_scaler, i, "cpu")
        if i == WARMUP - 1:
            settle()
    with MetricWindow() as window:
        for i in range(WARMUP + 2, STEPS + 2):
            one(compiled, opt, scaler, i, xla)
            one(reference, ref_opt, ref_scaler, i, "cpu")
    # two per step, and the last step's update at the window's closing sync
    steps = STEPS - WARMUP
    assert (window.counts.executions, window.counts.transfers_to_host,
            window.counts.compiles) == (2 * steps + 1, steps, 0), window.counts
    assert_same_state(model, reference, rtol=1e-4)
    assert scaler.get_scale() == ref_scaler.get_scale()


def test_per_graph_option_runs_each_graph_as_its_own_execution(xla):
    """The per-graph path stays available as the fallback: more than one per step."""
    work = workloads.get_workload("mlp", hidden=44)
    model = work.build_model().to(xla)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    compiled = torch.compile(workloads.train_step, backend="syncfree_xla", options=PER_GRAPH)
    for i in range(WARMUP):
        compiled(model, opt, *work.make_batch(i, xla))
    with MetricWindow() as window:
        for i in range(WARMUP, STEPS):
            compiled(model, opt, *work.make_batch(i, xla))
    assert window.counts.executions >= 3 * (STEPS - WARMUP), window.counts
    assert counters.counter(counters.STEPS_JOINED) == 0


def test_explain_says_which_graphs_a_step_joined(xla):
    work = workloads.get_workload("mlp", hidden=36)
    model = work.build_model().to(xla)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    compiled = torch.compile(workloads.train_step, backend="syncfree_xla", options=JOIN)
    with ExplainSession() as session:
        for i in range(4):
            compiled(model, opt, *work.make_batch(i, xla))
    report = session.report()
    # the first step runs each graph on its own; the next three are joined
    assert report.steps_joined == 3 and report.steps_cut == 0
    assert [name.split(" ")[0] for name in report.last_step] == [
        "forward", "backward", "inference"]
    assert "3 steps joined into one XLA computation each" in str(report)


def test_a_host_read_inside_the_step_is_reported_as_a_cut(xla):
    model = torch.nn.Linear(4, 1).to(xla)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x):
        loss = model(x).square().mean()
        loss.backward()
        print_me = float(loss)  # a host read between the backward and the update
        opt.step()
        opt.zero_grad(set_to_none=True)
        return print_me

    compiled = torch.compile(step, backend="syncfree_xla", options=JOIN)
    with ExplainSession() as session:
        for _ in range(3):
            compiled(torch.ones(2, 4, device=xla))
    report = session.report()
    assert report.steps_cut >= 1, str(report)
    assert "cut into more executions by a host read" in str(report)


class _QueuedContrast(torch.nn.Module):
    """MoCo's shape: the forward scores a query against a key and a queue of past keys,
    then writes the key into the queue at a pointer it reads with ``int()``, as the
    reference code does, and advances the pointer."""

    def __init__(self, size: int = 32, indices: bool = False):
        super().__init__()
        self.indices = indices  # written as the README suggests: tensor indices
        self.encoder = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(),
                                           torch.nn.Linear(32, 8))
        self.register_buffer("queue", torch.nn.functional.normalize(torch.randn(8, size), dim=0))
        self.register_buffer("pointer", torch.zeros(1, dtype=torch.long))

    def forward(self, x):
        query = torch.nn.functional.normalize(self.encoder(x), dim=1)
        with torch.no_grad():
            key = torch.nn.functional.normalize(self.encoder(x * 1.1), dim=1)
        logits = torch.cat([(query * key).sum(1, keepdim=True),
                            query @ self.queue.clone().detach()], 1)
        with torch.no_grad():
            if self.indices:
                at = (self.pointer + torch.arange(len(x), device=x.device)) % self.queue.shape[1]
                self.queue.index_copy_(1, at, key.T)
                self.pointer.add_(len(x)).remainder_(self.queue.shape[1])
            else:
                at = int(self.pointer)
                self.queue[:, at:at + len(x)] = key.T
                self.pointer[0] = (at + len(x)) % self.queue.shape[1]
        return logits / 0.2


def _queue_step(device: torch.device, indices: bool = False):
    torch.manual_seed(0)
    model = _QueuedContrast(indices=indices).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step(x):
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(
            logits, torch.zeros(len(x), dtype=torch.long, device=x.device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    return model, step


@pytest.mark.parametrize("indices", [False, True], ids=["int-pointer", "tensor-indices"])
def test_a_queue_written_at_a_pointer_trains_like_eager(xla, indices):
    """The pointer read is one host read a step, by the loop's design, and the write
    after it runs outside the graph (Dynamo cannot slice at a value it has not seen), so
    each new pointer value compiles once, as in torch_xla's lazy mode. Before, the first
    step's scan for other holders of its buffers crashed on an undefined tensor the
    garbage collector returned ("tensor does not have a device"), after printing
    torch's "Deallocating Tensor that still has live PyObject references" for the
    queue, which the scan had asked torch_xla about. Written with tensor indices, as the
    README suggests, the queue costs nothing: no host read, no compile."""
    model, got_step = _queue_step(xla, indices)
    reference, want_step = _queue_step(torch.device("cpu"), indices)
    compiled = torch.compile(got_step, backend="syncfree_xla", options=JOIN)
    batches = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i))
               for i in range(STEPS)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [compiled(x.to(xla)) for x in batches[:WARMUP]]
    assert not [w for w in caught if "PyObject" in str(w.message)]
    with MetricWindow() as window:
        got += [compiled(x.to(xla)) for x in batches[WARMUP:]]
    want = [want_step(x) for x in batches]
    torch.testing.assert_close(torch.stack([g.cpu() for g in got]), torch.stack(want),
                               rtol=1e-4, atol=1e-5)
    assert_same_state(model, reference, rtol=1e-4)
    assert int(model.pointer) == STEPS * 8 % 32
    assert (window.counts.executions, window.counts.transfers_to_host) == (
        STEPS - WARMUP, 0 if indices else STEPS - WARMUP)
    if indices:
        assert window.counts.compiles == 0


@pytest.mark.parametrize("kind", ["plain", "B"])
def test_steady_joined_steps_read_counters_not_metrics(xla, kind, monkeypatch):
    """Reading a torch_xla metric copies its samples (up to 1024) into Python: the
    four reads a step made cost 0.11-0.15 ms once the process had made a thousand host
    reads, as a loop logging ``loss.item()`` each step has."""
    import torch_xla

    work = workloads.get_workload("mlp", hidden=48)
    model = work.build_model().to(xla)
    opt, run = _loop(kind, model, xla)
    compiled = torch.compile(STEP_FNS[kind], backend="syncfree_xla", options=JOIN)
    for i in range(WARMUP):
        run(compiled, *work.make_batch(i, xla))
    batches = [work.make_batch(i, xla) for i in range(WARMUP, STEPS)]
    settle()
    joined = counters.counter(counters.STEPS_JOINED)
    read, names = torch_xla._XLAC._xla_metric_data, []
    monkeypatch.setattr(torch_xla._XLAC, "_xla_metric_data",
                        lambda name: names.append(name) or read(name))
    for batch in batches:
        run(compiled, *batch)
    monkeypatch.undo()
    settle()
    assert counters.counter(counters.STEPS_JOINED) - joined == STEPS - WARMUP
    assert names == [], f"steady steps read these metrics: {sorted(set(names))}"


@pytest.mark.parametrize("read", ["after the step", "of a tensor made before it"])
def test_a_host_read_that_runs_none_of_the_step_does_not_cut_it(xla, read):
    """A step is cut when a sync runs its pending work early, not by every host read."""
    model = torch.nn.Linear(4, 1).to(xla)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scale = torch.full((), 3.0, device=xla)
    settle()

    def step(x):
        loss = model(x).square().mean()
        loss.backward()
        factor = float(scale) if read != "after the step" else 3.0
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach() * factor

    compiled = torch.compile(step, backend="syncfree_xla", options=JOIN)
    with ExplainSession() as session:
        for _ in range(3):
            float(compiled(torch.ones(2, 4, device=xla)))  # logged after each step
        with MetricWindow() as window:
            for _ in range(3):
                float(compiled(torch.ones(2, 4, device=xla)))
    report = session.report()
    assert report.steps_joined == 5 and report.steps_cut == 0, str(report)
    host_reads = 3 if read == "after the step" else 6
    assert (window.counts.executions, window.counts.transfers_to_host) == (3, host_reads)



def test_a_step_logging_its_loss_every_few_steps_warns_nothing_and_trains_like_eager(
        xla, caplog):
    """``if it % 4 == 0: log(loss.item())`` after the update, in the compiled step: the
    read's graph has nothing to compile, so running it op by op is no fallback to warn
    about on a clean run; the read costs one transfer on the steps that log, no more."""
    warn_once.reset_all()
    torch.manual_seed(0)
    model, reference = twin(workloads.get_workload("mlp").build_model(), xla)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2)

    def step(model, opt, it, x, y, logged):
        loss = workloads.train_step(model, opt, x, y)
        if it % 4 == 0:
            logged.append(loss.item())
        return loss

    compiled = torch.compile(step, backend="syncfree_xla", options=JOIN)
    work = workloads.get_workload("mlp")
    got, want, got_log, want_log = [], [], [], []
    with caplog.at_level(logging.WARNING, logger="xla_backend"):
        for it in range(6):
            got.append(compiled(model, opt, it, *work.make_batch(it, xla), got_log))
            want.append(step(reference, ref_opt, it, *work.make_batch(it), want_log))
        with MetricWindow() as window:
            for it in range(6, 10):
                got.append(compiled(model, opt, it, *work.make_batch(it, xla), got_log))
                want.append(step(reference, ref_opt, it, *work.make_batch(it), want_log))
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert window.counts.transfers_to_host == 1  # step 8's read
    torch.testing.assert_close(torch.tensor(got_log), torch.tensor(want_log),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.stack([t.cpu() for t in got]), torch.stack(want),
                               rtol=1e-4, atol=1e-5)
    assert_same_state(model, reference, rtol=1e-4)
    assert_same_optimizer_state(opt, ref_opt, rtol=1e-4)


def test_a_warm_up_lr_set_from_the_step_index_at_the_top_of_the_step_costs_no_compile(xla):
    """``lr = base * min(1, (it + 1) / warmup)`` assigned to every group before the
    forward, ``it`` a Python int and the model and optimizer the script's globals: the
    lr leaves the first graph as a host tensor. Made in the device part, each new ``it``
    lowered that graph again, stored one more cache entry and read the lr back."""
    torch.manual_seed(0)
    model, reference = twin(torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(),
                                                 torch.nn.Linear(32, 4)), xla)

    def make_step(net: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable:
        def step(x, y, it):
            lr = 1e-2 * min(1.0, (it + 1) / 100)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = workloads.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.detach()

        return step

    runs = {}
    for net in (model, reference):
        opt = torch.optim.AdamW(net.parameters(), lr=0.1)
        runs[net] = make_step(net, opt), opt
    compiled = torch.compile(runs[model][0], backend="syncfree_xla", options=JOIN)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
               for _ in range(10)]
    got = [compiled(*(t.to(xla) for t in batches[it]), it) for it in range(5)]
    lowered = counters.counter(counters.GRAPHS_LOWERED)
    with MetricWindow() as window:
        got += [compiled(*(t.to(xla) for t in batches[it]), it) for it in range(5, 10)]
    assert counters.counter(counters.GRAPHS_LOWERED) == lowered
    want = [runs[reference][0](*batches[it], it) for it in range(10)]
    assert (window.counts.executions, window.counts.transfers_to_host,
            window.counts.compiles, window.counts.dynamo_graphs) == (5, 0, 0, 0), window.counts
    torch.testing.assert_close(torch.stack([t.cpu() for t in got]), torch.stack(want),
                               rtol=1e-4, atol=1e-5)
    assert_same_state(model, reference, rtol=1e-4)
    # the groups as the user made them: capturable=False came back set by the frame
    # that writes the lr, and an eager CPU optimizer refused that state_dict
    assert_same_optimizer_state(runs[model][1], runs[reference][1], rtol=1e-4)

def test_a_graph_that_reads_no_buffer_runs_alone(xla):
    """A computation with no parameter cannot be a lazy node: it runs as its own."""
    compiled = torch.compile(lambda: torch.arange(6, device=xla).float() * 2,
                             backend="syncfree_xla", options=JOIN)
    for _ in range(2):
        assert compiled().cpu().tolist() == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


def test_joining_starts_at_a_second_call_and_stays_on_its_thread():
    """The first call of each graph runs alone; the first repeat starts joining, on that
    thread only: another thread's graphs run on their own."""
    import threading

    from xla_backend.runtime.step import StepJoiner

    joiner = StepJoiner()
    assert [joiner.joins(1, "forward graph 0"), joiner.joins(2, "inference graph 1")] == [
        False, False]
    assert not joiner.started
    assert joiner.joins(1, "forward graph 0") and joiner.started
    assert joiner.joins(3, "forward graph 2"), "a new graph joins once joining started"
    elsewhere: list[bool] = []
    worker = threading.Thread(target=lambda: elsewhere.append(joiner.joins(1, "forward graph 0")))
    worker.start()
    worker.join(timeout=60)
    assert elsewhere == [False]
    joiner.reset()
    assert not joiner.started and not joiner.joins(1, "forward graph 0")


def test_steady_joined_steps_reuse_their_temporaries_instead_of_faulting_them_in(xla):
    """A joined step's temporaries (here ~100 MB of activations and gradients) were one
    XLA allocation that glibc mapped afresh every step: a minor page fault for each 4 KiB
    page, every step (25,000 on the bench's transformer LM). Split into heaps of at most
    16 MiB (``device.CPU_HEAP_FLAG``) that glibc keeps mapped (``runtime.host_memory``),
    a steady step faults in a small fraction of them. Page faults are the kernel's count,
    not a timing."""
    import resource
    import statistics

    width, batch, layers = 1024, 2048, 6
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Sequential(torch.nn.Linear(width, width),
                                                      torch.nn.ReLU())
                                  for _ in range(layers)]).to(xla)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, width).to(xla)
    y = torch.randint(0, width, (batch,)).to(xla)
    compiled = torch.compile(workloads.train_step, backend="syncfree_xla", options=JOIN)
    for _ in range(3):
        compiled(model, opt, x, y)
        settle()
    steps = 5
    faults = []
    with MetricWindow() as window:
        for _ in range(steps):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            compiled(model, opt, x, y)
            settle()
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    assert window.counts.executions == steps, window.counts
    activation_pages = layers * batch * width * 4 // 4096  # one layer's output each
    # the median step: anything in the process that trims glibc's arenas (a compile
    # finishing on the pool calls ``host_memory.release``) makes one step fault its
    # temporaries in again; a full suite once saw that in one step of four
    assert statistics.median(faults) < activation_pages / 4, (faults, activation_pages)
