"""NaN and inf semantics: the ``nan_semantics`` rewrite, and compiled ops vs eager.

The unit tests trace functions with make_fx on CPU (fake tensors, as AOTAutograd does),
run the rewrite and check that the rewritten graph computes what the original does on
inputs full of NaN and inf; they need no XLA. The tests taking the ``xla`` fixture
compile through the backend and compare with eager on the CPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
from torch.fx.experimental.proxy_tensor import make_fx

from xla_backend import device
from xla_backend.rewrites.nan_semantics import NAN_SEMANTICS

NAN, INF = float("nan"), float("inf")
aten = torch.ops.aten


def _x(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """NaN, +-inf and ties, at different places in each row and column."""
    return torch.tensor([[1.0, NAN, INF, 3.0, NAN],
                         [-INF, 2.0, NAN, 2.0, -1.0],
                         [0.5, -2.0, 4.0, 4.0, -INF]], dtype=dtype)


CASES: dict[str, Callable[..., Any]] = {
    "argmax": lambda t: t.argmax(1),
    "argmax-dim0": lambda t: t.argmax(0),
    "argmax-keepdim": lambda t: t.argmax(1, keepdim=True),
    "argmax-all": lambda t: t.argmax(),
    "argmax-all-keepdim": lambda t: torch.argmax(t, keepdim=True),
    "argmin": lambda t: t.argmin(-1),
    "argmin-all": lambda t: t.argmin(),
    "max-dim": lambda t: t.max(1),
    "min-dim-keepdim": lambda t: t.min(0, keepdim=True),
    "max-dim-indices-only": lambda t: t.max(1)[1] + 1,
    "clamp": lambda t: t.clamp(-2.0, 2.0),
    "clamp-min": lambda t: t.clamp(min=0.0),
    "clamp-max": lambda t: t.clamp(max=0),
    "clamp-inverted-bounds": lambda t: t.clamp(3.0, 1.0),
    "clamp_min": lambda t: torch.clamp_min(t, -1.0),
    "clamp_max": lambda t: torch.clamp_max(t, 1.5),
    "clip": lambda t: t.clip(min=-0.5),
    "clamp-tensor": lambda t: t.clamp(t.flip(0), t.flip(1) + 1),
    "clamp-tensor-min": lambda t: t.clamp(min=t.flip(1)),
    "clamp-tensor-max-broadcast": lambda t: t.clamp(max=t[0]),
    "clamp_min-tensor": lambda t: torch.clamp_min(t, t.flip(0)),
    "clamp-0d": lambda t: t[0, 2].clamp(min=0.0),
}


def _traced(fn: Callable[..., Any], *inputs: torch.Tensor) -> torch.fx.GraphModule:
    return make_fx(fn, tracing_mode="fake")(*inputs)


def _assert_same(got: Any, want: Any) -> None:
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, (got, want)
        torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)
    else:
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _assert_same(g, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_rewritten_graph_computes_what_eager_does(case, dtype):
    x = _x(dtype)
    gm = _traced(CASES[case], x)
    want = gm(x)
    assert NAN_SEMANTICS(gm).modified
    for node in gm.graph.nodes:
        if node.op == "call_function":
            assert "val" in node.meta, node
    _assert_same(gm(x), want)
    _assert_same(gm(x), CASES[case](x))


def test_clamp_becomes_maximum_and_minimum():
    gm = _traced(lambda t: (t.clamp(min=0.0), t.clamp(-1.0, 1.0)), _x())
    NAN_SEMANTICS(gm)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert aten.clamp.default not in targets
    assert targets.count(aten.maximum.default) == 2
    assert targets.count(aten.minimum.default) == 1


@pytest.mark.parametrize("fn", [
    lambda t: t.argmax(0),                     # integers have no NaN
    lambda t: t.clamp(min=0),
    lambda t: t.max(0),
], ids=["argmax", "clamp", "max-dim"])
def test_integer_inputs_are_left_alone(fn):
    gm = _traced(fn, torch.tensor([[3, -1], [2, 5]]))
    before = gm.code
    assert not NAN_SEMANTICS(gm).modified
    assert gm.code == before


@pytest.mark.parametrize("fn", [
    lambda t: t[0, 0].argmax(),                # a 0-d tensor has only index 0
    lambda t: t.clamp(min=NAN),                # eager ignores a NaN scalar bound alone...
    lambda t: t.clamp(NAN, 1.0),               # ...and not next to another bound
    lambda t: t.clamp(min=t.double()).float(),  # mixed dtypes: clamp's own promotion
    lambda t: t.max(),                         # NaN-propagating with the XLA flag
], ids=["argmax-0d", "nan-scalar-bound", "nan-scalar-bound-two", "mixed-dtypes", "max-all"])
def test_cases_eager_agrees_with_torch_xla_on_are_left_alone(fn):
    x = _x()
    gm = _traced(fn, x)
    assert not NAN_SEMANTICS(gm).modified
    _assert_same(gm(x), fn(x))


def test_a_bound_read_from_a_tensor_is_left_alone():
    """A clamp bound that is a symbolic number (``s.item()``), not a tensor: the rewrite
    has no dtype to build a bound of, so clamp keeps it (it raised, and the pass was
    skipped with a "please report this" warning)."""
    def fn(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return t.clamp(min=-s.item(), max=s.item())

    x, s = _x(), torch.tensor(2.0)
    gm = make_fx(fn, tracing_mode="symbolic")(x, s)
    assert not NAN_SEMANTICS(gm).modified
    _assert_same(gm(x, s), fn(x, s))


def test_configure_pjrt_adds_the_cpu_flags_without_clobbering(monkeypatch):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    device.configure_pjrt()
    assert os.environ["XLA_FLAGS"] == ("--xla_dump_to=/tmp/x --xla_cpu_enable_fast_min_max=false"
                                       " --xla_multiheap_size_constraint_per_heap=16777216"
                                       " --xla_cpu_copy_insertion_use_region_analysis=true")
    device.configure_pjrt()  # idempotent
    assert os.environ["XLA_FLAGS"].count("fast_min_max") == 1
    assert os.environ["XLA_FLAGS"].count("multiheap") == 1
    assert os.environ["XLA_FLAGS"].count("region_analysis") == 1

    user = ("--xla_cpu_enable_fast_min_max=true --xla_multiheap_size_constraint_per_heap=-1 "
            "--xla_cpu_copy_insertion_use_region_analysis=false")
    monkeypatch.setenv("XLA_FLAGS", user)
    device.configure_pjrt()  # the user's choices win
    assert os.environ["XLA_FLAGS"] == user

    monkeypatch.delenv("XLA_FLAGS")
    device.configure_pjrt()
    assert os.environ["XLA_FLAGS"] == " ".join(device.CPU_FLAGS)

    monkeypatch.setenv("PJRT_DEVICE", "TPU")  # CPU-only flags
    monkeypatch.delenv("XLA_FLAGS")
    device.configure_pjrt()
    assert "XLA_FLAGS" not in os.environ


def test_configure_pjrt_warns_when_the_runtime_started_first(xla, monkeypatch, caplog):
    monkeypatch.setenv("PJRT_DEVICE", "CPU")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    torch.ones(1, device=xla).cpu()  # the runtime is up, with the flags it started with
    with caplog.at_level(logging.WARNING, logger="xla_backend.device"):
        device.configure_pjrt()
    assert [r.message for r in caplog.records if "cannot take effect" in r.message]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="xla_backend.device"):
        device.configure_pjrt()  # the flag is in XLA_FLAGS now: nothing more to say
    assert not caplog.records


# --- compiled on XLA vs eager ---------------------------------------------------------

COMPILED = {**CASES,
            "amax": lambda t: t.amax(1),
            "max": lambda t: t.max(),
            "min": lambda t: t.min(),
            "maximum": lambda t: torch.maximum(t, t.flip(0)),
            "minimum-scalar": lambda t: torch.minimum(t, torch.tensor(0.0, device=t.device))}


@pytest.mark.parametrize("case", sorted(COMPILED))
def test_compiled_like_eager_with_nan_and_inf(xla, case):
    fn = COMPILED[case]
    x = _x()
    torch._dynamo.reset()
    want = fn(x)
    got = torch.compile(fn, backend="syncfree_xla")(x.to(xla))
    got = got.cpu() if isinstance(got, torch.Tensor) else type(got)(g.cpu() for g in got)
    _assert_same(got, want)


def test_compiled_bfloat16_like_eager(xla):
    x = _x(torch.bfloat16)

    def fn(t):
        return t.argmax(0), t.max(1), t.clamp(min=0.1), t.clamp(max=t.flip(0))

    torch._dynamo.reset()
    want = fn(x)
    got = torch.compile(fn, backend="syncfree_xla")(x.to(xla))
    got = (got[0].cpu(), tuple(g.cpu() for g in got[1]), got[2].cpu(), got[3].cpu())
    _assert_same(got, want)
