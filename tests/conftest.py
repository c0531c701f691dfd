"""Shared set-up for the three test tiers, each a folder with a marker of its own:

* ``tests/unit`` (``-m unit``): torch and FX only; never imports torch_xla, runs in seconds
  (``tests/unit/test_unit_tier.py`` checks that).
* ``tests/xla`` (``-m xla``): modules run on the XLA CPU device.
* ``tests/e2e`` (``-m e2e``): whole training loops, scripts, the CLI and subprocesses.

Nothing here may import torch_xla at import time: the ``xla`` fixture does it lazily.
Helpers shared by the xla and e2e tiers live in ``tests/xla_helpers.py``
(``from tests.xla_helpers import ...``).
"""

import os
import sys
import tempfile
from pathlib import Path

import pytest

# pytester: tests/e2e/test_budgets.py runs the budget plugin as a user would
pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "xla", "e2e")

sys.path.insert(0, str(TESTS.parent))

from xla_backend.device import configure_pjrt  # noqa: E402

configure_pjrt()

# The graph cache defaults to ~/.cache; tests keep their entries to themselves, and
# subprocesses started by tests inherit the same directory.
os.environ["SYNCFREE_XLA_CACHE_DIR"] = tempfile.mkdtemp(prefix="syncfree-xla-tests-")


@pytest.fixture
def xla():
    """A clean slate for a backend test: fresh Dynamo caches, zeroed counters."""
    import torch._dynamo
    import torch_xla

    import xla_backend

    torch._dynamo.reset()
    torch_xla.sync()
    xla_backend.reset_stats()
    yield torch_xla.device()
    torch._dynamo.reset()


def _tier(item: pytest.Item) -> str | None:
    try:
        tier = Path(str(item.path)).resolve().relative_to(TESTS).parts[0]
    except ValueError:  # not under tests/ (e.g. benchmarks/)
        return None
    return tier if tier in TIERS else None


def pytest_collection_modifyitems(config, items):
    """Mark each test with its tier, named after the folder under tests/ it lives in."""
    for item in items:
        tier = _tier(item)
        if tier is not None:
            item.add_marker(getattr(pytest.mark, tier))


def pytest_collection_finish(session):
    """A session that runs xla or e2e tests starts torch_xla's runtime before any test.

    Autograd sets up its per-device queues at the process's first backward: a unit
    test's CPU backward run first (as a pytest-xdist worker may) would leave the XLA
    device without one (pytorch/xla#4174: an INTERNAL ASSERT at the next XLA backward).
    Asked after ``-m``/``-k`` deselected: a session of unit tests only does not start it.
    """
    if any(_tier(item) not in (None, "unit") for item in session.items):
        import torch_xla

        torch_xla.device()
