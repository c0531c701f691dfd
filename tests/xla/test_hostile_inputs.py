"""Inputs and outputs a training loop should not have to think about, but sometimes has.

Views that are not contiguous or that overlap, CPU 0-d scalars next to device tensors,
integer and boolean tensors, Python numbers and nested containers coming out: each must
give eager's result, or a clear error.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.xla_helpers import MetricWindow, settle


def _cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cpu(v) for v in value)
    return value


def assert_same(got: Any, want: Any) -> None:
    """Same structure, same types of leaves, same values (tensors: dtype and shape too)."""
    assert type(got) is type(want), f"{type(got)} != {type(want)}"
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, (got, want)
        torch.testing.assert_close(got, want, equal_nan=True)
    elif isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            assert_same(got[k], want[k])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w)
    else:
        assert got == want


def compare(fn: Callable[..., Any], make_inputs: Callable[[Any], list[Any]],
            device: torch.device) -> list[Any]:
    """``fn`` compiled on XLA inputs against eager on CPU inputs built the same way.

    Returns the XLA inputs, so a test can look at them after the call too.
    """
    want = fn(*make_inputs("cpu"))
    inputs = make_inputs(device)
    got = torch.compile(fn, backend="syncfree_xla")(*inputs)
    assert_same(_cpu(got), want)
    return inputs


# --- views as inputs -----------------------------------------------------------------

def _grid(device: Any) -> torch.Tensor:
    return torch.arange(12.0, device=device).reshape(3, 4)


VIEWS = {
    "transposed": lambda dev: _grid(dev).t(),
    "strided-slice": lambda dev: _grid(dev)[:, ::2],
    "row": lambda dev: _grid(dev)[1],
    "expanded": lambda dev: torch.arange(4.0, device=dev).expand(3, 4),
    "overlapping-as_strided": lambda dev: torch.arange(6.0, device=dev).as_strided((3, 3), (1, 1)),
    "permuted-3d": lambda dev: torch.arange(24.0, device=dev).reshape(2, 3, 4).permute(2, 0, 1),
}


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_views_as_inputs(xla, view):
    def fn(t):
        return t * 2 + 1, t.sum(0), t.cumsum(-1), t.reshape(-1)[:3], t.t() if t.dim() == 2 else t

    compare(fn, lambda dev: [VIEWS[view](dev)], xla)


def test_view_and_its_base_both_passed_in_with_an_in_place_update(xla):
    def fn(base, row):
        base.add_(1)
        return row * 2

    def make(dev):
        base = torch.ones(2, 2, device=dev)
        return [base, base[0]]

    base, row = compare(fn, make, xla)
    assert base.cpu().tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert row.cpu().tolist() == [2.0, 2.0]


def test_same_tensor_passed_twice_with_an_in_place_update(xla):
    def fn(a, b):
        a.mul_(3)
        return a + b

    def make(dev):
        t = torch.ones(3, device=dev)
        return [t, t]

    a, _ = compare(fn, make, xla)
    assert a.cpu().tolist() == [3.0, 3.0, 3.0]


@pytest.mark.parametrize("view", ["row", "transposed"])
def test_in_place_update_of_a_view_input_reaches_its_base(xla, view):
    def make(dev):
        base = _grid(dev)
        return base, (base[0] if view == "row" else base.t())

    base, sibling = make("cpu")
    (base[0] if view == "row" else base.t()).mul_(2)
    xla_base, xla_view = make(xla)
    torch.compile(lambda t: t.mul_(2), backend="syncfree_xla")(xla_view)
    assert_same(xla_base.cpu(), base)


def test_in_place_update_of_an_expanded_input_raises_like_eager(xla):
    def fn(t):
        return t.add_(1)

    with pytest.raises(RuntimeError, match="single memory location"):
        fn(torch.arange(4.0).expand(3, 4))
    with pytest.raises(Exception, match="single memory location"):
        torch.compile(fn, backend="syncfree_xla")(torch.arange(4.0, device=xla).expand(3, 4))


def test_non_contiguous_leaf_gets_the_right_gradient(xla):
    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))
    leaf = w.t().detach().requires_grad_()  # (4, 3), transposed strides
    xla_leaf = w.to(xla).t().detach().requires_grad_()

    def fn(a, b):
        return (a @ b).pow(2).sum()

    fn(x, leaf).backward()
    torch.compile(fn, backend="syncfree_xla")(x.to(xla), xla_leaf).backward()
    torch.testing.assert_close(xla_leaf.grad.cpu(), leaf.grad, rtol=1e-5, atol=1e-5)


# --- scalars, integers, booleans ---------------------------------------------------------

@pytest.mark.parametrize("scalar", [torch.tensor(2.5), torch.tensor(3), torch.tensor(True),
                                    torch.tensor(0.0), torch.tensor(1.0)],
                         ids=["float", "int", "bool", "zero", "one"])
def test_cpu_zero_dim_scalars_mixed_in(xla, scalar):
    def fn(x, s):
        return x * s + s, torch.where(x > 1, x, s), (x + s).sum()

    compare(fn, lambda dev: [torch.arange(4.0, device=dev), scalar.clone()], xla)


def test_a_changing_cpu_scalar_is_an_input_not_a_constant(xla):
    step = torch.compile(lambda x, s: x * s, backend="syncfree_xla")
    x = torch.ones(2, device=xla)
    for warm_up in (2.5, 1.5):  # the first call runs alone, the second compiles its step
        step(x, torch.tensor(warm_up))
    with MetricWindow() as window:
        results = [step(x, torch.tensor(v)).cpu().tolist() for v in (3.5, -2.0, 7.25)]
    assert results == [[3.5, 3.5], [-2.0, -2.0], [7.25, 7.25]]
    assert window.counts.compiles == 0
    assert window.counts.transfers_to_host == 3  # the .cpu() reads, nothing else


def test_a_cpu_scalar_of_zero_costs_no_extra_execution(xla):
    step = torch.compile(lambda x, s: x * s, backend="syncfree_xla")
    x = torch.ones(2, device=xla)
    step(x, torch.tensor(2.5))
    settle()
    executions = []
    for value in (3.5, 0.0):
        with MetricWindow() as window:
            step(x, torch.tensor(value))
        executions.append((window.counts.executions, window.counts.compiles))
    assert executions[1] == executions[0]


@pytest.mark.parametrize("values", [(0.0, 1.0, 5.0, 0.0), (True, False, True)],
                         ids=["float", "bool"])
def test_device_zero_dim_inputs_holding_zero_and_one(xla, values):
    # torch_xla inlines 0-d 0 and 1 as literals when tracing: they must not be baked in.
    step = torch.compile(lambda x, s: torch.where(s != 0, x * s, -x), backend="syncfree_xla")
    x = torch.arange(3.0, device=xla)
    for v in values:
        want = torch.where(torch.tensor(v) != 0, torch.arange(3.0) * v, -torch.arange(3.0))
        assert_same(step(x, torch.tensor(v, device=xla)).cpu(), want)


def test_integer_and_boolean_inputs(xla):
    def fn(index, mask, counts, x):
        return (x[index], x.masked_fill(mask, 0.0), index.sum(), mask.any(), counts * 2,
                counts // 2, mask & (counts > 0), torch.embedding(x.unsqueeze(1), index))

    compare(fn, lambda dev: [torch.tensor([2, 0, 2], device=dev),
                             torch.tensor([True, False, True], device=dev),
                             torch.tensor([3, -1, 4], device=dev),
                             torch.arange(3.0, device=dev)], xla)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int32,
                                   torch.uint8])
def test_other_dtypes(xla, dtype):
    def fn(t):
        return t * 2, t.sum(), t.max(), t.to(torch.float32).mean()

    compare(fn, lambda dev: [torch.arange(6, device=dev).to(dtype).reshape(2, 3)], xla)


def test_zero_size_inputs(xla):
    def fn(t):
        return t.sum(), t.mean(0), t * 2, t.t().shape[0], t.reshape(-1)

    compare(fn, lambda dev: [torch.zeros(0, 3, device=dev)], xla)


# --- containers and Python values ---------------------------------------------------------

def test_python_numbers_out(xla):
    def fn(t):
        return t.sum().item(), float(t.mean()) * 2, int(t.argmax()), t.shape[0], len(t)

    compare(fn, lambda dev: [torch.arange(3.0, device=dev)], xla)


def test_nested_containers_in_and_out(xla):
    def fn(batch):
        x, (y, scale) = batch["x"], batch["pair"]
        return {"sum": (x + y * scale).sum(), "parts": (x.mean(), [y.max(), 3, None]),
                "name": "loss", "shape": tuple(x.shape)}

    compare(fn, lambda dev: [{"x": torch.ones(2, device=dev),
                              "pair": [torch.full((2,), 2.0, device=dev),
                                       torch.tensor(3.0, device=dev)]}], xla)


def test_outputs_that_are_the_inputs_or_views_of_them(xla):
    def fn(t):
        return t, t.t(), t[0], t.view(-1)

    (x,) = compare(fn, lambda dev: [torch.arange(4.0, device=dev).reshape(2, 2)], xla)
    out = torch.compile(fn, backend="syncfree_xla")(x)
    assert out[0] is x


def test_cpu_tensor_inside_a_container_is_named_in_the_error(xla):
    fn = torch.compile(lambda batch: batch["x"] * 2, backend="syncfree_xla")
    with pytest.raises(Exception, match=r"DeviceMismatchError: syncfree_xla: L\['batch'\]"
                       r"\['x'\] is a cpu tensor of shape \(2, 3\)"):
        fn({"x": torch.ones(2, 3)})



@pytest.mark.parametrize("non_blocking", [False, True])
def test_a_step_that_moves_its_host_batch_itself_trains_like_eager(xla, non_blocking):
    """``x, y = x.to(device), y.to(device)`` at the top of the step: the batch comes in on
    the host, and the moves are taken out of the graph (``passes.hoist_device_moves``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    reference = copy.deepcopy(model)
    model.to(xla)
    runs = {}
    for net, device in ((model, xla), (reference, torch.device("cpu"))):
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2)

        def step(x, y, net=net, opt=opt, device=device):
            x, y = x.to(device, non_blocking=non_blocking), y.to(device=device)
            loss = torch.nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            return loss.detach()

        runs[device.type] = step
    compiled = torch.compile(runs["xla"], backend="syncfree_xla")
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g))
               for _ in range(8)]
    got = [compiled(*b) for b in batches[:4]]
    with MetricWindow() as window:
        got += [compiled(*b) for b in batches[4:]]
    want = [runs["cpu"](*b) for b in batches]
    torch.testing.assert_close(torch.stack(_cpu(got)), torch.stack(want), rtol=1e-4, atol=1e-5)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.detach().cpu(), q, rtol=1e-4, atol=1e-5)
    assert (window.counts.executions, window.counts.transfers_to_host,
            window.counts.compiles, window.counts.dynamo_graphs) == (4, 0, 0, 0), window.counts


def test_a_host_tensor_moved_with_a_new_dtype_is_still_named_in_the_error(xla):
    """Only a pure move is taken out of the graph; a cast on the way is left to the user."""
    fn = torch.compile(lambda x: x.to(xla, torch.float64) * 2, backend="syncfree_xla")
    with pytest.raises(Exception, match=r"DeviceMismatchError: syncfree_xla: L\['x'\] is a "
                       r"cpu tensor of shape \(2, 3\)"):
        fn(torch.ones(2, 3))

def test_in_place_update_of_a_leaf_that_requires_grad_raises(xla):
    fn = torch.compile(lambda t: t.add_(1), backend="syncfree_xla")
    with pytest.raises(Exception, match="a leaf Variable that requires grad is being used in "
                       "an in-place operation"):
        fn(torch.ones(3, device=xla, requires_grad=True))


@pytest.mark.parametrize("module", ["embedding", "embedding_bag"])
def test_sparse_gradients_are_refused_by_name(xla, module):
    """torch_xla has no sparse tensors: say so at compile time, naming the line."""
    layer = (torch.nn.Embedding(10, 4, sparse=True) if module == "embedding"
             else torch.nn.EmbeddingBag(10, 4, sparse=True)).to(xla)

    def step(idx):
        loss = layer(idx).sum()
        loss.backward()
        return loss

    idx = torch.tensor([[1, 2, 3]], device=xla)
    with pytest.raises(Exception, match=rf"UnsupportedOnXla: syncfree_xla: {module} with "
                                        r"sparse=True \(File .*in step\)"):
        torch.compile(step, backend="syncfree_xla")(idx)
