"""The exceptions a user of the backend may see and catch.

Defined once here, below every stage, so any stage can raise them and callers can catch
them without importing the stage that raised.
"""

from __future__ import annotations


class DeviceMismatchError(TypeError):
    """An argument is not on the XLA device the graph was compiled for."""


class UnsupportedOnXla(NotImplementedError):
    """The graph needs something torch_xla cannot do at all (sparse gradients)."""


class LoweredDtypeMismatch(TypeError):
    """torch_xla lowered an op to another dtype than eager gives (``xla_backend.rewrites``)."""


class LoweredShapeMismatch(ValueError):
    """torch_xla lowered an op to another shape than eager gives: its later uses would
    compute on the wrong elements."""


__all__ = ["DeviceMismatchError", "LoweredDtypeMismatch", "LoweredShapeMismatch",
           "UnsupportedOnXla"]
