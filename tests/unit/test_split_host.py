"""The host part of a split graph computes each distinct value once, and only those.

No XLA: device tensors are meta tensors, which ``split`` tells from the host's CPU ones
the same way.
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from xla_backend.lower.split import split

aten = torch.ops.aten


def _split(fn, *inputs):
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    return split(gm)


def _host_targets(s) -> list:
    return [n.target for n in s.host.graph.nodes if n.op == "call_function"]


def _device_inputs_from_host(s) -> int:
    return sum(kind == "host" for kind, _ in s.device_inputs)


def test_a_scalar_cast_once_per_parameter_is_cast_once():
    """A foreach optimizer casts its float64 lr to float32 once per parameter."""

    def fn(lr, a, b, c):
        scaled = lr * 0.5
        return [p * scaled.to(torch.float32) for p in (a, b, c)]

    lr = torch.tensor(0.1, dtype=torch.float64)
    params = [torch.empty(4, device="meta") for _ in range(3)]
    s = _split(fn, lr, *params)
    assert _host_targets(s).count(aten._to_copy.default) == 1
    assert _device_inputs_from_host(s) == 1
    (cast,) = s.host(lr)
    assert cast.dtype == torch.float32 and cast.item() == torch.tensor(0.05).item()


def test_values_python_calls_equal_stay_apart():
    """0.0 and -0.0, 1 and 1.0 compare equal in Python but compute different values."""

    def fn(n, x):
        return x * (n * 0.0), x * (n * -0.0), x * (n + 1), x * (n + 1.0)

    n = torch.tensor(3)
    s = _split(fn, n, torch.empty(2, device="meta"))
    assert _device_inputs_from_host(s) == 4
    zero, negative_zero, int_sum, float_sum = s.host(n)
    assert torch.signbit(negative_zero) and not torch.signbit(zero)
    assert int_sum.dtype == torch.int64 and float_sum.dtype == torch.float32


def test_random_host_values_are_drawn_each_time():
    def fn(seed_like, x):
        return x * torch.rand_like(seed_like), x * torch.rand_like(seed_like)

    s = _split(fn, torch.tensor(1.0), torch.empty(2, device="meta"))
    assert _device_inputs_from_host(s) == 2
    first, second = s.host(torch.tensor(1.0))
    assert first.item() != second.item()


def test_reads_after_an_in_place_update_are_not_merged_with_reads_before_it():
    """A CPU input read, updated in place, and read again (an optimizer's step counter)."""

    def fn(step, x):
        before = step * 2
        step.add_(1)
        after = step * 2
        return x * before, x * after

    gm = make_fx(fn, tracing_mode="fake")(torch.tensor(1.0), torch.empty(2, device="meta"))
    # make_fx reads the updated value through add_'s result; read the input itself, as
    # a graph that reads a tensor after writing it in place may
    step = next(n for n in gm.graph.nodes if n.op == "placeholder")
    updated = next(n for n in gm.graph.nodes if n.target is aten.add_.Tensor)
    for user in list(updated.users):
        user.replace_input_with(updated, step)
    s = split(gm)
    assert _device_inputs_from_host(s) == 2
    before, after = s.host(torch.tensor(1.0))
    assert (before.item(), after.item()) == (2.0, 4.0)


def test_a_graph_that_writes_into_a_value_it_computed_merges_nothing():
    """Merged, ``b`` would be the very tensor ``add_`` then changes."""

    def fn(n, x):
        a = n * 2
        b = n * 2
        a.add_(1)
        return x * a, x * b

    s = _split(fn, torch.tensor(3.0), torch.empty(2, device="meta"))
    a, b = s.host(torch.tensor(3.0))
    assert (a.item(), b.item()) == (7.0, 6.0)


def test_a_host_tensor_made_from_an_int_input_is_computed_on_the_host():
    """An lr computed from the step index at the top of a step leaves the graph as a CPU
    ``scalar_tensor``. Made in the device part, the index was a constant of the device
    computation, so every new index compiled it again; made on the host, the device
    part does not take the index at all."""

    def fn(it, x):
        return x.sin(), torch.scalar_tensor(0.01 * ((it + 1) / 100), dtype=torch.float64)

    gm = make_fx(fn, tracing_mode="symbolic")(5, torch.empty(2, device="meta"))
    s = split(gm)
    assert s.scalar_inputs == []
    assert all(kind != "scalar" for kind, _ in s.device_inputs)
    assert s.host_inputs == [0]
    (lr,) = s.host(7)
    assert lr.dtype == torch.float64 and lr.item() == 0.01 * (8 / 100)


def test_the_device_part_reads_a_host_input_as_it_was_before_the_host_part_wrote_it():
    """SWA's host counter: divided by on the device, incremented on the host in the same
    graph. The host part runs first; the device part read the incremented counter."""

    def fn(count, avg, p):
        new = avg + (p - avg) / (count.to("meta") + 1)
        count.add_(1)
        return new

    count = torch.tensor(1)
    s = _split(fn, count, torch.empty(2, device="meta"), torch.empty(2, device="meta"))
    assert ("cpu_arg", 0) not in s.device_inputs and _device_inputs_from_host(s) == 1
    (seen,) = s.host(count)
    assert (seen.item(), count.item()) == (1, 2)


def test_an_input_assigned_through_data_is_an_update_and_a_reshape_is_refused():
    """``teacher.data = teacher.data * m + student.data * (1 - m)`` (MoCo) reaches the
    split as ``set_(input, value)``: an update of that input, like ``copy_``. A ``set_``
    to another shape cannot be a rebinding of the caller's tensor and stays refused."""
    from xla_backend.lower.split import UnsplittableGraph

    def ema(teacher, student):
        teacher.set_(teacher * 0.9 + student * 0.1)
        return student.sum()

    def shrink(teacher, student):
        teacher.set_(student[:2] * 2)
        return student.sum()

    meta = [torch.empty(4, device="meta"), torch.empty(4, device="meta")]
    s = _split(ema, *meta)
    assert list(s.device_mutations) == [0]
    assert not any(n.target is aten.set_.source_Tensor for n in s.device.graph.nodes)
    with pytest.raises(UnsplittableGraph, match="set_"):
        _split(shrink, *meta)
