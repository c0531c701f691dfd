import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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
