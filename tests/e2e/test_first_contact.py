"""A new user's first minutes: the README's usage example, run verbatim, prints nothing.

It runs in a fresh interpreter in the usual order (torch_xla's device first, the compile
second), which is the order in which torch_xla used to warn about PJRT_DEVICE and this
backend about a NaN flag it could no longer set. ``import torch`` now runs the
backend's device defaults (entry point group ``torch.backends``) before torch_xla
starts, so both are in place, and Dynamo's notice about the optimizer's profiler
region stays off stderr.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# What the README leaves to the reader: a model and a loader.
PRELUDE = """
import torch
class MyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 4)
    def forward(self, x):
        return self.layer(x)
loader = [(torch.randn(2, 8), torch.randint(0, 4, (2,))) for _ in range(3)]
"""

EPILOGUE = """
import os
assert "--xla_cpu_enable_fast_min_max=false" in os.environ["XLA_FLAGS"]
assert all(bool(torch.isfinite(loss)) for loss in losses)
"""


def _readme_example() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"## Usage\n\n```python\n(.*?)```", readme, re.S)
    assert match, "README.md has no python block under '## Usage'"
    return match.group(1)


def test_readme_example_prints_nothing(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(PRELUDE + _readme_example() + EPILOGUE, encoding="utf-8")
    env = {k: v for k, v in os.environ.items()
           if k not in ("PJRT_DEVICE", "XLA_FLAGS", "XLA_NO_SPECIAL_SCALARS")}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr == "" and run.stdout == ""


def _clean_env() -> dict[str, str]:
    """The environment of a user who configured nothing."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PJRT_DEVICE", "XLA_FLAGS", "XLA_NO_SPECIAL_SCALARS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def test_demo_prints_nothing_but_its_progress_lines():
    cmd = [sys.executable, "-m", "xla_backend.tools.demo", "--steps", "4", "--d-model", "32",
           "--layers", "1", "--heads", "2", "--batch", "2", "--seq", "16", "--no-baseline"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(), cwd=ROOT,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stderr.splitlines()
    assert lines, "the demo shows its progress on stderr"
    assert all(re.fullmatch(r"step +\d+/4  loss .*steps/s", line) for line in lines), lines


USER_TEST = """
import pytest
import torch
import torch_xla


@pytest.mark.syncfree(warmup=2, steps=2, max_syncs_per_step=0, max_compiles=0)
def test_step(syncfree_budget):
    model = torch.nn.Linear(4, 2).to(torch_xla.device())
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)

    def step(x):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    batches = [torch.randn(3, 4).to(torch_xla.device()) for _ in range(4)]
    syncfree_budget.run(torch.compile(step, backend="syncfree_xla"), [(b,) for b in batches])
"""


def test_a_plugin_test_run_prints_no_warnings(tmp_path):
    (tmp_path / "test_user.py").write_text(USER_TEST, encoding="utf-8")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "-s", "test_user.py"], capture_output=True, text=True,
                         env=_clean_env(), cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stderr == ""
    assert "warning" not in run.stdout.lower(), run.stdout  # also no warnings summary
    assert "1 passed" in run.stdout


OPENXLA_STEP = """
import torch
import torch_xla
from xla_backend.tools import workloads  # a model, its batches and a train step only

device = torch_xla.device()
work = workloads.get_workload("mlp", hidden=16)
model = work.build_model().to(device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
compiled = torch.compile(workloads.train_step, backend="openxla")
for i in range(3):
    loss = compiled(model, opt, *work.make_batch(i, device))
assert bool(torch.isfinite(loss.cpu()))
"""


def test_torch_xla_own_backend_still_trains_with_this_package_installed(tmp_path):
    """``import torch`` runs this package's device defaults; they must not break
    torch_xla's ``openxla`` backend. With special scalars off (``XLA_NO_SPECIAL_SCALARS=1``,
    which they used to set) this step failed: "Execution supplied 7 buffers but compiled
    program expected 6"."""
    script = tmp_path / "openxla_step.py"
    script.write_text(OPENXLA_STEP, encoding="utf-8")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         env=_clean_env(), cwd=tmp_path, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
