"""The import floors, read from the source: imports flow cli -> analyses -> hookpoints (model side) -> store.

- the store imports nothing of ours but ``hookpoints.errors``;
- the model side (``hookpoints/`` but its front door ``__init__.py``) imports no analyses and no cli;
- the analyses import no cli;
- module-level imports form no cycle.

Every ``import`` statement counts for the floors (one inside a function too: it runs all the same);
only module-level ones for cycles (a lazy import cannot deadlock a partially initialised module).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "hookpoints": "hookpoints",
    "store": "hookpoints.store",
    "analyses": "hookpoints.analyses",
    "cli": "hookpoints.cli",
}


def _modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package (the folders mapped as pyproject maps them)."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str:
    """The longest known module ``name`` starts with (``hookpoints.analyses.ap.LabelSetPlan`` -> ``...ap``)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str, *, top_level_only: bool) -> set[str]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {_resolve(name) for name in names if name == "hookpoints" or name.startswith("hookpoints.")}
    return found - {module}


def _floor(module: str) -> str:
    for layer in ("store", "analyses", "cli"):
        if module == f"hookpoints.{layer}" or module.startswith(f"hookpoints.{layer}."):
            return layer
    return "front door" if module == "hookpoints" else "model"


def test_the_walk_sees_every_floor():
    floors = {_floor(m) for m in MODULES}
    assert floors == {"store", "analyses", "cli", "model", "front door"}
    assert "hookpoints.analyses.ap" in MODULES and "hookpoints.adapters.base" in MODULES
    assert "hookpoints.store.catalog" in _imports("hookpoints.analyses.hook_matrix", top_level_only=True)


def test_imports_respect_the_floors():
    allowed = {
        "store": lambda target: _floor(target) == "store" or target == "hookpoints.errors",
        "model": lambda target: _floor(target) in ("model", "store", "front door"),
        "analyses": lambda target: _floor(target) != "cli",
        "cli": lambda target: True,
        "front door": lambda target: True,
    }
    wrong = [
        f"{module} imports {target}"
        for module in MODULES
        for target in sorted(_imports(module, top_level_only=False))
        if not allowed[_floor(module)](target)
    ]
    assert not wrong, wrong


def test_module_level_imports_have_no_cycle():
    graph = {module: _imports(module, top_level_only=True) & MODULES.keys() for module in MODULES}
    # A package's __init__ importing its own submodules is how packages export; a cycle is anything else.
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                if not all(
                    a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(cycle, cycle[1:], strict=False)
                ):
                    cycles.append(" -> ".join(cycle))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
