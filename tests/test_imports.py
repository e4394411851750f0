"""The import graph of gpt/ (ARCHITECTURE.md, "Layers and the direction of imports"): no module imports
itself through any chain of imports, function-level imports included; inference, evaluation and serving
reach neither the trainer nor a stage module through any chain (tests/test_layers.py checks the direct
imports of every library module)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gpt"


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _without_main_block(tree: ast.Module) -> ast.Module:
    """The module without its `if __name__ == "__main__":` block: what that block imports runs only when the file
    is run as a script, as `__main__`, a module nothing else imports, so it closes no chain of imports."""
    def is_main(node) -> bool:
        test = getattr(node, "test", None)
        return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
                and test.left.id == "__name__" and len(test.comparators) == 1 and isinstance(test.ops[0], ast.Eq)
                and getattr(test.comparators[0], "value", None) == "__main__")

    tree.body = [node for node in tree.body if not is_main(node)]
    return tree


def import_graph(package: Path) -> dict[str, set[str]]:
    """{module: the package's modules it imports anywhere in its file, function bodies included}.

    `from a import b` is an import of module a.b where that is a module, else of a. Importing a submodule
    runs its package's __init__ too, but that is not an edge: a package whose __init__ imports its own
    submodules is no cycle to Python."""
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(_without_main_block(ast.parse(path.read_text(encoding="utf-8")))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                          for a in node.names}
            elif isinstance(node, ast.ImportFrom):  # relative: none today; resolve them before allowing any
                raise AssertionError(f"{name}: relative import (level {node.level}); the graph check needs absolute ones")
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One chain of imports that returns to where it started ([a, b, ..., a]), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if root in state:
            continue
        path, todo = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(sorted(graph[nxt])))
    return None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_the_checker_sees_function_level_and_from_package_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from pkg.sub import c\n")
    (pkg / "a.py").write_text("import os\n\n\ndef f():\n    from pkg import b\n    return b\n")
    (pkg / "b.py").write_text("import pkg.sub.c\n")
    (pkg / "sub" / "c.py").write_text("from pkg.a import f\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub.c"}, "pkg.sub": {"pkg.sub.c"},
                     "pkg.sub.c": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]
    (pkg / "sub" / "c.py").write_text("import os\n")
    assert find_cycle(import_graph(pkg)) is None
    # what only the file run as a script imports (`python -m pkg.sub.c`) closes no chain; the same import elsewhere does
    (pkg / "sub" / "c.py").write_text('import os\n\nif __name__ == "__main__":\n    from pkg.a import f\n')
    assert import_graph(pkg)["pkg.sub.c"] == set() and find_cycle(import_graph(pkg)) is None
    (pkg / "sub" / "c.py").write_text('if __name__ != "__main__":\n    from pkg.a import f\n')
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.b", "pkg.sub.c", "pkg.a"]


def test_no_two_modules_import_each_other_through_any_chain():
    graph = import_graph(PACKAGE)
    # the LoRA merge CLI sits above the checkpoint layer, which builds on the adapters
    assert "gpt.checkpoint" in graph["gpt.lora.__main__"] and "gpt.lora" in graph["gpt.checkpoint"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("module", ["gpt.inference", "gpt.evaluation", "gpt.serve"])
def test_inference_evaluation_and_serving_reach_no_trainer_or_stage(module):
    graph = import_graph(PACKAGE)
    starts = [m for m in graph if m == module or m.startswith(module + ".")]
    assert starts, f"no module {module}"
    for start in starts:
        up = {m for m in reachable(graph, start) if m == "gpt.trainer" or m.startswith("gpt.stages")}
        assert not up, f"{start} imports {sorted(up)} through a chain of imports"
