"""The package's shape: every module sits in a folder named for its concern (or is a top-level entry module), imports
run one way (from the entry points down to the math and storage), and no two modules import each other, directly
or around a circle. Read from the source (AST), so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "qvlquant"

# Floors, highest first. A module may import its own floor or lower ones, never a higher one.
FLOORS: tuple[tuple[str, ...], ...] = (
    ("__init__", "__main__", "cli"),
    ("api", "evaluation", "tools"),
    ("runtime",),
    ("checkpoint",),
    ("engine",),
    ("config", "recipes"),
    ("calib", "eval", "kernels"),
    ("quant",),
    ("storage", "parallel"),
    ("families", "ui", "assets", "version"),
)
TOP_LEVEL_MODULES = {"__init__", "__main__", "api", "cli", "config", "evaluation", "families", "recipes", "version"}


def modules() -> dict[str, pathlib.Path]:
    """'qvlquant.engine.loop' -> its file, for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def concern(module: str) -> str:
    """The floor key of a module: its folder under qvlquant/, or its own name at the top level."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def floor(module: str) -> int:
    key = concern(module)
    for level, names in enumerate(FLOORS):
        if key in names:
            return len(FLOORS) - level
    raise AssertionError(f"{module} is on no floor: add its folder to FLOORS in {__file__}")


def imports(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The qvlquant modules ``module`` imports, at the top or inside functions."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                found.add(sub if sub in known else base)
    return {m for m in found if m in known and m != module}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} (floor {floor(m)}) imports {d} (floor {floor(d)})"
                  for m, deps in g.items() for d in deps
                  if floor(d) > floor(m))


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_every_module_sits_in_a_concern_folder_or_is_an_entry_module():
    loose = sorted(m for m in modules() if m.count(".") == 1 and m.split(".")[1] not in TOP_LEVEL_MODULES
                   and not (PACKAGE / m.split(".")[1]).is_dir())
    assert not loose, f"modules at the top of qvlquant/ that belong in a concern folder: {loose}"
    assert all(floor(m) for m in modules())


def test_no_import_runs_back_up():
    assert upward(graph()) == []


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_checks_see_an_upward_import_and_a_cycle():
    """The scan itself: a planted upward import and a planted cycle are found (so the two tests above can fail)."""
    g = graph()
    planted = {k: set(v) for k, v in g.items()}
    planted["qvlquant.quant.rtn"].add("qvlquant.engine.loop")
    assert "qvlquant.quant.rtn (floor 3) imports qvlquant.engine.loop (floor 6)" in upward(planted)
    assert any({"qvlquant.quant.rtn", "qvlquant.engine.loop"} <= set(c) for c in cycles(planted))
    assert "qvlquant.quant.rtn" in g["qvlquant.quant.gptq"]  # imports inside the package are seen at all
