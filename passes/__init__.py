"""Pure FX-to-FX rewrites that remove host syncs. Imports torch only, never torch_xla."""

from .base import GraphPass, PassResult

__all__ = ["GraphPass", "PassResult"]
