"""The package's layer order (design-sketch.md): a module imports only its own layer or
the layers below it, and the import graph has no cycle. Every import counts, including
those inside functions (a lazy import must not be a way round a circle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "countdown_jax"

# Lowest first. A module's layer is the first entry matching its dotted name (an entry
# ending in "." matches a package's every module).
LAYERS = (
    ("gated", "attention", "rope", "norms", "config", "layout", "cost", "argtypes", "proxy",
     "decode_path"),
    ("selection", "policy", "parallel_selection", "sharding"),
    ("kernels._platform", "kernels._triton_tiles"),
    ("kernels.",),
    ("ffn", "ffn_parallel", "attention_parallel", "decode_projections", "batch_union", "fast_path"),
    ("model",),
    ("generate",),
    ("api", "evaluate.", "calibrate", "budget", "calibrate_command", "predictor",
     "predictor_online", "data", "modules"),
    ("cli", "demo", "__main__"),
)


def _layer(name: str) -> int:
    for i, entries in enumerate(LAYERS):
        for e in entries:
            if name == e or (e.endswith(".") and name.startswith(e)) or name == e.rstrip("."):
                return i
    raise AssertionError(f"countdown_jax.{name} has no layer in LAYERS: add it")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts:                            # the package's own __init__ re-exports (lazily)
            out[".".join(parts)] = path
    return out


def _imports(path: Path, modules) -> set[str]:
    """countdown_jax modules imported anywhere in the file (package-relative names)."""
    def module_of(n):              # "pkg.mod.name" -> the module "pkg.mod" (or None)
        n = n[len("countdown_jax."):] if n.startswith("countdown_jax.") else ""
        while n and n not in modules:
            n = n.rpartition(".")[0]
        return n or None

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(module_of(a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from pkg import mod" imports pkg.mod; "from pkg.mod import name" pkg.mod
            found.update(module_of(f"{node.module}.{a.name}") or module_of(node.module)
                         for a in node.names)
    found.discard(None)
    return found


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    for name in graph:
        _layer(name)


def test_no_import_from_a_lower_layer_up(graph):
    bad = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
           for a, deps in sorted(graph.items()) for b in sorted(deps)
           if _layer(b) > _layer(a)]
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle(graph):
    state: dict[str, int] = {}        # 1: on the current path, 2: done
    cycles = []

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_kernels_see_only_gated_selection_and_platform(graph):
    """Kernel ops depend on the leaf maths (incl. the proxy's storage format), selection
    helpers and kernels._platform only, never on another op's insides (an op may call
    another op's public api)."""
    allowed_below = {"gated", "attention", "proxy", "selection", "policy", "kernels._platform",
                     "kernels._triton_tiles"}
    bad = []
    for name, deps in sorted(graph.items()):
        if not name.startswith("kernels.") or name.startswith("kernels._"):
            continue
        op = name.split(".")[1]
        for dep in deps:
            if dep.startswith(f"kernels.{op}") or dep in allowed_below:
                continue
            if dep.startswith("kernels.") and dep.endswith(".api"):
                continue
            bad.append(f"{name} imports {dep}")
    assert not bad, "\n".join(bad)
