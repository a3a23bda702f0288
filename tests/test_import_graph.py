"""The package's import graph has no circle (docs/architecture.md, layers): every module-level import of mmkernels/
and python_api/ (installed as mmkernels.api) is an edge; imports inside functions (the lazy imports of optional
backends) are not. `from package import name` is an edge to package.name when that is a module, else to package."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = {"mmkernels": ROOT / "mmkernels", "mmkernels.api": ROOT / "python_api"}


def modules() -> dict:
    """Module name -> file, for every .py file of the two packages."""
    out = {}
    for prefix, folder in PACKAGES.items():
        for f in sorted(folder.rglob("*.py")):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([prefix, *parts])
            if prefix == "mmkernels" and parts[:1] == ["api"]:
                continue
            out[name] = f
    return out


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def edges(mods: dict) -> dict:
    graph = {name: set() for name in mods}
    for name, f in mods.items():
        is_package = f.name == "__init__.py"
        for node in ast.parse(f.read_text()).body:  # module level only: lazy imports are not edges
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.If | ast.Try):  # guarded imports at module level still run
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom):
                        base = _resolve(name, is_package, sub.level, sub.module)
                        targets += [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in sub.names]
            graph[name] |= {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: dict) -> list:
    """Every elementary cycle found by a depth-first search (one per back edge)."""
    found, state, stack = [], {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                found.append(stack[stack.index(m) :] + [m])
            elif m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def test_the_import_graph_has_no_circle():
    mods = modules()
    assert "mmkernels.reference.valuation" in mods and "mmkernels.api.pmr" in mods
    graph = edges(mods)
    assert sum(len(v) for v in graph.values()) > 50  # the graph is really built
    assert cycles(graph) == []


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
