"""``xla_backend.tools.explain`` and ``syncfree-xla explain``: where a step syncs, and why.

Each case checks what a user would act on: the sync point's own file:line, whether it
was removed and by which pass, or the reason it was kept; graph breaks and recompiles
with their reasons; the host syncs torch_xla actually counted.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.nn.functional as F
import torch_xla

import xla_backend
from passes import pipeline as pass_pipeline
from xla_backend import backend
from xla_backend.dynamo import grad_scaler
from xla_backend.tools import cli
from xla_backend.tools.explain import MASKED_GRAD_SCALER_STEP, ExplainSession, run_script

# Autograd's engine sizes its per-device queues at the first backward of the process;
# the XLA device must exist by then.
torch_xla.device()

THIS_FILE = str(Path(__file__).resolve())


def _line_of(fn, text: str) -> int:
    """The line number of the first line of ``fn`` containing ``text``."""
    lines, first = inspect.getsourcelines(fn)
    return first + next(i for i, line in enumerate(lines) if text in line)


def _tiny_training(device: torch.device):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 8).to(device)
    y = torch.randint(0, 4, (16,)).to(device)
    return model, opt, x, y


def loop_c_step(model, opt, x, y, step, warmup: int = 10):
    lr_scale = min(1.0, (step.item() + 1) / warmup)
    loss = F.cross_entropy(model(x), y)
    (loss * lr_scale).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    step.add_(1)
    return loss.detach()


def test_loop_c_item_is_removed_by_tensorify_scalar_reads(xla):
    model, opt, x, y = _tiny_training(xla)
    step = torch.zeros((), dtype=torch.int64, device=xla)
    report = xla_backend.explain(loop_c_step, model, opt, x, y, step)

    items = [s for s in report.sync_points if s.what == "Tensor.item()"]
    assert len(items) == 1, report
    line = _line_of(loop_c_step, "step.item()")
    assert (items[0].where.filename, items[0].where.lineno) == (THIS_FILE, line)
    assert items[0].removed_by == "tensorify_scalar_reads"
    text = str(report)
    assert f"test_explain.py:{line}" in text
    assert "removed by tensorify_scalar_reads" in text
    assert not any(a.runs_op_by_op for a in report.aten_graphs), report
    assert len(report.host_syncs_per_call) == 2
    assert report.host_syncs_running == 0, report  # compiling may store constants
    assert int(step.cpu()) == 2


def sized_by_data(x):
    n = x.sum().item()
    torch._check_is_size(n)
    return x.new_ones(n) * 2


def test_data_dependent_size_is_kept_with_its_reason(xla):
    report = xla_backend.explain(sized_by_data, torch.ones(3, dtype=torch.int64, device=xla))

    (item,) = [s for s in report.sync_points if s.what == "Tensor.item()"]
    assert not item.removed
    assert item.where.lineno == _line_of(sized_by_data, ".item()")
    assert item.reason.startswith("data-dependent shape"), item.reason
    assert "new_ones" in item.reason
    (aten,) = report.aten_graphs
    assert aten.runs_op_by_op and "reads a device value on the host" in aten.fallback_reason
    assert any(s.what == "aten._local_scalar_dense" for s in aten.sync_points)
    assert "kept: data-dependent shape" in str(report)
    assert "op-by-op fallback: reads a device value on the host" in str(report)
    assert report.host_syncs >= 1  # observed, not guessed


def scale_across_break(x, step):
    scale = min(1.0, (step.item() + 1) / 10)
    y = x * 2
    torch._dynamo.graph_break()
    return y * scale


def test_value_crossing_a_graph_break_is_kept_and_the_break_listed(xla):
    report = xla_backend.explain(scale_across_break, torch.ones(3, device=xla),
                                 torch.zeros((), dtype=torch.int64, device=xla))

    (item,) = [s for s in report.sync_points if s.what == "Tensor.item()"]
    assert not item.removed
    assert item.reason.startswith("value read on the host across a graph break"), item.reason
    break_line = _line_of(scale_across_break, "graph_break()")
    assert f"test_explain.py:{break_line}" in item.reason
    (graph_break,) = report.graph_breaks
    assert (graph_break.where.filename, graph_break.where.lineno) == (THIS_FILE, break_line)
    assert "graph_break()" in graph_break.reason
    assert report.host_syncs >= 2  # one read per call


def _break_here(x):
    torch._dynamo.graph_break()
    return x + 1


def one_break_reached_twice(x):
    return _break_here(_break_here(x * 2)) * 3


def test_the_headline_counts_break_places_as_budgets_do(xla):
    """``measure`` budgets distinct places; the headline says both, so they agree."""
    report = xla_backend.explain(one_break_reached_twice, torch.ones(3, device=xla))
    (graph_break,) = report.graph_breaks
    assert graph_break.count > 1
    assert f"graph breaks: 1 place ({graph_break.count} breaks);" in str(report)


def scaled(x, scale: float):
    return (x * scale).sum()


def test_changing_float_recompiles_without_syncfree_passes(xla):
    compiled = torch.compile(scaled, backend="syncfree_xla", options={"syncfree_passes": False})
    x = torch.ones(3, device=xla)
    with ExplainSession() as session:
        session.call(compiled, x, 0.5)
        session.call(compiled, x, 0.25)
    report = session.report()

    (recompile,) = report.recompiles
    assert recompile.function == "scaled"
    assert "scale == 0.5" in recompile.reason, recompile.reason
    assert all(not g.syncfree_passes for g in report.graphs)
    text = str(report)
    assert "Recompiles\n  scaled" in text and "scale == 0.5" in text


def amp_step(model, opt, scaler, x, y):
    loss = F.cross_entropy(model(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def test_grad_scaler_steps_masked_after_the_first(xla):
    model, opt, x, y = _tiny_training(xla)
    scaler = torch.amp.GradScaler("xla", init_scale=2.0**8)
    compiled = torch.compile(amp_step, backend="syncfree_xla")
    with ExplainSession() as session:
        for _ in range(3):
            session.call(compiled, model, opt, scaler, x, y)
    report = session.report()

    kept, removed = report.eager_sync_points
    assert not kept.removed and "first step" in kept.reason
    assert removed.removed_by == MASKED_GRAD_SCALER_STEP and removed.count == 2
    assert removed.where.lineno == _line_of(amp_step, "scaler.step(opt)")
    assert report.host_syncs_running == 1, report  # the first, stock step


def test_session_leaves_no_hooks_behind(xla):
    with ExplainSession():
        assert backend.OBSERVERS and pass_pipeline.OBSERVERS
        assert grad_scaler.OBSERVERS
    assert backend.OBSERVERS == [] and pass_pipeline.OBSERVERS == []
    assert grad_scaler.OBSERVERS == []
    assert sys.getprofile() is None  # its host-read watch is gone too


def test_package_import_stays_cheap_and_explain_callable():
    code = ("import sys, xla_backend; assert 'torch_xla' not in sys.modules; "
            "import xla_backend.tools.explain; assert callable(xla_backend.explain)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- CLI

SCRIPT = textwrap.dedent("""\
    import sys
    import torch
    import torch_xla

    def step_fn(w, x, step):
        scale = min(1.0, (step.item() + 1) / 4)
        step.add_(1)
        return (w * x).sum() * scale

    dev = torch_xla.device()
    step = torch.zeros((), dtype=torch.int64, device=dev)
    compiled = torch.compile(step_fn, backend="syncfree_xla")
    w, x = torch.ones(4, device=dev), torch.ones(4, device=dev)
    for _ in range(int(sys.argv[1])):
        compiled(w, x, step)
    print("script ran", int(step.cpu()))
""")


def test_cli_explains_a_script(xla, tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    assert cli.main(["explain", str(script), "--steps", "2", "--", "5"]) == 0
    out = capsys.readouterr().out
    item_line = SCRIPT.splitlines().index(
        "    scale = min(1.0, (step.item() + 1) / 4)") + 1
    assert "syncfree_xla explain" in out
    assert f"train.py:{item_line}" in out
    assert "removed by tensorify_scalar_reads" in out
    assert "script stopped after 2 steps" in out
    assert "script ran" not in out  # stopped before the end
    assert backend.OBSERVERS == []
    assert torch.compile.__module__ == "torch"


def test_cli_runs_a_script_to_its_end(xla, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    run = run_script(script, ["3"])
    assert run.exit_code == 0 and run.error is None
    assert run.report.host_syncs_running == 1, run.report  # its own int(step.cpu())


def test_cli_missing_script_exits_2_naming_it(tmp_path, capsys):
    missing = tmp_path / "nope.py"
    assert cli.main(["explain", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err


def test_cli_script_error_prints_its_traceback(xla, tmp_path, capsys):
    script = tmp_path / "broken.py"
    script.write_text("x = 1\nraise ValueError('bad data')\n")
    assert cli.main(["explain", str(script)]) == 1
    captured = capsys.readouterr()
    assert "syncfree_xla explain" in captured.out
    assert 'broken.py", line 2' in captured.err
    assert "ValueError: bad data" in captured.err
    assert "broken.py raised ValueError" in captured.err


def test_a_failing_pass_is_named_and_its_sync_kept(xla, monkeypatch):
    """A pass that raises leaves the host read in place, and explain says which pass."""
    import passes

    def broken(gm):
        raise ValueError("broken on purpose")

    monkeypatch.setattr(passes, "DYNAMO_PASSES",
                        (passes.GraphPass("broken_pass", 1, broken), *passes.DYNAMO_PASSES))
    model, opt, x, y = _tiny_training(xla)
    step = torch.zeros((), dtype=torch.int64, device=xla)
    report = xla_backend.explain(loop_c_step, model, opt, x, y, step)
    text = str(report)
    assert "pass failed and skipped, its host reads stay: broken_pass (ValueError: " \
           "broken on purpose)" in text, text
    items = [s for s in report.sync_points if s.what == "Tensor.item()"]
    assert items and items[0].removed_by == "tensorify_scalar_reads", report
    assert int(step.cpu()) == 2
