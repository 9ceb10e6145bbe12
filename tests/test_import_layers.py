"""The package's modules form no import cycle (every import counts: top-level, lazy and
``TYPE_CHECKING``), so lower layers never import upper ones."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llmseg_ros"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path, name: str, known: set[str]) -> set[str]:
    """Package modules ``path`` imports anywhere in its body (resolved to known module names)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            # the deepest known module named by the import (``a.b.c`` → ``a.b`` when c is a name)
            parts = target.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts and ".".join(parts) != name:
                found.add(".".join(parts))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    known = set(modules)
    graph = {name: imported_modules(path, name, known) for name, path in modules.items()}
    # importing ``a.b.c`` first imports the packages ``a`` and ``a.b``: the package
    # ``__init__`` files are part of the path, but a package importing its own children
    # (re-exports) is not an edge back up.
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_the_graph_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "llmseg_ros.pipeline" in graph["llmseg_ros"]  # TYPE_CHECKING and lazy __getattr__ imports
    assert graph["llmseg_ros.pipeline"]


def test_cycle_finder_reports_a_cycle() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles among the package's modules:\n" + "\n".join(
        " <-> ".join(cycle) for cycle in cycles
    )


# The architecture's layers, lowest first; a module may import its own layer and lower ones.
# The package's root ``__init__`` is the public facade and may import anything.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("utils",),
    ("config", "types"),
    ("weights",),
    ("models",),
    ("methods",),
    ("tracking",),
    ("pipeline", "conversations"),
    ("tiny", "data"),
    ("ros", "evaluation", "datagen"),
    ("training",),
    ("cli",),
    ("node",),
)


def layer_of(module: str) -> int:
    top = module.split(".")[1]
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer of LAYERS; add its top-level name")


def test_layers_only_look_down() -> None:
    graph = import_graph()
    upward = [
        f"{module} imports {target}"
        for module, targets in sorted(graph.items())
        if module != "llmseg_ros"
        for target in sorted(targets)
        if target != "llmseg_ros" and layer_of(target) > layer_of(module)
    ]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)
