"""The calib package's imports run one way and sit at the top of each file (issue 12, item 1)."""

import ast
import pathlib

import qvlquant.calib

PACKAGE = pathlib.Path(qvlquant.calib.__file__).parent


def imports(path: pathlib.Path) -> tuple[set[str], list[str]]:
    """-> (qvlquant.calib modules imported anywhere in the file, qvlquant imports made inside a function)."""
    tree = ast.parse(path.read_text())
    found, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qvlquant.calib."):
            found.add(node.module.rsplit(".", 1)[1])
    for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(func):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qvlquant"):
                nested.append(f"{path.name}:{node.lineno} {node.module}")
    return found, nested


def test_calib_imports_have_no_cycle_and_none_hides_in_a_function():
    graph, nested = {}, []
    for path in sorted(PACKAGE.glob("*.py")):
        graph[path.stem], inner = imports(path)
        nested += inner
    assert nested == []
    done, stack = set(), []

    def visit(mod):
        assert mod not in stack, f"import cycle: {' -> '.join(stack[stack.index(mod):] + [mod])}"
        if mod in done:
            return
        stack.append(mod)
        for dep in sorted(graph.get(mod, ())):
            visit(dep)
        stack.pop()
        done.add(mod)

    for mod in graph:
        visit(mod)
    assert {"images", "fetch", "dataset", "qwen_vl_v1"} <= set(graph)
