"""The runtime under concurrency: threads, background compiles, interrupts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback

import pytest
import torch

import xla_backend
from tests.xla_helpers import settle
from xla_backend import xla_internals, xla_metrics


def _mlp(x, w1, w2):
    return torch.tanh(x @ w1) @ w2


def test_one_compiled_function_called_from_four_threads(xla):
    f = torch.compile(_mlp, backend="syncfree_xla")
    w1, w2 = torch.randn(16, 32), torch.randn(32, 4)
    inputs = [torch.randn(8, 16) for _ in range(4)]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    f(inputs[0].to(xla), w1.to(xla), w2.to(xla))  # Dynamo's first compile happens once

    def worker(k: int) -> None:
        try:
            for _ in range(5):
                out = f(inputs[k].to(xla), w1.to(xla), w2.to(xla))
            results[k] = out.cpu()
        except BaseException as exc:  # reported below, with its traceback
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for k in range(4):
        torch.testing.assert_close(results[k], _mlp(inputs[k], w1, w2), rtol=1e-5, atol=1e-5)


def test_same_computation_from_two_threads_compiles_once(xla):
    def g(x):
        return (x.sin() * 3).cumsum(0)

    x = torch.randn(64, device=xla)
    settle()
    before = xla_metrics.compiles()
    outs: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: outs.append(
        torch.compile(g, backend="syncfree_xla", options={"cache": False})(x).cpu()))
        for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    settle()
    assert len(outs) == 2
    assert xla_metrics.compiles() - before == 1
    torch.testing.assert_close(outs[0], g(x.cpu()))


def _failing_compile(tensors):
    raise RuntimeError("injected compile failure")


def test_background_compile_error_reaches_the_caller_with_its_traceback(xla, monkeypatch):
    monkeypatch.setattr(xla_internals, "compile", _failing_compile)
    f = torch.compile(lambda x: x.exp() + 7, backend="syncfree_xla", options={"cache": False})
    with pytest.raises(Exception, match="injected compile failure") as info:
        f(torch.randn(5, device=xla))
    frames = "".join(traceback.format_exception(info.value))
    assert "_failing_compile" in frames, "the worker's frame is in the traceback"
    assert xla_backend.stats().get("compile_seconds", 0) == 0


INTERRUPTED_LOOP = textwrap.dedent("""
    import sys, torch, torch_xla
    from xla_backend.tools import workloads
    device = torch_xla.device()
    work = workloads.get_workload("mlp")
    model = work.build_model().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    step = torch.compile(workloads.train_step, backend="syncfree_xla")
    i = 0
    while True:
        step(model, opt, *work.make_batch(i % 4, device))
        i += 1
        if i == 5:
            print("training", flush=True)
""")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_a_training_loop_promptly():
    # A job started in the background of a non-interactive shell inherits SIGINT ignored,
    # and so would the loop, whatever the backend does: it starts with the default.
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_LOOP], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    try:
        assert proc.stdout.readline().strip() == "training"
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert time.monotonic() - started < 10
    assert "KeyboardInterrupt" in err


def test_ctrl_c_that_lands_in_a_dynamo_guard_still_interrupts(xla, monkeypatch):
    """torch 2.9 clears any exception a Python guard raises and recompiles the frame, so
    Python's own handler would lose this KeyboardInterrupt (the loop above then trains
    on; it did in about one run in thirty under load). SIGINT arrives here while every
    frame's saved-tensors-hooks guard runs."""
    hooks_module = torch._functorch._aot_autograd.utils
    top_hooks, pressed = hooks_module.top_saved_tensors_hooks, []

    def top_hooks_while_ctrl_c_is_pressed():
        if pressed:
            pressed.pop()
            signal.raise_signal(signal.SIGINT)
        return top_hooks()

    monkeypatch.setattr(hooks_module, "top_saved_tensors_hooks", top_hooks_while_ctrl_c_is_pressed)
    # Python's own handler, as in a terminal (a job started in the background ignores SIGINT)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        f = torch.compile(lambda x: torch.tanh(x) * 2, backend="syncfree_xla")
        x = torch.ones(3, device=xla)
        f(x)  # compiles; the frame's guard now calls the function above
        received = xla_backend.stats()["graphs_received"]
        pressed.append(True)
        with pytest.raises(KeyboardInterrupt):
            f(x)
    finally:
        signal.signal(signal.SIGINT, handler)
    assert not pressed, "the guard ran with Ctrl-C pressed"
    assert torch.equal(f(x).cpu(), torch.tanh(torch.ones(3)) * 2)
    assert xla_backend.stats()["graphs_received"] == received, "the frame recompiled"


def test_stats_report_waiting_and_how_far_the_host_ran_ahead(xla):
    # ~4 GFLOP a call: the device is still busy when the host counts what is in flight,
    # even with another process on the cores (a 256 x 256 one sometimes finished first)
    f = torch.compile(lambda x: torch.tanh(x @ x) @ x, backend="syncfree_xla")
    x = torch.randn(1024, 1024, device=xla)
    for _ in range(10):
        x = f(x) / 1024
    settle()
    s = xla_backend.stats()
    assert s["compile_seconds"] > 0
    assert s["dispatch_wait_seconds"] >= 0
    assert s["queue_depth_max"] >= 1, "ten asynchronous calls left at least one in flight"


def test_a_graph_traced_on_one_buffer_passed_twice_reads_two_inputs(xla):
    """A graph traced on real inputs runs on their own buffers (``executable.standins``),
    and torch_xla makes one computation parameter of one buffer: the second input on
    the same buffer needs a buffer of its own, or the computation would read one
    parameter for both, and a later call with two tensors get ``x * 2 + x``."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from xla_backend.runtime.graph import LoweredGraph

    def fn(a, b):
        return (a * 2 + b,)

    gm = make_fx(fn, tracing_mode="fake")(torch.randn(4, device=xla), torch.randn(4, device=xla))
    x = torch.arange(4.0).to(xla)
    settle()
    lowered = LoweredGraph(gm, [x, x], "forward graph 0")  # traced now, on x and x
    y = torch.full((4,), 10.0).to(xla)
    (got,) = lowered([x, y])
    torch.testing.assert_close(got.cpu(), torch.arange(4.0) * 2 + 10)
    (same,) = lowered([x, x])
    torch.testing.assert_close(same.cpu(), torch.arange(4.0) * 3)



EVICTING_LOOP = textwrap.dedent("""
    import os, torch, torch_xla, xla_backend
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    reference = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    reference.load_state_dict(model.state_dict())
    model.to(torch_xla.device())
    def make_step(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        def step(x):
            loss = m(x).pow(2).mean(); loss.backward(); opt.step(); opt.zero_grad()
            return loss.detach()
        return step
    step, eager = torch.compile(make_step(model), backend="syncfree_xla"), make_step(reference)
    other = torch.compile(lambda t: t.sin() * 2, backend="syncfree_xla")
    for i in range(6):
        x = torch.randn(4, 8)
        got, want = step(x.to(torch_xla.device())), eager(x)
        assert torch.allclose(got.cpu(), want, rtol=1e-4), (i, got, want)
        for n in range(3):  # graphs of their own shapes push the step's graphs out
            other(torch.randn(3 + n + 3 * i, device=torch_xla.device())).cpu()
    print("trained")
""")


def test_a_graph_evicted_from_torch_xlas_computation_cache_compiles_again():
    """torch_xla keeps ``XLA_COMPILATION_CACHE_SIZE`` computations (2048 by default),
    least recently used out first; a graph run after its computation was evicted failed
    with "Failed to get computation by hash". Graphs run one by one here
    (``join_graphs`` off), as a step's first run and a graph cut around a host op do."""
    env = dict(os.environ, XLA_COMPILATION_CACHE_SIZE="2", SYNCFREE_XLA_JOIN_GRAPHS="0",
               PJRT_DEVICE="CPU")
    proc = subprocess.run([sys.executable, "-c", EVICTING_LOOP], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "trained"
