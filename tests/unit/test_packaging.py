"""What the distribution promises: pinned dev tools, so CI cannot turn red on its own."""

from __future__ import annotations

import ast
from pathlib import Path

SETUP = Path(__file__).resolve().parents[2] / "setup.py"


def _extras() -> dict[str, list[str]]:
    call = next(node for node in ast.walk(ast.parse(SETUP.read_text(encoding="utf-8")))
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setup")
    extras = next(k.value for k in call.keywords if k.arg == "extras_require")
    return ast.literal_eval(extras)


def test_every_dev_tool_is_pinned_to_one_version():
    dev = _extras()["dev"]
    tools = {"pytest", "pytest-benchmark", "hypothesis", "ruff", "matplotlib"}
    pinned = {req.split("==")[0]: req for req in dev if "==" in req}
    assert tools <= set(pinned), f"unpinned: {sorted(tools - set(pinned))}"
    assert all("==" in req for req in dev), dev
