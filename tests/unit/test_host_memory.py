"""``runtime.host_memory``: glibc's malloc is set up once, never over the user's settings."""

from __future__ import annotations

import pytest

from xla_backend.runtime import host_memory

USER_SETTINGS = ("MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                 "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")


@pytest.fixture
def mallopt(monkeypatch):
    """Records mallopt calls instead of changing this process's malloc."""
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(host_memory, "_MALLOPT",
                        lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.setattr(host_memory, "_kept", False)
    for name in USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return calls


def test_sets_a_fixed_mmap_threshold_and_top_pad_once_per_process(mallopt):
    assert host_memory.keep_step_heaps()
    # glibc's M_MMAP_THRESHOLD (-3) at its 64-bit maximum, M_TOP_PAD (-2) at a heap's size
    assert mallopt == [(-3, 32 * 1024 * 1024), (-2, 64 * 1024 * 1024)]
    assert not host_memory.keep_step_heaps()
    assert len(mallopt) == 2


@pytest.mark.parametrize("name,value", [("MALLOC_TOP_PAD_", "0"),
                                        ("MALLOC_MMAP_THRESHOLD_", "131072"),
                                        ("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")])
def test_a_user_who_tunes_malloc_keeps_their_settings(mallopt, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert not host_memory.keep_step_heaps()
    assert mallopt == []


def test_other_glibc_tunables_do_not_count_as_tuning_malloc(mallopt, monkeypatch):
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.pthread.rseq=0")
    assert host_memory.keep_step_heaps()
    assert len(mallopt) == 2
