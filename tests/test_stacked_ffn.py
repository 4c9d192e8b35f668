"""The model hands the FFN its stacked [L, m, d] MLP weights plus the layer index, so
gather kernels read kept rows of the stack in place. That path must equal the FFN on the
sliced layer, for every implementation, and must read no other layer's rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax.ffn import ffn
from countdown_jax.kernels.sparse_ffn.api import sparse_ffn
from countdown_jax.policy import SparseSpec, make_policy

L, M, D = 3, 37, 19


def stack(seed=0):
    rng = np.random.default_rng(seed)
    return {k: jnp.asarray(rng.standard_normal((L, M, D)) / np.sqrt(D), jnp.float32)
            for k in ("gate", "up", "down")}


@pytest.mark.parametrize("method,mode", [("m_countdown", "ideal"), ("cats", "ideal"),
                                         ("d_countdown", "predictor"), ("dense", "ideal")])
@pytest.mark.parametrize("impl", ["masked", "gather"])
def test_stacked_equals_sliced(method, mode, impl):
    w = stack()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((4, D)), jnp.float32)
    rank = 5
    rng = np.random.default_rng(2)
    pol = make_policy(L, sparsity=0.6, theta=0.1, predictor={
        "V": rng.standard_normal((L, D, rank)).astype(np.float32),
        "U": rng.standard_normal((L, M, rank)).astype(np.float32)}) if mode == "predictor" \
        else make_policy(L, sparsity=0.6)
    spec = SparseSpec(method=method, mode=mode, implementation=impl, capacity=M // 2)
    for l in range(L):
        layer_pol = jax.tree.map(lambda a: a[l], pol)
        ref, kref = ffn({k: v[l] for k, v in w.items()}, x, act="silu", spec=spec,
                        policy=layer_pol)
        got, kgot = jax.jit(lambda w, l, p: ffn({**w, "layer": l}, x, act="silu", spec=spec,
                                                policy=p))(w, jnp.int32(l), layer_pol)
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(kgot), np.asarray(kref))


@pytest.mark.parametrize("impl", ["xla", "pallas_gpu"])
@pytest.mark.parametrize("dense", [None, "up"])
def test_kernel_reads_only_its_layer(impl, dense):
    """Other layers' rows are NaN: any read outside layer l would poison the result."""
    w = stack(3)
    l = 1
    poisoned = {k: v.at[jnp.arange(L) != l].set(jnp.nan) for k, v in w.items()}
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, D)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.permutation(M)[:8] for _ in range(2)]), jnp.int32)
    count = jnp.asarray([8, 3], jnp.int32)
    coef = jnp.asarray(rng.standard_normal((2, M)), jnp.float32) if dense else None
    ref = sparse_ffn(x, w["gate"][l], w["up"][l], w["down"][l], idx, count, act="silu",
                     dense=dense, coef=coef)
    got = sparse_ffn(x, poisoned["gate"], poisoned["up"], poisoned["down"], idx, count,
                     act="silu", dense=dense, coef=coef, layer=jnp.int32(l),
                     implementation=impl, interpret=True)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_stacked_weights_need_layer():
    w = stack()
    x = jnp.ones((1, D))
    idx = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(ValueError, match=r"layer=|\[m, d\]"):
        sparse_ffn(x, w["gate"], w["up"], w["down"], idx, jnp.ones((1,), jnp.int32),
                   act="silu", implementation="xla")
