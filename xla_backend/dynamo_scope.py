"""Dynamo settings for frames compiled by *this* backend only.

Why this exists: what Dynamo decides before a backend ever sees a graph is the
backend's problem too. ``import torch_xla`` flips two process-wide Dynamo settings
(``torch_xla/__init__.py``): ``specialize_float=True`` and
``automatic_dynamic_shapes=False``. With them a learning rate that a scheduler changes
every step is a guarded constant, so every step recompiles (and after
``recompile_limit`` the step silently runs eagerly). And with PyTorch's default
``capture_scalar_outputs=False`` every ``.item()`` is a graph break plus a host sync.

For our frames we want PyTorch's own defaults back, plus captured scalars:

* ``specialize_float=False`` and ``automatic_dynamic_shapes=True``: a float that
  changes between calls (``param_groups[i]["lr"]``) becomes a 0-d float64 *input*
  after one recompile, instead of a constant baked into the graph;
* ``capture_scalar_outputs=True``: ``.item()`` / ``float(t)`` stay in the graph as
  symbolic scalars, which ``passes.tensorify_scalars`` turns into 0-d tensor math.

How: Dynamo enters ``backend.backend_ctx_ctor()`` (when the backend defines one)
around every call of the compiled function, resume frames after graph breaks
included, which is exactly where frames are traced. ``torch.compile`` however wraps
the backend in ``_TorchCompileWrapper`` and then in ``WrapBackendDebug``, and neither
forwards the attribute, so the hook is lost. :func:`install` gives
``WrapBackendDebug`` a ``__getattr__`` that forwards *only* ``backend_ctx_ctor``, and
only when the wrapped backend function defines it. Every other backend has no such
attribute and behaves exactly as before: ``getattr`` still raises ``AttributeError``
and Dynamo falls back to its null context.

Limits (say them out loud):

* ``torch._dynamo.config`` is process-wide. While one of our compiled functions is
  running (and only then) the three settings above are in effect for the whole
  process, so a *different* ``torch.compile``'d function called from inside our
  step (nested compile) would be traced with them too. Calls that are not nested in
  ours, on any thread that does not overlap, see the unpatched settings.
* ``automatic_dynamic_shapes=True`` also applies to tensor shapes: a shape that
  changes between calls is retraced once with a symbolic size, as in stock PyTorch.
* ``torch._dynamo.optimize(syncfree_xla)`` honours the hook without :func:`install`;
  ``install`` is needed for ``torch.compile``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch._dynamo
from torch._dynamo.repro.after_dynamo import WrapBackendDebug

from . import options as options_mod

log = logging.getLogger(__name__)

__all__ = ["DYNAMO_SETTINGS", "backend_ctx", "install", "installed"]

#: The Dynamo settings our frames are traced with (see the module docstring).
DYNAMO_SETTINGS: dict[str, Any] = {
    "capture_scalar_outputs": True,
    "specialize_float": False,
    "automatic_dynamic_shapes": True,
}

_FORWARDED = "backend_ctx_ctor"
_MARK = "__syncfree_xla_scoped__"


def backend_ctx(options: Mapping[str, Any] | None = None,
                **_compile_kwargs: Any) -> contextlib.AbstractContextManager[Any]:
    """The context Dynamo enters around each call of a function compiled by us.

    Takes the keyword arguments ``torch.compile`` passes to the backend, so that
    ``options={"syncfree_passes": False}`` (or ``SYNCFREE_XLA_SYNCFREE_PASSES=0``)
    also keeps stock Dynamo behaviour: captured scalars without the passes that
    rewrite them would crash AOTAutograd instead of merely syncing.
    """
    try:
        enabled = options_mod.resolve(options).syncfree_passes
    except ValueError:
        enabled = True  # the backend itself reports bad options, with a clear message
    if not enabled:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(**DYNAMO_SETTINGS)


def _forward_backend_ctx_ctor(self: Any, name: str) -> Any:
    """``WrapBackendDebug.__getattr__``: runs only when normal lookup failed.

    Forwards ``backend_ctx_ctor`` only from a backend :func:`install` marked, found as
    the ``compiler_fn`` of ``torch.compile``'s ``_TorchCompileWrapper`` (then bound to
    the keyword arguments torch.compile passes the backend) or as the wrapped function
    itself. Any other name, or any other backend, raises ``AttributeError`` as before.
    """
    if name == _FORWARDED:
        inner = self.__dict__.get("_torchdynamo_orig_backend")
        compiler_fn = getattr(inner, "compiler_fn", None)
        if getattr(compiler_fn, _MARK, False):
            ctor = compiler_fn.backend_ctx_ctor
            kwargs = dict(getattr(inner, "kwargs", None) or {})
            return functools.partial(ctor, **kwargs) if kwargs else ctor
        if getattr(inner, _MARK, False):
            return inner.backend_ctx_ctor
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


setattr(_forward_backend_ctx_ctor, _MARK, True)


def installed() -> bool:
    """Whether ``WrapBackendDebug`` forwards ``backend_ctx_ctor`` for marked backends."""
    hook = WrapBackendDebug.__dict__.get("__getattr__")
    return hook is not None and getattr(hook, _MARK, False)


def install(backend: Callable[..., Any]) -> None:
    """Makes ``torch.compile(..., backend=backend)`` trace with :data:`DYNAMO_SETTINGS`.

    Idempotent. Sets ``backend.backend_ctx_ctor`` to :func:`backend_ctx` and marks
    ``backend`` as the only kind whose hook is forwarded. If some other code already
    gave ``WrapBackendDebug`` a ``__getattr__``, that one is left alone (never replace
    someone else's hook) and a warning says the settings will not be scoped.
    """
    backend.backend_ctx_ctor = backend_ctx  # type: ignore[attr-defined]
    setattr(backend, _MARK, True)
    if installed():
        return
    if "__getattr__" in WrapBackendDebug.__dict__:
        log.warning(
            "syncfree_xla: WrapBackendDebug already has a __getattr__ of someone else's; "
            "not replacing it, so torch.compile may ignore this backend's Dynamo settings "
            "(float learning rates may then recompile every step)"
        )
        return
    WrapBackendDebug.__getattr__ = _forward_backend_ctx_ctor  # type: ignore[attr-defined]
    log.debug("syncfree_xla: WrapBackendDebug now forwards %s", _FORWARDED)
