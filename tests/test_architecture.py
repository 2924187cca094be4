"""The package's layers (docs/DESIGN.md, "Layers"): every import goes down or sideways, never up; no import cycle; the
plain-PyTorch reference is imported only by the CPU implementation and the test toolkit.

Imports are read from the source (module-level and function-level alike, `TYPE_CHECKING` ones too), as a reader sees
them. A package's `__init__` re-exporting its modules is part of the package's layer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import spattn_compile

PACKAGE = Path(spattn_compile.__file__).parent

# Bottom-up; a module is in the layer of its longest listed prefix. See docs/DESIGN.md.
LAYERS: tuple[tuple[str, ...], ...] = (
    # 0. Settings and types: what a call is and what may be asked of it.
    (
        "capability",
        "layout",
        "plan",
        "config",
        "families",
        "call_layout",
        "inputs",
        "estimators.base",
        "policies.base",
    ),
    # 1. The arithmetic: the Triton kernels and the plain-PyTorch reference.
    ("kernels", "reference"),
    # 2. The registered estimators and policies (settings -> reference and kernel handlers).
    ("estimators", "policies"),
    # 3. The implementations (the registry with capability checks).
    ("implementations",),
    # 4. One call: the orchestrator and the public functions.
    ("attention", "api"),
    # 5. What runs when a compiled model runs: the op and the schedule.
    ("runtime",),
    # 6. The compiler: the FX passes, the backend, explain.
    ("passes", "backend", "explain"),
    # 7. The test and benchmark toolkit.
    ("testing",),
)


def _modules() -> dict[str, Path]:
    """Dotted names (relative to the package; "" for its `__init__`) -> source files."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _imports(name: str, source: str, is_package: bool = False) -> set[str]:
    """The package's modules that module `name` (of source `source`) imports."""
    base = name.split(".") if name and is_package else name.split(".")[:-1] if name else []
    found = set()
    for node in ast.walk(ast.parse(source)):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.level:
            anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            prefix = ".".join([*anchor, *([node.module] if node.module else [])])
            targets = [prefix] + [f"{prefix}.{alias.name}" if prefix else alias.name for alias in node.names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            absolute = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom):
                absolute += [f"{node.module}.{alias.name}" for alias in node.names]
            targets = [t.removeprefix("spattn_compile.") for t in absolute if t.startswith("spattn_compile")]
            targets = ["" if t == "spattn_compile" else t for t in targets]
        for target in targets:
            # The longest module of the package that the name is or lies in.
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target in MODULES and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name, path.read_text(), path.name == "__init__.py") for name, path in MODULES.items()}


def layer_of(name: str) -> int:
    """The layer of module `name` (the package's `__init__` is above every layer)."""
    if not name:
        return len(LAYERS)
    best, layer = -1, None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), index
    assert layer is not None, f"module {name} is in no layer: add it to LAYERS (and to docs/DESIGN.md)"
    return layer


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)


def _climbing(graph: dict[str, set[str]]) -> list[str]:
    return [
        f"{name} (layer {layer_of(name)}) -> {target} (layer {layer_of(target)})"
        for name, targets in graph.items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(name)
    ]


def test_no_import_climbs_a_layer():
    assert _climbing(GRAPH) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (a package's `__init__` re-exporting its own modules
    does not count: the edges from a module into its package's `__init__` are dropped)."""
    graph = {
        name: {t for t in targets if not (MODULES[t].name == "__init__.py" and name.startswith(f"{t}.") or not t)}
        for name, targets in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_no_import_cycle():
    assert _cycles(GRAPH) == []


def test_the_reference_is_imported_only_by_the_cpu_implementation_and_the_test_toolkit():
    importers = sorted(name for name, targets in GRAPH.items() if "reference" in targets)
    assert all(name == "implementations.reference" or name.startswith("testing") for name in importers), importers


@pytest.mark.parametrize("kernel", sorted(name for name in MODULES if name.startswith("kernels.")))
def test_kernels_import_nothing_above_the_settings(kernel):
    assert all(layer_of(target) == 0 or target.startswith("kernels") for target in GRAPH[kernel]), GRAPH[kernel]


def test_the_checks_see_a_climbing_import_and_a_cycle():
    """The checks fail on what they guard against: a kernel importing the orchestrator inside a function (which
    climbs three layers and closes a cycle through the selection policy and the implementations)."""
    source = MODULES["kernels.select"].read_text() + "\n\ndef _late():\n    from ..attention import SparseAttention\n"
    mutated = {**GRAPH, "kernels.select": _imports("kernels.select", source)}
    assert "kernels.select (layer 1) -> attention (layer 4)" in _climbing(mutated)
    assert any("kernels.select" in cycle and "attention" in cycle for cycle in _cycles(mutated))
