"""Dynamo-level passes that keep scalars on the device, and the Dynamo settings scope.

The graphs come from plain torch on the CPU (Dynamo with a capturing backend,
AOTAutograd's ``aot_eager``), so no XLA is needed.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
import torch.fx
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.repro.after_dynamo import WrapBackendDebug

import passes
from passes import hoist_scalar_negation, tensorify_scalar_reads
from passes.dynamo_graph import is_sym
from xla_backend.dynamo import grad_scaler
from xla_backend.dynamo import scope as dynamo_scope


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Capture:
    """A backend that runs ``pipeline`` on each Dynamo graph, keeps it, and runs it."""

    def __init__(self, pipeline: tuple = passes.DYNAMO_PASSES, aot: bool = False) -> None:
        self.pipeline = pipeline
        self.graphs: list[torch.fx.GraphModule] = []
        self.fired: list[list[str]] = []
        self.aot = aot

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        self.fired.append(passes.run_pipeline(gm, self.pipeline))
        self.graphs.append(gm)
        if self.aot:
            return aot_autograd(fw_compiler=_boxed, bw_compiler=_boxed)(gm, example_inputs)
        return gm.forward


def _boxed(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
    return make_boxed_func(gm.forward)


def _compile(fn: Callable, backend: Callable) -> Callable:
    """``fn`` compiled with our Dynamo settings, entered around each call as Dynamo would."""
    compiled = torch.compile(fn, backend=backend)

    def call(*args: Any, **kwargs: Any) -> Any:
        with dynamo_scope.backend_ctx():
            return compiled(*args, **kwargs)

    return call


def _item_calls(gm: torch.fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_method" and n.target == "item")


def _sym_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if is_sym(n)]


# --------------------------------------------------------------------------- tensorify


def warmup_item(step: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (w * x).sum() * min(1.0, (step.item() + 1) / 10)


def warmup_float(step: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (w * x) * max(0.25, min(1.0, (float(step) + 1) / 10) ** 2)


def float_read(step: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    s = step.item()
    return (w * x).sum() * (1 - s) ** 2 - s / (w * x)


def int_math(step: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    n = step.item()
    return w * (n // 3) + x * (n % 3) - (2 * n - 1)


def lerp_weight(step: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return w.lerp(x, 1 - float(step) / 16)


def inplace_update(step: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    y = w.clone()
    y.mul_(float(step) * 0.5)
    return y.add_(x)


def clamp_bounds(step: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    c = 0.2 + float(step) / 10
    return (w * x).clamp(min=-c, max=c) + torch.clamp(w, 0.0, c) + x.clip(max=c)


def tensor_of_a_number(step: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    c = torch.tensor(0.5 + float(step) / 7, dtype=torch.float32)  # as in clip_grad_norm_
    return w / (c + 1e-6) + torch.scalar_tensor(float(step) * 0.25, dtype=torch.float64) * x


CASES: dict[str, tuple[Callable, Callable[[int], torch.Tensor]]] = {
    "item-int-min": (warmup_item, lambda v: torch.tensor(v)),
    "float-int-max-pow": (warmup_float, lambda v: torch.tensor(v, dtype=torch.int32)),
    "float-tensor-read": (float_read, lambda v: torch.tensor(v / 7.0)),
    "int-floordiv-mod": (int_math, lambda v: torch.tensor(v)),
    "lerp-weight": (lerp_weight, lambda v: torch.tensor(v)),
    "inplace": (inplace_update, lambda v: torch.tensor(v)),
    "clamp-bounds": (clamp_bounds, lambda v: torch.tensor(v)),
    "tensor-of-a-number": (tensor_of_a_number, lambda v: torch.tensor(v)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scalar_reads_become_tensor_math(case):
    fn, make_step = CASES[case]
    w, x = torch.randn(5), torch.randn(5)
    capture = Capture()
    compiled = _compile(fn, capture)
    for v in (0, 3, 9, 14):
        got, want = compiled(make_step(v), w, x), fn(make_step(v), w, x)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert len(capture.graphs) == 1, "a new step value must not retrace"
    gm = capture.graphs[0]
    assert capture.fired[0][0] == "tensorify_scalar_reads"
    assert _item_calls(gm) == 0
    assert _sym_nodes(gm) == []


def test_scalar_read_cuts_autograd_like_item():
    def fn(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / (1.0 + (w * w).sum().item())
        return ((w * x) * scale).sum()

    w, w_ref, x = torch.randn(4, requires_grad=True), None, torch.randn(4)
    w_ref = w.detach().clone().requires_grad_(True)
    capture = Capture()
    _compile(fn, capture)(w, x).backward()
    fn(w_ref, x).backward()
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=0, atol=0)
    assert _item_calls(capture.graphs[0]) == 0


def test_scalar_zero_dim_operand_keeps_its_dtype():
    """Next to a 0-d float32 tensor a float64 0-d tensor would promote; the pass casts."""
    def fn(step: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        return loss * (float(step) / 3)

    capture = Capture()
    got = _compile(fn, capture)(torch.tensor(2), torch.tensor(1.5))
    assert got.dtype == torch.float32
    assert torch.equal(got, fn(torch.tensor(2), torch.tensor(1.5)))


def _returns_scalar(step: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, float]:
    s = step.item() * 2.0
    return w * s, s


def _scalar_as_size(step: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return w * torch.full((3,), step.item() + 0.5).sum()


@pytest.mark.parametrize("fn", [_returns_scalar, _scalar_as_size], ids=["output", "keyword"])
def test_unsupported_uses_leave_the_whole_group_alone(fn):
    """A number that leaves the graph, or feeds an op taking only numbers, is not rewritten."""
    gm = dynamo_graph(fn, torch.tensor(3.0), torch.randn(3))
    before = gm.code
    result = tensorify_scalar_reads(gm)
    assert not result.modified
    assert gm.code == before


def dynamo_graph(fn: Callable, *args: Any) -> torch.fx.GraphModule:
    """The first Dynamo graph of ``fn`` with our settings, before any pass."""
    capture = Capture(pipeline=())
    _compile(fn, capture)(*args)
    return capture.graphs[0]


def test_dynamo_float_input_item_is_kept_and_anchored():
    """A float argument Dynamo keeps symbolic still reaches a tensor op as the bare symbol."""
    def fn(t: torch.Tensor, lr: float) -> torch.Tensor:
        return t.lerp(t * 2, 1 - lr)

    t = torch.randn(4)
    fn(t, 0.5)
    capture = Capture(aot=True)
    compiled = _compile(fn, capture)
    for lr in (0.5, 0.25, 0.125, 0.0625):
        torch.testing.assert_close(compiled(t, lr), fn(t, lr), rtol=0, atol=0)
    assert len(capture.graphs) == 2, "one specialized graph, then one for every lr"
    gm = capture.graphs[-1]
    assert _item_calls(gm) == 1
    anchors = [n for n in gm.graph.nodes if n.target is torch.mul
               and any(getattr(a, "target", None) == "item" for a in n.args)]
    assert len(anchors) == 1


# --------------------------------------------------------------------------- int inputs


def _momentum_schedule(w: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
    return w.mul(1 - 0.1 * (1 - i / 8)) + x * (i // 2)


def _index_returned(w: torch.Tensor, x: torch.Tensor, i: int) -> tuple[torch.Tensor, int]:
    return w * x * (i + 1), i * 2


def _index_as_slice(w: torch.Tensor, x: torch.Tensor, i: int) -> torch.Tensor:
    return (w[:i] * x[:i]).sum() * (i + 1)


class IntInputs:
    """A backend doing what ours does with int inputs: rewrite, then pass tensors."""

    def __init__(self) -> None:
        self.graphs: list[tuple[torch.fx.GraphModule, list[int]]] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        positions = passes.tensorify_int_inputs(gm, example_inputs)
        passes.run_pipeline(gm, passes.DYNAMO_PASSES)
        self.graphs.append((gm, positions))

        def call(*args: Any) -> Any:
            return gm.forward(*[torch.tensor(a) if k in positions else a
                                for k, a in enumerate(args)])

        return call


def _adam_style_correction(w: torch.Tensor, group: dict) -> torch.Tensor:
    """Adam's step as torch wrote it before 1.12: an int step counted in Python."""
    group["step"] += 1
    return w * (math.sqrt(1 - 0.999 ** group["step"]) / (1 - 0.9 ** group["step"]))


def test_an_int_input_the_graph_returns_is_tensor_math_everywhere_else():
    """The graph returns ``step + 1`` (the counter's new value), so the int stays a
    SymInt input; the bias corrections, ``math.sqrt`` included, become tensor math on
    ``scalar_tensor(step)``, which only the host part reads once lowered."""
    backend = IntInputs()
    compiled = _compile(_adam_style_correction, backend)
    w = torch.randn(6)
    got, want = {"step": 0}, {"step": 0}
    for _ in range(6):
        torch.testing.assert_close(compiled(w, got), _adam_style_correction(w, want),
                                   rtol=1e-6, atol=0)
    assert got == want == {"step": 6}
    gm, positions = backend.graphs[-1]
    assert positions == []
    syms = set(_sym_nodes(gm))
    assert syms, "the returned count is still computed from the symbol"
    users = {user for n in syms for user in n.users if user not in syms}
    assert {u.op for u in users} <= {"output", "call_function"}, gm.code
    assert {u.target for u in users if u.op == "call_function"} == {torch.scalar_tensor}, gm.code


def test_an_int_input_used_as_a_number_becomes_a_tensor_input():
    """Dynamo makes the int symbolic at its second value; the graph then takes it as a
    0-d tensor, with the arithmetic as tensor math, and gives eager's values exactly."""
    backend = IntInputs()
    compiled = _compile(_momentum_schedule, backend)
    w, x = torch.randn(6), torch.randn(6)
    for i in range(6):
        torch.testing.assert_close(compiled(w, x, i), _momentum_schedule(w, x, i),
                                   rtol=0, atol=0)
    assert len(backend.graphs) == 2, "one graph for i=0, then one for every index"
    gm, positions = backend.graphs[-1]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert [placeholders[k].name for k in positions] == ["l_i_"]
    assert not _sym_nodes(gm) and _item_calls(gm) == 0


@pytest.mark.parametrize("fn", [_index_returned, _index_as_slice], ids=["output", "slice"])
def test_an_int_input_used_otherwise_stays_a_symbol(fn):
    """A number that leaves the graph or sizes a tensor keeps its SymInt input."""
    backend = IntInputs()
    compiled = _compile(fn, backend)
    w, x = torch.randn(6), torch.randn(6)
    for i in range(1, 5):
        torch.testing.assert_close(compiled(w, x, i), fn(w, x, i), rtol=0, atol=0)
    gm, positions = backend.graphs[-1]
    assert positions == []
    assert any(isinstance(n.meta.get("example_value"), torch.SymInt)
               for n in gm.graph.nodes if n.op == "placeholder")


# --------------------------------------------------------------------------- hoist negation


def test_hoisted_negation_takes_the_bare_symbol():
    def fn(t: torch.Tensor, lr: float) -> torch.Tensor:
        u = torch.mul(t, -lr)
        v = t.clone()
        v.mul_(-lr)
        return u + v / -lr

    t = torch.randn(6)
    fn(t, 0.5)
    capture = Capture(pipeline=(hoist_scalar_negation,), aot=True)
    compiled = _compile(fn, capture)
    for lr in (0.5, 0.3, 0.1, 0.7):
        torch.testing.assert_close(compiled(t, lr), fn(t, lr), rtol=0, atol=0)
    assert len(capture.graphs) == 2, "lr must become an input after one recompile"
    gm = capture.graphs[-1]
    assert not [n for n in gm.graph.nodes if n.target is operator.neg]
    assert sum(1 for n in gm.graph.nodes if n.target in (torch.neg, "neg_")) == 3


def _negation_graph(kwargs: dict[str, Any]) -> torch.fx.GraphModule:
    """``torch.div(t, -s, **kwargs)`` built by hand, with a SymFloat ``s``."""
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    graph = torch.fx.Graph()
    t, s = graph.placeholder("t"), graph.placeholder("s")
    neg = graph.call_function(operator.neg, (s,))
    graph.output(graph.call_function(torch.div, (t, neg), kwargs))
    sym = ShapeEnv().create_unbacked_symfloat()
    t.meta["example_value"], s.meta["example_value"] = torch.empty(3), sym
    neg.meta["example_value"] = -sym
    return torch.fx.GraphModule(torch.nn.Module(), graph)


def test_hoist_on_a_hand_built_graph():
    gm = _negation_graph({})
    assert hoist_scalar_negation(gm).modified
    t = torch.tensor([1.0, -2.0, 3.0])
    assert torch.equal(gm(t, 0.3), torch.div(t, -0.3))
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.div, torch.neg]


def test_hoist_leaves_rounding_division_alone():
    """floor(t / -s) is not -floor(t / s): a keyword argument blocks the rewrite."""
    gm = _negation_graph({"rounding_mode": "floor"})
    assert not hoist_scalar_negation(gm).modified


# --------------------------------------------------------------------------- optimizers


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=1e-2, momentum=0.5, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, amsgrad=True),
    "adam-l2": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    # the foreach paths take beta1 as _foreach_lerp_'s Python weight
    "adam-foreach": lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True, foreach=True),
    "adamax-foreach": lambda p: torch.optim.Adamax(p, lr=1e-2, foreach=True),
}


def _opt_step(opt: torch.optim.Optimizer) -> None:
    opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_scheduled_hyperparameters_stop_recompiling(name):
    """lr, beta1 and momentum (as OneCycleLR and CyclicLR change them) and a scheduled
    weight decay become inputs, not constants."""
    params = [torch.randn(4, 3), torch.randn(3)]
    ref = [p.clone() for p in params]
    opt, ref_opt = OPTIMIZERS[name](params), OPTIMIZERS[name](ref)
    capture = Capture(aot=True)
    step = _compile(_opt_step, capture)
    warm = 0
    for i in range(7):
        if i == 3:
            warm = len(capture.graphs)
        for p, q in zip(params, ref):
            p.grad = torch.full_like(p, 0.1 * (i + 1))
            q.grad = p.grad.clone()
        for o in (opt, ref_opt):
            group = o.param_groups[0]
            group["lr"] = 0.05 / (i + 1)
            if name.startswith("adam"):
                group["betas"] = (0.9 - 0.01 * i, 0.999)
            if group.get("momentum"):
                group["momentum"] = 0.9 - 0.02 * i
            if group.get("weight_decay"):
                group["weight_decay"] = 1e-2 * (i + 1)
        step(opt)
        ref_opt.step()
        for p, q in zip(params, ref):  # compiled Adam keeps step in float32, eager in double
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert len(capture.graphs) == warm, "no graph after the warm-up steps"


def test_without_the_passes_sgd_recompiles_every_step():
    """The control for the test above: AOTAutograd alone specializes SGD's -lr."""
    params = [torch.randn(3)]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    capture = Capture(pipeline=(), aot=True)
    step = _compile(_opt_step, capture)
    for i in range(5):
        params[0].grad = torch.ones(3)
        opt.param_groups[0]["lr"] = 0.1 / (i + 1)
        step(opt)
    assert len(capture.graphs) >= 5, "every new lr is a new graph"


# --------------------------------------------------------------------------- dynamo scope


def _seen_settings() -> dict[str, Any]:
    return {k: getattr(torch._dynamo.config, k) for k in dynamo_scope.DYNAMO_SETTINGS}


@torch._dynamo.disable
def _record(into: list) -> None:
    into.append(_seen_settings())


def test_scope_applies_to_marked_backend_only():
    outside = _seen_settings()
    ours: list[dict[str, Any]] = []
    theirs_tracing: list[dict[str, Any]] = []
    theirs_running: list[dict[str, Any]] = []

    def our_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        ours.append(_seen_settings())
        return gm.forward

    def their_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        theirs_tracing.append(_seen_settings())
        return gm.forward

    dynamo_scope.install(our_backend)
    dynamo_scope.install(our_backend)  # idempotent
    assert dynamo_scope.installed()

    running: list[dict[str, Any]] = []

    def f(x: torch.Tensor, into: list) -> torch.Tensor:
        y = x * 2
        _record(into)
        return y + 1

    torch.compile(f, backend=our_backend)(torch.ones(2), running)
    torch.compile(f, backend=their_backend)(torch.ones(2), theirs_running)
    torch.compile(f, backend="eager")(torch.ones(2), theirs_running)

    assert ours and all(s == dynamo_scope.DYNAMO_SETTINGS for s in ours)
    assert running == [dynamo_scope.DYNAMO_SETTINGS]
    assert theirs_tracing and all(s == outside for s in theirs_tracing)
    assert theirs_running == [outside, outside]
    assert _seen_settings() == outside


def test_forwarding_is_limited_to_marked_backends():
    def plain(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        return gm.forward

    wrapped = WrapBackendDebug(plain, "plain")
    with pytest.raises(AttributeError):
        wrapped.backend_ctx_ctor  # noqa: B018
    with pytest.raises(AttributeError):
        wrapped.some_other_attribute  # noqa: B018


def test_syncfree_passes_off_keeps_stock_settings():
    outside = _seen_settings()
    with dynamo_scope.backend_ctx({"syncfree_passes": False}):
        assert _seen_settings() == outside
    with dynamo_scope.backend_ctx({"syncfree_passes": True}):
        assert _seen_settings() == dynamo_scope.DYNAMO_SETTINGS
    assert _seen_settings() == outside


def test_forwarded_hook_honours_torch_compile_options():
    def marked(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        return gm.forward

    dynamo_scope.install(marked)
    outside = _seen_settings()
    for options, want in ((None, dynamo_scope.DYNAMO_SETTINGS),
                          ({"syncfree_passes": False}, outside)):
        wrapper = torch._TorchCompileWrapper(marked, None, options, None)
        ctor = WrapBackendDebug(wrapper, "marked").backend_ctx_ctor
        with ctor():
            assert _seen_settings() == want
    assert _seen_settings() == outside


# --------------------------------------------------------------------------- GradScaler


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_masked_grad_scaler_step_matches_the_stock_one(opt_name):
    """Same parameters, state and scale as GradScaler's host-side branch, inf step or not."""
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.01)}[opt_name]
    runs = []
    for masked in (False, True):
        model = torch.nn.Linear(3, 2)
        with torch.no_grad():
            model.weight.copy_(torch.arange(6.0).view(2, 3) / 10)
            model.bias.zero_()
        opt = make(model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
        for i in range(5):
            x = torch.full((4, 3), 0.5 + i)
            if i in (2, 3):
                x[0, 0] = float("inf")
            scaler.scale(model(x).square().mean()).backward()
            with grad_scaler.masked_step() if masked else contextlib.nullcontext():
                scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        state = [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        runs.append(([p.detach() for p in model.parameters()], state, scaler.get_scale()))
    (params, state, scale), (mparams, mstate, mscale) = runs
    assert scale == mscale == 2.0
    for a, b in zip(params + state, mparams + mstate):
        assert torch.equal(a, b)


def _half_done_then_raise(gm: torch.fx.GraphModule) -> passes.PassResult:
    """A buggy pass: rewrites part of the graph, then fails."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.sin:
            node.target = torch.cos
    raise RuntimeError("a bug in the pass")


BROKEN = passes.GraphPass("half_done_pass", 1, _half_done_then_raise)


def test_a_failing_pass_is_undone_and_skipped_with_one_warning(caplog):
    def fn(x):
        return torch.sin(x) * 2

    x = torch.randn(4)
    gm = torch.fx.symbolic_trace(fn)
    with caplog.at_level("WARNING", logger="passes.pipeline"):
        fired = passes.run_pipeline(gm, (BROKEN, *passes.DYNAMO_PASSES))
        passes.run_pipeline(torch.fx.symbolic_trace(fn), (BROKEN,))
    assert fired == []
    assert torch.equal(gm(x), fn(x))  # not the half-rewritten cos
    warnings = [r.getMessage() for r in caplog.records if "half_done_pass" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert "RuntimeError: a bug in the pass" in warnings[0]


def _sin_to_tanh(gm: torch.fx.GraphModule) -> passes.PassResult:
    rewritten = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.sin:
            node.target = torch.tanh
            rewritten += 1
    return passes.PassResult(gm, bool(rewritten))


SIN_TO_TANH = passes.GraphPass("sin_to_tanh", 1, _sin_to_tanh)
NOTHING = passes.GraphPass("nothing", 1, lambda gm: passes.PassResult(gm, False))


def test_a_failing_pass_is_undone_back_to_the_passes_before_it(monkeypatch):
    """The graph goes back to where the last good pass left it, not to the start; and
    it is copied only when a pass changed it since the last copy (once for passes that
    change nothing), each copy being a walk over every node of a large graph."""
    def fn(x):
        return torch.sin(x) * 2

    copies = []
    copy_graph = passes.pipeline.copy_graph
    monkeypatch.setattr(passes.pipeline, "copy_graph",
                        lambda graph: copies.append(1) or copy_graph(graph))
    x = torch.randn(4)
    gm = torch.fx.symbolic_trace(fn)
    assert passes.run_pipeline(gm, (NOTHING, NOTHING, NOTHING)) == []
    assert len(copies) == 1
    copies.clear()
    fired = passes.run_pipeline(gm, (NOTHING, SIN_TO_TANH, NOTHING, BROKEN, NOTHING))
    assert fired == ["sin_to_tanh"]
    assert len(copies) == 3  # at the start, after sin_to_tanh changed it, after the undo
    assert torch.equal(gm(x), torch.tanh(x) * 2)  # sin_to_tanh kept, the half-done cos not


def test_augmented_assignment_patch_is_in_force_only_while_our_calls_run():
    from torch._dynamo import symbolic_convert

    stock = symbolic_convert.InstructionTranslatorBase.INPLACE_SUBTRACT
    assert stock in symbolic_convert._binary_op_lookup
    with dynamo_scope.backend_ctx():
        assert stock not in symbolic_convert._binary_op_lookup
    assert stock in symbolic_convert._binary_op_lookup
