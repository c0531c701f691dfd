"""The backend's contract: registration, devices, options, counters, odd graphs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

import xla_backend
from tests.xla_helpers import settle
from xla_backend import options as options_mod

# The backend is the first to touch torch_xla here, so it chooses the device. A script
# that calls torch_xla.device() itself first gets torch_xla's own notice instead.
FRESH_INTERPRETER = textwrap.dedent("""
    import sys, torch
    f = torch.compile(lambda n: (torch.arange(n, device="xla") * 2.0).sum(),
                      backend="syncfree_xla")
    print(float(f(4)))
    print("xla_backend" in sys.modules)
""")


def test_entry_point_works_in_a_fresh_interpreter_without_import_or_pjrt_warning():
    env = {k: v for k, v in os.environ.items() if k != "PJRT_DEVICE"}
    env["PYTHONWARNINGS"] = "default"
    done = subprocess.run([sys.executable, "-c", FRESH_INTERPRETER], capture_output=True,
                          text=True, env=env, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["12.0", "True"]
    assert "PJRT_DEVICE" not in done.stderr, done.stderr


CPU_BACKWARD_FIRST = textwrap.dedent("""
    import torch
    w = torch.ones(3, requires_grad=True)
    (w * 2).sum().backward()  # an eager CPU reference, before torch_xla's runtime starts
    import torch_xla
    device = torch_xla.device()
    model = torch.nn.Linear(4, 2).to(device)
    step = torch.compile(lambda x: model(x).sum(), backend="syncfree_xla")
    try:
        step(torch.ones(3, 4, device=device)).backward()
    except Exception as e:
        print(str(e))
""")


def test_a_backward_before_the_runtime_started_gets_a_clear_error():
    done = subprocess.run([sys.executable, "-c", CPU_BACKWARD_FIRST], capture_output=True,
                          text=True, timeout=300, cwd="/")
    assert done.returncode == 0, done.stderr
    assert "syncfree_xla: autograd cannot run a backward on the XLA device" in done.stdout
    assert "torch_xla.device() before the first backward" in done.stdout, done.stdout
    assert "INTERNAL ASSERT" not in done.stdout + done.stderr


def test_cpu_inputs_get_a_clear_error_naming_the_argument(xla):
    model = nn.Linear(3, 2)  # forgotten: .to(torch_xla.device())
    step = torch.compile(lambda m, batch: m(batch), backend="syncfree_xla")
    with pytest.raises(Exception, match=r"DeviceMismatchError: syncfree_xla: "
                       r"L\['m'\]._parameters\['weight'\] is a cpu tensor of shape \(2, 3\)"
                       r".*\.to\(torch_xla\.device\(\)\)"):
        step(model, torch.randn(4, 3))


class _PlainAttribute(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.weights = torch.tensor([1.0, 0.5])  # not a buffer: model.to() leaves it

    def forward(self, x):
        out = self.linear(x) * self.weights.to(x.device)
        self.weights.mul_(0.9)  # used on the host too, so it is no batch to move ahead
        return out


def test_a_plain_tensor_attribute_gets_an_error_saying_register_buffer(xla):
    """``model.to(xla)`` moved the model, but not a tensor kept as a plain attribute:
    "move the model first" would send the user in a circle."""
    model = _PlainAttribute().to(xla)
    step = torch.compile(lambda m, batch: m(batch), backend="syncfree_xla")
    with pytest.raises(Exception, match=r"DeviceMismatchError: syncfree_xla: "
                       r"L\['m'\].weights is a cpu tensor of shape \(2,\) kept as a plain "
                       r"attribute.*register_buffer\(\)"):
        step(model, torch.randn(4, 3, device=xla))


LR_SCHEDULE = np.linspace(1e-3, 1e-4, 10)  # as DINO and MAE build theirs


def test_a_numpy_schedule_read_in_the_step_is_named_with_what_to_do_instead(xla):
    """Dynamo lifts the array as a CPU tensor input: the error names the array and says
    how to pass the number in, not "move the model and its inputs"."""
    def step(x: torch.Tensor, it: int) -> torch.Tensor:
        return x * float(LR_SCHEDULE[it])

    with pytest.raises(Exception, match=r"DeviceMismatchError: syncfree_xla: the compiled "
                       r"function reads a numpy array, G\['LR_SCHEDULE'\], of shape \(10,\).*"
                       r"lr=float\(lr_schedule\[it\]\)"):
        torch.compile(step, backend="syncfree_xla")(torch.ones(3, device=xla), 2)


def test_mixed_devices_fail_before_reaching_torch_xla(xla):
    # Dynamo's fake-tensor propagation rejects the op before any graph reaches a backend.
    model = nn.Linear(3, 2).to(xla)
    step = torch.compile(lambda m, batch: m(batch), backend="syncfree_xla")
    with pytest.raises(Exception, match="found two different devices cpu, xla"):
        step(model, torch.randn(4, 3))


def test_zero_dim_cpu_scalars_are_allowed(xla):
    f = torch.compile(lambda x, s: x * s, backend="syncfree_xla")
    out = f(torch.ones(3, device=xla), torch.tensor(2.5))
    assert torch.equal(out.cpu(), torch.full((3,), 2.5))


@pytest.mark.parametrize(("options", "message"), [
    ({"cache_dri": "/tmp"}, r"unknown option 'cache_dri'; accepted options: .*cache_dir"),
    ({"compile_threads": 0}, r"'compile_threads'.*got 0.*positive integer"),
    ({"cache": "yes"}, r"'cache'.*got 'yes'.*True or False"),
    ({"fallback": "ignore"}, r"'fallback'.*'warn' or 'error'"),
])
def test_bad_options_raise_value_error_naming_them(options, message):
    with pytest.raises(ValueError, match=message):
        options_mod.resolve(options, environ={})


def test_environment_variables_and_options_precedence():
    env = {"SYNCFREE_XLA_COMPILE_THREADS": "3", "SYNCFREE_XLA_CACHE": "off"}
    assert options_mod.resolve(None, environ=env).compile_threads == 3
    assert options_mod.resolve(None, environ=env).cache is False
    assert options_mod.resolve({"compile_threads": 5}, environ=env).compile_threads == 5
    with pytest.raises(ValueError, match="SYNCFREE_XLA_CACHE_MAX_BYTES='lots'"):
        options_mod.resolve(None, environ={"SYNCFREE_XLA_CACHE_MAX_BYTES": "lots"})


def test_options_reach_the_backend_through_torch_compile(xla):
    f = torch.compile(lambda x: x + 1, backend="syncfree_xla", options={"bogus": 1})
    with pytest.raises(Exception, match="unknown option 'bogus'"):
        f(torch.ones(2, device=xla))



@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_an_inductor_mode_is_refused_naming_it_and_the_options(xla, mode):
    """A user coming from inductor got "__call__() got an unexpected keyword argument"."""
    f = torch.compile(lambda x: x + 1, backend="syncfree_xla", mode=mode)
    with pytest.raises(Exception, match=rf"mode='{mode}'\) is an inductor mode; .*mode=None "
                       rf"or 'default'.*options=.*join_graphs"):
        f(torch.ones(2, device=xla))


def test_the_default_mode_is_accepted(xla):
    f = torch.compile(lambda x: x + 1, backend="syncfree_xla", mode="default")
    assert torch.equal(f(torch.ones(2, device=xla)).cpu(), torch.full((2,), 2.0))

def test_stats_count_graphs_and_executions_and_reset(xla):
    f = torch.compile(lambda x: (x @ x).relu(), backend="syncfree_xla")
    x = torch.randn(4, 4, device=xla)
    for _ in range(3):
        f(x)
    settle()
    s = xla_backend.stats()
    assert isinstance(s, dict)
    assert s["graphs_received"] == 1
    assert s["graphs_lowered"] == 1
    assert s["executions"] == 3
    xla_backend.reset_stats()
    assert xla_backend.stats().get("executions", 0) == 0


def test_graph_without_tensor_inputs_and_non_tensor_outputs(xla):
    @torch.compile(backend="syncfree_xla")
    def make(n: int):
        t = torch.arange(n, device=torch.device("xla")) * 3
        return t, n + 1, "label"

    t, m, label = make(5)
    assert torch.equal(t.cpu(), torch.arange(5) * 3)
    assert (m, label) == (6, "label")


def test_outputs_that_alias_inputs(xla):
    @torch.compile(backend="syncfree_xla")
    def f(x):
        return x, x.view(-1), x.detach(), x.clone(), x + 1

    x = torch.randn(2, 3, device=xla)
    before = x.cpu()
    a, b, c, snapshot, d = f(x)
    assert a is x
    assert snapshot is not x
    with torch.no_grad():
        x.add_(1)  # views see the update, as in eager; the clone keeps the old values
    assert torch.equal(b.cpu(), (before + 1).view(-1))
    assert torch.equal(c.cpu(), before + 1)
    assert torch.equal(snapshot.cpu(), before)
    assert torch.allclose(d.cpu(), before + 1)


def test_unused_parameter_keeps_none_gradient(xla):
    model = nn.ModuleDict({"used": nn.Linear(3, 1), "unused": nn.Linear(3, 1)}).to(xla)

    @torch.compile(backend="syncfree_xla")
    def step(x):
        loss = model["used"](x).sum()
        loss.backward()
        return loss.detach()

    step(torch.randn(4, 3, device=xla))
    assert model["used"].weight.grad is not None
    assert model["unused"].weight.grad is None


def test_in_place_update_of_an_input_lands_in_the_callers_tensor(xla):
    @torch.compile(backend="syncfree_xla")
    def bump(x, y):
        x.add_(y)
        return x.sum()

    x = torch.zeros(3, device=xla)
    for _ in range(3):
        total = bump(x, torch.ones(3, device=xla))
    assert torch.equal(x.cpu(), torch.full((3,), 3.0))
    assert float(total) == 9.0


def _sized_by_data(x):
    n = x.sum().item()
    torch._check_is_size(n)
    return x.new_ones(n) * 2


def test_graph_that_reads_a_value_on_the_host_runs_op_by_op_with_a_warning(xla, caplog):
    torch._dynamo.config.capture_scalar_outputs = True
    try:
        x = torch.tensor([1, 2], device=xla)
        with caplog.at_level("WARNING"):
            out = torch.compile(_sized_by_data, backend="syncfree_xla")(x)
        assert torch.equal(out.cpu(), torch.full((3,), 2))
        assert "op by op" in caplog.text and "_local_scalar_dense" in caplog.text
        assert "in _sized_by_data" in caplog.text, "the warning points at the user's line"
        assert xla_backend.stats()["eager_fallbacks"] == 1

        torch._dynamo.reset()
        strict = torch.compile(_sized_by_data, backend="syncfree_xla",
                               options={"fallback": "error"})
        with pytest.raises(Exception, match="reads a device value on the host"):
            strict(x)
    finally:
        torch._dynamo.config.capture_scalar_outputs = False


def test_dynamo_reset_resets_the_backend(xla, caplog):
    """``torch._dynamo.reset()`` reaches the backend's ``reset`` (through torch.compile's
    wrapper): a once-per-process warning is said again, as in a fresh process."""
    import logging

    from xla_backend.warn_once import WarnOnce

    said = WarnOnce(logging.getLogger("tests.reset"))
    said("kind", "first time")
    f = torch.compile(lambda x: x * 3 + 1, backend="syncfree_xla")
    torch.testing.assert_close(f(torch.ones(2, device=xla)).cpu(), torch.full((2,), 4.0))
    assert said.seen("kind")
    torch._dynamo.reset()
    assert not said.seen("kind")
    with caplog.at_level(logging.WARNING, logger="tests.reset"):
        assert said("kind", "said again")
    assert "said again" in caplog.text


def _moments_update(p, g, m, v):
    """An optimizer-like graph: large inputs, elementwise updates."""
    m = m * 0.9 + g * 0.1
    v = v * 0.99 + g * g * 0.01
    return p - m / (v.sqrt() + 1e-8), m, v


def test_tracing_a_graph_uploads_one_stand_in_per_input(xla):
    """The trace's stand-in buffers also feed the compile: a second set would double the
    memory an optimizer graph's first call takes (a stand-in per parameter and state
    tensor; on issue 13's 50M-parameter MLP the first step's peak was 1.3 GB higher).
    Counted in bytes torch_xla copied to the device."""
    from xla_backend import xla_metrics

    inputs = [torch.randn(256, 1024).to(xla) for _ in range(3)] + [torch.rand(256, 1024).to(xla)]
    settle()
    compiled = torch.compile(_moments_update, backend="syncfree_xla",
                             options={"cache": False})
    before = xla_metrics.host_to_device_bytes()
    p, m, v = compiled(*inputs)
    settle()
    uploaded = xla_metrics.host_to_device_bytes() - before
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    assert input_bytes <= uploaded <= input_bytes + 4096, (uploaded, input_bytes)
    want = _moments_update(*(t.cpu() for t in inputs))
    for got, expected in zip((p, m, v), want):
        torch.testing.assert_close(got.cpu(), expected)
