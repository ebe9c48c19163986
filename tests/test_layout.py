"""The package's layout: subpackages that follow the architecture, imports that only go down, no cycle.

Every import of a package module counts: at the top, inside functions, and under TYPE_CHECKING alike.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "block_recurrent"

# each room may import only the rooms listed after it (and itself)
ROOMS = {
    "model": set(),
    "inference": {"model"},
    "persistence": {"model", "inference"},  # files of models and of decode states
    "training": {"model", "inference", "persistence"},
    "reference": {"model", "inference", "training"},
    "tasks": {"model", "inference", "training", "persistence"},
    # transformers' adapter, at the edge: it may import every other room, none imports it
    "hf": {"model", "inference", "persistence", "training", "reference", "tasks"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports, by dotted name (``block_recurrent.model.layer``)."""
    modules = {module_name(path) for path in PACKAGE.rglob("*.py")}
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("block_recurrent"):
                    continue
                edges.add(target)
                edges.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import x`
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name.startswith("block_recurrent"))
        graph[name] = (edges & modules) - {name}
    return graph


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


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
    assert "block_recurrent.model.layer" in graph["block_recurrent.model.model"]  # the parser sees the imports
    # the package's own __init__ re-exports everything: leave it out, as every submodule imports through it
    graph = {name: edges - {"block_recurrent"} for name, edges in graph.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


@pytest.mark.parametrize("name", sorted(ROOMS))
def test_each_room_imports_only_the_rooms_below_it(name):
    graph = import_graph()
    wrong = {
        f"{module} -> {target}"
        for module, targets in graph.items() if room(module) == name
        for target in targets
        if target == "block_recurrent" or (room(target) not in (name, None) and room(target) not in ROOMS[name])
        or (room(target) is None and target != "block_recurrent" and target.count(".") == 1)  # cli, top level
    }
    assert not wrong, sorted(wrong)


def test_the_room_rules_can_fail():
    graph = import_graph()
    assert any(room(t) == "model" for t in graph["block_recurrent.inference.decoding"])
    assert "model" not in ROOMS["model"] and "training" not in ROOMS["inference"]


def test_no_module_is_a_warehouse():
    sizes = {module_name(path): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert max(sizes.values()) <= 450, {name: n for name, n in sizes.items() if n > 450}


def test_eval_and_generate_do_not_import_the_trainer():
    code = ("import sys, block_recurrent.cli, block_recurrent.inference.evaluation, block_recurrent.inference.generation; "
            "from block_recurrent import TrainConfig as _; loaded = 'block_recurrent.training.trainer' in sys.modules; "
            "print(loaded)")
    before = ("import sys, block_recurrent.cli, block_recurrent.inference.evaluation, "
              "block_recurrent.inference.generation; print('block_recurrent.training.trainer' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", before], capture_output=True, text=True, check=True).stdout.strip() == "False"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"
