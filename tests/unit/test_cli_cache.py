"""`syncfree-xla cache ...`: called through main(argv) and, once, as a real subprocess."""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xla_backend.cache.key import CacheKey
from xla_backend.cache.store import Store
from xla_backend.tools import cli

REPO_ROOT = Path(__file__).resolve().parents[2]


def _key(name: str) -> CacheKey:
    return CacheKey([("graph", name)])


def _fill(directory: Path, names: str = "abc", size: int = 3000) -> list[CacheKey]:
    store = Store(directory)
    keys = []
    for name in names:
        key = _key(name)
        store.put(key.digest, name.encode() * size, dict(key.component_hashes), {})
        keys.append(key)
    return keys


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "cache"
    keys = _fill(directory)
    an_hour_ago = time.time() - 3600
    for entry in directory.glob("*.entry"):
        os.utime(entry, (an_hour_ago, an_hour_ago))
    Store(directory).get(keys[0].digest)  # a disk hit, so "a" is the most recently used
    Store(directory).get(_key("zz").digest)  # a miss
    return directory


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_stats_shows_entries_size_and_hit_counts(cache_dir, capsys):
    code, out, _ = _run(capsys, "cache", "--cache-dir", str(cache_dir), "stats")
    assert code == 0
    assert "entries:         3" in out
    total = sum(p.stat().st_size for p in cache_dir.glob("*.entry"))
    assert f"total size:      {cli.format_size(total)}" in out and "KiB" in out
    assert "hits:            1 (memory 0, disk 1)" in out
    assert "misses:          1" in out
    assert "hit rate:        50.0%" in out


def test_cache_dir_may_follow_the_action_or_come_from_the_environment(cache_dir, capsys,
                                                                      monkeypatch):
    code, out, _ = _run(capsys, "cache", "stats", "--cache-dir", str(cache_dir))
    assert code == 0 and "entries:         3" in out
    monkeypatch.setenv("SYNCFREE_XLA_CACHE_DIR", str(cache_dir))
    code, out, _ = _run(capsys, "cache", "stats")
    assert code == 0 and f"cache directory: {cache_dir}" in out


def test_a_missing_cache_is_reported_and_not_created(tmp_path, capsys):
    missing = tmp_path / "nothing"
    for action in ("stats", "list", "verify", "prune", "clear"):
        code, out, _ = _run(capsys, "cache", "--cache-dir", str(missing), action)
        assert code == 0 and "no cache at" in out
    assert not missing.exists()


def test_an_untrusted_directory_is_an_error(tmp_path, capsys):
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)
    code, _, err = _run(capsys, "cache", "--cache-dir", str(directory), "stats")
    assert code == 2 and "cannot use the cache" in err


def test_list_shows_each_entry_with_size_age_and_last_use(cache_dir, capsys):
    code, out, _ = _run(capsys, "cache", "--cache-dir", str(cache_dir), "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["DIGEST", "SIZE", "AGE", "LAST", "USED"]
    rows = lines[1:-1]
    assert len(rows) == 3
    # Most recently used first: "a" had the disk hit.
    assert rows[0].startswith(_key("a").digest[:16])
    assert {row.split()[0] for row in rows} == {_key(n).digest[:16] for n in "abc"}
    assert all("KiB" in row and row.endswith("ago") for row in rows)
    assert rows[0].endswith(" 0s ago") and rows[1].endswith(" 1h ago")
    assert lines[-1].startswith("3 entries, ")


def test_list_of_an_empty_cache(tmp_path, capsys):
    Store(tmp_path / "empty")
    code, out, _ = _run(capsys, "cache", "--cache-dir", str(tmp_path / "empty"), "list")
    assert code == 0 and "no entries" in out


def test_verify_is_clean_then_reports_a_bad_entry_with_exit_code_1(cache_dir, capsys):
    code, out, _ = _run(capsys, "cache", "--cache-dir", str(cache_dir), "verify")
    assert (code, out.strip()) == (0, "checked 3 entries: all good")

    bad = cache_dir / f"{_key('b').digest}.entry"
    data = bytearray(bad.read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    code, out, _ = _run(capsys, "cache", "--cache-dir", str(cache_dir), "verify")
    assert code == 1
    assert f"BAD {_key('b').digest}: payload checksum mismatch" in out
    assert "1 of 3 entries bad" in out
    assert bad.exists()

    code, out, _ = _run(capsys, "cache", "--cache-dir", str(cache_dir), "verify", "--remove")
    assert code == 1 and "(removed)" in out and not bad.exists()
    code, _, _ = _run(capsys, "cache", "--cache-dir", str(cache_dir), "verify")
    assert code == 0


@pytest.mark.parametrize(("text", "expected"), [
    ("0", 0),
    ("123", 123),
    ("500M", 500 * 2**20),
    ("2G", 2 * 2**30),
    ("2g", 2 * 2**30),
    ("64k", 64 * 1024),
    ("1.5GiB", 3 * 2**29),
    ("10MB", 10 * 2**20),
    ("1T", 2**40),
])
def test_parse_size_accepts_plain_ints_and_suffixes(text, expected):
    assert cli.parse_size(text) == expected


@pytest.mark.parametrize("text", ["12x", "-5", "", "M", "2 GB GB", "1e9", "five"])
def test_parse_size_rejects_anything_else_naming_the_value(text):
    with pytest.raises(argparse.ArgumentTypeError, match="500M"):
        cli.parse_size(text)


def test_prune_with_a_bad_size_is_a_clear_usage_error(cache_dir, capsys):
    code, _, err = _run(capsys, "cache", "--cache-dir", str(cache_dir), "prune",
                        "--max-bytes", "12x")
    assert code == 2
    assert "invalid size '12x'" in err and "500M, 2G" in err
    assert len(list(cache_dir.glob("*.entry"))) == 3


def test_prune_evicts_least_recently_used_down_to_the_limit(cache_dir, capsys):
    one_entry = max(p.stat().st_size for p in cache_dir.glob("*.entry"))
    code, out, _ = _run(capsys, "cache", "--cache-dir", str(cache_dir), "prune",
                        "--max-bytes", str(one_entry))
    assert code == 0 and out.startswith("removed 2 entries (")
    assert [p.name for p in cache_dir.glob("*.entry")] == [f"{_key('a').digest}.entry"]
    code, out, _ = _run(capsys, "cache", "--cache-dir", str(cache_dir), "prune",
                        "--max-bytes", "0")
    assert code == 0 and "removed 1 entry " in out
    assert list(cache_dir.glob("*.entry")) == []


@pytest.mark.parametrize("answer", ["", "n\n", "no\n", "whatever\n"])
def test_clear_without_a_yes_deletes_nothing(cache_dir, capsys, monkeypatch, answer):
    monkeypatch.setattr(sys, "stdin", io.StringIO(answer))
    code, out, _ = _run(capsys, "cache", "--cache-dir", str(cache_dir), "clear")
    assert code == 1
    assert "delete 3 entries" in out and "[y/N]" in out and "nothing deleted" in out
    assert len(list(cache_dir.glob("*.entry"))) == 3


def test_clear_with_no_stdin_at_all_deletes_nothing(cache_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    code, _, _ = _run(capsys, "cache", "--cache-dir", str(cache_dir), "clear")
    assert code == 1 and len(list(cache_dir.glob("*.entry"))) == 3
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(sys, "stdin", closed)
    code, _, _ = _run(capsys, "cache", "--cache-dir", str(cache_dir), "clear")
    assert code == 1 and len(list(cache_dir.glob("*.entry"))) == 3


@pytest.mark.parametrize("answer", ["y\n", "YES\n"])
def test_clear_after_confirmation(cache_dir, capsys, monkeypatch, answer):
    monkeypatch.setattr(sys, "stdin", io.StringIO(answer))
    code, out, _ = _run(capsys, "cache", "--cache-dir", str(cache_dir), "clear")
    assert code == 0 and "deleted 3 entries" in out
    assert list(cache_dir.glob("*.entry")) == []


def test_clear_with_yes_asks_nothing(cache_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", None)
    code, out, _ = _run(capsys, "cache", "--cache-dir", str(cache_dir), "clear", "--yes")
    assert code == 0 and "[y/N]" not in out
    assert list(cache_dir.glob("*.entry")) == []
    code, out, _ = _run(capsys, "cache", "--cache-dir", str(cache_dir), "stats")
    assert "entries:         0" in out and "misses:          0" in out


def test_human_readable_sizes_and_ages():
    assert [cli.format_size(n) for n in (0, 1023, 1024, 1536, 5 * 2**20, 2 * 2**30, 2**50)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 MiB", "2.0 GiB", "1024.0 TiB"]
    assert [cli.format_age(s) for s in (-1, 5, 90, 7200, 3 * 86400)] == [
        "0s", "5s", "1m", "2h", "3d"]


def test_usage_errors_and_help_return_exit_codes(capsys):
    assert cli.main([]) == 2
    assert cli.main(["cache"]) == 2
    assert cli.main(["cache", "frobnicate"]) == 2
    assert cli.main(["--help"]) == 0
    assert "cache" in capsys.readouterr().out


def test_more_command_groups_plug_in_beside_cache(capsys, monkeypatch):
    def add_hello_commands(subparsers) -> None:
        hello = subparsers.add_parser("hello")
        hello.set_defaults(func=lambda args: print("hi") or 7)

    monkeypatch.setattr(cli, "COMMAND_GROUPS", [*cli.COMMAND_GROUPS, add_hello_commands])
    assert cli.main(["hello"]) == 7
    assert capsys.readouterr().out == "hi\n"


def test_python_dash_m_runs_the_command(cache_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("SYNCFREE_XLA_CACHE_DIR", None)
    result = subprocess.run(
        [sys.executable, "-m", "xla_backend.tools.cli", "cache", "stats",
         "--cache-dir", str(cache_dir)],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "entries:         3" in result.stdout
