"""The import graph, read from the source (ast): franca stands alone and its modules form no cycle.

Every ``import`` statement counts, also those inside functions: a lazy import that closes a cycle or reaches into
an add-on is still an arrow of the graph. ``from p import name`` is an edge to ``p.name`` when that is a module,
else to ``p``. Importing a package's submodule does not count as an edge to the package's ``__init__``.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Top-level packages outside the library; franca may import none of them.
ADD_ONS = ("rasa", "benchmarks", "demo", "scripts", "tests", "hubconf")


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@cache
def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(path: Path, known: dict[str, Path], root: Path = ROOT) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved), anywhere in the file."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                names.add(full if full in known else base)
    return names


def _graph(package: str) -> dict[str, set[str]]:
    modules = _modules(package)
    return {name: {i for i in _imports(path, modules) if i in modules and i != name} for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_sees_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_lazy_imports_are_read(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n\ndef f():\n    from .c import thing\n    import rasa.train\n")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("")
    known = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py", "pkg.c": pkg / "c.py"}
    assert _imports(pkg / "a.py", known, tmp_path) == {"pkg.b", "pkg.c", "rasa.train"}


def test_franca_imports_no_add_on():
    offending = sorted(
        f"{name} imports {imported}"
        for name, path in _modules("franca").items()
        for imported in _imports(path, _modules("franca"))
        if imported.split(".")[0] in ADD_ONS
    )
    assert offending == [], "franca/ must not import the packages built on it:\n" + "\n".join(offending)


@pytest.mark.parametrize("package", ["franca", "rasa"])
def test_no_import_cycles(package):
    graph = _graph(package)
    assert len(graph) > 5
    assert _cycles(graph) == []


def test_rasa_builds_on_franca_public_layers_only():
    """RASA post-training reaches franca through its models, hub, eval features, layers and utilities only."""
    allowed = ("franca.models", "franca.hub", "franca.eval", "franca.layers", "franca.utils")
    franca_imports = {
        f"{name} imports {imported}"
        for name, path in _modules("rasa").items()
        for imported in _imports(path, _modules("rasa"))
        if imported.split(".")[0] == "franca"
    }
    assert franca_imports, "rasa is expected to build on franca"
    offending = sorted(line for line in franca_imports if not line.split(" imports ")[1].startswith(allowed))
    assert offending == []


def test_franca_subpackages_form_layers():
    """Collapsed to subpackages (``franca.models``, ``franca.train``, …) the graph has no cycle either: no arrow runs
    back up from a lower layer (layers, loss, data, utils, …) to one built on it (train, eval, export, run)."""
    packages: dict[str, set[str]] = {}
    for name, imported in _graph("franca").items():
        package = ".".join(name.split(".")[:2])
        packages.setdefault(package, set()).update(".".join(i.split(".")[:2]) for i in imported)
    packages = {p: {i for i in imported if i != p and i in packages} for p, imported in packages.items()}
    assert {"franca.layers", "franca.train", "franca.hub"} <= set(packages)
    assert _cycles(packages) == []
