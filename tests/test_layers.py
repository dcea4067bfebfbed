"""The package's layers: no module imports one above its own, and no two modules import each other in a
circle. Read from the source with ``ast`` (every import, at the top of a module or inside a function)."""

from __future__ import annotations

import ast
from pathlib import Path

import tabtune_cli

PACKAGE = Path(tabtune_cli.__file__).parent
# bottom to top; a module may import its own layer's and the ones below. The first matching prefix wins.
LAYERS = [
    ("foundation", ["errors", "config", "rundir", "modules"]),  # schemas, the run-directory writer, torch maths
    ("data", ["data"]),
    ("models", ["models"]),
    ("training", ["tuning", "evaluation"]),
    ("strategies", ["strategies"]),
    ("library", ["artifacts", "memory", "pipeline", "leaderboard", "estimators", "__init__"]),
    ("commands", ["commands", "cli", "__main__"]),
]


def layer(module: str) -> int:
    head = module.split(".")[0]
    for rank, (_, names) in enumerate(LAYERS):
        if head in names:
            return rank
    raise AssertionError(f"tabtune_cli.{module}: in no layer of tests/test_layers.py (add it to one)")


def imports() -> dict[str, set[str]]:
    """``{module: the tabtune_cli modules it imports}``, dotted below ``tabtune_cli``."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        package = module.rsplit(".", 1)[0] if path.name != "__init__.py" else module
        package = "" if package == "__init__" else package.removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, up level - 1
                    base = package.split(".") if package else []
                    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                    target = ".".join([*base, *([node.module] if node.module else [])])
                elif node.module and node.module.startswith("tabtune_cli"):
                    target = node.module.removeprefix("tabtune_cli").lstrip(".")
                else:
                    continue
                names = [target] if node.module else [f"{target}.{a.name}".lstrip(".") for a in node.names]
                found |= {n for n in names if n}
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("tabtune_cli.") for a in node.names if a.name.startswith("tabtune_cli.")}
        graph[module.removesuffix(".__init__")] = {f for f in found if f}
    return graph


def edges() -> dict[str, set[str]]:
    """``{module: the modules it imports}``: ``from .x import name`` names the module x (or, for a name a
    package defines, the package; the top package is ``__init__``)."""
    graph = imports()
    modules = set(graph)

    def resolve(target: str) -> str:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or "__init__"

    return {m: {r for t in targets if (r := resolve(t)) != m} for m, targets in graph.items()}


def test_no_module_imports_one_above_its_layer():
    upward = sorted(f"{m} (layer {LAYERS[layer(m)][0]}) imports {t} (layer {LAYERS[layer(t)][0]})"
                    for m, targets in edges().items() for t in targets if layer(t) > layer(m))
    assert upward == []


def test_no_modules_import_each_other_in_a_circle():
    graph = edges()
    modules = set(graph)
    circles, state = [], {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                circles.append(" -> ".join([*path[path.index(n):], n]))
            elif n not in state:
                visit(n, [*path, n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    # a package's __init__ that re-exports its own modules is not a circle of dependence
    circles = [c for c in circles if not any(c.startswith(p + " ") or f"-> {p} ->" in c
                                             for p in modules if (PACKAGE / p.replace(".", "/") / "__init__.py").is_file()
                                             and all(x == p or x.startswith(p + ".") for x in c.split(" -> ")))]
    assert circles == []


def test_hydra_is_imported_only_under_commands():
    """The library (pipeline, strategies, models, ...) runs without Hydra: it is the command line's."""
    outside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "commands":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            outside += [f"{path.relative_to(PACKAGE)} imports {n}" for n in names if n.split(".")[0] == "hydra"]
    assert outside == []
