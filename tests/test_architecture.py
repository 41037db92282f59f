"""The package's layers (docs/architecture.md): each module imports only modules of its own
layer or below, function-level imports included; no import ring; decoders never import each
other. A failure names the file and line of the offending import."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "brainrecon"

#: Top-level modules and subpackages of brainrecon, by layer (docs/architecture.md).
LAYERS = {
    0: ("brainrecon", "errors", "io", "hub", "devices", "progress", "extras", "plugins", "recipes"),
    1: ("data", "targets", "eval", "viz"),
    2: ("decoders", "generate"),
    3: ("runs",),
    4: ("workflows", "federation", "publish", "leaderboard", "demo", "fetch", "testing"),
    5: ("cli",),
}
LAYER_OF = {name: layer for layer, names in LAYERS.items() for name in names}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, list[tuple[str, int]]]:
    """Every brainrecon module each module imports, anywhere in its body, with the line."""
    found: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from pkg import submodule` imports the submodule
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                if target == "brainrecon" or target.startswith("brainrecon."):
                    while target not in modules:  # `import brainrecon.x.y` of a name, not a module
                        target = target.rpartition(".")[0]
                    if target != name:
                        found[name].append((target, node.lineno))
    return found


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _where(modules, module, line) -> str:
    return f"{modules[module].relative_to(PACKAGE.parent)}:{line}"


def test_every_module_has_a_layer():
    modules = _modules()
    missing = sorted({_unit(m) for m in modules} - set(LAYER_OF))
    assert not missing, f"modules with no layer in docs/architecture.md and LAYERS: {missing}"


def test_no_module_imports_a_higher_layer():
    modules = _modules()
    wrong = []
    for module, targets in _imports(modules).items():
        for target, line in targets:
            if LAYER_OF[_unit(target)] > LAYER_OF[_unit(module)]:
                wrong.append(f"{_where(modules, module, line)} imports {target} "
                             f"(layer {LAYER_OF[_unit(target)]} above {LAYER_OF[_unit(module)]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_decoders_do_not_import_each_other():
    modules = _modules()
    wrong = []
    for module, targets in _imports(modules).items():
        parts = module.split(".")
        if len(parts) < 3 or parts[1] != "decoders" or parts[2] in ("base",):
            continue
        for target, line in targets:
            tparts = target.split(".")
            if (len(tparts) >= 3 and tparts[1] == "decoders" and tparts[2] not in ("base", parts[2])):
                wrong.append(f"{_where(modules, module, line)} imports {target}")
    assert not wrong, "decoders importing each other:\n" + "\n".join(wrong)


def test_no_import_ring():
    """No cycle among modules (package __init__ files re-exporting their own submodules aside:
    importing `brainrecon.x.y` runs `brainrecon.x` first, which is not a dependency of y)."""
    modules = _modules()
    graph = {m: sorted({t for t, _ in targets if not m.startswith(t + ".")})
             for m, targets in _imports(modules).items()}
    lines = {(m, t): line for m, targets in _imports(modules).items() for t, line in targets}
    index, low, stack, on_stack, rings = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
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
                rings.append(sorted(component))

    for v in sorted(modules):
        if v not in index:
            visit(v)
    described = []
    for ring in rings:
        members = set(ring)
        edges = [f"  {_where(modules, m, lines[(m, t)])} imports {t}"
                 for m in ring for t in graph.get(m, ()) if t in members]
        described.append("ring of " + ", ".join(ring) + ":\n" + "\n".join(edges))
    assert not rings, "import rings:\n" + "\n".join(described)
