"""The unit tier stays a unit tier: ``pytest tests/unit`` never imports torch_xla.

Starting torch_xla (its import, PJRT, the XLA CPU client) costs seconds and is what the
other tiers (tests/xla, tests/e2e) are for; a test here that reaches it, directly or
through an xla_backend module that imports it, belongs in tests/xla. The rest of the
tier runs in a fresh interpreter, which must end without torch_xla in ``sys.modules``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).resolve().parent

CHILD = f"""
import sys
import pytest
rc = pytest.main(["-q", "-p", "no:cacheprovider", {str(UNIT)!r}, "-k", "not unit_tier"])
assert "torch_xla" not in sys.modules, "tests/unit imported torch_xla"
sys.exit(rc)
"""


def test_unit_tests_never_import_torch_xla():
    child = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                           cwd=UNIT.parents[1], timeout=600)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-4000:]
