"""The package's functions stay small enough to read: no public function of countdown_jax/
takes more than MAX_PARAMETERS parameters (knobs go into a frozen config dataclass, the
inputs of one idea into one object). Pallas kernel bodies are exempt: their parameters
are the kernel's Refs and static settings, fixed by pallas_call."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "countdown_jax"
MAX_PARAMETERS = 12


def _parameters(fn: ast.FunctionDef) -> list[str]:
    a = fn.args
    return [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]


def _is_kernel_body(fn: ast.FunctionDef) -> bool:
    """A Pallas kernel body: named *_kernel (or _kernel), or its parameters are Refs."""
    names = _parameters(fn)
    refs = fn.args.vararg is not None and fn.args.vararg.arg == "refs"
    return (fn.name.endswith("_kernel") or refs
            or (bool(names) and all(n.endswith("_ref") for n in names)))


def _public_functions(tree: ast.Module):
    """Module-level functions and methods of module-level classes whose names do not start
    with "_" (nested helpers are not part of any interface)."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield f"{node.name}.{item.name}", item


def too_many_parameters(source: str, limit: int = MAX_PARAMETERS) -> list[tuple[str, int]]:
    """(name, parameter count) of the public functions in ``source`` above ``limit``
    (``self`` / ``cls`` not counted)."""
    out = []
    for name, fn in _public_functions(ast.parse(source)):
        if name.rpartition(".")[2].startswith("_") or _is_kernel_body(fn):
            continue
        n = len([p for p in _parameters(fn) if p not in ("self", "cls")])
        if n > limit:
            out.append((name, n))
    return out


def test_no_public_function_takes_more_than_twelve_parameters():
    hits = [f"{path.relative_to(PKG.parent)}: {name} ({n})"
            for path in sorted(PKG.rglob("*.py"))
            for name, n in too_many_parameters(path.read_text())]
    assert not hits, (f"public functions with more than {MAX_PARAMETERS} parameters (group "
                      "the knobs in a frozen config dataclass):\n" + "\n".join(hits))


def test_the_check_counts_every_kind_of_parameter():
    src = ("def f(a, /, b, *, c, d=1): pass\n"
           "def _private(a, b, c, d, e): pass\n"
           "def _kernel(*refs, a, b, c, d): pass\n"
           "def fused_kernel(a, b, c, d, e): pass\n"
           "def body(x_ref, y_ref, z_ref, o_ref, p_ref): pass\n"
           "class C:\n"
           "    def m(self, a, b, c, d): pass\n"
           "    def _h(self, a, b, c, d, e): pass\n"
           "def outer(a):\n"
           "    def inner(a, b, c, d, e): pass\n")
    assert too_many_parameters(src, limit=3) == [("f", 4), ("C.m", 4)]
    assert too_many_parameters(src, limit=4) == []
