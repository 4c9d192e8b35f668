"""The public API is visible: dir() lists the lazy top-level exports, and every core
module's ``__all__`` names what it defines."""

from __future__ import annotations

import importlib

import pytest

import countdown_jax

CORE = ("gated", "attention", "rope", "norms", "config", "layout", "selection", "policy",
        "sharding", "parallel_selection", "kernels._platform", "kernels.sparse_ffn.api",
        "kernels.fused_sparse_ffn.api", "kernels.decode_attention.api", "ffn",
        "ffn_parallel", "model", "generate")


def test_dir_lists_the_lazy_exports():
    assert set(countdown_jax.__all__) <= set(dir(countdown_jax))
    assert "SparseSpec" in countdown_jax.__all__ and "load" in countdown_jax.__all__


@pytest.mark.parametrize("name", CORE)
def test_core_module_all_names_exist(name):
    mod = importlib.import_module(f"countdown_jax.{name}")
    assert mod.__all__, name
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, f"countdown_jax.{name}.__all__ names undefined {missing}"
