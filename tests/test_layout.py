"""The package's layout: the import graph has no cycle, counting every import of a package module (at the
top, inside functions, and under TYPE_CHECKING alike)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "block_recurrent"


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from .x import``, ``from . import x``, ``import block_recurrent.x``)."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for path in PACKAGE.glob("*.py"):
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1 and node.module:
                    edges.add(node.module.split(".")[0])
                elif node.level == 1:
                    edges.update(alias.name for alias in node.names if alias.name in modules)
                    edges.add("__init__")  # `from . import x` runs the package's __init__
                elif node.module and node.module.startswith("block_recurrent"):
                    edges.add(node.module.split(".")[1] if "." in node.module else "__init__")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("block_recurrent."):
                        edges.add(alias.name.split(".")[1])
        graph[path.stem] = (edges & modules) - {path.stem}  # the package importing its own submodules
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle():
    graph = import_graph()
    assert "model" in graph and "layer" in graph["model"]  # the parser sees the imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("low, high", [("checks", "config"), ("config", "state"), ("layer", "model"),
                                       ("model", "segments"), ("model", "evaluation")])
def test_nothing_imports_upward(low, high):
    graph = import_graph()

    def reaches(a, b, seen=()):
        return b in graph[a] or any(reaches(n, b, seen + (a,)) for n in graph[a] if n not in seen)

    assert not reaches(low, high), f"{low} imports {high} (directly or through another module)"


def test_eval_and_generate_do_not_import_the_trainer():
    import subprocess
    import sys

    code = ("import sys, block_recurrent.cli, block_recurrent.evaluation, block_recurrent.generation; "
            "from block_recurrent import TrainConfig as _; loaded = 'block_recurrent.trainer' in sys.modules; "
            "print(loaded)")
    before = ("import sys, block_recurrent.cli, block_recurrent.evaluation, block_recurrent.generation; "
              "print('block_recurrent.trainer' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", before], capture_output=True, text=True, check=True).stdout.strip() == "False"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"
