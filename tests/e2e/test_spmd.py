"""Data-parallel and FSDP-style training over torch_xla's SPMD runtime, still sync-free.

This process already runs torch_xla on one device, and SPMD must be chosen before the
runtime starts, so each device count runs ``tests/e2e/spmd_worker.py`` in a fresh process
(``CPU_NUM_DEVICES=N``) and the tests here assert on the JSON it prints. One process per
device count runs several cases, which keeps the cost to two process starts.

Every training case trains 20 steps under ``syncfree_xla`` over the mesh next to eager
PyTorch on the CPU with the same global batch, and must match it (rtol 1e-4) with no
host sync, XLA compile or Dynamo retrace in the 17 steps after 3 warm-up steps.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch_xla

from xla_backend import sharding

ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-4
# (devices, cases) per worker process: loop A and loop B, data parallel and FSDP,
# each at both device counts between the two; the cache-key checks on 4 devices.
PLAN = {2: ("A-dp", "B-fsdp"), 4: ("A-fsdp", "B-dp", "key", "errors", "reshard")}


@functools.cache
def worker(devices: int) -> dict[str, Any]:
    """The worker's results for ``devices`` virtual CPU devices (run once per count)."""
    env = dict(os.environ, CPU_NUM_DEVICES=str(devices), PJRT_DEVICE="CPU",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "tests.e2e.spmd_worker", *PLAN[devices]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SPMD_RESULTS ")]
    assert proc.returncode == 0 and lines, (
        f"worker with {devices} devices failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("SPMD_RESULTS "))


TRAINING = [(n, case) for n, cases in PLAN.items() for case in cases if "-" in case]


@pytest.mark.parametrize(("devices", "case"), TRAINING,
                         ids=[f"{case}-{n}dev" for n, case in TRAINING])
def test_sharded_training_matches_single_device_and_stays_sync_free(devices, case):
    results = worker(devices)
    assert results["devices"] == devices
    r = results[case]
    assert r["loss_rel_err"] <= RTOL, r
    assert r["param_rel_err"] <= RTOL, r
    assert r["param_elem_err"] <= 10 * RTOL, r
    assert r["syncs"] == 0, r
    assert r["compiles"] == 0, r
    assert r["new_frames"] == 0, r
    assert r["executions"] >= r["warm_steps"], r
    # Parameters rebound to the step's outputs keep the layout they were given.
    assert r["layout_after"] == r["layout_before"], r
    assert r["state_specs_match_params"], r
    sharded = [spec for spec in r["layout_before"].values() if spec]
    if case.endswith("fsdp"):
        assert len(sharded) >= 4 and all(f"{devices}" in s for s in sharded), r
    else:
        assert not sharded, r
    if case.startswith("B"):
        # The inf landed in one device's shard only; the whole mesh skipped those steps,
        # and the scale backed off exactly as the single-device reference's did.
        assert r["scale"][0] == r["scale"][1] < 2.0**8, r
        assert r["finite_steps"] == 18


def test_sharding_is_a_cache_key_component_and_selects_a_new_executable():
    r = worker(4)["key"]
    assert r["digests_distinct"], r
    # The same graph on the same shapes differs in the sharding component only.
    assert r["differing"] == {"rows": ["sharding"], "rows_reversed_mesh": ["sharding"],
                              "cols": ["sharding"]}, r
    # rows, then cols (resharded input: one more trace and entry), then rows again
    # (the executable kept for it, no new trace).
    lowered, misses = r["graphs_lowered"], r["cache_misses"]
    assert lowered[1] == lowered[0] + 1 and lowered[2] == lowered[1], r
    assert misses[1] == misses[0] + 1 and misses[2] == misses[1], r
    assert r["outputs_match"], r


def test_optimizer_state_is_laid_out_like_its_parameter():
    r = worker(4)["reshard"]
    rows = r["param_specs"][0]
    assert rows == "{devices=[4,1]0,1,2,3}", r
    # replicated state and state split on the other dimension both move; values do not
    assert r["moved"] == 2, r
    assert r["specs"]["replicated"] == rows and r["specs"]["cols"] == r["param_specs"][1], r
    assert r["specs"]["step"] == "", r
    assert r["values_kept"], r


def test_bad_meshes_and_batches_get_clear_errors():
    r = worker(4)["errors"]
    assert "batch dimension 6 does not divide evenly over the 4 devices" in r["batch"]
    assert "asked for 3 devices but the runtime has 4" in r["mesh_size"]
    assert "positive int, got 0" in r["mesh_zero"]
    assert "parameter weight is on cpu" in r["cpu_model"]
    assert "not 'model'" in r["axis"]


def test_spmd_after_a_single_device_start_is_refused():
    torch.ones(2, device=torch_xla.device()).sum()  # this process runs on one device
    with pytest.raises(sharding.ShardingError, match="before any tensor is moved"):
        sharding.enable_spmd()
    with pytest.raises(sharding.ShardingError, match="got -1"):
        sharding.data_parallel_mesh(-1)


@pytest.mark.parametrize(("shape", "n", "want"), [
    ((128, 64), 4, (0, None)),
    ((10, 128), 4, (None, 0)),
    ((10,), 4, None),
    ((), 2, None),
    ((6, 3), 2, (0, None)),
])
def test_fsdp_splits_the_first_dimension_that_divides(shape, n, want):
    assert sharding.fsdp_partition(shape, n) == want
