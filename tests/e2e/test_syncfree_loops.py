"""Sync-free optimizer steps: whole compiled steps that never wait on the device.

After 3 warm-up steps, each step must cause no device-to-host transfer and no XLA
compile (torch_xla's own counters), and 20 steps must match eager PyTorch on the CPU.

Loop A: backward, clip_grad_norm_, optimizer step with a float lr that an LR
scheduler changes every step (inside the compiled step or outside it).
Loop B: ``torch.amp.GradScaler`` with a non-finite gradient at chosen steps, for every
optimizer as a user creates it (no ``capturable=True``).
Loop C: a warm-up factor read from a tensor step counter with ``.item()`` / ``float()``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch_xla

from tests.xla_helpers import MetricWindow, assert_same_state, settle, twin
from xla_backend import counters
from xla_backend.dynamo import scope as dynamo_scope
from xla_backend.tools import workloads

# Autograd's engine sizes its per-device queues at the first backward of the process;
# the XLA device must exist by then, and CPU-only tests may run a backward first.
torch_xla.device()

STEPS = 20
WARMUP = 3
RTOL = 1e-4

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-3, amsgrad=True),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-3),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=1e-2),
}

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LRScheduler]] = {
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1.0 + 0.1 * s)),
    "cosine": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=STEPS),
}

# (optimizer, scheduler, scheduler.step() inside the compiled step)
LOOP_A = [
    *[(name, "lambda", True) for name in OPTIMIZERS],
    ("adamw", "cosine", True),
    ("adamw", "onecycle", True),
    ("sgd", "cosine", False),
    ("adamw", "onecycle", False),
]


def _frames_compiled() -> int:
    """Graphs Dynamo handed to the backend: a retrace or recompile adds one."""
    return int(counters.counter(counters.GRAPHS_RECEIVED))


def _run(xla: torch.device, opt_name: str, step_fn: Callable, compiled_args: Callable,
         eager_args: Callable, after_step: Callable[[int], None] | None = None
         ) -> tuple[torch.nn.Module, torch.nn.Module, list, list, MetricWindow, int]:
    """Trains the compiled and the eager step side by side; counts the steps after warm-up."""
    work = workloads.get_workload("mlp")
    model, reference = twin(work.build_model(), xla)
    opt, ref_opt = OPTIMIZERS[opt_name](model.parameters()), OPTIMIZERS[opt_name](
        reference.parameters())
    state = compiled_args(model, opt), eager_args(reference, ref_opt)
    compiled = torch.compile(step_fn, backend="syncfree_xla")
    got, want = [], []

    def one(i: int) -> None:
        got.append(compiled(model, opt, *work.make_batch(i, xla), **state[0]()))
        want.append(step_fn(reference, ref_opt, *work.make_batch(i), **state[1]()))
        if after_step is not None:
            after_step(i)

    window, frames = _warm_then_measure(one)
    return model, reference, [g.cpu() for g in got], want, window, frames


def _warm_then_measure(one) -> tuple[MetricWindow, int]:
    """Runs WARMUP steps, then the rest under a metric window; also counts new frames."""
    for i in range(WARMUP):
        one(i)
    frames = _frames_compiled()
    with MetricWindow() as window:
        for i in range(WARMUP, STEPS):
            one(i)
    frames = _frames_compiled() - frames
    settle()
    return window, frames


def _check(model, reference, got, want, window: MetricWindow, frames: int) -> None:
    assert window.counts.transfers_to_host == 0, window.counts
    assert window.counts.compiles == 0, window.counts
    assert frames == 0, f"Dynamo traced {frames} more graphs after warm-up"
    assert window.counts.executions > 0
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=RTOL, atol=RTOL * 0.1)
    assert_same_state(model, reference, rtol=RTOL)


@pytest.mark.parametrize(("opt_name", "sched_name", "inside"), LOOP_A,
                         ids=[f"{o}-{s}-{'in' if i else 'out'}" for o, s, i in LOOP_A])
def test_loop_a_scheduled_lr(xla, opt_name, sched_name, inside):
    scheds: dict[str, torch.optim.lr_scheduler.LRScheduler] = {}

    def args_for(key: str) -> Callable:
        def make(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], dict]:
            scheds[key] = SCHEDULERS[sched_name](opt)
            return lambda: {"scheduler": scheds[key]} if inside else {}
        return make

    def step_outside(i: int) -> None:
        if not inside:
            scheds["compiled"].step()
            scheds["eager"].step()

    model, reference, got, want, window, frames = _run(
        xla, opt_name, workloads.train_step_clip, args_for("compiled"), args_for("eager"),
        step_outside)
    _check(model, reference, got, want, window, frames)
    lrs = [s.optimizer.param_groups[0]["lr"] for s in (scheds["compiled"], scheds["eager"])]
    assert lrs[0] == pytest.approx(lrs[1], rel=1e-12)
    assert scheds["compiled"].last_epoch == scheds["eager"].last_epoch == STEPS


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_loop_a_with_a_clipping_norm_that_changes_every_step(xla, opt_name):
    """``max_norm`` from a schedule: torch_xla's ``clip_grad_norm_`` makes it a tensor
    (``torch.tensor(max_norm, ...)``), which recompiled every step until Dynamo's limit."""
    calls = {"compiled": 0, "eager": 0}

    def args_for(key: str) -> Callable:
        def make(model: torch.nn.Module, opt: torch.optim.Optimizer) -> Callable[[], dict]:
            def args() -> dict:
                calls[key] += 1
                return {"max_norm": 0.05 * (1 + calls[key] % 4)}
            return args
        return make

    _check(*_run(xla, opt_name, workloads.train_step_clip, args_for("compiled"),
                 args_for("eager")))


def train_step_warmup_item(model: torch.nn.Module, opt: torch.optim.Optimizer,
                           x: torch.Tensor, y: torch.Tensor, step: torch.Tensor,
                           warmup: int = 10) -> torch.Tensor:
    """Loop C: lr warm-up from a tensor step counter read with ``.item()``."""
    lr_scale = min(1.0, (step.item() + 1) / warmup)
    loss = workloads.cross_entropy(model(x), y)
    value = loss.detach()
    (loss * lr_scale).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    step.add_(1)
    return value


def train_step_warmup_float(model: torch.nn.Module, opt: torch.optim.Optimizer,
                            x: torch.Tensor, y: torch.Tensor, step: torch.Tensor,
                            warmup: int = 10) -> torch.Tensor:
    """Loop C with ``float(step)``, a max() and a power, scaling the loss."""
    lr_scale = max(0.1, min(1.0, ((float(step) + 1) / warmup) ** 2))
    loss = workloads.cross_entropy(model(x), y)
    value = loss.detach()
    (lr_scale * loss).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    step.add_(1)
    return value


LOOP_C = [(train_step_warmup_item, "adamw"), (train_step_warmup_float, "sgd")]


@pytest.mark.parametrize(("step_fn", "opt_name"), LOOP_C, ids=["item-adamw", "float-sgd"])
def test_loop_c_warmup_from_step_counter(xla, step_fn, opt_name):
    counter = {"compiled": torch.zeros((), dtype=torch.int64, device=xla),
               "eager": torch.zeros((), dtype=torch.int64)}
    model, reference, got, want, window, frames = _run(
        xla, opt_name, step_fn,
        lambda m, o: (lambda: {"step": counter["compiled"]}),
        lambda m, o: (lambda: {"step": counter["eager"]}))
    _check(model, reference, got, want, window, frames)
    assert int(counter["compiled"].cpu()) == int(counter["eager"]) == STEPS


# Loop B: GradScaler. The steps in BAD_STEPS see a non-finite input (inf, then NaN), so
# their gradients are non-finite: both runs must skip exactly those optimizer steps and
# back off; after GROWTH_INTERVAL good steps in a row both double the scale.
BAD_STEPS = {5: float("inf"), 11: float("nan")}
GROWTH_INTERVAL = 3
# Created as a user would, with no capturable=True: Adam-style step counters start on
# the host and the backend moves them (xla_backend/step_counters.py).
LOOP_B_OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p, device: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True,
                                             weight_decay=1e-2),
    "adam": lambda p, device: torch.optim.Adam(p, lr=1e-3),
    "adamw-amsgrad": lambda p, device: torch.optim.AdamW(p, lr=1e-3, amsgrad=True),
    "rmsprop": lambda p, device: torch.optim.RMSprop(p, lr=1e-3, momentum=0.5),
    "adagrad": lambda p, device: torch.optim.Adagrad(p, lr=1e-2),
    # the user's own capturable=True on the device; eager CPU runs it non-capturable
    "adamw-capturable": lambda p, device: torch.optim.AdamW(
        p, lr=1e-3, capturable=torch.device(device).type == "xla"),
    # torch_xla's own "syncfree" optimizers, as torch_xla's AMP examples train with
    "torch_xla-syncfree-adamw": lambda p, device: _syncfree().AdamW(p, lr=1e-3,
                                                                    weight_decay=1e-2),
    "torch_xla-syncfree-sgd": lambda p, device: _syncfree().SGD(p, lr=0.05, momentum=0.9),
}


def _syncfree():
    from torch_xla.amp import syncfree

    return syncfree


def _amp_batch(work: workloads.Workload, i: int, device: torch.device | str):
    x, y = work.make_batch(i)
    if i in BAD_STEPS:
        x[0, 0] = BAD_STEPS[i]
    return x.to(device), y.to(device)


def _check_state_dict_loads_eagerly(opt: torch.optim.Optimizer, ref_opt: torch.optim.Optimizer,
                                    make: Callable, flags: list, reference: torch.nn.Module
                                    ) -> None:
    """The compiled run's state dict is what eager torch saves, and loads into an eager one."""
    saved = opt.state_dict()
    assert [g.get("capturable") for g in saved["param_groups"]] == flags
    want = ref_opt.state_dict()["state"]
    for index, state in saved["state"].items():
        if "step" in state:
            # on the host as torch keeps it, unless the user asked for capturable
            assert state["step"].device.type == ("xla" if any(flags) else "cpu")
            assert float(state["step"].cpu()) == float(want[index]["step"])
    # the live counters stay on the device: saving copies them, never moves them
    assert all(s["step"].device.type == "xla" for s in opt.state.values() if "step" in s)
    if any(flags):
        return  # a capturable group cannot run on the CPU, by torch's own rule
    params = [torch.nn.Parameter(p.detach().clone()) for p in reference.parameters()]
    fresh = make(params, "cpu")
    fresh.load_state_dict(saved)
    for p in params:
        p.grad = torch.ones_like(p)
    fresh.step()  # runs eagerly on the CPU, step counters included


@pytest.mark.parametrize("opt_name", list(LOOP_B_OPTIMIZERS))
def test_loop_b_grad_scaler_skips_on_device(xla, opt_name):
    work = workloads.get_workload("mlp")
    model, reference = twin(work.build_model(), xla)
    make = LOOP_B_OPTIMIZERS[opt_name]
    opt, ref_opt = make(model.parameters(), xla), make(reference.parameters(), "cpu")
    flags = [g.get("capturable") for g in opt.param_groups]
    scaler = workloads.make_grad_scaler(xla, init_scale=2.0**8, growth_interval=GROWTH_INTERVAL)
    ref_scaler = workloads.make_grad_scaler("cpu", init_scale=2.0**8,
                                            growth_interval=GROWTH_INTERVAL)
    compiled = torch.compile(workloads.train_step_amp, backend="syncfree_xla")
    got, want, scales = [], [], []

    def one(i: int) -> None:
        got.append(compiled(model, opt, scaler, *_amp_batch(work, i, xla)))
        want.append(workloads.train_step_amp(reference, ref_opt, ref_scaler,
                                             *_amp_batch(work, i, "cpu")))
        scales.append(ref_scaler.get_scale())
        snapshots.append(counters.counter(counters.GRAD_SCALER_SNAPSHOTS))

    snapshots: list[float] = []
    window, frames = _warm_then_measure(one)
    assert window.counts.transfers_to_host == 0, window.counts
    assert window.counts.compiles == 0, window.counts
    assert frames == 0, f"Dynamo traced {frames} more graphs after warm-up"
    # after warm-up every masked step ran its graphs' masked twins, with no snapshot
    assert snapshots[-1] == snapshots[WARMUP - 1], snapshots
    # the reference backs off at each bad step and grows within the measured steps
    for i in BAD_STEPS:
        assert scales[i] == scales[i - 1] / 2, f"step {i}: {scales}"
    assert any(scales[i] == 2 * scales[i - 1] for i in range(WARMUP + 1, STEPS)), scales
    assert float(scaler.get_scale()) == ref_scaler.get_scale()
    assert int(scaler._growth_tracker.cpu()) == int(ref_scaler._growth_tracker)
    finite = [i for i in range(STEPS) if i not in BAD_STEPS]
    assert all(not torch.isfinite(got[i].cpu()) for i in BAD_STEPS)
    got_finite = torch.stack([got[i].cpu() for i in finite])
    torch.testing.assert_close(got_finite, torch.stack([want[i] for i in finite]),
                               rtol=RTOL, atol=RTOL * 0.1)
    assert_same_state(model, reference, rtol=RTOL)
    _check_state_dict_loads_eagerly(opt, ref_opt, make, flags, reference)


def test_the_masked_grad_scaler_step_is_never_handed_to_dynamo(xla):
    """``disable(recursive=False)`` alone sends the step's frame through Dynamo's whole
    frame callback at every step; the skip is kept on its code object instead."""
    from torch._dynamo.convert_frame import input_codes

    from xla_backend.dynamo.grad_scaler import masked_maybe_opt_step

    work = workloads.get_workload("mlp")
    model = work.build_model().to(xla)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = workloads.make_grad_scaler(xla)
    compiled = torch.compile(workloads.train_step_amp, backend="syncfree_xla")
    for i in range(4):
        compiled(model, opt, scaler, *_amp_batch(work, i, xla))
    settle()
    assert masked_maybe_opt_step.__wrapped__.__code__ not in input_codes


@pytest.mark.parametrize("enabled", [True, False], ids=["enabled", "disabled"])
def test_grad_scaler_scale_unscale_and_update_are_traced_into_the_step(xla, enabled):
    """torch.amp is on Dynamo's skip list: without our stand-ins each of these three
    calls is a graph break with eager ops around it, at every step. nanoGPT-style
    scripts keep the calls with ``GradScaler(enabled=False)`` when not in float16."""
    from torch._dynamo.utils import counters as dynamo_counters

    work = workloads.get_workload("mlp")
    model = work.build_model().to(xla)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("xla", enabled=enabled)
    before = dict(dynamo_counters["graph_break"])
    compiled = torch.compile(workloads.train_step_amp, backend="syncfree_xla")
    for i in range(3):
        compiled(model, opt, scaler, *_amp_batch(work, i, xla))
    settle()
    new = [reason for reason, n in dynamo_counters["graph_break"].items()
           if n > before.get(reason, 0)]
    assert any("Tensor.backward" in reason for reason in new), new  # the count works
    for method in ("GradScaler.scale", "GradScaler.unscale_", "GradScaler.update"):
        assert not any(f"`{method}`" in reason for reason in new), (method, new)


class _RecordingScaler(torch.amp.GradScaler):
    """Overrides a helper the stand-ins would otherwise bypass."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.unscaled = 0

    def _unscale_grads_(self, *args, **kwargs):
        self.unscaled += 1
        return super()._unscale_grads_(*args, **kwargs)


def _two_losses(model, opt, scaler, x, y):
    """A list scaled in one call, with clipping by value."""
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    scaled = scaler.scale([loss, out.pow(2).mean() * 0.1])
    (scaled[0] + scaled[1]).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_value_(model.parameters(), 0.5)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return loss.detach()


def _no_unscale(model, opt, scaler, x, y):
    """``scaler.step`` unscales by itself; ``update(new_scale)`` sets the scale."""
    loss = torch.nn.functional.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update(torch.full((), 2.0**6, device=x.device))
    opt.zero_grad()
    return loss.detach()


@pytest.mark.parametrize(("step_fn", "scaler_type"), [
    (_two_losses, torch.amp.GradScaler), (_no_unscale, torch.amp.GradScaler),
    (workloads.train_step_amp, _RecordingScaler)],
    ids=["list-clip-value", "no-unscale-new-scale", "subclass"])
def test_grad_scaler_calls_the_stand_ins_leave_alone_match_eager(xla, step_fn, scaler_type):
    """A list to scale, a step that unscales by itself, a new scale, a subclass that
    overrides a helper: the stock methods run them, as in eager."""
    work = workloads.get_workload("mlp")
    model, reference = twin(work.build_model(), xla)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-3)
    scaler = scaler_type("xla", init_scale=2.0**8, growth_interval=GROWTH_INTERVAL)
    ref_scaler = scaler_type("cpu", init_scale=2.0**8, growth_interval=GROWTH_INTERVAL)
    compiled = torch.compile(step_fn, backend="syncfree_xla")
    scales = []
    for i in range(8):
        compiled(model, opt, scaler, *_amp_batch(work, i, xla))
        step_fn(reference, ref_opt, ref_scaler, *_amp_batch(work, i, "cpu"))
        scales.append(ref_scaler.get_scale())
    settle()
    if scaler_type is _RecordingScaler:
        assert scaler.unscaled == ref_scaler.unscaled == 8
    assert set(scales) != {2.0**8}, scales  # the scale moved
    assert float(scaler.get_scale()) == ref_scaler.get_scale()
    assert int(scaler._growth_tracker.cpu()) == int(ref_scaler._growth_tracker)
    assert_same_state(model, reference, rtol=RTOL)


def _unscale_twice(model, opt, scaler, x, y):
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    scaler.unscale_(opt)


def _half_gradients(model, opt, scaler, x, y):
    scaler.scale(torch.nn.functional.cross_entropy(model(x.half()).float(), y)).backward()
    scaler.unscale_(opt)


@pytest.mark.parametrize(("step_fn", "half"), [(_unscale_twice, False), (_half_gradients, True)],
                         ids=["unscale-twice", "float16-gradients"])
def test_grad_scaler_misuse_raises_what_eager_raises(xla, step_fn, half):
    work = workloads.get_workload("mlp")
    errors = []
    for device in ("cpu", xla):
        model = work.build_model().to(device)
        if half:
            model.half()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = workloads.make_grad_scaler(device)
        run = step_fn if device == "cpu" else torch.compile(step_fn, backend="syncfree_xla")
        with pytest.raises((RuntimeError, ValueError)) as caught:
            run(model, opt, scaler, *_amp_batch(work, 0, device))
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1]


def _two_optimizers(nets, opts, scaler, x, y):
    """Two optimizers, one scaler, one update: the found_infs of both are summed."""
    losses = []
    for net, opt in zip(nets, opts):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        scaler.step(opt)
        opt.zero_grad()
        losses.append(loss.detach())
        x = x.clone()
        x[0, 0] = 0.0  # the second net's batch is finite: it steps, the first one skips
    scaler.update()
    return torch.stack(losses)


def test_grad_scaler_with_two_optimizers_matches_eager(xla):
    work = workloads.get_workload("mlp")
    pairs = [twin(work.build_model(), xla) for _ in range(2)]
    nets, ref_nets = [p[0] for p in pairs], [p[1] for p in pairs]
    opts = [torch.optim.AdamW(n.parameters(), lr=1e-3) for n in nets]
    ref_opts = [torch.optim.AdamW(n.parameters(), lr=1e-3) for n in ref_nets]
    scaler = workloads.make_grad_scaler(xla, init_scale=2.0**8, growth_interval=GROWTH_INTERVAL)
    ref_scaler = workloads.make_grad_scaler("cpu", init_scale=2.0**8,
                                            growth_interval=GROWTH_INTERVAL)
    compiled = torch.compile(_two_optimizers, backend="syncfree_xla")
    scales = []
    for i in range(STEPS):
        compiled(nets, opts, scaler, *_amp_batch(work, i, xla))
        _two_optimizers(ref_nets, ref_opts, ref_scaler, *_amp_batch(work, i, "cpu"))
        scales.append(ref_scaler.get_scale())
    settle()
    assert all(scales[i] == scales[i - 1] / 2 for i in BAD_STEPS), scales
    assert float(scaler.get_scale()) == ref_scaler.get_scale()
    assert int(scaler._growth_tracker.cpu()) == int(ref_scaler._growth_tracker)
    for net, ref_net in pairs:
        assert_same_state(net, ref_net, rtol=RTOL)


class _MomentumWithEagerDecay(torch.optim.Optimizer):
    """SGD with momentum whose ``eager_decay`` path shrinks the weights in a function
    Dynamo does not compile: an in-place change that no compiled graph makes."""

    def __init__(self, params, lr: float = 0.05) -> None:
        super().__init__(params, {"lr": lr})
        self.eager_decay = False

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum" not in state:
                    state["momentum"] = torch.zeros_like(p)
                state["momentum"].mul_(0.9).add_(p.grad)
                p.add_(state["momentum"], alpha=-group["lr"])
        if self.eager_decay:
            _decay([p for g in self.param_groups for p in g["params"]])


@torch._dynamo.disable
def _decay(params: list[torch.Tensor]) -> None:
    for p in params:
        p.mul_(0.999)


def _eager_decay_run(xla, schedule: list[bool], bad: set[int]):
    """Trains the compiled loop B and its eager CPU twin, ``eager_decay`` set per step
    from ``schedule``; the steps in ``bad`` see an inf input. Returns a step runner."""
    work = workloads.get_workload("mlp")
    model, reference = twin(work.build_model(), xla)
    opt = _MomentumWithEagerDecay(model.parameters())
    ref_opt = _MomentumWithEagerDecay(reference.parameters())
    scaler = workloads.make_grad_scaler(xla, init_scale=2.0**8)
    ref_scaler = workloads.make_grad_scaler("cpu", init_scale=2.0**8)
    compiled = torch.compile(workloads.train_step_amp, backend="syncfree_xla")

    def one(i: int) -> None:
        opt.eager_decay = ref_opt.eager_decay = schedule[i]
        x, y = work.make_batch(i)
        if i in bad:
            x[0, 0] = float("inf")
        compiled(model, opt, scaler, x.to(xla), y.to(xla))
        workloads.train_step_amp(reference, ref_opt, ref_scaler, x, y)

    return one, model, reference


def test_a_changed_step_path_that_compiles_is_undone_from_a_snapshot(xla, caplog):
    """Step 3 takes a path never compiled before, which changes the weights outside
    any compiled graph, and is skipped: the compile snapshots first, so the skip is
    exact, and the optimizer snapshots on every step after."""
    one, model, reference = _eager_decay_run(xla, [False] * 3 + [True] * 5, bad={3, 6})
    for i in range(3):
        one(i)
    snapshots = counters.counter(counters.GRAD_SCALER_SNAPSHOTS)
    one(3)
    assert counters.counter(counters.GRAD_SCALER_SNAPSHOTS) == snapshots + 1
    assert "later steps snapshot them again" in caplog.text
    for i in range(4, 8):
        one(i)
    assert counters.counter(counters.GRAD_SCALER_SNAPSHOTS) == snapshots + 5
    assert_same_state(model, reference, rtol=RTOL)


def test_a_skipped_step_that_cannot_be_undone_raises(xla):
    """The decaying path was compiled (step 1) before the plain one checked out again
    (step 2); taking it again compiles nothing, so there is no snapshot to undo its
    change from when that step must be skipped: the step says so."""
    one, _, _ = _eager_decay_run(xla, [False, True, False, True], bad={3})
    for i in range(3):
        one(i)
    with pytest.raises(RuntimeError, match="cannot be undone"):
        one(3)


@torch._dynamo.disable
def _record_settings(into: list) -> None:
    into.append({k: getattr(torch._dynamo.config, k) for k in dynamo_scope.DYNAMO_SETTINGS})


def _graph_break_step(x: torch.Tensor, into: list) -> torch.Tensor:
    y = x * 2
    _record_settings(into)
    return y + 1


def test_dynamo_settings_are_scoped_to_syncfree_xla(xla):
    """torch_xla's global flip stays in force for everyone else, before, during and after."""
    outside = {k: getattr(torch._dynamo.config, k) for k in dynamo_scope.DYNAMO_SETTINGS}
    assert outside["specialize_float"] is True, "torch_xla sets this at import"
    seen: list[dict] = []
    x = torch.ones(3, device=xla)
    torch.compile(_graph_break_step, backend="syncfree_xla")(x, seen)
    torch.compile(_graph_break_step, backend="openxla")(x, seen)
    torch.compile(_graph_break_step, backend="eager")(x, seen)
    _graph_break_step(x, seen)
    assert seen == [dynamo_scope.DYNAMO_SETTINGS, outside, outside, outside]
    assert {k: getattr(torch._dynamo.config, k) for k in dynamo_scope.DYNAMO_SETTINGS} == outside
