"""The code's layout rules, read from the source (no import of torch or torch_xla).

Data flows one way through the modules, so the import graph of ``passes`` and
``xla_backend`` must have no cycle, lazy imports inside functions included; a
private name (``_x``) is used only inside its own module, and a private module only
inside its own package; ``passes`` knows nothing of XLA; and each stage imports only the
stages before it (:data:`STAGES`), so the backend never imports the tools built on it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("passes", "xla_backend")
# The stages of the data flow, in order: a module imports only its own stage and earlier
# ones. Modules outside every listed stage are the base every stage may use (options,
# errors, counters, device, sharding, xla_metrics). The package's own ``__init__``
# (public names, the lazy ``explain``) is exempt.
STAGES: tuple[tuple[str, ...], ...] = (
    ("xla_backend.dynamo",), ("passes",), ("xla_backend.aot",), ("xla_backend.rewrites",),
    ("xla_backend.lower",),
    ("xla_backend.cache",), ("xla_backend.runtime",), ("xla_backend.backend",),
    ("xla_backend.tools", "xla_backend.testing"),  # built on the backend
)


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: set[str] = field(default_factory=set)  # project modules, lazy ones included
    private_uses: list[str] = field(default_factory=list)
    external: set[str] = field(default_factory=set)  # top-level names of other imports


def _modules() -> dict[str, Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            found[name] = Module(name, path, is_package)
    return found


def _absolute(module: Module, target: str | None, level: int) -> str:
    if level == 0:
        return target or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _package(name: str) -> str:
    return name.rpartition(".")[0]


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _analyse() -> dict[str, Module]:
    modules = _modules()
    for module in modules.values():
        aliases: dict[str, str] = {}  # local name -> project module it is bound to
        tree = ast.parse(module.path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules:
                        module.imports.add(alias.name)
                        aliases[alias.asname or alias.name] = alias.name
                    else:
                        module.external.add(alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(module, node.module, node.level)
                if source not in modules:
                    module.external.add(source.split(".")[0])
                    continue
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    target = full if full in modules else source
                    if target != module.name:
                        module.imports.add(target)
                    if target == full:
                        aliases[alias.asname or alias.name] = full
                    elif _private(alias.name) and source != module.name:
                        module.private_uses.append(f"from {source} import {alias.name}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _private(node.attr)
                    and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and aliases[node.value.id] != module.name):
                module.private_uses.append(f"{aliases[node.value.id]}.{node.attr}")
        for target in module.imports:
            last = target.rpartition(".")[2]
            if _private(last) and _package(target) != _package(module.name):
                module.private_uses.append(f"import of private module {target}")
    return modules


MODULES = _analyse()


def _cycles(modules: dict[str, Module]) -> list[list[str]]:
    """Each import cycle once, as the list of modules around it."""
    cycles, state, stack = [], {}, []

    def visit(name: str) -> None:
        state[name] = "open"
        stack.append(name)
        for target in sorted(modules[name].imports):
            if target == _package(name) or name.startswith(target + "."):
                continue  # a package's own __init__ runs first anyway
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target):] + [target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[name] = "done"

    for name in sorted(modules):
        if name not in state:
            visit(name)
    return cycles


def test_the_rules_see_the_code():
    assert "xla_backend.lower.trace" in MODULES and "passes.pipeline" in MODULES
    assert "xla_backend.lower.executable" in MODULES["xla_backend.lower.trace"].imports
    assert "torch" in MODULES["passes.pipeline"].external


def test_no_import_cycles():
    assert _cycles(MODULES) == []


def test_a_cycle_is_found():
    a = Module("pkg.a", Path("a.py"), False, imports={"pkg.b"})
    b = Module("pkg.b", Path("b.py"), False, imports={"pkg.c"})
    c = Module("pkg.c", Path("c.py"), False, imports={"pkg.a"})
    assert _cycles({"pkg.a": a, "pkg.b": b, "pkg.c": c}) == [["pkg.a", "pkg.b", "pkg.c",
                                                              "pkg.a"]]


def test_private_names_stay_in_their_module():
    uses = {m.name: m.private_uses for m in MODULES.values() if m.private_uses}
    assert uses == {}


def test_passes_know_nothing_of_xla():
    for module in MODULES.values():
        if module.name.split(".")[0] == "passes":
            assert not {i for i in module.imports if i.startswith("xla_backend")}, module.name
            assert "torch_xla" not in module.external, module.name


def _stage(name: str) -> int:
    """The index of ``name``'s stage in :data:`STAGES`; -1 for the base."""
    for k, stage in enumerate(STAGES):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in stage):
            return k
    return -1


def test_imports_follow_the_data_flow():
    against = sorted(
        (module.name, target) for module in MODULES.values() if module.name != "xla_backend"
        for target in module.imports if _stage(target) > _stage(module.name))
    assert against == []


def test_each_stage_is_a_folder_or_module_that_exists():
    for stage in STAGES:
        for prefix in stage:
            assert prefix in MODULES, prefix
