"""The import graph of adapterkit's own modules, read from the source (nothing is imported).

    python tests/import_graph.py        # every import between adapterkit modules, and any cycle

An edge counts whether the import is at module level or inside a function: a function-local import
only hides a circle until the function runs. Exit code 1 when there is a cycle.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "adapterkit"


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _targets(mods: dict[str, Path], here: str, node: ast.AST) -> list[str]:
    """The adapterkit modules an import statement loads (`from pkg import name` loads pkg.name if it is one)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = here if mods[here].name == "__init__.py" else here.rpartition(".")[0]
            for _ in range(node.level - 1):
                package = package.rpartition(".")[0]
            base = f"{package}.{base}" if base else package
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    else:
        return []
    out = []
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name.startswith("adapterkit") and name != here:
            out.append(name)
    return out


def graph() -> dict[str, dict[str, bool]]:
    """module -> {imported module: whether the import is inside a function}."""
    mods = modules()
    edges: dict[str, dict[str, bool]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f)}
        typing_only = {id(n) for s in tree.body if isinstance(s, ast.If) and "TYPE_CHECKING" in ast.unparse(s.test)
                       for n in ast.walk(s)}
        edges[name] = {}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            for target in _targets(mods, name, node):
                edges[name][target] = edges[name].get(target, True) and id(node) in local
    return edges


def cycles(edges: dict[str, dict[str, bool]]) -> list[list[str]]:
    """Every elementary cycle, each listed once from its smallest module name."""
    found = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in edges.get(node, {}):
            if nxt == start:
                found.append(path)
            elif nxt > start and nxt not in path:
                walk(start, nxt, [*path, nxt])

    for start in sorted(edges):
        walk(start, start, [start])
    return found


def main() -> int:
    edges = graph()
    for name in sorted(edges):
        for target, local in sorted(edges[name].items()):
            print(f"{name} -> {target}{'  (inside a function)' if local else ''}")
    found = cycles(edges)
    print(f"\n{len(found)} cycle(s)" + "".join(f"\n  {' -> '.join([*c, c[0]])}" for c in found))
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
