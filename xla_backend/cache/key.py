"""The cache key: an ordered list of named components, each hashed on its own.

Hashing components separately (and logging each hash at debug level) means a
surprising miss can be explained component by component ("the xla_flags
differ") instead of only "the digest differs". This module knows nothing of
torch: components arrive as strings or bytes.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

logger = logging.getLogger(__name__)

# Bump when the way components are combined into a digest changes, so old
# digests can never collide with new ones.
KEY_FORMAT_VERSION = 1

# The components the backend puts in every key, in their fixed order. This is
# the one place these names are spelled.
GRAPH = "graph"
INPUT_SIGNATURE = "input_signature"
PASSES_VERSION = "passes_version"
TORCH_VERSION = "torch_version"
TORCH_XLA_VERSION = "torch_xla_version"
XLA_FLAGS = "xla_flags"
DEVICE_KIND = "device_kind"
DEVICE_COUNT = "device_count"
SHARDING = "sharding"  # SPMD on or off, each input's sharding (mesh and layout)
OPTIONS = "options"

COMPONENT_NAMES: tuple[str, ...] = (
    GRAPH,
    INPUT_SIGNATURE,
    PASSES_VERSION,
    TORCH_VERSION,
    TORCH_XLA_VERSION,
    XLA_FLAGS,
    DEVICE_KIND,
    DEVICE_COUNT,
    SHARDING,
    OPTIONS,
)

# XLA flags that only change what XLA writes for humans to read (dumps of HLO,
# dump locations, dump filters), never the generated code. Matched as prefixes
# of the flag name. Deliberately NOT here: --xla_hlo_profile, which instruments
# the generated code, and --xla_force_host_platform_device_count, which changes
# the device count (itself a component).
DEBUG_ONLY_XLA_FLAG_PREFIXES: tuple[str, ...] = (
    "--xla_dump",  # --xla_dump_to, --xla_dump_hlo_as_text, --xla_dump_hlo_pass_re, ...
    "--xla_enable_dumping",
)

# One XLA_FLAGS token: a run of non-space characters, where a double-quoted
# part may contain spaces (--xla_dump_to="/tmp/a b").
_FLAG_TOKEN = re.compile(r'(?:[^\s"]+|"[^"]*")+')

Component = str | bytes


def component_hash(value: Component) -> str:
    """sha256 hex of one component; strings are hashed as their UTF-8 bytes."""
    if isinstance(value, str):
        value = value.encode("utf-8")
    elif not isinstance(value, bytes | bytearray | memoryview):
        raise TypeError(f"a key component must be str or bytes, not {type(value).__name__}")
    return hashlib.sha256(value).hexdigest()


def _combine(hashes: Iterable[tuple[str, str]]) -> str:
    """Digest of the (name, component hash) sequence, unambiguously framed."""
    h = hashlib.sha256(b"syncfree-xla cache key v%d\0" % KEY_FORMAT_VERSION)
    for name, digest in hashes:
        encoded = name.encode("utf-8")
        h.update(len(encoded).to_bytes(4, "big"))
        h.update(encoded)
        h.update(bytes.fromhex(digest))
    return h.hexdigest()


class CacheKey:
    """A key built from ordered, named components.

    ``components`` keeps the values, ``component_hashes`` their separate
    sha256 hashes (what the store records next to each entry), and ``digest``
    the hex sha256 over the (name, hash) sequence.
    """

    __slots__ = ("component_hashes", "components", "digest")

    components: Mapping[str, Component]
    component_hashes: Mapping[str, str]
    digest: str

    def __init__(
        self, components: Iterable[tuple[str, Component]] | Mapping[str, Component]
    ) -> None:
        pairs = list(components.items() if isinstance(components, Mapping) else components)
        values: dict[str, Component] = {}
        hashes: dict[str, str] = {}
        for name, value in pairs:
            if not isinstance(name, str) or not name:
                raise ValueError(f"a key component needs a non-empty string name, got {name!r}")
            if name in values:
                raise ValueError(f"key component {name!r} given twice")
            values[name] = value
            hashes[name] = component_hash(value)
            logger.debug("cache key component %s: %s", name, hashes[name])
        object.__setattr__(self, "components", MappingProxyType(values))
        object.__setattr__(self, "component_hashes", MappingProxyType(hashes))
        object.__setattr__(self, "digest", _combine(hashes.items()))
        logger.debug("cache key digest: %s", self.digest)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("CacheKey is immutable")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CacheKey) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"CacheKey({self.digest[:16]}…, components={list(self.components)})"


def backend_key(components: Mapping[str, Component]) -> CacheKey:
    """A key with exactly the backend's components, put in their fixed order.

    Building every backend key through here means a forgotten or misspelled
    component is an error, not a key that silently collides or never hits.
    """
    missing = [name for name in COMPONENT_NAMES if name not in components]
    unknown = sorted(set(components) - set(COMPONENT_NAMES))
    if missing or unknown:
        raise ValueError(f"backend key components: missing {missing}, unknown {unknown}")
    return CacheKey((name, components[name]) for name in COMPONENT_NAMES)


def scrub_xla_flags(flags: str | None) -> str:
    """XLA_FLAGS without the flags that cannot change generated code.

    So turning on HLO dumps to debug a problem does not also turn every
    lookup into a miss. Remaining flags keep their order (the last of a
    repeated flag wins in XLA) and are joined by single spaces.
    """
    if not flags:
        return ""
    kept = [
        token
        for token in _FLAG_TOKEN.findall(flags)
        if not token.startswith(DEBUG_ONLY_XLA_FLAG_PREFIXES)
    ]
    return " ".join(kept)


@dataclass(frozen=True)
class MissExplanation:
    """Which components of a looked-up key differ from the nearest stored entry."""

    nearest_digest: str
    differing: tuple[str, ...]

    def __str__(self) -> str:
        if not self.differing:
            return f"entry {self.nearest_digest[:16]} has identical components"
        return f"nearest entry {self.nearest_digest[:16]} differs in: {', '.join(self.differing)}"


def differing_components(wanted: Mapping[str, str], existing: Mapping[str, str]) -> tuple[str, ...]:
    """Names whose hashes differ, wanted's order first, then names only ``existing`` has."""
    names = list(wanted) + [name for name in existing if name not in wanted]
    return tuple(name for name in names if wanted.get(name) != existing.get(name))


def explain_miss(
    key: CacheKey | Mapping[str, str],
    existing: Mapping[str, Mapping[str, str]],
) -> MissExplanation | None:
    """Name the components that differ from the nearest existing entry.

    ``existing`` maps entry digests to their component hashes. The nearest
    entry is the one with the fewest differing components (ties go to the
    smallest digest, so the answer is deterministic). None if there are no
    entries to compare with.
    """
    wanted = key.component_hashes if isinstance(key, CacheKey) else key
    best: MissExplanation | None = None
    for digest in sorted(existing):
        diff = differing_components(wanted, existing[digest])
        if best is None or len(diff) < len(best.differing):
            best = MissExplanation(digest, diff)
    if best is not None:
        logger.debug("cache miss explained: %s", best)
    return best
