"""The house rules of the layout, read from the source: who may import whom.

- The core (``balancer/``) never imports ``plugins/`` or ``integrations/`` (they register through
  entry points, like third-party packages).
- No plugin imports the ``Balancer`` (plugins see stats and state only).
- No import circle between modules at import time (``TYPE_CHECKING`` and function-level imports
  are not executed at import time and are left out).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "balancer": ROOT / "balancer",
    "balancer.plugins": ROOT / "plugins",
    "balancer.integrations": ROOT / "integrations",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in FOLDERS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_time_imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Modules of this project that ``module`` imports when it is imported."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and _is_type_checking(node):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for item in getattr(node, block, []):
                        visit(item.body if isinstance(item, ast.ExceptHandler) else [item])
                continue
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                while name and name not in known:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    out.add(name)

    visit(ast.parse(path.read_text()).body)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _import_time_imports(m, p, known) for m, p in modules.items()}


def _all_imports(path: Path) -> set[str]:
    """Every module name an ``import`` anywhere in the file mentions (type-checking ones included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return names


def test_the_core_never_imports_plugins_or_integrations():
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            n for n in _all_imports(path) if n.startswith(("balancer.plugins", "balancer.integrations"))
        )
        for path in (ROOT / "balancer").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_plugin_imports_the_balancer():
    offenders = {
        path.name: sorted(
            n
            for n in _all_imports(path)
            if n in ("balancer.Balancer", "balancer.optimizer") or n.startswith("balancer.optimizer.")
        )
        for path in (ROOT / "plugins").glob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_circle():
    graph = _graph()
    assert len(graph) > 50  # the walk found the package
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            # A package's __init__ importing its own submodules is how packages work, not a circle.
            if node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                walk(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert cycles == []


def test_the_walk_sees_a_circle_when_there_is_one(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from balancer.b import x\n")
    b.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from balancer.a import y\nfrom balancer.a import z\n"
    )
    known = {"balancer.a", "balancer.b"}
    assert _import_time_imports("balancer.a", a, known) == {"balancer.b"}
    assert _import_time_imports("balancer.b", b, known) == {"balancer.a"}
    b.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from balancer.a import y\n")
    assert _import_time_imports("balancer.b", b, known) == set()


def test_every_sub_package_is_installed():
    """A sub-package missing from pyproject's list works in the editable install and is absent
    from a regular one (wheel, ``pip install .``)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join((package, *init.parent.relative_to(folder).parts))
        for package, folder in FOLDERS.items()
        for init in folder.rglob("__init__.py")
    }
    assert found == listed
