"""Content-addressed storage of compiled graphs: a memory tier over a disk tier.

The store only sees digests, bytes and small JSON-able dictionaries. What it
guarantees, so the backend never has to think about it:

* Loading an entry never runs code from the file (no pickle): an entry is a
  fixed magic, a format version, a JSON header and the payload, and the
  payload's sha256 is checked on every read.
* A bad entry (truncated, corrupted, garbage, another format version) is
  logged once, removed and treated as a miss; wrong bytes are never returned.
* Writes are atomic (temporary file in the same directory, fsync, rename), so
  a writer killed mid-write leaves only a temporary file no reader trusts.
* Trouble with the directory (insecure permissions, read-only, full disk) is
  logged once and the store carries on with the memory tier only; it never
  raises an OSError to the caller.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import stat
import struct
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .. import counters, options
from ..warn_once import WarnOnce
from .key import MissExplanation, explain_miss

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = options.ENV_PREFIX + "CACHE_DIR"
DEFAULT_MAX_BYTES = options.DEFAULT_CACHE_MAX_BYTES
MAGIC = b"SFXLAC\r\n"
FORMAT_VERSION = 1
ENTRY_SUFFIX = ".entry"
TEMP_PREFIX = ".tmp-"
TOTALS_FILE = "totals.json"
TOTALS_LOCK_FILE = ".totals.lock"
# A temporary file this old belongs to a writer that died; nobody will rename it.
STALE_TEMP_SECONDS = 15 * 60
MAX_HEADER_BYTES = 1 << 20
TOTALS_FIELDS = ("memory_hits", "disk_hits", "misses")

#: How both of the cache's containers start (entry files here, graph entries in their
#: payload): 8 magic bytes, a format version and the length of the JSON header after it.
PREAMBLE = struct.Struct(">8sII")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_ENTRY_NAME = re.compile(r"([0-9a-f]{64})" + re.escape(ENTRY_SUFFIX))

_warn_once = WarnOnce(logger)


def default_cache_dir() -> Path:
    """Where the cache lives unless told otherwise.

    $SYNCFREE_XLA_CACHE_DIR if set, else $XDG_CACHE_HOME/syncfree_xla (when
    absolute, as the XDG spec asks), else ~/.cache/syncfree_xla. The one place
    these variables are read.
    """
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "syncfree_xla"
    return Path.home() / ".cache" / "syncfree_xla"


class BadEntryError(ValueError):
    """An entry file that must not be trusted; the message says why.

    ``file_stat`` identifies the file that was read, so it is only removed if
    no writer has replaced it since.
    """

    def __init__(self, reason: str, file_stat: os.stat_result | None = None) -> None:
        super().__init__(reason)
        self.file_stat = file_stat


@dataclass(frozen=True)
class EntryInfo:
    digest: str
    size: int
    created: float
    last_used: float
    components: dict[str, str]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadEntry:
    digest: str
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    checked: int
    bad: tuple[BadEntry, ...]

    @property
    def ok(self) -> bool:
        return not self.bad


@dataclass(frozen=True)
class PruneReport:
    removed: int
    freed_bytes: int
    remaining_bytes: int
    stale_temps_removed: int


@dataclass
class _MemoryEntry:
    payload: bytes
    components: dict[str, str]
    meta: dict[str, Any]
    created: float
    last_used: float


@dataclass(frozen=True)
class _DiskFile:
    digest: str
    path: Path
    size: int
    mtime: float


# ---------------------------------------------------------------------------
# Entry format


def encode_header(
    digest: str,
    payload: bytes,
    components: Mapping[str, str],
    meta: Mapping[str, Any],
    created: float,
) -> bytes:
    """Everything in an entry file before the payload: preamble and JSON header."""
    header = {
        "digest": digest,
        "components": dict(components),
        "meta": dict(meta),
        "payload_length": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "created": created,
    }
    encoded = json.dumps(header, separators=(",", ":"), allow_nan=False)
    header_bytes = encoded.encode("utf-8")
    return PREAMBLE.pack(MAGIC, FORMAT_VERSION, len(header_bytes)) + header_bytes


def read_header(f: BinaryIO, digest: str, file_size: int) -> dict[str, Any]:
    """Read and check the preamble and header; leaves ``f`` at the payload.

    Checks the total length against ``file_size`` before reading the payload,
    so a garbage length can neither truncate silently nor allocate wildly.
    """
    preamble = f.read(PREAMBLE.size)
    if len(preamble) < PREAMBLE.size:
        raise BadEntryError("truncated before the header")
    magic, version, header_length = PREAMBLE.unpack(preamble)
    if magic != MAGIC:
        raise BadEntryError("not a syncfree-xla cache entry (bad magic)")
    if version != FORMAT_VERSION:
        raise BadEntryError(f"format version {version}, expected {FORMAT_VERSION}")
    if header_length > MAX_HEADER_BYTES or PREAMBLE.size + header_length > file_size:
        raise BadEntryError("truncated or oversized header")
    header = _parse_header(f.read(header_length), digest)
    expected_size = PREAMBLE.size + header_length + header["payload_length"]
    if file_size != expected_size:
        raise BadEntryError(f"file is {file_size} bytes, header says {expected_size}")
    return header


def _parse_header(raw: bytes, digest: str) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise BadEntryError(f"unreadable header: {e}") from None
    if not isinstance(header, dict):
        raise BadEntryError("header is not a JSON object")
    if header.get("digest") != digest:
        raise BadEntryError("header names a different digest")
    components = header.get("components")
    if not isinstance(components, dict) or not all(
        isinstance(v, str) for v in components.values()
    ):
        raise BadEntryError("bad components in header")
    length = header.get("payload_length")
    if not isinstance(length, int) or isinstance(length, bool) or length < 0:
        raise BadEntryError("bad payload length in header")
    checksum = header.get("payload_sha256")
    if not isinstance(checksum, str) or not _DIGEST.fullmatch(checksum):
        raise BadEntryError("bad payload checksum in header")
    if not isinstance(header.get("meta"), dict):
        raise BadEntryError("bad meta in header")
    if not isinstance(header.get("created"), int | float):
        raise BadEntryError("bad creation time in header")
    return header


def read_entry(path: Path, digest: str) -> tuple[dict[str, Any], bytes, os.stat_result]:
    """Header, verified payload and the stat of the file that was read.

    Raises BadEntryError for anything untrustworthy, OSError for I/O trouble.
    """
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        try:
            header = read_header(f, digest, st.st_size)
            payload = f.read(header["payload_length"])
            if len(payload) != header["payload_length"]:
                raise BadEntryError("payload truncated")
            if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
                raise BadEntryError("payload checksum mismatch")
        except BadEntryError as e:
            raise BadEntryError(str(e), st) from None
    return header, payload, st


def _write_all(f: BinaryIO, parts: Iterable[bytes]) -> None:
    """Write the parts of an entry in order (a seam tests slow down to kill a writer)."""
    f.writelines(parts)


def _fsync_directory(directory: Path) -> None:
    """Make a rename durable; best-effort, some filesystems refuse."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_digest(digest: str) -> None:
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise ValueError(f"a cache digest is 64 lowercase hex characters, got {digest!r}")


def _directory_problem(st: os.stat_result) -> str | None:
    """Why a cache directory must not be trusted, or None if it may."""
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


# ---------------------------------------------------------------------------
# The store


class Store:
    """Memory tier (LRU, capped at ``max_bytes``) over a disk tier (same cap).

    Thread-safe: the memory tier and the disk switch sit behind one lock; the
    disk itself is made safe for threads and processes by atomic renames.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        disk: bool = True,
    ) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self._lock = threading.Lock()
        self._memory: OrderedDict[str, _MemoryEntry] = OrderedDict()
        self._memory_bytes = 0
        self._disk = disk and self._open_directory()
        if self._disk:
            self._remove_stale_temps()

    @property
    def disk_enabled(self) -> bool:
        """Whether the disk tier is in use (False after any trouble with it)."""
        return self._disk

    # -- lookups ------------------------------------------------------------

    def get(self, digest: str) -> bytes | None:
        """The payload stored under ``digest``, or None on a miss."""
        _check_digest(digest)
        with self._lock:
            entry = self._memory.get(digest)
            if entry is not None:
                self._memory.move_to_end(digest)
                entry.last_used = time.time()
        if entry is not None:
            counters.incr(counters.CACHE_MEMORY_HITS)
            self._touch(digest)
            self._record_total("memory_hits")
            return entry.payload
        counters.incr(counters.CACHE_MEMORY_MISSES)
        if not self._disk:
            return None
        loaded = self._load(digest)
        if loaded is None:
            counters.incr(counters.CACHE_DISK_MISSES)
            self._record_total("misses")
            return None
        header, payload = loaded
        counters.incr(counters.CACHE_DISK_HITS)
        self._touch(digest)
        self._remember(digest, _MemoryEntry(
            payload, header["components"], header["meta"], header["created"], time.time()
        ))
        self._record_total("disk_hits")
        return payload

    def put(
        self,
        digest: str,
        payload: bytes,
        components: Mapping[str, str],
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Store ``payload`` under ``digest`` with its component hashes and meta.

        ``meta`` must be JSON-serializable (a TypeError/ValueError otherwise,
        raised before anything is stored); disk trouble is never raised.
        """
        _check_digest(digest)
        payload = bytes(payload)
        components = {str(k): str(v) for k, v in components.items()}
        meta = dict(meta or {})
        now = time.time()
        header = encode_header(digest, payload, components, meta, now)
        self._remember(digest, _MemoryEntry(payload, components, meta, now, now))
        if self._disk:
            self._write(digest, header, payload)

    # -- maintenance ----------------------------------------------------------

    def entries(self) -> list[EntryInfo]:
        """Info on every entry: on disk, or in memory when the disk tier is off."""
        if not self._disk:
            with self._lock:
                return [
                    EntryInfo(d, len(e.payload), e.created, e.last_used, dict(e.components),
                              dict(e.meta))
                    for d, e in self._memory.items()
                ]
        infos = []
        for disk_file in self._scan():
            info = self._entry_info(disk_file)
            if info is not None:
                infos.append(info)
        return infos

    def verify(self, remove: bool = False) -> VerifyReport:
        """Read every entry on disk and check its checksum; optionally remove bad ones."""
        if not self._disk:
            return VerifyReport(0, ())
        bad = []
        files = self._scan()
        for disk_file in files:
            try:
                read_entry(disk_file.path, disk_file.digest)
            except FileNotFoundError:
                continue
            except BadEntryError as e:
                bad.append(BadEntry(disk_file.digest, str(e)))
                if remove:
                    self._unlink(disk_file.path)
            except OSError as e:
                bad.append(BadEntry(disk_file.digest, f"unreadable: {e}"))
        return VerifyReport(len(files), tuple(bad))

    def prune(self, max_bytes: int | None = None) -> PruneReport:
        """Evict least-recently-used disk entries until they total <= ``max_bytes``.

        Also removes temporary files left by writers that died.
        """
        limit = self.max_bytes if max_bytes is None else max_bytes
        if not self._disk:
            return PruneReport(0, 0, 0, 0)
        stale = self._remove_stale_temps()
        files = sorted(self._scan(), key=lambda f: f.mtime)
        total = sum(f.size for f in files)
        removed = freed = 0
        for disk_file in files:
            if total <= limit:
                break
            total -= disk_file.size
            if self._unlink(disk_file.path):
                removed += 1
                freed += disk_file.size
                counters.incr(counters.CACHE_EVICTIONS)
        return PruneReport(removed, freed, total, stale)

    def discard(self, digest: str, reason: str) -> None:
        """Drops an entry whose bytes were intact but whose content the caller rejected.

        Counted and warned about once, like a corrupt entry, and removed from both tiers
        so the next ``put`` replaces it.
        """
        with self._lock:
            old = self._memory.pop(digest, None)
            if old is not None:
                self._memory_bytes -= len(old.payload)
        if self.disk_enabled:
            self._discard_bad(self._entry_path(digest), BadEntryError(reason))

    def clear(self) -> int:
        """Remove every entry, memory and disk, and the hit/miss totals; returns the count."""
        with self._lock:
            removed = len(self._memory)
            self._memory.clear()
            self._memory_bytes = 0
        if not self._disk:
            return removed
        removed = sum(1 for f in self._scan() if self._unlink(f.path))
        self._remove_stale_temps()
        self._unlink(self.directory / TOTALS_FILE)
        return removed

    def nearest(self, components: Mapping[str, str]) -> MissExplanation | None:
        """Which components differ from the most similar stored entry (explains a miss)."""
        with self._lock:
            existing = {d: dict(e.components) for d, e in self._memory.items()}
        if self._disk:
            for info in self.entries():
                existing.setdefault(info.digest, info.components)
        return explain_miss(dict(components), existing)

    def totals(self) -> dict[str, int]:
        """Hit/miss totals persisted across processes (zeros without a disk tier)."""
        if not self._disk:
            return dict.fromkeys(TOTALS_FIELDS, 0)
        return _load_totals(self.directory / TOTALS_FILE)

    # -- internals ------------------------------------------------------------

    def _open_directory(self) -> bool:
        """Create the directory (0700) and check it is ours alone; else go memory-only."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(self.directory)
        except OSError as e:
            self._disable("cannot create it", e)
            return False
        problem = _directory_problem(st)
        if problem is not None:
            self._disable(problem)
            return False
        return True

    def _disable(self, reason: str, error: OSError | None = None) -> None:
        with self._lock:
            self._disk = False
        detail = f"{reason}: {error}" if error is not None else reason
        _warn_once(("disabled", str(self.directory)),
                   "syncfree-xla cache directory %s %s; using the in-memory cache only",
                   self.directory, detail)

    def _entry_path(self, digest: str) -> Path:
        return self.directory / (digest + ENTRY_SUFFIX)

    def _remember(self, digest: str, entry: _MemoryEntry) -> None:
        size = len(entry.payload)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._memory.pop(digest, None)
            if old is not None:
                self._memory_bytes -= len(old.payload)
            self._memory[digest] = entry
            self._memory_bytes += size
            while self._memory_bytes > self.max_bytes:
                _, evicted = self._memory.popitem(last=False)
                self._memory_bytes -= len(evicted.payload)

    def _load(self, digest: str) -> tuple[dict[str, Any], bytes] | None:
        path = self._entry_path(digest)
        try:
            header, payload, _ = read_entry(path, digest)
        except FileNotFoundError:
            return None
        except BadEntryError as e:
            self._discard_bad(path, e)
            return None
        except OSError as e:
            _warn_once(("unreadable", str(path)), "cannot read cache entry %s: %s", path, e)
            return None
        return header, payload

    def _discard_bad(self, path: Path, error: BadEntryError) -> None:
        """Warn once, count, and remove a bad entry unless a writer already replaced it."""
        counters.incr(counters.CACHE_BAD_ENTRIES)
        _warn_once(("bad", str(path)), "discarding bad cache entry %s: %s", path, error)
        read_stat = error.file_stat
        try:
            now = os.stat(path)
        except OSError:
            return
        if read_stat is None or (now.st_ino, now.st_dev) == (read_stat.st_ino, read_stat.st_dev):
            self._unlink(path)

    def _write(self, digest: str, header: bytes, payload: bytes) -> None:
        """Atomically write one entry, then enforce the size cap."""
        final = self._entry_path(digest)
        if len(header) + len(payload) > self.max_bytes:
            logger.debug("cache entry %s is larger than the cap; not written", digest)
            return
        if final.exists():
            self._touch(digest)
            return
        tmp: str | None = None
        try:
            fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".part", dir=self.directory)
            with os.fdopen(fd, "wb") as f:
                _write_all(f, (header, payload))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            tmp = None
        except OSError as e:
            if tmp is not None:
                self._unlink(Path(tmp))
            self._disable("cannot be written to", e)
            return
        _fsync_directory(self.directory)
        counters.incr(counters.CACHE_DISK_WRITES)
        self.prune(self.max_bytes)

    def _touch(self, digest: str) -> None:
        """Record a use: the entry file's mtime is its last use, for LRU eviction."""
        if not self._disk:
            return
        try:
            os.utime(self._entry_path(digest))
        except OSError:
            pass  # evicted meanwhile, or a read-only directory: LRU order just ages

    def _scan(self) -> list[_DiskFile]:
        """The finalized entry files (temporary files are never considered)."""
        files = []
        try:
            with os.scandir(self.directory) as it:
                for dirent in it:
                    match = _ENTRY_NAME.fullmatch(dirent.name)
                    if match is None:
                        continue
                    try:
                        st = dirent.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        files.append(_DiskFile(match[1], Path(dirent.path), st.st_size,
                                               st.st_mtime))
        except OSError as e:
            _warn_once(("unlistable", str(self.directory)),
                       "cannot list cache directory %s: %s", self.directory, e)
        return files

    def _entry_info(self, disk_file: _DiskFile) -> EntryInfo | None:
        try:
            with open(disk_file.path, "rb") as f:
                header = read_header(f, disk_file.digest, os.fstat(f.fileno()).st_size)
        except (OSError, BadEntryError) as e:
            logger.debug("skipping cache entry %s: %s", disk_file.path, e)
            return None
        return EntryInfo(disk_file.digest, disk_file.size, header["created"], disk_file.mtime,
                         header["components"], header["meta"])

    def _remove_stale_temps(self, max_age: float = STALE_TEMP_SECONDS) -> int:
        """Remove temporary files of writers that died (older than ``max_age``)."""
        removed = 0
        cutoff = time.time() - max_age
        try:
            with os.scandir(self.directory) as it:
                for dirent in it:
                    if not dirent.name.startswith(TEMP_PREFIX):
                        continue
                    try:
                        if dirent.stat(follow_symlinks=False).st_mtime < cutoff:
                            os.unlink(dirent.path)
                            removed += 1
                    except OSError:
                        continue
        except OSError:
            pass
        return removed

    def _unlink(self, path: Path) -> bool:
        try:
            os.unlink(path)
            return True
        except FileNotFoundError:
            return False
        except OSError as e:
            _warn_once(("unlink", str(path)), "cannot remove cache file %s: %s", path, e)
            return False

    def _record_total(self, name: str) -> None:
        """Add one to a persisted hit/miss total; best-effort, never raises."""
        if not self._disk:
            return
        try:
            fd = os.open(self.directory / TOTALS_LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                totals = _load_totals(self.directory / TOTALS_FILE)
                totals[name] += 1
                _write_json_atomically(self.directory / TOTALS_FILE, totals)
            finally:
                os.close(fd)
        except OSError as e:
            logger.debug("could not update cache totals in %s: %s", self.directory, e)


def _load_totals(path: Path) -> dict[str, int]:
    totals = dict.fromkeys(TOTALS_FIELDS, 0)
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return totals
    if isinstance(loaded, dict):
        for name in TOTALS_FIELDS:
            value = loaded.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
                totals[name] = value
    return totals


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


__all__ = [
    "CACHE_DIR_ENV",
    "DEFAULT_MAX_BYTES",
    "FORMAT_VERSION",
    "PREAMBLE",
    "BadEntry",
    "BadEntryError",
    "EntryInfo",
    "PruneReport",
    "Store",
    "VerifyReport",
    "default_cache_dir",
]
