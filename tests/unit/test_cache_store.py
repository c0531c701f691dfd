"""The on-disk store: format, atomicity, concurrency, eviction, and refusing bad directories."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import multiprocessing
import os
import pickle
import random
import stat
import struct
import tempfile
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xla_backend import counters
from xla_backend.cache import store as store_module
from xla_backend.cache.key import CacheKey
from xla_backend.cache.store import (
    DEFAULT_MAX_BYTES,
    FORMAT_VERSION,
    MAGIC,
    STALE_TEMP_SECONDS,
    TEMP_PREFIX,
    Store,
    default_cache_dir,
)

STORE_LOGGER = "xla_backend.cache.store"
_FORK = multiprocessing.get_context("fork")


def _key(name: str) -> CacheKey:
    return CacheKey([("graph", name), ("options", "o")])


def _payload(name: str, size: int = 1000) -> bytes:
    seed = hashlib.sha256(name.encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


def _put(store: Store, name: str, size: int = 1000, meta: dict | None = None) -> CacheKey:
    key = _key(name)
    store.put(key.digest, _payload(name, size), dict(key.component_hashes), meta or {})
    return key


def _entry_file(directory: Path, key: CacheKey) -> Path:
    return directory / f"{key.digest}.entry"


def _temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(TEMP_PREFIX))


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == STORE_LOGGER and r.levelno == logging.WARNING]


class CounterDeltas:
    """Counter deltas since construction, read without touching torch_xla."""

    def __init__(self) -> None:
        self._start = {name: counters.counter(name) for name in self._names()}

    @staticmethod
    def _names() -> list[str]:
        return [counters.CACHE_MEMORY_HITS, counters.CACHE_MEMORY_MISSES,
                counters.CACHE_DISK_HITS, counters.CACHE_DISK_MISSES, counters.CACHE_DISK_WRITES,
                counters.CACHE_EVICTIONS, counters.CACHE_BAD_ENTRIES]

    def __getitem__(self, name: str) -> float:
        return counters.counter(name) - self._start[name]


# ---------------------------------------------------------------------------
# Basics


def test_round_trip_through_memory_then_disk_counts_hits_and_misses(tmp_path):
    deltas = CounterDeltas()
    store = Store(tmp_path / "c")
    key = _key("a")
    assert store.get(key.digest) is None
    assert (deltas[counters.CACHE_MEMORY_MISSES], deltas[counters.CACHE_DISK_MISSES]) == (1, 1)

    _put(store, "a")
    assert deltas[counters.CACHE_DISK_WRITES] == 1
    assert store.get(key.digest) == _payload("a")
    assert deltas[counters.CACHE_MEMORY_HITS] == 1

    fresh = Store(tmp_path / "c")  # a new process, as far as the tiers are concerned
    assert fresh.get(key.digest) == _payload("a")
    assert deltas[counters.CACHE_DISK_HITS] == 1
    assert fresh.get(key.digest) == _payload("a")
    assert deltas[counters.CACHE_MEMORY_HITS] == 2
    assert deltas[counters.CACHE_DISK_HITS] == 1


def test_memory_only_store_writes_nothing(tmp_path):
    store = Store(tmp_path / "c", disk=False)
    _put(store, "a")
    assert store.get(_key("a").digest) == _payload("a")
    assert not (tmp_path / "c").exists()
    assert [e.digest for e in store.entries()] == [_key("a").digest]


def test_default_directory_and_its_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("SYNCFREE_XLA_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "syncfree_xla"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "syncfree_xla"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "syncfree_xla"
    monkeypatch.setenv("SYNCFREE_XLA_CACHE_DIR", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"
    assert Store().directory == tmp_path / "explicit"
    assert DEFAULT_MAX_BYTES == 2 * 1024**3 and Store().max_bytes == DEFAULT_MAX_BYTES


def test_directory_is_created_private(tmp_path):
    old = os.umask(0)
    try:
        Store(tmp_path / "deep" / "c")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "deep" / "c").stat().st_mode) == 0o700


def test_entries_describe_what_is_stored(tmp_path):
    store = Store(tmp_path)
    before = time.time()
    key = _put(store, "a", size=300, meta={"compile_seconds": 1.5, "name": "fwd"})
    (info,) = store.entries()
    assert info.digest == key.digest
    assert info.size == _entry_file(tmp_path, key).stat().st_size > 300
    assert before <= info.created <= info.last_used <= time.time()
    assert info.components == dict(key.component_hashes)
    assert info.meta == {"compile_seconds": 1.5, "name": "fwd"}


def test_nearest_explains_a_miss_from_stored_component_hashes(tmp_path):
    _put(Store(tmp_path), "a")
    wanted = CacheKey([("graph", "a"), ("options", "different")])
    explanation = Store(tmp_path).nearest(dict(wanted.component_hashes))
    assert explanation is not None
    assert explanation.nearest_digest == _key("a").digest
    assert explanation.differing == ("options",)
    assert Store(tmp_path / "empty").nearest(dict(wanted.component_hashes)) is None


def test_caller_mistakes_raise_before_anything_is_stored(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.get("../../etc/passwd")
    with pytest.raises(ValueError, match="64 lowercase hex"):
        store.put("A" * 64, b"x", {})
    key = _key("a")
    with pytest.raises(TypeError):
        store.put(key.digest, b"x", {}, {"not json": object()})
    assert store.get(key.digest) is None
    assert store.entries() == []


def test_totals_persist_across_stores_and_clear_resets_them(tmp_path):
    store = Store(tmp_path)
    key = _put(store, "a")
    store.get(key.digest)  # memory hit
    Store(tmp_path).get(key.digest)  # disk hit
    Store(tmp_path).get(_key("b").digest)  # miss
    assert Store(tmp_path).totals() == {"memory_hits": 1, "disk_hits": 1, "misses": 1}
    assert store.clear() == 1
    assert store.get(key.digest) is None  # the memory tier was cleared too
    assert Store(tmp_path).entries() == []
    assert Store(tmp_path).totals() == {"memory_hits": 0, "disk_hits": 0, "misses": 1}


def test_memory_tier_is_lru_capped(tmp_path):
    store = Store(tmp_path, max_bytes=2500, disk=False)
    a, b = _put(store, "a"), _put(store, "b")
    assert store.get(a.digest) is not None  # a is now more recent than b
    c = _put(store, "c")
    assert store.get(b.digest) is None
    assert store.get(a.digest) == _payload("a") and store.get(c.digest) == _payload("c")


# ---------------------------------------------------------------------------
# Format: verified on read, no code ever run from a file


def _valid_entry_bytes(tmp_path: Path, name: str = "a") -> tuple[CacheKey, bytes]:
    key = _put(Store(tmp_path), name, size=200)
    return key, _entry_file(tmp_path, key).read_bytes()


def test_entry_layout_is_magic_version_json_header_payload(tmp_path):
    key, data = _valid_entry_bytes(tmp_path)
    magic, version, header_length = struct.unpack(">8sII", data[:16])
    assert (magic, version) == (MAGIC, FORMAT_VERSION)
    header = json.loads(data[16:16 + header_length])
    payload = data[16 + header_length:]
    assert payload == _payload("a", 200)
    assert header["payload_length"] == 200
    assert header["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert header["components"] == dict(key.component_hashes)
    assert header["digest"] == key.digest


def _corruptions(data: bytes) -> dict[str, bytes]:
    header_end = 16 + struct.unpack(">I", data[12:16])[0]
    flipped_payload = bytearray(data)
    flipped_payload[-1] ^= 0xFF
    other_version = data[:8] + struct.pack(">I", FORMAT_VERSION + 1) + data[12:]
    return {
        "empty": b"",
        "truncated in preamble": data[:10],
        "truncated in header": data[:header_end - 5],
        "truncated in payload": data[:-1],
        "trailing bytes": data + b"\0",
        "payload bit flip": bytes(flipped_payload),
        "header garbage": data[:16] + b"\xff" * (header_end - 16) + data[header_end:],
        "other version": other_version,
        "bad magic": b"NOTMAGIC" + data[8:],
        "garbage": os.urandom(len(data)),
        "huge lengths": MAGIC + struct.pack(">II", FORMAT_VERSION, 2**32 - 1) + data[16:],
    }


@pytest.mark.parametrize("corruption", sorted(_corruptions(b"\0" * 64)))
def test_bad_entry_is_a_miss_logged_once_and_removed(tmp_path, caplog, corruption):
    key, data = _valid_entry_bytes(tmp_path)
    path = _entry_file(tmp_path, key)
    path.write_bytes(_corruptions(data)[corruption])
    deltas = CounterDeltas()
    store = Store(tmp_path)
    assert store.get(key.digest) is None
    assert not path.exists()
    assert store.get(key.digest) is None
    assert len(_warnings(caplog)) == 1 and "bad cache entry" in _warnings(caplog)[0]
    assert deltas[counters.CACHE_BAD_ENTRIES] == 1
    _put(store, "a", size=200)  # the slot is usable again
    assert Store(tmp_path).get(key.digest) == _payload("a", 200)


def test_bad_entry_that_cannot_be_removed_is_still_warned_about_once(tmp_path, caplog,
                                                                     monkeypatch):
    key, data = _valid_entry_bytes(tmp_path)
    _entry_file(tmp_path, key).write_bytes(data[:-1])

    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "refused", str(path))

    monkeypatch.setattr(store_module.os, "unlink", refuse)
    store = Store(tmp_path)
    for _ in range(3):
        assert store.get(key.digest) is None
    bad = [m for m in _warnings(caplog) if "bad cache entry" in m]
    assert len(bad) == 1


def test_verify_reports_and_optionally_removes_bad_entries(tmp_path):
    good, _ = _valid_entry_bytes(tmp_path, "good")
    bad, data = _valid_entry_bytes(tmp_path, "bad")
    _entry_file(tmp_path, bad).write_bytes(data[:-3] + b"xyz")
    report = Store(tmp_path).verify()
    assert report.checked == 2 and not report.ok
    assert [(b.digest, b.reason) for b in report.bad] == [(bad.digest, "payload checksum mismatch")]
    assert _entry_file(tmp_path, bad).exists()  # reporting alone deletes nothing
    assert not Store(tmp_path).verify(remove=True).ok
    assert Store(tmp_path).verify().ok
    assert Store(tmp_path).get(good.digest) == _payload("good", 200)


def test_loading_a_pickle_runs_no_code(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    key = _key("a")
    cache = tmp_path / "c"
    Store(cache)
    _entry_file(cache, key).write_bytes(pickle.dumps(Exploit()))
    assert Store(cache).get(key.digest) is None
    assert not marker.exists()


def _fixed_entry_bytes() -> tuple[CacheKey, bytes]:
    """A valid entry with a fixed creation time, so its bytes never vary between runs."""
    key, payload = _key("a"), _payload("a", 200)
    header = store_module.encode_header(key.digest, payload, dict(key.component_hashes), {},
                                        created=1_700_000_000.0)
    return key, header + payload


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_mutation_yields_the_right_bytes_or_a_miss(data):
    key, original = _fixed_entry_bytes()
    mutated = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        if not mutated:
            break
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(mutated) - 1))
        if op == "flip":
            mutated[at] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del mutated[at:]
        else:
            mutated[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    with tempfile.TemporaryDirectory() as d:
        _entry_file(Path(d), key).write_bytes(bytes(mutated))
        got = Store(d).get(key.digest)
    assert got is None or got == _payload("a", 200)
    if bytes(mutated) == original:
        assert got == _payload("a", 200)


# ---------------------------------------------------------------------------
# Atomic writes: a writer killed mid-write leaves nothing a reader trusts


def _write_then_hang(directory: str, started) -> None:
    """Child: start writing a large entry, signal the parent half-way, then hang."""

    def slow_write_all(f, parts):
        header, payload = parts
        f.write(header)
        f.write(payload[: len(payload) // 2])
        f.flush()
        started.set()
        time.sleep(60)
        f.write(payload[len(payload) // 2:])

    store_module._write_all = slow_write_all
    _put(Store(directory), "killed", size=4 << 20)


def test_sigkilled_writer_leaves_only_an_untrusted_temp_file(tmp_path):
    directory = tmp_path / "c"
    survivor = _put(Store(directory), "survivor")
    started = _FORK.Event()
    child = _FORK.Process(target=_write_then_hang, args=(str(directory), started))
    child.start()
    try:
        assert started.wait(30), "the writer never started"
        os.kill(child.pid, 9)
    finally:
        child.join(30)
    assert child.exitcode == -9

    (temp,) = _temp_files(directory)
    assert (directory / temp).stat().st_size > 2 << 20  # it really died mid-write
    killed = _key("killed")
    assert not _entry_file(directory, killed).exists()
    store = Store(directory)
    assert store.get(killed.digest) is None
    assert [e.digest for e in store.entries()] == [survivor.digest]
    assert store.verify().ok and store.verify().checked == 1
    assert store.get(survivor.digest) == _payload("survivor")

    # A fresh temp file might be a live writer's, so it stays; a stale one goes.
    assert store.prune().stale_temps_removed == 0 and _temp_files(directory) == [temp]
    old = time.time() - STALE_TEMP_SECONDS - 60
    os.utime(directory / temp, (old, old))
    Store(directory)  # opening the store cleans up
    assert _temp_files(directory) == []


# ---------------------------------------------------------------------------
# Concurrency


_NAMES = [f"k{i}" for i in range(6)]
_SIZES = {name: 60_000 + 20_000 * i for i, name in enumerate(_NAMES)}
_CAP = 450_000  # less than all six entries: evictions race with reads and writes


def _hammer(directory: str, seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    bad_before = counters.counter(counters.CACHE_BAD_ENTRIES)  # inherited from the parent
    for _ in range(rounds):
        store = Store(directory, max_bytes=_CAP)  # fresh memory tier: go to disk
        for name in rng.sample(_NAMES, len(_NAMES)):
            key = _key(name)
            got = store.get(key.digest)
            if got is None:
                store.put(key.digest, _payload(name, _SIZES[name]), dict(key.component_hashes))
            elif got != _payload(name, _SIZES[name]):
                raise SystemExit(f"wrong bytes for {name}")
    if counters.counter(counters.CACHE_BAD_ENTRIES) != bad_before:
        raise SystemExit("a reader saw a half-written or corrupt entry")


def test_four_processes_share_one_directory(tmp_path):
    rounds = 10
    procs = [_FORK.Process(target=_hammer, args=(str(tmp_path), seed, rounds))
             for seed in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]

    store = Store(tmp_path, max_bytes=_CAP)
    report = store.verify()
    assert report.ok and report.checked >= 1
    assert _temp_files(tmp_path) == []
    assert sum(e.size for e in store.entries()) <= _CAP
    for info in store.entries():
        name = next(n for n in _NAMES if _key(n).digest == info.digest)
        assert store.get(info.digest) == _payload(name, _SIZES[name])
    totals = Store(tmp_path).totals()
    assert totals["memory_hits"] + totals["disk_hits"] + totals["misses"] == (
        4 * rounds * len(_NAMES) + len(store.entries()))


def test_threads_share_one_store(tmp_path):
    store = Store(tmp_path, max_bytes=12_000)
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(60):
            name = rng.choice(_NAMES)
            got = store.get(_key(name).digest)
            if got is None:
                _put(store, name, size=2000)
            elif got != _payload(name, 2000):
                errors.append(name)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store._memory_bytes == sum(len(e.payload) for e in store._memory.values()) <= 12_000
    assert store.verify().ok


# ---------------------------------------------------------------------------
# Size cap: least recently used goes first


def _age(directory: Path, key: CacheKey, seconds_ago: float) -> None:
    when = time.time() - seconds_ago
    os.utime(_entry_file(directory, key), (when, when))


def test_put_over_the_cap_evicts_least_recently_used(tmp_path):
    store = Store(tmp_path)
    a, b, c = _put(store, "a"), _put(store, "b"), _put(store, "c")
    size = _entry_file(tmp_path, a).stat().st_size
    _age(tmp_path, a, 300)
    _age(tmp_path, b, 200)
    _age(tmp_path, c, 100)

    reader = Store(tmp_path)  # a hit from another process marks a as used now
    assert reader.get(a.digest) == _payload("a")
    deltas = CounterDeltas()
    capped = Store(tmp_path, max_bytes=3 * size + size // 2)
    d = _put(capped, "d")
    remaining = {e.digest for e in capped.entries()}
    assert remaining == {a.digest, c.digest, d.digest}
    assert deltas[counters.CACHE_EVICTIONS] == 1


def test_prune_to_a_limit_and_oversized_entries(tmp_path):
    store = Store(tmp_path)
    keys = [_put(store, name) for name in "abcd"]
    for age, key in zip((400, 300, 200, 100), keys, strict=True):
        _age(tmp_path, key, age)
    sizes = [_entry_file(tmp_path, key).stat().st_size for key in keys]
    report = store.prune(sizes[2] + sizes[3])
    assert (report.removed, report.freed_bytes, report.remaining_bytes) == (
        2, sizes[0] + sizes[1], sizes[2] + sizes[3])
    assert {e.digest for e in store.entries()} == {keys[2].digest, keys[3].digest}
    assert store.prune(0).removed == 2 and store.entries() == []

    small = Store(tmp_path / "small", max_bytes=500)
    big = _put(small, "big", size=600)
    assert small.entries() == [] and small.get(big.digest) is None


def test_unrelated_files_are_ignored(tmp_path):
    (tmp_path / "README").write_text("hello")
    (tmp_path / ("z" * 64 + ".entry")).write_text("not a digest")
    store = Store(tmp_path)
    key = _put(store, "a")
    assert [e.digest for e in store.entries()] == [key.digest]
    assert store.verify().checked == 1
    store.clear()
    assert (tmp_path / "README").exists()


def test_stale_temp_files_are_removed_on_open_and_fresh_ones_kept(tmp_path):
    stale, fresh = tmp_path / f"{TEMP_PREFIX}old.part", tmp_path / f"{TEMP_PREFIX}new.part"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = time.time() - STALE_TEMP_SECONDS - 1
    os.utime(stale, (old, old))
    Store(tmp_path)
    assert not stale.exists() and fresh.exists()


# ---------------------------------------------------------------------------
# Untrusted or unusable directories: warn once, memory tier only, never raise


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777], ids=oct)
def test_directory_writable_by_others_is_refused(tmp_path, caplog, mode):
    directory = tmp_path / "c"
    directory.mkdir()
    directory.chmod(mode)
    stores = [Store(directory), Store(directory)]
    assert not any(s.disk_enabled for s in stores)
    (warning,) = _warnings(caplog)
    assert "writable by group or others" in warning and "in-memory cache only" in warning
    key = _put(stores[0], "a")
    assert stores[0].get(key.digest) == _payload("a")
    assert list(directory.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_directory_owned_by_another_user_is_refused(tmp_path, caplog):
    directory = tmp_path / "c"
    directory.mkdir(mode=0o700)
    os.chown(directory, 4242, -1)
    store = Store(directory)
    assert not store.disk_enabled
    assert "owned by uid 4242" in _warnings(caplog)[0]
    _put(store, "a")
    assert list(directory.iterdir()) == []


def test_a_file_where_the_directory_should_be_is_refused(tmp_path, caplog):
    (tmp_path / "file").write_text("x")
    assert not Store(tmp_path / "file").disk_enabled
    assert not Store(tmp_path / "file" / "below").disk_enabled
    assert len(_warnings(caplog)) == 2


def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))
    return fail


@pytest.mark.parametrize(("target", "code"), [
    ("_write_all", errno.ENOSPC),
    ("replace", errno.EROFS),
    ("mkstemp", errno.EACCES),
])
def test_write_failure_turns_the_disk_tier_off_quietly(tmp_path, caplog, monkeypatch, target,
                                                        code):
    store = Store(tmp_path)
    old = _put(store, "old")
    if target == "_write_all":
        monkeypatch.setattr(store_module, "_write_all", _fail_with(code))
    elif target == "replace":
        monkeypatch.setattr(store_module.os, "replace", _fail_with(code))
    else:
        monkeypatch.setattr(store_module.tempfile, "mkstemp", _fail_with(code))

    for name in ("a", "b", "c"):  # never raises, warns once
        _put(store, name)
    assert not store.disk_enabled
    (warning,) = _warnings(caplog)
    assert os.strerror(code) in warning and "in-memory cache only" in warning
    assert store.get(_key("b").digest) == _payload("b")
    assert store.get(old.digest) == _payload("old")
    monkeypatch.undo()
    assert _temp_files(tmp_path) == []
    assert [e.digest for e in Store(tmp_path).entries()] == [old.digest]
