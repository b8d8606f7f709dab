"""The package's shape: layers import only downwards, no import circle, no private name across packages.

Read with ``ast`` from the source (nothing is imported), so a violation names the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fewsight"

#: Bottom to top: a module may import its own layer and the ones before it.
LAYERS = (
    ("errors", "_io"),
    ("geometry", "retrieval"),
    ("data", "losses"),
    ("models",),
    ("eval",),
    ("fewshot",),
    ("hub",),
    ("train",),
    ("app",),
    ("cli",),
)
TOP = {"__init__"}  # fewsight/__init__.py re-exports the packages
MAX_LINES = 650


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _imports(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """``(line, imported module, imported names)`` for every import of a fewsight module, lazy ones included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "fewsight"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "fewsight":
                found.append((node.lineno, target, [a.name for a in node.names]))
    return found


def _top_package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(package: str) -> int:
    for i, names in enumerate(LAYERS):
        if package in names:
            return i
    raise AssertionError(f"fewsight.{package}: not placed in a layer of tests/test_architecture.py")


MODULES = _modules()


def test_every_package_has_a_layer():
    for module, _ in MODULES:
        top = _top_package(module)
        if top not in TOP:
            _layer(top)


def test_layers_import_only_downwards():
    bad = []
    for module, path in MODULES:
        top = _top_package(module)
        if top in TOP:
            continue
        for line, target, _ in _imports(path, module):
            other = _top_package(target)
            if other not in TOP and _layer(other) > _layer(top):
                bad.append(f"{path.relative_to(ROOT)}:{line} ({top}) imports {target} ({other})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_circle_between_modules():
    graph: dict[str, set[str]] = {m: set() for m, _ in MODULES}
    for module, path in MODULES:
        for _, target, names in _imports(path, module):
            # `from fewsight.x import y` may name a module y or an object of x.
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in graph and cand != module:
                    graph[module].add(cand)
                    break
    # Edges into a package's __init__ are edges into everything it re-exports: a circle through an
    # __init__ is a real circle at import time, so they stay.
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    # A package importing its own submodules from __init__ is not a circle unless a submodule imports back.
    real = [c for c in cycles if not _only_init_to_child(c)]
    assert not real, "import circles:\n" + "\n".join(real)


def _only_init_to_child(cycle: str) -> bool:
    nodes = cycle.split(" -> ")
    return all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(nodes, nodes[1:]))


def test_no_private_name_imported_from_another_package():
    bad = []
    for module, path in MODULES:
        top = _top_package(module)
        for line, target, names in _imports(path, module):
            if _top_package(target) == top:
                continue
            private = [n for n in names if n.startswith("_")] + [p for p in target.split(".")[1:] if p.startswith("_") and p != "_io"]
            if private:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {private} from {target}")
    assert not bad, "private names across packages:\n" + "\n".join(bad)


def test_no_test_imports_bench():
    bad = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        if path.name == Path(__file__).name:
            continue
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] == "bench" for n in names):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
        for i, line in enumerate(text.splitlines(), 1):  # bench scripts loaded by path
            if "bench" in line and any(w in line for w in ("sys.path", "run_path", "spec_from_file_location")):
                bad.append(f"{path.relative_to(ROOT)}:{i}")
    assert not bad, "tests importing bench/:\n" + "\n".join(bad)


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_module_size(module, path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)}: {lines} lines; a module holds one concept (guide: <= ~600)"
