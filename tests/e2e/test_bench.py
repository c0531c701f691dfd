"""`syncfree-xla bench` and the perf gate: argument checks, failures as results, JSON, gate logic.

Only one test starts real cell processes (the failure paths, with eager as the cell
that must still succeed); everything else runs the engine with a fake cell runner.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from xla_backend import testing
from xla_backend.tools import bench, cli

REPO_ROOT = Path(__file__).resolve().parents[2]


def _load_perf_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "perf_check", REPO_ROOT / "benchmarks" / "perf_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


perf_check = _load_perf_check()


def _fake_result(spec: bench.CellSpec, steady_ms: float = 10.0) -> bench.CellResult:
    on_xla = spec.backend in bench.XLA_BACKENDS
    return bench.CellResult(
        spec.model, spec.loop, spec.backend, first_step_s=1.5, warmup_s=2.0,
        steady_ms=steady_ms, steady_ms_min=steady_ms * 0.9, pipelined_ms=steady_ms,
        syncs_per_step=0.0 if on_xla else None, executions_per_step=1.0 if on_xla else None,
        xla_compiles_after_warmup=0 if on_xla else None, peak_rss_mb=900.0, threads=1,
        steps=spec.steps, warmup=spec.warmup, wall_s=3.0)


def _fake_runner(spec: bench.CellSpec, timeout_s: float) -> bench.CellResult:
    if spec.backend == "openxla":
        return bench.CellResult(spec.model, spec.loop, spec.backend, status="failed",
                                error="RuntimeError: buffer is deleted")
    return _fake_result(spec, 20.0 if spec.backend == "eager" else 10.0)


# --------------------------------------------------------------------------- CLI arguments


@pytest.mark.parametrize(("argv", "expected"), [
    (["--models", "nope"], ["--models", "invalid choice: 'nope'", "mlp", "transformer_lm"]),
    (["--backends", "tvm"], ["--backends", "invalid choice: 'tvm'", "syncfree_xla", "inductor"]),
    (["--loops", "C"], ["--loops", "invalid choice: 'C'", "A", "B"]),
    (["--steps", "0"], ["--steps", "positive integer", "'0'"]),
    (["--steps", "ten"], ["--steps", "positive integer", "'ten'"]),
    (["--timeout", "-1"], ["--timeout", "positive number"]),
    (["--devices", "0"], ["--devices", "positive integer", "'0'"]),
    (["--devices", "two"], ["--devices", "positive integer", "'two'"]),
    (["--skip", "mlp"], ["--skip", "MODEL:BACKEND", "'mlp'", "resnet", "openxla"]),
    (["--skip", "mlp:tvm"], ["--skip", "MODEL:BACKEND"]),
    (["--plot", "chart.jpg"], ["--plot", ".png", "'chart.jpg'"]),
    (["--json", "/no/such/dir/out.json"], ["--json", "'/no/such/dir'", "does not exist"]),
])
def test_bench_rejects_bad_arguments(capsys, argv, expected):
    assert cli.main(["bench", *argv]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err


def test_bench_plot_without_matplotlib_says_how_to_get_it(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(bench.plot, "matplotlib_available", lambda: False)
    assert cli.main(["bench", "--plot", str(tmp_path / "c.png")]) == 2
    assert "pip install -e '.[dev]'" in capsys.readouterr().err


def test_bench_help_lists_models_backends_and_loops(capsys):
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for name in [*bench.DEFAULT_MODELS, *bench.BACKENDS, *bench.LOOPS]:
        assert name in out


# --------------------------------------------------------------------------- engine


def test_plan_runs_eager_first_in_each_group():
    cells = bench.plan(["mlp", "bert"], ["A", "B"], ["openxla", "eager", "syncfree_xla"])
    assert cells[:3] == [("mlp", "A", "eager"), ("mlp", "A", "openxla"),
                         ("mlp", "A", "syncfree_xla")]
    assert len(cells) == 12


def test_timeout_skips_the_same_backend_on_later_loops():
    calls = []

    def runner(spec: bench.CellSpec, timeout_s: float) -> bench.CellResult:
        calls.append((spec.loop, spec.backend))
        if spec.backend == "inductor":
            return bench.CellResult(spec.model, spec.loop, spec.backend, status="failed",
                                    error=f"timed out after {timeout_s:g} s")
        return _fake_result(spec)

    results = bench.run_matrix(["bert"], ["A", "B"], ["eager", "inductor"], timeout_s=7,
                               skip={("bert", "eager"): "skipped on request (--skip)"},
                               runner=runner)
    assert calls == [("A", "inductor")]
    by = {(r.loop, r.backend): r for r in results}
    assert by[("A", "eager")].status == "skipped"
    assert by[("A", "inductor")].error == "timed out after 7 s"
    assert by[("B", "inductor")].status == "skipped"
    assert by[("B", "inductor")].error == "loop A timed out after 7 s"


def test_failures_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """Real cell processes: an unknown backend, one that raises, one that segfaults."""
    (tmp_path / "bench_test_backends.py").write_text(textwrap.dedent("""
        import os, signal

        def raises(gm, example_inputs):
            raise RuntimeError("boom from a test backend")

        def segfaults(gm, example_inputs):
            os.kill(os.getpid(), signal.SIGSEGV)
    """))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    backends = ["no_such_backend", "bench_test_backends:raises",
                "bench_test_backends:segfaults", "eager"]
    seen = []
    results = bench.run_matrix(["mlp"], ["A"], backends, steps=2, warmup=1, timeout_s=120,
                               progress=lambda r, i, n: seen.append((i, n, r.backend)))
    by = {r.backend: r for r in results}
    assert [s[:2] for s in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert by["eager"].ok, by["eager"]
    assert by["eager"].steady_ms > 0 and by["eager"].peak_rss_mb > 0
    assert by["no_such_backend"].status == "failed"
    assert "no_such_backend" in by["no_such_backend"].error
    assert by["bench_test_backends:raises"].status == "failed"
    assert "boom from a test backend" in by["bench_test_backends:raises"].error
    assert by["bench_test_backends:raises"].detail  # the traceback, for the JSON
    crashed = by["bench_test_backends:segfaults"]
    assert crashed.status == "failed"
    assert "SIGSEGV" in crashed.error, crashed.error
    assert all("\n" not in r.error for r in results if not r.ok)


def test_a_cell_past_its_timeout_is_killed_and_recorded():
    result = bench.run_cell(bench.CellSpec("mlp", "A", "eager"), timeout_s=0.2)
    assert result.status == "failed"
    assert result.error == "timed out after 0.2 s"
    assert bench.is_timeout(result)


# --------------------------------------------------------------------------- output


def test_bench_command_writes_table_json_and_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench.runner, "run_cell", _fake_runner)
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    status = cli.main(["bench", "--models", "mlp", "--backends", "eager", "openxla",
                       "syncfree_xla", "--loops", "A", "B", "--steps", "4",
                       "--json", str(out_json), "--plot", str(out_png)])
    assert status == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("[")]
    assert len(progress) == 6
    assert progress[0].startswith("[1/6] mlp loop A eager:")
    assert "failed: RuntimeError: buffer is deleted" in captured.err
    table = captured.out
    assert "| model" in table and "vs eager" in table
    assert "0.50x" in table  # syncfree_xla 10 ms against eager 20 ms
    assert "failed: RuntimeError: buffer is deleted" in table

    report = json.loads(out_json.read_text())
    assert report["schema"] == bench.SCHEMA_VERSION
    assert set(report) >= {"created", "environment", "config", "memory_metric", "cells"}
    assert report["environment"]["torch"]
    assert report["config"]["steps"] == 4
    assert report["config"]["backends"] == ["eager", "openxla", "syncfree_xla"]
    assert len(report["cells"]) == 6
    cell = next(c for c in report["cells"]
                if c["backend"] == "syncfree_xla" and c["loop"] == "B")
    for name in ("first_step_s", "warmup_s", "steady_ms", "syncs_per_step",
                 "executions_per_step", "xla_compiles_after_warmup", "peak_rss_mb", "status"):
        assert name in cell
    assert cell["vs_eager"] == pytest.approx(0.5)
    failed = next(c for c in report["cells"] if c["backend"] == "openxla")
    assert failed["status"] == "failed" and failed["vs_eager"] is None
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_devices_reach_xla_cells_and_their_process_environment(monkeypatch):
    specs = []

    def runner(spec: bench.CellSpec, timeout_s: float) -> bench.CellResult:
        specs.append(spec)
        return _fake_result(spec)

    bench.run_matrix(["mlp"], ["A"], ["eager", "syncfree_xla"], devices=4, runner=runner)
    assert {s.backend: s.devices for s in specs} == {"eager": None, "syncfree_xla": 4}

    seen = {}

    class FakeProcess:
        pid, returncode = 0, 0

        def __init__(self, argv, env, **kwargs):
            seen.update(argv=argv, env=env)

        def communicate(self, timeout=None):
            spec = bench.CellSpec.from_json(seen["argv"][-1])
            result = json.dumps(dataclasses.asdict(_fake_result(spec)))
            return "\n" + bench.RESULT_PREFIX + result + "\n", ""

        def poll(self):
            return 0

    monkeypatch.setattr(bench.runner.subprocess, "Popen", FakeProcess)
    assert bench.run_cell(specs[1]).ok
    assert seen["env"]["CPU_NUM_DEVICES"] == "4"


def test_pair_loops_pairs_loops_a_and_b_with_plain_and_shows_the_ratio(monkeypatch, capsys):
    specs = []

    def runner(spec: bench.CellSpec, timeout_s: float) -> bench.CellResult:
        specs.append(spec)
        result = _fake_result(spec)
        if spec.paired_loop is not None:
            result.paired_loop_steady_ms, result.loop_ratio = 8.0, 1.25
        return result

    monkeypatch.setattr(bench.runner, "run_cell", runner)
    assert cli.main(["bench", "--models", "mlp", "--backends", "syncfree_xla",
                     "--loops", "plain", "A", "B", "--pair-loops"]) == 0
    assert {s.loop: s.paired_loop for s in specs} == {"plain": None, "A": "plain", "B": "plain"}
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| mlp")]
    assert [row.count("1.25x") for row in rows] == [0, 1, 1]
    specs.clear()
    bench.run_matrix(["mlp"], ["A"], ["syncfree_xla"], runner=runner)
    assert specs[0].paired_loop is None  # off unless asked: it costs a second compile


def test_a_loop_is_timed_against_plain_after_its_own_counters():
    """The plain loop's model and compile come after the A cell's counters were read,
    which stay loop A's alone: one execution and no compile per step."""
    spec = bench.CellSpec("mlp", "A", "syncfree_xla", steps=3, warmup=3, pipelined=False,
                          paired_loop="plain")
    result = bench.run_cell(spec)
    assert result.ok, result.detail
    assert (result.executions_per_step, result.syncs_per_step) == (1.0, 0.0)
    assert result.xla_compiles_after_warmup == 0
    assert result.paired_loop_steady_ms > 0 and 0.2 < result.loop_ratio < 5
    for bad in ("A", "C"):
        with pytest.raises(ValueError, match=f"paired_loop must be another loop.*'plain'.*'{bad}'"):
            bench.measure_cell(bench.CellSpec("mlp", "A", "eager", paired_loop=bad))


def test_cell_json_round_trip():
    spec = bench.CellSpec("bert", "B", "lazy", steps=3, threads=1, cache_dir="/tmp/x")
    assert bench.CellSpec.from_json(spec.to_json()) == spec
    result = _fake_result(spec)
    data = json.loads(json.dumps(dataclasses.asdict(result)))
    assert bench.CellResult.from_dict({**data, "unknown_future_field": 1}) == result


def test_a_run_where_every_cell_failed_exits_1(monkeypatch, capsys):
    monkeypatch.setattr(bench.runner, "run_cell", lambda spec, timeout_s: bench.CellResult(
        spec.model, spec.loop, spec.backend, status="failed", error="boom"))
    assert cli.main(["bench", "--models", "mlp", "--backends", "eager", "--loops", "A"]) == 1
    assert "failed: boom" in capsys.readouterr().out


# --------------------------------------------------------------------------- perf gate


def _figures(**overrides: float) -> dict:
    counters = {"syncs_per_step": 0.0, "executions_per_step": 5.0,
                "compiles": 0, "recompiles": 0,
                "eager_fallbacks": 0, "warm_cache_graph_hits": 5, "warm_cache_graph_misses": 0,
                "warm_cache_aot_hits": 4, "warm_cache_aot_misses": 0}
    ratio = overrides.pop("ratio", 2.0)
    changed = {**counters, **overrides}  # only mlp/A changes
    return {"schema": 1,
            "counters": {"mlp/A": changed, "transformer_lm_small/A": counters},
            "ratios": {"mlp/A": {perf_check.RATIO: ratio},
                       "transformer_lm_small/A": {perf_check.RATIO: 1.0}},
            "failures": {}}


def _baseline(**overrides: float) -> dict:
    tolerance = overrides.pop("tolerance", perf_check.TOLERANCE)
    return perf_check.make_baseline(_figures(**overrides), tolerance)


def test_gate_passes_on_identical_figures():
    assert perf_check.compare(_baseline(), _figures()) == ([], [])


@pytest.mark.parametrize(("metric", "old", "new"), [
    ("syncs_per_step", 0.0, 1.0),
    ("executions_per_step", 5.0, 5.1),
    ("compiles", 0, 1),
    ("warm_cache_graph_misses", 0, 2),
    ("warm_cache_aot_misses", 0, 1),
])
def test_gate_fails_on_any_counter_increase(metric, old, new):
    failures, _ = perf_check.compare(_baseline(**{metric: old}), _figures(**{metric: new}))
    assert len(failures) == 1
    message = failures[0]
    assert metric in message and "mlp/A" in message
    assert f"baseline {old:g}, now {new:g}" in message


def test_gate_fails_on_fewer_warm_cache_hits_and_notes_improvements():
    failures, notes = perf_check.compare(_baseline(warm_cache_graph_hits=5),
                                         _figures(warm_cache_graph_hits=3))
    assert failures == ["warm_cache_graph_hits on mlp/A: baseline 5, now 3 "
                        "(a decrease; counters must not get worse)"]
    failures, _ = perf_check.compare(_baseline(), _figures(warm_cache_aot_hits=0))
    assert failures == ["warm_cache_aot_hits on mlp/A: baseline 4, now 0 "
                        "(a decrease; counters must not get worse)"]
    failures, notes = perf_check.compare(_baseline(executions_per_step=5.0),
                                         _figures(executions_per_step=4.0))
    assert failures == []
    assert any("executions_per_step on mlp/A improved" in n for n in notes)


@pytest.mark.parametrize(("new", "fails"), [(2.0, False), (2.4, False), (2.49, False),
                                            (2.6, True), (1.0, False)])
def test_gate_allows_timing_ratios_within_the_tolerance(new, fails):
    failures, notes = perf_check.compare(_baseline(ratio=2.0), _figures(ratio=new))
    assert bool(failures) == fails
    if fails:
        assert perf_check.RATIO in failures[0] and "mlp/A" in failures[0]
        assert "baseline 2.000" in failures[0] and f"now {new:.3f}" in failures[0]
        assert "tolerance 25%" in failures[0]
    if new == 1.0:
        assert any("better than the baseline" in n for n in notes)


def test_gate_tolerance_comes_from_the_baseline_or_the_caller():
    baseline = _baseline(ratio=2.0, tolerance=0.5)
    assert perf_check.compare(baseline, _figures(ratio=2.9))[0] == []
    assert perf_check.compare(baseline, _figures(ratio=2.9), tolerance=0.25)[0]


def test_gate_fails_when_a_measurement_fails_or_is_missing():
    current = _figures()
    del current["counters"]["mlp/A"], current["ratios"]["mlp/A"]
    current["failures"]["mlp/A"] = "cold: timed out after 300 s"
    failures, _ = perf_check.compare(_baseline(), current)
    assert failures == ["mlp/A: the measurement failed: cold: timed out after 300 s"]
    current["failures"] = {}
    failures, _ = perf_check.compare(_baseline(), current)
    assert failures == ["mlp/A: in the baseline but not measured"]


def test_gate_update_writes_the_baseline_and_then_compares(tmp_path, capsys):
    current_file, baseline_file = tmp_path / "current.json", tmp_path / "baseline.json"
    current_file.write_text(json.dumps(_figures()))
    assert perf_check.main(["--current", str(current_file), "--baseline", str(baseline_file),
                            "--update"]) == 0
    written = json.loads(baseline_file.read_text())
    figures = _figures()
    assert set(written) == {"_about", *figures["counters"]}
    for key, counters in figures["counters"].items():
        assert written[key] == {**counters, "ratios": figures["ratios"][key],
                                "tolerance": perf_check.TOLERANCE}
    assert "perf-baseline" in written["_about"]["about"]
    # the plugin's and `check`'s reader takes it: one baseline format
    assert testing.read_baseline(baseline_file) == written
    assert perf_check.main(["--current", str(current_file), "--baseline",
                            str(baseline_file)]) == 0
    current_file.write_text(json.dumps(_figures(syncs_per_step=1.0)))
    assert perf_check.main(["--current", str(current_file), "--baseline",
                            str(baseline_file)]) == 1
    out = capsys.readouterr().out
    assert "FAIL syncs_per_step on mlp/A: baseline 0, now 1" in out
    assert "make perf-baseline" in out


def test_gate_refuses_to_record_a_failed_measurement(tmp_path):
    current = _figures()
    current["failures"]["mlp/B"] = "eager: boom"
    current_file, baseline_file = tmp_path / "current.json", tmp_path / "baseline.json"
    current_file.write_text(json.dumps(current))
    assert perf_check.main(["--current", str(current_file), "--baseline", str(baseline_file),
                            "--update"]) == 1
    assert not baseline_file.exists()


def test_committed_baseline_covers_every_check():
    baseline = testing.read_baseline(perf_check.BASELINE)
    keys = {perf_check.key_of(m, lp) for m, lp in perf_check.CHECKS}
    assert set(baseline) == {"_about", *keys}
    for key in keys:
        assert set(baseline[key]) == {*perf_check.LOWER_IS_BETTER, *perf_check.HIGHER_IS_BETTER,
                                      "ratios", "tolerance"}
        assert perf_check.RATIO in baseline[key]["ratios"]


def test_plain_pytest_collects_only_tests():
    """The pytest-benchmark suites in benchmarks/ run from `make bench`, not `pytest`."""
    assert 'testpaths = ["tests"]' in (REPO_ROOT / "pyproject.toml").read_text()


def test_paired_eager_steps_are_interleaved_in_the_cell(xla):
    """In process: eager on the CPU, cheap; the ratio is a median of per-step ratios.

    ``xla`` loads torch_xla first: a backward run before it registers its device leaves
    torch's autograd engine without a queue for it, and every later XLA backward in
    this process fails an internal assert.
    """
    spec = bench.CellSpec("mlp", "plain", "eager", steps=3, warmup=1, pipelined=False,
                          paired="eager")
    result = bench.measure_cell(spec)
    assert result.ok and result.paired_steady_ms > 0
    assert 0.05 < result.paired_ratio < 20
    with pytest.raises(ValueError, match="paired must be 'eager'"):
        bench.measure_cell(bench.CellSpec("mlp", "plain", "eager", paired="lazy"))


@pytest.mark.parametrize(("again", "calls", "fails"), [
    ([2.2], 1, False),  # noise: the second run is back within the tolerance
    ([3.1, 2.9], 2, True),  # a real regression: every run is slow
])
def test_gate_measures_a_slow_ratio_again_before_failing(monkeypatch, again, calls, fails):
    samples = iter(again)
    seen = []

    def measure_ratio(model, loop, steps, warmup):
        seen.append((model, loop))
        return next(samples)

    monkeypatch.setattr(perf_check, "measure_ratio", measure_ratio)
    monkeypatch.setattr(perf_check, "CHECKS", (("mlp", "A"), ("transformer_lm_small", "A")))
    current = _figures(ratio=3.0)
    perf_check.confirm_ratios(_baseline(ratio=2.0), current, None, steps=2, warmup=1)
    assert seen == [("mlp", "A")] * calls
    assert current["ratios"]["mlp/A"][perf_check.RATIO] == min([3.0, *again])
    failures, _ = perf_check.compare(_baseline(ratio=2.0), current)
    assert bool(failures) == fails


def test_op_profile_names_the_heavy_ops_of_a_step():
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "op_profile.py"), "--model", "cnn",
         "--reps", "1", "--top", "3"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("cnn: heavy ops of one AdamW step, cpu_rewrites on")
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| op")]
    assert len(rows) == 3
    ops = {row.split(" | ")[0].removeprefix("| ") for row in rows}
    assert ops <= {"convolution", "convolution_backward", "addmm", "mm",
                   "_native_batch_norm_legit_functional", "native_batch_norm_backward"}
    # XLA time per op is measured, not zero: the ops run on the device
    assert all(float(row.split(" | ")[3]) > 0 for row in rows)
