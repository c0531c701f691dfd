"""One comparison of counters and timing ratios against a baseline entry.

``xla_backend.testing.compare_entry`` is what the pytest plugin, ``syncfree-xla check``
and this repository's own perf gate (``benchmarks/perf_check.py``) judge with.
"""

from __future__ import annotations

import json

import pytest

from xla_backend import testing

ENTRY = {"syncs_per_step": 0.0, "executions_per_step": 5.0, "compiles": 0,
         "warm_cache_graph_hits": 5}


def test_identical_figures_pass_without_a_word():
    assert testing.compare_entry(ENTRY, dict(ENTRY)) == ([], [])


@pytest.mark.parametrize(("name", "new"), [("syncs_per_step", 1.0),
                                           ("executions_per_step", 5.5), ("compiles", 1)])
def test_any_counter_increase_is_a_regression_naming_both_values(name, new):
    regressions, _ = testing.compare_entry(ENTRY, {**ENTRY, name: new}, where="mlp/A")
    assert len(regressions) == 1
    assert regressions[0].startswith(f"{name} on mlp/A: baseline {ENTRY[name]:g}, now {new:g}")
    assert "an increase" in regressions[0]


def test_higher_is_better_counters_regress_when_they_drop():
    regressions, improvements = testing.compare_entry(
        ENTRY, {**ENTRY, "warm_cache_graph_hits": 3}, higher_is_better=["warm_cache_graph_hits"])
    assert regressions == ["warm_cache_graph_hits: baseline 5, now 3 "
                           "(a decrease; counters must not get worse)"]
    _, improvements = testing.compare_entry(ENTRY, {**ENTRY, "executions_per_step": 1.0})
    assert improvements == ["executions_per_step improved: baseline 5, now 1"]


def test_a_counter_no_longer_measured_is_a_regression():
    current = dict(ENTRY)
    del current["compiles"]
    assert testing.compare_entry(ENTRY, current)[0] == ["compiles: baseline 0, now not measured"]


@pytest.mark.parametrize(("new", "fails"), [(2.0, False), (2.49, False), (2.51, True)])
def test_ratios_may_grow_by_the_tolerance(new, fails):
    recorded = {**ENTRY, testing.RATIOS: {"step_over_reference": 2.0}}
    current = {**ENTRY, testing.RATIOS: {"step_over_reference": new}}
    regressions, _ = testing.compare_entry(recorded, current)
    assert bool(regressions) == fails
    if fails:
        assert regressions[0] == (f"step_over_reference: baseline 2.000, now {new:.3f} "
                                  f"(+{new / 2 - 1:.0%}, tolerance 25%)")


def test_tolerance_comes_from_the_caller_then_the_entry_then_the_default():
    recorded = {**ENTRY, testing.RATIOS: {"r": 2.0}, testing.TOLERANCE: 0.5}
    current = {**ENTRY, testing.RATIOS: {"r": 2.9}}
    assert testing.compare_entry(recorded, current)[0] == []
    assert testing.compare_entry(recorded, current, tolerance=0.25)[0]
    assert testing.DEFAULT_TOLERANCE == 0.25


def test_timing_is_opt_in_a_run_without_a_ratio_is_not_judged_on_one():
    recorded = {**ENTRY, testing.RATIOS: {"step_over_reference": 1.0}}
    assert testing.compare_entry(recorded, dict(ENTRY)) == ([], [])


def test_write_baseline_merges_or_replaces_atomically(tmp_path):
    path = tmp_path / "perf" / "syncfree.json"
    testing.write_baseline(path, {"a": {"compiles": 0}})
    testing.write_baseline(path, {"b": {"compiles": 1}})
    assert set(json.loads(path.read_text())) == {"a", "b"}
    testing.write_baseline(path, {"c": {"compiles": 2}}, merge=False)
    assert set(json.loads(path.read_text())) == {"c"}
    assert [p.name for p in path.parent.iterdir()] == ["syncfree.json"]
