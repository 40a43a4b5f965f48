"""The project's files import each other one way: each file can be read knowing only those below it."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["cli", "data", "kernel", "sea", "controls", "performer", "reformer", "weights", "model", "eval", "train", "bench"]  # a file imports only files to its left


def project_imports():
    """{module: set of project modules it imports anywhere in the file, lazily or not}."""
    modules = {path.stem: path for path in ROOT.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported.add(node.module.split(".")[0])
        graph[name] = imported & set(modules) - {name}
    return graph


def find_cycle(graph):
    """A list of modules that import each other in a circle, or None."""
    state = {}  # absent: unvisited, 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_no_import_circle():
    assert find_cycle(project_imports()) is None


def test_each_file_imports_only_the_ones_below_it():
    graph = project_imports()
    assert set(LAYERS) <= set(graph), "a file of the layer list is missing"
    for position, module in enumerate(LAYERS):
        above = graph[module] - set(LAYERS[:position])
        assert not above, f"{module}.py imports {sorted(above)}, which it should not need"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
