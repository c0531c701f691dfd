"""BatchNorm's cumulative moving average (``momentum=None``) traced into our graphs.

Why: for that average ``_BatchNorm.forward`` passes ``1.0 / float(num_batches_tracked)``
to ``F.batch_norm`` as its momentum, a float that depends on a tensor's value. Dynamo
cannot pass it on, so it breaks the graph there and the layer runs eagerly in torch_xla's
lazy mode, whose BatchNorm updates ``running_var`` with the *biased* batch variance
(``rewrites.batch_norm_stats`` fixes that only inside our graphs): too small by a
factor (N - 1) / N, silently. ``torch.optim.swa_utils.update_bn`` runs every BatchNorm
in exactly this mode.

While one of our compiled functions runs, :func:`cumulative_average_traced` gives
``_BatchNorm`` (BatchNorm1d/2d/3d and their lazy forms) a forward that keeps the factor
a tensor: it normalizes with the batch statistics, as the stock forward does in
training, and updates the running statistics itself with eager's formula
(``(1 - f) * running + f * batch``, the unbiased batch variance, ``f = 1 / n``). Every
other case (a momentum, eval mode, no running statistics) goes to the stock forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["cumulative_average_traced", "traceable_forward"]

_STOCK_FORWARD = _BatchNorm.__dict__["forward"]


def traceable_forward(self: _BatchNorm, input: torch.Tensor) -> torch.Tensor:
    """``_BatchNorm.forward`` with a cumulative average Dynamo can trace."""
    if not (self.momentum is None and self.training and self.track_running_stats
            and self.num_batches_tracked is not None and self.running_mean is not None
            and self.running_var is not None):
        return _STOCK_FORWARD(self, input)
    self._check_input_dim(input)
    self.num_batches_tracked.add_(1)
    # first, so that a batch it refuses (one value per channel) leaves the stats alone
    out = F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
    with torch.no_grad():
        factor = 1.0 / self.num_batches_tracked
        x = input.detach().to(self.running_mean.dtype)
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, correction=1)
        self.running_mean.mul_(1 - factor).add_(mean * factor)
        self.running_var.mul_(1 - factor).add_(var * factor)
    return out


@contextlib.contextmanager
def cumulative_average_traced() -> Iterator[None]:
    """Puts :func:`traceable_forward` on ``_BatchNorm`` for the duration."""
    _BatchNorm.forward = traceable_forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        _BatchNorm.forward = _STOCK_FORWARD  # type: ignore[method-assign]
