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
@pytest.mark.parametrize("impl", ["masked", "xla"])
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
        got, kgot = jax.jit(lambda w, l, p: ffn(w, x, act="silu", spec=spec, policy=p,
                                                layer=l))(w, jnp.int32(l), layer_pol)
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


# The fused kernel (selection inside) on the stack: ragged m and d against every block size,
# in-kernel scoring (M, D), XLA-computed scores (CATS), predicated and compacted reads.
FUSED_STACKED = [
    ("m", 2, dict(bn=16, bd=8, blocks_per_program=2)),
    ("cats", 1, dict(bn=8, bd=16, score="xla", compact=4, programs=2)),
    ("d", 2, dict(bn=16, bd=8, bds=4, compact=4)),
]


@pytest.mark.parametrize("method,n,cfg", FUSED_STACKED)
def test_fused_kernel_reads_only_its_layer(method, n, cfg):
    """Stacked weights + traced layer == the kernel on the sliced layer == the reference,
    with every other layer's rows NaN (a read outside layer l poisons y)."""
    from countdown_jax.kernels.fused_sparse_ffn.api import fused_sparse_ffn
    from countdown_jax.kernels.fused_sparse_ffn.pallas_gpu import FusedConfig
    from countdown_jax.kernels.fused_sparse_ffn.reference import selection_scores

    cfg = FusedConfig(**cfg)
    w = stack(5)
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((n, D)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((4, D)) / np.sqrt(D), jnp.float32)    # Vt [r, d]
    u = jnp.asarray(rng.standard_normal((M, 4)), jnp.float32)
    kw = dict(act="silu", method=method, pred_vt=v, pred_u=u, interpret=True)
    stacked = jax.jit(lambda ws, t, l: fused_sparse_ffn(
        x, *ws, t, implementation="pallas", config=cfg, layer=l, **kw))
    sliced = jax.jit(lambda ws, t: fused_sparse_ffn(
        x, *ws, t, implementation="pallas", config=cfg, **kw))
    for l in (1, L - 1):                      # a middle layer and the last (no rows after it)
        own = tuple(w[k][l] for k in ("gate", "up", "down"))
        poisoned = tuple(w[k].at[jnp.arange(L) != l].set(jnp.nan) for k in ("gate", "up", "down"))
        q = np.sort(np.asarray(selection_scores(x, *own[:2], act="silu", method=method,
                                                pred_vt=v, pred_u=u)[0]), axis=1)
        taus = {"random": jnp.asarray((q[:, 20] + q[:, 21]) / 2, jnp.float32),
                "all": jnp.asarray(q[:, 0] - 1, jnp.float32),
                "none": jnp.asarray(q[:, -1] + 1, jnp.float32)}
        for case, tau in taus.items():
            y, cnt = stacked(poisoned, tau, jnp.int32(l))
            ys, cs = sliced(own, tau)
            r, rc = fused_sparse_ffn(x, *own, tau, implementation="xla", **kw)
            # the XLA paths slice (or list) the poisoned stack by layer too
            rx, rxc = fused_sparse_ffn(x, *poisoned, tau, implementation="xla", layer=l, **kw)
            gx, gxc = fused_sparse_ffn(x, *poisoned, tau, implementation="xla_gather",
                                       layer=l, **kw)
            assert np.isfinite(np.asarray(y)).all(), (case, l)
            for c in (cnt, cs, rxc, gxc):
                np.testing.assert_array_equal(np.asarray(c), np.asarray(rc), err_msg=case)
            np.testing.assert_array_equal(np.asarray(y), np.asarray(ys), err_msg=case)
            for got in (y, rx, gx):
                np.testing.assert_allclose(np.asarray(got), np.asarray(r), rtol=1e-5,
                                           atol=1e-6, err_msg=case)
            expect = {"random": M - 21, "all": M, "none": 0}[case]
            assert (np.asarray(cnt) == expect).all(), case
            if case == "none":
                assert (np.asarray(y) == 0).all()


def test_fused_stack_shape_errors():
    from countdown_jax.kernels.fused_sparse_ffn.api import fused_sparse_ffn
    w = stack()
    x = jnp.ones((1, D))
    with pytest.raises(ValueError, match="layer="):
        fused_sparse_ffn(x, w["gate"], w["up"], w["down"], 0.0, act="silu", method="m")
    with pytest.raises(ValueError, match=r"\[L, m, d\]"):
        fused_sparse_ffn(x, w["gate"][0], w["up"][0], w["down"][0], 0.0, act="silu",
                         method="m", layer=0)
    with pytest.raises(ValueError, match="scores"):
        fused_sparse_ffn(x, w["gate"], w["up"], w["down"], 0.0, act="silu", method="m",
                         layer=0, scores=jnp.ones((1, M - 1)))


def test_stack_past_int32_offsets_hands_the_kernel_one_layer(monkeypatch):
    """A stack with more elements than int32 offsets address (shrunk here) is sliced per
    layer before the kernel: same result, and the kernel sees [m, d] with no offset."""
    from countdown_jax.kernels import _platform
    w = stack(7)
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((2, D)), jnp.float32)
    idx = jnp.asarray(np.stack([rng.permutation(M)[:8] for _ in range(2)]), jnp.int32)
    count = jnp.asarray([8, 5], jnp.int32)
    l = 2
    ref = sparse_ffn(x, w["gate"][l], w["up"][l], w["down"][l], idx, count, act="silu")
    flat, off, m = _platform.flat_stack(tuple(w.values()), l)
    assert flat[0].shape == (L * M, D) and m == M
    monkeypatch.setattr(_platform, "MAX_FLAT_ELEMENTS", M * D)            # one layer fits
    flat, off, m = _platform.flat_stack(tuple(w.values()), l)
    assert flat[0].shape == (M, D) and off == 0 and m == M
    got = sparse_ffn(x, w["gate"], w["up"], w["down"], idx, count, act="silu",
                     layer=jnp.int32(l), implementation="pallas_gpu", interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-6)
