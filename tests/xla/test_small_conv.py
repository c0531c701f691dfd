"""The small-output convolution rewrite on the CPU client: eager's training numbers, no
convolution left in the lowered graphs, and no rewrite where the client is not CPU."""

from __future__ import annotations

import torch
import torch_xla

from tests.xla_helpers import assert_same_optimizer_state, assert_same_state, train_both, twin
from xla_backend import backend
from xla_backend.tools import workloads

aten = torch.ops.aten
torch_xla.device()  # autograd sizes its device queues at the first backward


class _Tail(torch.nn.Module):
    """A ResNet's last stage in miniature: 4x4 -> 2x2 convolutions with many channels."""

    def __init__(self) -> None:
        super().__init__()
        self.down = torch.nn.Conv2d(256, 32, 3, stride=2, padding=1)  # rewritten
        self.conv = torch.nn.Conv2d(32, 32, 3, padding=1)              # 288 values: kept
        self.wide = torch.nn.Conv2d(32 + 256, 16, 3, padding=1, bias=False)  # rewritten
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.down(x))
        y = torch.relu(self.conv(y)) + y
        skip = torch.nn.functional.avg_pool2d(x, 2)
        y = torch.relu(self.wide(torch.cat([y, skip], dim=1)))
        return self.head(y.mean(dim=(2, 3)))


def _batch(i: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i % 2)  # two batches, so that the loss falls
    x, y = torch.randn(8, 256, 4, 4, generator=g), torch.randint(0, 5, (8,), generator=g)
    return (x, y) if device is None else (x.to(device), y.to(device))


class _AtenTargets:
    """Records the aten ops of every graph the backend lowers."""

    def __init__(self) -> None:
        self.targets: list = []

    def on_dynamo_graph(self, gm, opts) -> None:
        pass

    def on_aten_graph(self, name, gm) -> None:
        self.targets += [n.target for n in gm.graph.nodes if n.op == "call_function"]

    def __enter__(self) -> _AtenTargets:
        backend.OBSERVERS.append(self)
        return self

    def __exit__(self, *exc) -> None:
        backend.OBSERVERS.remove(self)


def _convolutions(targets: list) -> int:
    return sum(t in (aten.convolution.default, aten.convolution_backward.default)
               for t in targets)


def test_training_through_rewritten_convolutions_matches_eager(xla):
    torch.manual_seed(0)
    model, reference = twin(_Tail(), xla)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=3e-3)
    with _AtenTargets() as seen:
        got, want = train_both(
            workloads.train_step,
            lambda i: (model, opt, *_batch(i, xla)),
            lambda i: (reference, ref_opt, *_batch(i)),
            steps=12,
        )
    torch.testing.assert_close(torch.stack(got), torch.stack(want), rtol=1e-4, atol=1e-5)
    assert torch.stack(want[-3:]).mean() < torch.stack(want[:3]).mean()
    assert_same_state(model, reference, rtol=1e-4)
    assert_same_optimizer_state(opt, ref_opt, rtol=1e-4)
    # Only the 32-channel convolution is left: its forward and its backward.
    assert seen.targets.count(aten.convolution.default) == 1
    assert seen.targets.count(aten.convolution_backward.default) == 1


def test_other_clients_keep_the_convolution(xla, monkeypatch):
    monkeypatch.setattr(backend, "cpu_client", lambda: False)
    torch.manual_seed(0)
    model = _Tail().to(xla)
    with _AtenTargets() as seen:
        torch.compile(model, backend="syncfree_xla")(_batch(0, xla)[0]).sum().backward()
    assert seen.targets.count(aten.convolution.default) == 3
    assert _convolutions(seen.targets) == 6
