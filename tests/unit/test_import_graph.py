"""The import graph of ``datorus_core`` and ``addons`` has no cycle (issue 14).

The graph is read from the source with :mod:`ast`, every ``import`` counted wherever it
stands (inside a function too: an import moved into a function to dodge a cycle is still
one). ``from pkg import name`` points at ``pkg.name`` when that is a module, else at
``pkg``. Importing a module also runs its packages' ``__init__``; that implicit edge is
not counted (Python handles a package whose submodule imports a sibling).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("datorus_core", "addons")


def modules(root: Path, packages: tuple[str, ...]) -> dict[str, Path]:
    """Every module under *packages* in *root*, by dotted name."""
    out = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules of *known* that the module *name* (at *path*) imports."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m in known and m != name}


def import_graph(root: Path, packages: tuple[str, ...]) -> dict[str, set[str]]:
    """Module -> the modules it imports, within *packages*."""
    known = modules(root, packages)
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), or self-loops."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_in_datorus_core_and_addons() -> None:
    graph = import_graph(ROOT, PACKAGES)
    assert "datorus_core.api.app" in graph and "addons.datorus" in graph
    found = cycles(graph)
    detail = {m: sorted(graph[m] & set(c)) for c in found for m in c}
    assert found == [], f"import cycles: {found}; edges within them: {detail}"


def test_api_routes_never_import_each_other() -> None:
    graph = import_graph(ROOT, PACKAGES)
    routes = {m for m in graph if m.startswith("datorus_core.api.routes_")}
    assert len(routes) >= 7
    assert {r: sorted(graph[r] & routes) for r in routes if graph[r] & routes} == {}
    # the application includes the routes, so no route may import it
    assert [r for r in routes if "datorus_core.api.app" in graph[r]] == []


def test_the_check_sees_a_cycle_dodged_inside_a_function(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "app.py").write_text("def make():\n    from .sub import routes\n")
    (pkg / "sub" / "routes.py").write_text("from ..app import make\n")
    (pkg / "leaf.py").write_text("import pkg.app\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.app"] == {"pkg.sub.routes"}
    assert graph["pkg.sub.routes"] == {"pkg.app"}
    assert cycles(graph) == [["pkg.app", "pkg.sub.routes"]]
