"""syncfree_xla: a torch.compile backend that trains on XLA without host syncs.

Use it with ``torch.compile(step_or_model, backend="syncfree_xla")``; the backend is
registered through the ``torch_dynamo_backends`` entry point, so no import is needed.
"""

from .counters import reset_stats, stats
from .device_loader import DeviceLoader

__all__ = ["DeviceLoader", "reset_stats", "stats"]
__version__ = "0.1.0"
