"""The code's layout keeps its promises (README: How the code is laid out): no import circle among
adapterkit's modules, and no code outside adapters/ tests a method's name (it reads the method rows)."""

from __future__ import annotations

import ast

from import_graph import PACKAGE, cycles, graph

from adapterkit.adapters import METHODS


def test_no_import_cycle_among_adapterkit_modules():
    edges = graph()
    assert "adapterkit.stages.sft" in edges["adapterkit.stages"]  # the graph is read at all
    assert cycles(edges) == []


def test_only_the_cli_imports_inside_functions():
    # Elsewhere a function-local import of adapterkit code would only hide a circle until it runs; the CLI
    # imports lazily so that `adapterkit --help` does not load torch.
    local = {(a, b) for a, targets in graph().items() for b, inside in targets.items() if inside}
    assert {a for a, _ in local} <= {"adapterkit.cli"}, sorted(local)


def test_no_method_name_is_tested_outside_adapters():
    names = set(METHODS)
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "adapters":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            values = [node.left, *node.comparators]
            literals = {v.value for v in values if isinstance(v, ast.Constant)}
            literals |= {e.value for v in values if isinstance(v, (ast.Tuple, ast.List, ast.Set))
                         for e in v.elts if isinstance(e, ast.Constant)}
            # A row's family ("full", "lora", "soft_prompt") and an adapter section ("lora") share words with
            # method names; comparing those is reading the row, not testing a name.
            if literals & names and not any(w in ast.unparse(node) for w in (".family", ".sections")):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []
