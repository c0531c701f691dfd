"""Sync and recompile budgets in a user's own CI: ``xla_backend.testing`` and the plugin.

The plugin is tested the way a user meets it: an inner pytest session, in a process of
its own, running test files written as a user would write them.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from xla_backend import testing

STEP_MODULE = textwrap.dedent("""
    import torch
    import torch_xla

    def build(read_loss=False):
        device = torch_xla.device()
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 2).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)

        def step(x, y):
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if read_loss:
                print(loss.item())  # SYNC-HERE
            return loss.detach()

        batches = [(torch.randn(4, 8).to(device), torch.randn(4, 2).to(device))
                   for _ in range(6)]
        return torch.compile(step, backend="syncfree_xla"), batches
""")


def _step(xla, read_loss: bool):
    model = torch.nn.Linear(8, 2).to(xla)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if read_loss:
            print(loss.item())  # the line the failure must name
        return loss.detach()

    batches = [(torch.randn(4, 8).to(xla), torch.randn(4, 2).to(xla)) for _ in range(6)]
    return torch.compile(step, backend="syncfree_xla"), batches


def test_the_plugin_knows_every_budget():
    from xla_backend.tools import pytest_plugin

    assert set(pytest_plugin.BUDGET_KEYS) == set(testing.COUNTERS.values())


def test_a_syncfree_step_is_within_budget(xla):
    step, batches = _step(xla, read_loss=False)
    counts = testing.measure(step, batches, warmup=3)
    assert (counts.steps, counts.syncs_per_step, counts.compiles, counts.recompiles) == \
        (3, 0, 0, 0)
    assert counts.executions_per_step >= 1
    testing.assert_budget(counts)


def test_a_host_read_fails_the_budget_and_says_where(xla):
    step, batches = _step(xla, read_loss=True)
    counts = testing.measure(step, batches, warmup=3)
    assert counts.syncs_per_step >= 1
    with pytest.raises(testing.BudgetExceeded) as failure:
        testing.assert_budget(counts, max_syncs_per_step=0)
    text = str(failure.value)
    assert "syncs_per_step: " in text and "> 0 allowed" in text
    line = next(n for n, src in enumerate(Path(__file__).read_text().splitlines(), 1)
                if src.strip().endswith("# the line the failure must name"))
    assert f"test_budgets.py:{line}" in text, text


def test_a_host_read_in_eager_code_around_the_step_is_placed_too(xla):
    step, batches = _step(xla, read_loss=False)

    def logged_step(x, y):
        loss = step(x, y)
        loss.item()  # an eager read: no graph shows it
        return loss

    counts = testing.measure(logged_step, batches, warmup=3)
    text = testing.failure_message(counts, ["(for the test)"])
    line = next(n for n, src in enumerate(Path(__file__).read_text().splitlines(), 1)
                if src.strip().endswith("# an eager read: no graph shows it"))
    assert counts.syncs_per_step == 1
    placed = [row for row in text.splitlines() if "Tensor.item() of a device tensor, run "
              "eagerly at " in row]
    assert len(placed) == 1 and f"test_budgets.py:{line} " in placed[0], text
    assert "(x6)" in text  # every call, warm-up and measured steps alike


def test_measure_says_when_the_batches_run_out(xla):
    step, batches = _step(xla, read_loss=False)
    with pytest.raises(ValueError, match="ran out"):
        testing.measure(step, batches[:2], warmup=3)


USER_TESTS = textwrap.dedent("""
    import pytest
    from steps import build

    @pytest.mark.syncfree(warmup=3, max_syncs_per_step=0, max_compiles=0)
    def test_clean(syncfree_budget):
        step, batches = build()
        syncfree_budget.run(step, batches)

    @pytest.mark.syncfree(warmup=3)
    def test_reads_the_loss(syncfree_budget):
        step, batches = build(read_loss=True)
        syncfree_budget.run(step, batches)
""")


def _user_project(pytester: pytest.Pytester, tests: str) -> None:
    pytester.makepyfile(steps=STEP_MODULE, test_user=tests)


def test_the_plugin_passes_a_clean_step_and_fails_a_syncing_one_with_its_line(pytester):
    _user_project(pytester, USER_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*BudgetExceeded*syncfree_xla budget exceeded*",
                                 "*syncs_per_step: * > 0 allowed*"])
    assert "steps.py" in result.stdout.str()
    # pytest captures non-propagating loggers too: torch's trace records stay out
    assert "torch.__trace" not in result.stdout.str()


def test_the_baseline_fails_a_test_whose_counters_went_up(pytester):
    _user_project(pytester, USER_TESTS.split("@pytest.mark.syncfree(warmup=3)\n")[0])
    baseline = pytester.path / "perf" / "syncfree.json"
    pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--syncfree-baseline={baseline}",
                                  "--syncfree-update").assert_outcomes(passed=1)
    recorded = json.loads(baseline.read_text())
    (test_id, counters), = recorded.items()
    assert test_id.endswith("test_user.py::test_clean") and counters["syncs_per_step"] == 0
    assert counters["executions_per_step"] >= 1
    counters["executions_per_step"] = 0.5  # as if the step used to run fewer executions
    baseline.write_text(json.dumps(recorded))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           f"--syncfree-baseline={baseline}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_clean: executions_per_step: baseline 0.5, now * "
                                 "(an increase; counters must not get worse)*"])


# Makes the race between two writers of one baseline certain: each reads the file, then
# waits long enough for the other to read it too before either replaces it.
SLOW_BASELINE_READ = textwrap.dedent("""
    import time
    from xla_backend import testing

    _read = testing.read_baseline

    def read_then_wait(path):
        recorded = _read(path)
        time.sleep(3)
        return recorded

    testing.read_baseline = read_then_wait
""")


TWO_CLEAN_TESTS = textwrap.dedent("""
    import pytest
    from steps import build

    @pytest.mark.syncfree(warmup=3)
    def test_clean(syncfree_budget):
        syncfree_budget.run(*build())

    @pytest.mark.syncfree(warmup=3)
    def test_clean_too(syncfree_budget):
        syncfree_budget.run(*build())
""")


def test_update_under_xdist_keeps_every_workers_entries(pytester):
    pytester.makeconftest(SLOW_BASELINE_READ)
    _user_project(pytester, TWO_CLEAN_TESTS)
    baseline = pytester.path / "syncfree.json"
    pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                  f"--syncfree-baseline={baseline}",
                                  "--syncfree-update").assert_outcomes(passed=2)
    recorded = json.loads(baseline.read_text())
    assert sorted(test_id.split("::")[1] for test_id in recorded) == \
        ["test_clean", "test_clean_too"]


def test_a_misspelled_budget_is_named_with_the_accepted_ones(pytester):
    _user_project(pytester, textwrap.dedent("""
        import pytest

        @pytest.mark.syncfree(max_sync_per_step=0)
        def test_typo(syncfree_budget):
            pass
    """))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*unknown max_sync_per_step; accepted: warmup, steps, "
                                 "max_syncs_per_step*"])


TRAIN_SCRIPT = textwrap.dedent("""
    import sys
    import torch, torch_xla
    device = torch_xla.device()
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    read = "--read" in sys.argv

    @torch.compile(backend="syncfree_xla")
    def step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        if read and loss.item() > 1e9:  # line 14: a data-dependent branch
            print("diverged")
        return loss.detach()

    for i in range(20):
        step(torch.randn(4, 8).to(device), torch.randn(4, 2).to(device))
""")


def _check(tmp_path, *options: str, script_args: tuple[str, ...] = ()) -> int:
    from xla_backend.tools import cli

    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    return cli.main(["check", *options, str(script), "--", *script_args])


def test_check_passes_a_syncfree_script(xla, tmp_path, capsys):
    assert _check(tmp_path) == 0
    out = capsys.readouterr().out
    assert "within budget (syncs_per_step=0, compiles=0, recompiles=0" in out


def test_check_fails_a_syncing_script_naming_the_line_and_writes_junit(xla, tmp_path, capsys):
    junit = tmp_path / "reports" / "check.xml"
    assert _check(tmp_path, "--junit-xml", str(junit), script_args=("--read",)) == 1
    err = capsys.readouterr().err
    assert "syncs_per_step: 1 > 0 allowed" in err
    assert "train.py:14" in err, err
    xml = junit.read_text()
    assert 'failures="1"' in xml and "syncs_per_step: 1 &gt; 0 allowed" in xml


def test_check_baseline_fails_on_an_increase(xla, tmp_path, capsys):
    baseline = tmp_path / "syncfree.json"
    assert _check(tmp_path, "--baseline", str(baseline), "--update", "--name", "train") == 0
    recorded = json.loads(baseline.read_text())["train"]
    assert recorded["syncs_per_step"] == 0 and recorded["executions_per_step"] >= 1
    recorded["executions_per_step"] = 0.5
    baseline.write_text(json.dumps({"train": recorded}))
    torch._dynamo.reset()
    assert _check(tmp_path, "--baseline", str(baseline), "--name", "train") == 1
    assert "executions_per_step: baseline 0.5, now " in capsys.readouterr().err


def test_check_refuses_update_without_a_baseline(tmp_path, capsys):
    assert _check(tmp_path, "--update") == 2
    assert "--update needs --baseline FILE" in capsys.readouterr().err


def test_a_reference_step_gives_a_ratio_and_stays_out_of_the_counters(xla):
    step, batches = _step(xla, read_loss=False)
    # the reference reads the batch back to the host: a sync the step itself never makes
    counts = testing.measure(step, batches, warmup=3, reference=lambda x, y: x.cpu() @ x.cpu().T)
    assert (counts.syncs_per_step, counts.compiles, counts.recompiles) == (0, 0, 0)
    assert counts.ratio is not None and counts.ratio > 0
    assert counts.entry()[testing.RATIOS] == {testing.STEP_OVER_REFERENCE: counts.ratio}
    assert testing.RATIOS not in testing.measure(*_step(xla, read_loss=False), warmup=3).entry()


TIMED_TESTS = textwrap.dedent("""
    import pytest
    import torch
    from steps import build

    def eager_reference(x, y):
        return torch.randn(64, 64) @ torch.randn(64, 64)

    @pytest.mark.syncfree(warmup=3)
    def test_timed(syncfree_budget):
        step, batches = build()
        syncfree_budget.run(step, batches, reference=eager_reference)
""")


def test_timing_ratios_are_opt_in_and_judged_with_a_tolerance(pytester):
    _user_project(pytester, TIMED_TESTS)
    baseline = pytester.path / "syncfree.json"
    pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--syncfree-baseline={baseline}",
                                  "--syncfree-update").assert_outcomes(passed=1)
    recorded = json.loads(baseline.read_text())
    (test_id, entry), = recorded.items()
    ratio = entry[testing.RATIOS][testing.STEP_OVER_REFERENCE]
    assert ratio > 0 and entry["syncs_per_step"] == 0
    entry[testing.RATIOS][testing.STEP_OVER_REFERENCE] = ratio / 1000  # as if 1000x faster
    baseline.write_text(json.dumps(recorded))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider",
                                           f"--syncfree-baseline={baseline}")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*test_timed: step_over_reference: baseline *, now * "
                                 "(+*%, tolerance 25%)*"])
    pytester.runpytest_subprocess("-p", "no:cacheprovider", f"--syncfree-baseline={baseline}",
                                  "--syncfree-tolerance=1e9").assert_outcomes(passed=1)
