"""Content-addressed cache of compiled graphs: a key of named components and a store.

Knows nothing of torch: the backend hands it strings and bytes.
"""

from .key import (
    COMPONENT_NAMES,
    DEBUG_ONLY_XLA_FLAG_PREFIXES,
    CacheKey,
    MissExplanation,
    backend_key,
    component_hash,
    explain_miss,
    scrub_xla_flags,
)
from .store import (
    CACHE_DIR_ENV,
    DEFAULT_MAX_BYTES,
    BadEntry,
    EntryInfo,
    PruneReport,
    Store,
    VerifyReport,
    default_cache_dir,
)

__all__ = [
    "CACHE_DIR_ENV",
    "COMPONENT_NAMES",
    "DEBUG_ONLY_XLA_FLAG_PREFIXES",
    "DEFAULT_MAX_BYTES",
    "BadEntry",
    "CacheKey",
    "EntryInfo",
    "MissExplanation",
    "PruneReport",
    "Store",
    "VerifyReport",
    "backend_key",
    "component_hash",
    "default_cache_dir",
    "explain_miss",
    "scrub_xla_flags",
]
