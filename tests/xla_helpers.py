"""Shared helpers for tests that train on the XLA device and compare with eager CPU."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch_xla
import torch_xla.core.xla_model as xm

from xla_backend import testing


def settle() -> None:
    """Finishes all queued device work so counters and timings are complete."""
    torch_xla.sync()
    xm.wait_device_ops()


@dataclass
class Counts:
    compiles: int
    transfers_to_host: int
    executions: int
    dynamo_graphs: int  # graphs Dynamo traced: a recompile or a new frame


class MetricWindow:
    """torch_xla's counters over a window of steps, measured as deltas."""

    def __enter__(self) -> MetricWindow:
        settle()
        self._start = self._read()
        return self

    def __exit__(self, *exc: Any) -> None:
        settle()
        end = self._read()
        self.counts = Counts(*(e - s for e, s in zip(end, self._start)))

    @staticmethod
    def _read() -> tuple[int, int, int, int]:
        now = testing.snapshot()
        return (now.compiles, now.syncs, now.executions, now.dynamo_graphs)


def warm_then_measure(one: Callable[[int], None], warmup: int, steps: int) -> MetricWindow:
    """Runs steps ``0..warmup-1``, then the rest under a metric window, and settles."""
    for i in range(warmup):
        one(i)
    with MetricWindow() as window:
        for i in range(warmup, steps):
            one(i)
    settle()
    return window


def twin(model: torch.nn.Module, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The same initial weights twice: one copy on the XLA device, one on the CPU."""
    reference = copy.deepcopy(model)
    return model.to(device), reference


def assert_same_state(model: torch.nn.Module, reference: torch.nn.Module, rtol: float) -> None:
    """Each parameter and buffer matches as a tensor: ||got - want|| <= rtol * ||want||.

    Per tensor, not per element: Adam rescales every gradient to a unit step, so an
    element whose gradient is rounding noise (attention's key bias has an exactly zero
    gradient in exact arithmetic) moves by a full step in a direction no two float32
    implementations share. The elementwise bound ``10 * rtol`` still catches any
    localized error.
    """
    pairs = [(f"parameter {n}", p, q) for (n, p), q in
             zip(model.named_parameters(), reference.parameters())]
    pairs += [(f"buffer {n}", b, c) for (n, b), c in
              zip(model.named_buffers(), reference.buffers())]
    for name, got, want in pairs:
        got, want = got.detach().cpu(), want.detach()
        if not want.dtype.is_floating_point:
            assert torch.equal(got, want), f"{name} differs"
            continue
        scale = max(float(want.norm()), 1e-12)
        error = float((got - want).norm()) / scale
        assert error <= rtol, f"{name}: relative error {error:.3g} > {rtol}"
        worst = float((got - want).abs().max())
        assert worst <= 10 * rtol * max(float(want.abs().max()), 1.0), (
            f"{name}: an element is off by {worst:.3g}")


def train_both(step: Callable, compiled_args: Callable[[int], tuple],
               eager_args: Callable[[int], tuple], steps: int) -> tuple[list, list]:
    """Runs the compiled step and the eager step side by side; returns both loss lists."""
    compiled = torch.compile(step, backend="syncfree_xla")
    got, want = [], []
    for i in range(steps):
        got.append(compiled(*compiled_args(i)))
        want.append(step(*eager_args(i)))
    settle()
    return [g.cpu() for g in got], want


def assert_same_optimizer_state(opt: torch.optim.Optimizer, reference: torch.optim.Optimizer,
                                rtol: float, host_steps: bool = True,
                                group_overrides: dict[str, Any] | None = None) -> None:
    """``state_dict()`` of both optimizers agree: every group's settings, every state entry.

    Tensors compare as in :func:`assert_same_state`. With ``host_steps``, step counters
    must be on the host, where eager torch keeps them for a non-capturable optimizer,
    so a checkpoint of the compiled run loads where an eager one would (ASGD keeps its
    counter on the parameter's device even eagerly). ``group_overrides`` are settings
    the reference could not share (``capturable=True``, which torch runs on accelerators
    only): the reference's groups are compared as if they had them.
    """
    got, want = opt.state_dict(), reference.state_dict()
    want_groups = [{**g, **(group_overrides or {})} for g in want["param_groups"]]
    assert got["param_groups"] == want_groups
    assert got["state"].keys() == want["state"].keys()
    for index, entries in want["state"].items():
        assert got["state"][index].keys() == entries.keys(), index
        for key, value in entries.items():
            mine = got["state"][index][key]
            where = f"state[{index}][{key!r}]"
            if not isinstance(value, torch.Tensor):
                assert mine == value, f"{where}: {mine!r} != {value!r}"
                continue
            want_host = host_steps and value.dim() == 0 and key == "step"
            assert not want_host or mine.device.type == "cpu", f"{where} is on {mine.device}"
            mine = mine.detach().cpu()
            assert mine.dtype == value.dtype, f"{where}: {mine.dtype} != {value.dtype}"
            scale = max(float(value.double().norm()), 1e-12)
            error = float((mine.double() - value.double()).norm()) / scale
            assert error <= rtol, f"{where}: relative error {error:.3g} > {rtol}"
