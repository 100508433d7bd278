"""The shape of the code: no import cycles inside the package, no function longer than a screenful or two.

Both are read from the source (``ast``), nothing is imported: the package is ``qblock/`` plus
``backends/`` and ``problems/``, which install as ``qblock.backends`` and ``qblock.problems``.
Imports inside functions count too (a lazy import is still a dependency).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"qblock": ROOT / "qblock", "qblock.backends": ROOT / "backends", "qblock.problems": ROOT / "problems"}
MAX_FUNCTION_LINES = 120


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = [p for p in f.relative_to(folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports (``from pkg import submodule`` counts as the submodule)."""
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            for a in node.names:
                deps.add(f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module)
    return {d for d in deps if d in mods and d != name}


def import_cycles() -> list[list[str]]:
    """Strongly connected components of more than one module in the package's import graph."""
    mods = _modules()
    graph = {name: sorted(_imports(name, path, mods)) for name, path in mods.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def long_functions(limit: int = MAX_FUNCTION_LINES) -> dict[str, int]:
    """``"path:function" -> lines`` of every function (docstring and nested functions included) over ``limit``."""
    out = {}
    for path in _modules().values():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    return out


def test_no_import_cycles():
    assert import_cycles() == []


def test_the_cycle_finder_sees_a_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "qblock"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from qblock import b\n")
    (pkg / "b.py").write_text("from qblock.a import f\n")
    monkeypatch.setitem(PACKAGES, "qblock", pkg)
    monkeypatch.delitem(PACKAGES, "qblock.backends")
    monkeypatch.delitem(PACKAGES, "qblock.problems")
    assert import_cycles() == [["qblock.a", "qblock.b"]]


def test_no_function_over_120_lines():
    assert long_functions() == {}
