"""The code's layout keeps its rules (docs/architecture.md): imports go one way, down
Make -> tasks.py -> backends/ -> scripts/ -> nanochat/; no script imports another script; no
import cycle among the project's modules; no module over 600 lines; every module says what it
does in a docstring. Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 600


def project_modules() -> dict[str, Path]:
    """Dotted name -> file for every module of the project (tests included)."""
    found = {"tasks": ROOT / "tasks.py"}
    for top in ("nanochat", "scripts", "backends", "tests"):
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


MODULES = project_modules()


def owner(name: str) -> str | None:
    """The project module an imported name lives in (``nanochat.training.checkpoint.find`` ->
    ``nanochat.training.checkpoint``), or None for a third-party one."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(filter(None, (owner(alias.name) for alias in node.names)))
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                out.add(owner(f"{node.module}.{alias.name}") or owner(node.module))
    out.discard(None)
    return out


GRAPH = {
    name: imports_of(path) - {name}
    for name, path in MODULES.items()
    if not name.startswith("tests")
}


def layer(name: str) -> int:
    """Higher layers may import lower ones only: tasks.py 3, backends 2, scripts 1, nanochat 0."""
    return {"tasks": 3, "backends": 2, "scripts": 1, "nanochat": 0}[name.split(".")[0]]


def test_imports_only_go_down_and_no_script_imports_another():
    wrong = [
        f"{name} imports {other}"
        for name, targets in GRAPH.items()
        for other in sorted(targets)
        if layer(other) > layer(name)
        or (name.startswith("scripts.") and other.startswith("scripts.") and other != "scripts")
    ]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    """Tarjan's strongly connected components over the import graph: none larger than one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in GRAPH.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_is_small_and_says_what_it_does(name):
    path = MODULES[name]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{path} is over {MAX_LINES} lines: split it"
    if text.strip() and name != "tests":
        assert ast.get_docstring(ast.parse(text)), f"{path} has no module docstring"
