"""syncfree_xla: a torch.compile backend that trains on XLA without host syncs.

Use it with ``torch.compile(step_or_model, backend="syncfree_xla")``; the backend is
registered through the ``torch_dynamo_backends`` entry point, so no import is needed.
"""

from typing import Any

from .counters import reset_stats, stats
from .runtime.device_loader import DeviceLoader

__all__ = ["DeviceLoader", "explain", "reset_stats", "stats"]
__version__ = "0.1.0"


def explain(step_fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Where and why ``step_fn`` syncs, breaks or recompiles: see ``xla_backend.tools.explain``.

    Imported on first use: it imports torch_xla, which ``import xla_backend`` must not.
    """
    from .tools.explain import explain as run

    return run(step_fn, *args, **kwargs)
