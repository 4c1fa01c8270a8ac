"""tandem's imports follow the layer order written once in tandem/__init__.py: no module imports
from a higher layer, and no import cycle joins two modules. Every import counts, at the top of a
file or inside a function; ``if TYPE_CHECKING:`` imports too."""

from __future__ import annotations

import ast
from pathlib import Path

import tandem

PACKAGE = Path(tandem.__file__).resolve().parent


def layers() -> dict[str, int]:
    """``tandem.<name>`` -> layer index (0 = bottom), from the indented block in the docstring."""
    doc = tandem.__doc__ or ""
    block = doc.split("the longest name that matches a module decides its layer.", 1)[1].split("\n\n")[1]
    order = {}
    for index, line in enumerate(block.strip().splitlines()):
        for name in line.split():
            assert f"tandem.{name}" not in order, f"{name} is listed twice"
            order[f"tandem.{name}"] = index
    return order


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(mods: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(importer, imported tandem module, line) for every import statement in tandem, with the\n    packages whose ``__init__`` the import runs (not the importer's own)."""
    edges = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            for target in targets:
                if target != "tandem" and not target.startswith("tandem."):
                    continue
                while target not in mods and "." in target:
                    target = target.rpartition(".")[0]
                # Importing tandem.a.b runs tandem/a/__init__.py first: that is an import too.
                while target != "tandem" and not name.startswith(target + ".") and target != name:
                    edges.append((name, target, node.lineno))
                    target = target.rpartition(".")[0]
    return edges


def layer_of(module: str, order: dict[str, int]) -> int:
    if module == "tandem":  # the package itself: its docstring and version, below everything
        return -1
    name = module
    while name not in order:
        assert "." in name, f"{module} is in no layer: add it to the list in tandem/__init__.py"
        name = name.rpartition(".")[0]
    return order[name]


def test_every_module_has_a_layer():
    order = layers()
    for module in modules():
        layer_of(module, order)
    stale = [name for name in order if not any(m == name or m.startswith(name + ".") for m in modules())]
    assert not stale, f"layers name modules that do not exist: {stale}"


def test_no_import_goes_up_a_layer():
    order, mods = layers(), modules()
    upward = [
        f"{mods[a].relative_to(PACKAGE.parent)}:{line} imports {b} (layer {layer_of(b, order)} > {layer_of(a, order)})"
        for a, b, line in imports(mods)
        if layer_of(b, order) > layer_of(a, order)
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for a, b, _ in imports(modules()):
        graph.setdefault(a, set()).add(b)
    cycles, index, low, stack, on_stack = [], {}, {}, [], set()

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
