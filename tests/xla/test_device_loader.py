"""DeviceLoader: order, nested moves, errors with their traceback, shutdown that never hangs.

Shutdown scenarios run in subprocesses with a timeout, so a hang fails the test instead of
the whole run. Most of them move to the CPU device: they exercise threads and stop logic,
not transfers, and skipping torch_xla's import keeps them fast; one runs on XLA to check
that exiting with workers mid-transfer does not crash the interpreter.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from typing import Any, Iterator, NamedTuple

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from xla_backend import counters
from xla_backend.runtime import device_loader as device_loader_module
from xla_backend.runtime.device_loader import DeviceLoader, move_to_device

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUBPROCESS_TIMEOUT = 60


@pytest.fixture(scope="module")
def xla_device() -> torch.device:
    import torch_xla

    return torch_xla.device()


def _loader_threads(loader: DeviceLoader[Any] | None = None) -> list[threading.Thread]:
    prefix = f"{loader._name}-" if loader is not None else "DeviceLoader-"
    return [t for t in threading.enumerate() if t.name.startswith(prefix)]


def _wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def _slow_numbers(count: int, max_delay: float, seed: int) -> Iterator[torch.Tensor]:
    rng = random.Random(seed)
    for i in range(count):
        time.sleep(rng.uniform(0, max_delay))
        yield torch.full((3,), float(i))


# ----------------------------------------------------------------------------- order


@pytest.mark.parametrize("threads", [1, 3])
def test_order_preserved_with_random_production_and_transfer_times(
    threads: int, xla_device: torch.device, monkeypatch: pytest.MonkeyPatch
) -> None:
    completed: list[int] = []
    lock = threading.Lock()
    real_move = device_loader_module.move_to_device

    def uneven_move(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
        index = int(batch[0])
        # Every third batch transfers slowly, so later batches overtake it on other threads.
        time.sleep(0.02 if index % 3 == 0 else random.uniform(0, 0.002))
        moved = real_move(batch, device)
        with lock:
            completed.append(index)
        return moved

    monkeypatch.setattr(device_loader_module, "move_to_device", uneven_move)
    count = 24
    loader = DeviceLoader(_slow_numbers(count, 0.003, seed=threads), prefetch=4, threads=threads)
    assert loader.threads == threads

    got = [batch for batch in loader]

    assert [int(b.cpu()[0]) for b in got] == list(range(count))
    assert all(b.device == xla_device for b in got)
    if threads > 1:
        assert completed != sorted(completed), "no batch overtook another: reordering untested"
    assert _wait_for(lambda: not _loader_threads())


def test_default_device_is_xla_and_threads_are_capped_by_prefetch(xla_device: torch.device):
    loader = DeviceLoader([torch.ones(2)], prefetch=2, threads=5)
    assert loader.device == xla_device
    assert loader.threads == 2
    assert DeviceLoader([], prefetch=1).threads == 1
    assert DeviceLoader([], prefetch=4).threads == 2


# ----------------------------------------------------------------------------- moving


class Pair(NamedTuple):
    features: torch.Tensor
    label: int


@dataclasses.dataclass
class Sample:
    image: torch.Tensor
    name: str
    extra: Any = None


@dataclasses.dataclass(frozen=True)
class Frozen:
    value: torch.Tensor


def test_nested_structures_moved_and_non_tensors_untouched(xla_device: torch.device) -> None:
    shared = torch.randn(4)
    meta = {"source": "disk", "ids": [1, 2, 3]}
    label = "cat"
    opaque = object()
    counts = collections.defaultdict(list, {"a": torch.arange(3)})
    batch = {
        "x": torch.randn(2, 3),
        "pair": Pair(torch.arange(5), 7),
        "nested": (shared, [shared, label, 3.5, None], {"deep": (torch.tensor(1.0),)}),
        "sample": Sample(torch.randn(2, 2), label, extra={"mask": torch.tensor([True, False])}),
        "frozen": Frozen(torch.tensor([2.0])),
        "counts": counts,
        "meta": meta,
        "opaque": opaque,
    }

    moved = next(iter(DeviceLoader([batch])))

    def check(original: Any, result: Any) -> None:
        if isinstance(original, torch.Tensor):
            assert result.device == xla_device
            assert original.device.type == "cpu"  # the source batch is left alone
            assert torch.equal(result.cpu(), original)
        elif isinstance(original, (list, tuple)):
            assert type(result) is type(original) and len(result) == len(original)
            for a, b in zip(original, result):
                check(a, b)
        elif isinstance(original, dict):
            assert type(result) is type(original) and list(result) == list(original)
            for key in original:
                check(original[key], result[key])
        elif dataclasses.is_dataclass(original):
            assert type(result) is type(original)
            for field in dataclasses.fields(original):
                check(getattr(original, field.name), getattr(result, field.name))
        else:
            assert result is original

    check(batch, moved)
    assert isinstance(moved["pair"], Pair) and moved["pair"].label == 7
    assert moved["counts"].default_factory is list
    # A tensor that appears twice is moved once: aliasing survives.
    assert moved["nested"][0] is moved["nested"][1][0]
    # Containers without tensors are passed through as the same objects.
    assert moved["meta"] is meta and moved["opaque"] is opaque
    assert moved["sample"].name is label


def test_non_tensor_batches_pass_through() -> None:
    items = ["a", 1, None, {"k": "v"}, (1, 2)]
    got = list(DeviceLoader(items, device="cpu"))
    assert got == items
    assert all(a is b for a, b in zip(got, items))


def test_move_to_device_direct(xla_device: torch.device) -> None:
    value = torch.arange(6).reshape(2, 3)
    moved = move_to_device([value, {"v": value}], xla_device)
    assert moved[0] is moved[1]["v"]
    assert torch.equal(moved[0].cpu(), value)


# ----------------------------------------------------------------------------- errors


class BatchError(RuntimeError):
    pass


def _explode_while_reading(index: int) -> None:
    raise BatchError(f"cannot read batch {index}")


def _failing_source(good: int) -> Iterator[torch.Tensor]:
    for i in range(good):
        yield torch.full((2,), float(i))
    _explode_while_reading(good)


@pytest.mark.parametrize("threads", [1, 2])
def test_worker_exception_reaches_consumer_with_its_traceback(threads: int) -> None:
    baseline = threading.active_count()
    it = iter(DeviceLoader(_failing_source(3), prefetch=2, threads=threads))
    got = [int(next(it).cpu()[0]) for _ in range(3)]
    assert got == [0, 1, 2]  # batches before the failure still arrive, in order

    with pytest.raises(BatchError, match="cannot read batch 3") as excinfo:
        next(it)

    formatted = "".join(traceback.format_exception(excinfo.value))
    assert "_explode_while_reading" in formatted
    assert "_failing_source" in formatted
    assert "_work" in formatted  # the worker thread's frame, not a re-wrapped copy
    with pytest.raises(StopIteration):
        next(it)  # the pass is over
    assert _wait_for(lambda: threading.active_count() <= baseline)


def test_transfer_exception_is_the_original_object(monkeypatch: pytest.MonkeyPatch) -> None:
    error = ValueError("transfer failed")

    def bad_move(batch: Any, device: torch.device) -> Any:
        if batch == 2:
            raise error
        return batch

    monkeypatch.setattr(device_loader_module, "move_to_device", bad_move)
    it = iter(DeviceLoader(range(10), prefetch=3, threads=3, device="cpu"))
    assert [next(it), next(it)] == [0, 1]
    with pytest.raises(ValueError) as excinfo:
        next(it)
    assert excinfo.value is error
    assert "bad_move" in "".join(traceback.format_exception(excinfo.value))


# ----------------------------------------------------------------------------- lifecycle


def test_garbage_collected_half_consumed_iterator_stops_threads() -> None:
    gc.collect()
    assert _wait_for(lambda: not _loader_threads())
    baseline = threading.active_count()

    def endless() -> Iterator[torch.Tensor]:
        i = 0
        while True:
            yield torch.full((2,), float(i))
            i += 1

    it = iter(DeviceLoader(endless(), prefetch=3, threads=2, device="cpu"))
    for _ in range(5):
        next(it)
    assert threading.active_count() == baseline + 2
    del it
    gc.collect()
    assert _wait_for(lambda: threading.active_count() == baseline, timeout=10)
    assert not _loader_threads()


def test_context_manager_and_close_stop_threads() -> None:
    loader = DeviceLoader(range(1000), prefetch=2, device="cpu")
    with iter(loader) as it:
        assert next(it) == 0
        assert len(_loader_threads(loader)) == 2
    assert not _loader_threads(loader)  # close() joins workers that are not stuck in the loader
    with pytest.raises(StopIteration):
        next(it)
    it.close()  # idempotent


def test_close_does_not_wait_for_a_worker_stuck_in_the_loader() -> None:
    release = threading.Event()

    def hangs_after_two() -> Iterator[int]:
        yield 0
        yield 1
        release.wait()  # stands in for a loader that never returns
        yield 2

    loader = DeviceLoader(hangs_after_two(), prefetch=3, threads=3, device="cpu")
    it = iter(loader)
    assert [next(it), next(it)] == [0, 1]
    time.sleep(0.1)  # one worker is now inside next(), the others queue behind it
    started = time.monotonic()
    it.close()
    assert time.monotonic() - started < 1.5
    assert len(_loader_threads(loader)) == 1  # only the stuck reader is left, a daemon
    release.set()
    assert _wait_for(lambda: not _loader_threads(loader))  # and it leaves once unblocked
    with pytest.raises(StopIteration):
        next(it)


def test_reiterating_starts_a_new_pass_and_len_delegates() -> None:
    data = [torch.tensor([float(i)]) for i in range(5)]
    loader = DeviceLoader(data, device="cpu")
    assert len(loader) == 5
    first = [float(b) for b in loader]
    second = [float(b) for b in loader]
    assert first == second == [0.0, 1.0, 2.0, 3.0, 4.0]

    unsized = DeviceLoader(iter(data), device="cpu")
    with pytest.raises(TypeError):
        len(unsized)
    assert unsized  # truth-testing must not fall back to len()


# ----------------------------------------------------------------------------- waiting


def test_wait_time_slow_producer_is_counted() -> None:
    def slow() -> Iterator[int]:
        for i in range(6):
            time.sleep(0.05)
            yield i

    before_wait = counters.counter(counters.INPUT_WAIT_SECONDS)
    before_batches = counters.counter(counters.INPUT_BATCHES)
    loader = DeviceLoader(slow(), prefetch=2, device="cpu")
    it = iter(loader)
    assert list(it) == list(range(6))

    assert loader.wait_seconds >= 0.2  # 0.3 s of production, barely overlapped
    assert it.wait_seconds == pytest.approx(loader.wait_seconds)
    assert counters.counter(counters.INPUT_WAIT_SECONDS) - before_wait == pytest.approx(
        loader.wait_seconds
    )
    assert counters.counter(counters.INPUT_BATCHES) - before_batches == 6


def test_wait_time_fast_producer_with_prefetch_is_small(xla_device: torch.device) -> None:
    loader = DeviceLoader([torch.randn(8, 8) for _ in range(10)], prefetch=3)
    it = iter(loader)
    next(it)  # the first batch always waits for its transfer
    after_first = loader.wait_seconds
    for _ in it:
        time.sleep(0.03)  # the "training step"; the next batch is moved meanwhile
    rest = loader.wait_seconds - after_first
    assert rest < 0.1, f"consumer waited {rest:.3f}s for batches that were prefetched"
    assert it.batches == 10


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"prefetch": 0}, ["prefetch=0", "int >= 1"]),
        ({"prefetch": -2}, ["prefetch=-2", "int >= 1"]),
        ({"prefetch": 1.5}, ["prefetch=1.5", "int >= 1"]),
        ({"prefetch": True}, ["prefetch=True", "int >= 1"]),
        ({"prefetch": "2"}, ["prefetch='2'", "int >= 1"]),
        ({"threads": 0}, ["threads=0", "None", "int >= 1"]),
        ({"threads": 2.0}, ["threads=2.0", "int >= 1"]),
        ({"device": "not-a-device"}, ["device='not-a-device'", "torch.device"]),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ValueError) as excinfo:
        DeviceLoader([1, 2], **kwargs)
    for fragment in fragments:
        assert fragment in str(excinfo.value)


@pytest.mark.parametrize("bad", [5, None, "abc"])
def test_loader_must_be_iterable(bad: Any) -> None:
    with pytest.raises(ValueError, match="loader must be an iterable") as excinfo:
        DeviceLoader(bad, device="cpu")
    assert type(bad).__name__ in str(excinfo.value)


# ----------------------------------------------------------------------------- DataLoader


def test_real_dataloader_over_tensor_dataset(xla_device: torch.device) -> None:
    features = torch.randn(22, 3)
    targets = torch.arange(22)
    data = DataLoader(TensorDataset(features, targets), batch_size=4)
    loader = DeviceLoader(data, prefetch=2, threads=2)
    assert len(loader) == 6

    for _ in range(2):  # a second epoch is a new pass
        seen_x, seen_y = [], []
        for x, y in loader:
            assert x.device == xla_device and y.device == xla_device
            seen_x.append(x.cpu())
            seen_y.append(y.cpu())
        assert torch.equal(torch.cat(seen_x), features)
        assert torch.equal(torch.cat(seen_y), targets)


# ----------------------------------------------------------------------------- subprocesses

_PRELUDE = """
import atexit, gc, sys, threading, time
import torch
from xla_backend.runtime.device_loader import DeviceLoader

marks = {}

def report():
    # Registered before any loader exists, so it runs after the loader's exit hook.
    if "start" in marks:
        sys.stdout.write(f"shutdown_seconds={time.monotonic() - marks['start']:.3f}\\n")
        sys.stdout.flush()

atexit.register(report)

def blocks_after(n):
    for i in range(n):
        yield torch.full((4,), float(i))
    threading.Event().wait()  # a loader that hangs forever

def endless(shape=(4,)):
    i = 0
    while True:
        yield torch.full(shape, float(i))
        i += 1
"""

_SCENARIOS = {
    "early_break": """
for i, batch in enumerate(DeviceLoader(blocks_after(3), prefetch=2, threads=2, device="cpu")):
    assert float(batch[0]) == i
    if i == 2:  # a worker is (or soon will be) stuck in the loader's next()
        marks["start"] = time.monotonic()
        break
""",
    "gc": """
it = iter(DeviceLoader(blocks_after(2), prefetch=2, threads=2, device="cpu"))
next(it), next(it)
time.sleep(0.1)  # a worker is stuck in the loader's next()
marks["start"] = time.monotonic()
del it
gc.collect()
""",
    "close_and_with": """
it = iter(DeviceLoader(blocks_after(2), prefetch=3, threads=3, device="cpu"))
next(it), next(it)
time.sleep(0.1)  # one worker is stuck in the loader's next(), two queue behind it
marks["start"] = time.monotonic()
it.close()
assert time.monotonic() - marks["start"] < 2, "close() waited for the stuck worker"
with iter(DeviceLoader(blocks_after(1), prefetch=2, device="cpu")) as it:
    next(it)  # the second next() would block forever in the loader
assert time.monotonic() - marks["start"] < 4, "leaving the with block hung"
""",
    # Interpreter exit with iterators left open: one whose worker is stuck in the loader
    # after its last batch, one whose workers are busy moving large tensors to XLA.
    "exit_mid_transfer_xla": """
stuck = iter(DeviceLoader(blocks_after(2), prefetch=2))
busy = iter(DeviceLoader(endless((1024, 1024)), prefetch=4, threads=3))
got = [next(stuck) for _ in range(2)]
assert [b.device.type for b in got] == ["xla", "xla"]
assert [float(b.cpu()[0]) for b in got] == [0.0, 1.0]
for _ in range(3):
    next(busy)
marks["start"] = time.monotonic()
""",
}


@pytest.mark.parametrize("scenario", sorted(_SCENARIOS))
def test_shutdown_never_hangs(scenario: str) -> None:
    script = textwrap.dedent(_PRELUDE) + textwrap.dedent(_SCENARIOS[scenario])
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,  # a hang fails here instead of stalling the run
    )
    assert result.returncode == 0, f"{scenario}: exit {result.returncode}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("shutdown_seconds=")]
    assert lines, result.stdout + result.stderr
    shutdown = float(lines[0].split("=")[1])
    assert shutdown < 5.0, f"{scenario}: shutting down took {shutdown:.1f}s"
