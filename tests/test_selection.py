"""Selection rules vs an independent NumPy float64 reference (tests/support/np_sparse_ffn.py)."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support import np_sparse_ffn as ref
from countdown_jax import selection as sel
from countdown_jax.policy import SparseSpec

METHODS = ("cats", "m_countdown", "d_countdown", "dejavu", "s_countdown")
R_LEVELS = (0.0, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 0.999)


def _mlp(rng, m, d, dtype=np.float32):
    return {k: rng.standard_normal((m, d)).astype(dtype) for k in ("gate", "up", "down")}


def test_num_dropped_is_floor_of_decimal_product():
    ms = [1, 2, 3, 7, 10, 37, 100, 128, 1000, 4864, 8192, 8960, 11008, 14336]
    rs = [f"0.{i:02d}" for i in range(100)] + ["0.999", "0.125", "0.875", "0.9999"]
    r32 = jnp.asarray([float(r) for r in rs], jnp.float32)
    for m in ms:
        got = np.asarray(sel.num_dropped(r32, m))
        want = [min(int(Fraction(r) * m), m - 1) for r in rs]
        assert got.tolist() == want, m
    # documented difference from Python's float64 int(): 100 * 0.29 = 28.999999999999996
    assert int(100 * 0.29) == 28 and int(sel.num_dropped(0.29, 100)) == 29


@pytest.mark.parametrize("mode", ["ideal", "topk"])
def test_rank_modes_vs_numpy_with_ties(mode):
    rng = np.random.default_rng(1)
    m = 37
    # small integers: many ties, including at the cut; plus all-equal rows and signed zeros
    q = rng.integers(-3, 4, size=(12, m)).astype(np.float32)
    q[0] = 0.0
    q[1] = 2.0
    q[2, ::2] = -0.0
    q[3] = rng.standard_normal(m)                       # no ties
    for r in R_LEVELS:
        fn = sel.ideal_mask if mode == "ideal" else sel.topk_mask
        got = np.asarray(fn(jnp.asarray(q), jnp.float32(r)))
        want = ref.select(mode, q.astype(np.float64), r)
        np.testing.assert_array_equal(got, want, err_msg=f"{mode} r={r}")
        if mode == "topk":
            assert (got.sum(-1) == m - int(m * r)).all()


def test_ideal_and_topk_differ_only_on_ties():
    q = jnp.zeros((1, 10), jnp.float32)
    assert int(sel.ideal_mask(q, 0.5).sum()) == 0           # all tied at the k-th value
    np.testing.assert_array_equal(sel.topk_mask(q, 0.5)[0], [True] * 5 + [False] * 5)
    q = jnp.asarray([[5.0, 1.0, 3.0, 3.0, 3.0, 0.0]])
    # k = 3: k-th smallest is 3, ideal keeps only 5; topk keeps 5 and the lowest-index 3s
    np.testing.assert_array_equal(sel.ideal_mask(q, 0.5)[0], [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(sel.topk_mask(q, 0.5)[0], [1, 0, 1, 1, 0, 0])


def test_ideal_realised_sparsity_without_ties():
    rng = np.random.default_rng(2)
    for m in (5, 37, 256):
        q = jnp.asarray(rng.standard_normal((8, m)), jnp.float32)
        for r in R_LEVELS:
            kept = np.asarray(sel.ideal_mask(q, r).sum(-1))
            assert (kept == m - int(m * r)).all(), (m, r)


def test_select_dispatch_threshold_and_predictor():
    rng = np.random.default_rng(3)
    q = rng.standard_normal((4, 3, 11)).astype(np.float32)
    for tau in (-np.inf, -0.5, 0.0, 0.7, np.inf):
        layer = {"threshold": jnp.float32(tau), "theta": jnp.float32(tau)}
        for mode in ("threshold", "predictor"):
            got = sel.select(SparseSpec("d_countdown", mode), jnp.asarray(q), layer)
            np.testing.assert_array_equal(got, ref.select(mode, q.astype(np.float64), tau))
    layer = {"sparsity": jnp.float32(0.4)}
    for mode in ("ideal", "topk"):
        got = sel.select(SparseSpec("cats", mode), jnp.asarray(q), layer)
        np.testing.assert_array_equal(got, ref.select(mode, q.astype(np.float64), 0.4))


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_rank_quantity_vs_numpy(act):
    rng = np.random.default_rng(4)
    m, d = 37, 19
    mlp = _mlp(rng, m, d)
    x = rng.standard_normal((2, 5, d)).astype(np.float32)
    x[0, 0] = 0.0
    mlp64 = {k: v.astype(np.float64) for k, v in mlp.items()}
    for method in METHODS:
        got = sel.rank_quantity(method, jax.tree.map(jnp.asarray, mlp), jnp.asarray(x), act)
        assert got.dtype == jnp.float32 and got.shape == (2, 5, m)
        want = ref.quantity(method, mlp64, x.astype(np.float64), act)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5, err_msg=method)
    with pytest.raises(ValueError, match="no ranked quantity"):
        sel.rank_quantity("dense", mlp, jnp.asarray(x), act)


def test_predictor_logits_vs_numpy():
    rng = np.random.default_rng(5)
    d, m, rank = 19, 37, 6
    pred = {"V": rng.standard_normal((d, rank)).astype(np.float32),
            "U": rng.standard_normal((m, rank)).astype(np.float32)}
    x = rng.standard_normal((3, d)).astype(np.float32)
    stored = {"Vt": jnp.asarray(pred["V"].T), "U": jnp.asarray(pred["U"])}   # as policies hold it
    got = sel.predictor_logits(stored, jnp.asarray(x))
    want = ref.predictor_logits({k: v.astype(np.float64) for k, v in pred.items()},
                                x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _float32_logits(stored, x):
    """Plain-JAX float32 z = (x Vt^T) U^T (the all-float32 maths, h never rounded)."""
    f32 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), (stored, x))
    h = jnp.einsum("td,rd->tr", f32[1], f32[0]["Vt"], precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("tr,mr->tm", h, f32[0]["U"], precision=jax.lax.Precision.HIGHEST)


def test_predictor_logits_round_h_to_u_dtype():
    """float32 U: exactly the float32 maths. bf16 U (a bf16 model's predictor): h is
    rounded to bf16, so z is within the bound of that rounding (|dh| <= 2^-9 |h|, plus
    float32 accumulation) of the float32 z, and z > theta differs only where z lies
    within that bound of theta. h_dtype=float32 gives the float32 maths for bf16 U too."""
    rng = np.random.default_rng(12)
    d, m, rank, theta = 64, 256, 32, 0.25
    x = jnp.asarray(rng.standard_normal((48, d)), jnp.float32)
    stored = {"Vt": jnp.asarray(rng.standard_normal((rank, d)) / np.sqrt(d), jnp.float32),
              "U": jnp.asarray(rng.standard_normal((m, rank)) / np.sqrt(rank), jnp.float32)}
    z32 = sel.predictor_logits(stored, x)
    assert z32.dtype == jnp.float32
    np.testing.assert_array_equal(z32, _float32_logits(stored, x))
    np.testing.assert_array_equal(sel.predictor_logits(stored, x, h_dtype=jnp.float32), z32)

    b16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), stored)
    xb = x.astype(jnp.bfloat16)
    ref32 = _float32_logits(b16, xb)                       # same bf16 values, float32 maths
    np.testing.assert_allclose(sel.predictor_logits(b16, xb, h_dtype=jnp.float32), ref32,
                               rtol=1e-5, atol=1e-5)       # only the summation order differs
    zb = sel.predictor_logits(b16, xb)
    assert zb.dtype == jnp.float32
    h = np.abs(np.asarray(_float32_logits({"Vt": b16["Vt"], "U": jnp.eye(rank)}, xb)))
    bound = 2.0 ** -8 * h @ np.abs(np.asarray(b16["U"], np.float32)).T + 1e-5
    err = np.abs(np.asarray(zb) - np.asarray(ref32))
    assert np.all(err <= bound) and err.max() > 1e-4              # rounded, and no further
    differ = np.asarray(zb > theta) != np.asarray(ref32 > theta)
    near = np.abs(np.asarray(ref32) - theta) <= bound
    assert not np.any(differ & ~near)
    assert near.mean() < 0.05                            # the tie band is a small share


def test_keep_largest_among_valid():
    rng = np.random.default_rng(6)
    m = 23
    q = rng.integers(-2, 3, size=(30, m)).astype(np.float32)
    valid = rng.random((30, m)) < 0.6
    valid[0] = False
    valid[1] = True
    for n in (0, 1, 4, 9, 23):
        got = np.asarray(sel.keep_largest(jnp.asarray(q), n, valid=jnp.asarray(valid)))
        want = np.stack([ref.cap_row(v, row, n) for v, row in zip(valid, q)])
        np.testing.assert_array_equal(got, want, err_msg=f"n={n}")


def _check_indices(mask, idx, count, capacity):
    mask, idx, count = np.asarray(mask), np.asarray(idx), np.asarray(count)
    flat_m, flat_i, flat_c = mask.reshape(-1, mask.shape[-1]), idx.reshape(-1, capacity), count.reshape(-1)
    for mrow, irow, c in zip(flat_m, flat_i, flat_c):
        want = np.flatnonzero(mrow)
        assert c == len(want) and len(want) <= capacity
        np.testing.assert_array_equal(irow[:c], want)            # ascending, exactly the mask
        assert (irow[c:] == irow[0]).all()                       # padding repeats a read row
        assert ((irow >= 0) & (irow < mrow.size)).all()


def test_mask_to_indices_roundtrip_and_capacity_cut():
    rng = np.random.default_rng(7)
    m = 37
    q = rng.integers(-3, 4, size=(4, 5, m)).astype(np.float32)  # ties in the cut
    mask = rng.random((4, 5, m)) < 0.5
    mask[0, 0] = True
    mask[0, 1] = False
    idx, count = sel.mask_to_indices(jnp.asarray(mask))
    assert idx.shape == (4, 5, m) and idx.dtype == jnp.int32 and count.shape == (4, 5)
    _check_indices(mask, idx, count, m)
    to_idx = jax.jit(sel.mask_to_indices, static_argnums=1)
    for cap in (1, 8, 50):
        c = min(cap, m)
        idx, count = to_idx(jnp.asarray(mask), cap, jnp.asarray(q))
        capped = np.stack([ref.cap_row(mr, qr, c) for mr, qr in
                           zip(mask.reshape(-1, m), q.reshape(-1, m))]).reshape(mask.shape)
        _check_indices(capped, idx, count, c)
        if cap == 8:
            np.testing.assert_array_equal(
                sel.limit_to_capacity(jnp.asarray(mask), jnp.asarray(q), cap), capped)


@pytest.mark.parametrize("m", [100, 128, 256, 14336])
def test_count_kept_equals_a_plain_sum(m):
    """The kept count equals one sum over m: random, all and none kept, leading axes
    kept, m a multiple of 128 or not."""
    rng = np.random.default_rng(m)
    for mask in (rng.random((2, 3, m)) < 0.3, np.ones((2, 3, m), bool),
                 np.zeros((2, 3, m), bool)):
        got = sel.count_kept(jnp.asarray(mask))
        assert got.dtype == jnp.int32 and got.shape == (2, 3)
        np.testing.assert_array_equal(np.asarray(got), mask.sum(-1))
