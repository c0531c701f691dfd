"""``xla_backend.device``: what the backend sets up before torch_xla starts."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from xla_backend import device


def test_one_malloc_arena_leaves_a_users_choice_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert device.one_malloc_arena() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_configure_pjrt_keeps_one_malloc_arena_on_the_cpu_client():
    """Applied in a fresh interpreter with the CPU client chosen and no user setting.

    What it saves is measured by ``benchmarks/memory_bench.py`` (syncfree_xla against
    syncfree_xla-arenas); here, that glibc accepted the setting.
    """
    code = ("from xla_backend import device\n"
            "applied = []\n"
            "real = device.one_malloc_arena\n"
            "device.one_malloc_arena = lambda: applied.append(real()) or applied[-1]\n"
            "device.configure_pjrt()\n"
            "assert applied == [True], applied\n")
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    env["PJRT_DEVICE"] = "CPU"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120,
                   cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
