"""The GEMV kernel (countdown_jax/kernels/gemv) against its float32 reference.

CPU: the Triton kernel in the Pallas interpreter, on ragged shapes (d = 200 and n = 333
against every block size), batches 1 / 3 / 8 / 16, both weight layouts, split d (float32
partials summed), the tensor-core dot, deferred reductions, and a stacked weight read in
place at a traced layer whose other layers are NaN; rows not read (live / rows + count)
are NaN too. GPU (marked ``gpu``): compiled.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax.kernels import _platform
from countdown_jax.kernels.gemv.api import gemv
from countdown_jax.kernels.gemv.pallas_gpu import GemvConfig as C
from countdown_jax.kernels.gemv.reference import gemv_reference, gemv_xla


def make(seed, B, d, n, dtype, transposed=False, layers=None):
    rng = np.random.default_rng(seed)
    shape = (n, d) if transposed else (d, n)
    if layers is not None:
        shape = (layers,) + shape
    x = rng.standard_normal((B, d)).astype(np.float32)
    w = (rng.standard_normal(shape) / np.sqrt(d)).astype(np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def assert_close(got, x, w, transposed=False):
    """float32 output: float32 sums in another order. bfloat16 output: within one rounding
    of the float32 result."""
    ref = np.asarray(gemv_reference(x, w, transposed=transposed, out_dtype=jnp.float32))
    got = np.asarray(got, np.float32)
    assert got.shape == ref.shape and np.all(np.isfinite(got))
    scale = np.abs(ref).max()
    tol = 1e-5 if x.dtype == jnp.float32 else 2 ** -8
    assert np.max(np.abs(got - ref)) <= tol * scale, np.max(np.abs(got - ref)) / scale


CASES = [   # B, transposed, config, dtype
    (1, False, C(block_n=64, block_d=32), jnp.float32),                     # deferred sum
    (3, False, C(block_n=128, block_d=64, split_d=2), jnp.float32),         # 2 partials
    (8, False, C(block_n=32, block_d=16, split_d=5), jnp.bfloat16),         # uneven splits
    (3, False, C(block_n=64, block_d=64, dot=True), jnp.bfloat16),
    (8, False, C(block_n=16, block_d=128, dot=True, split_d=2), jnp.bfloat16),
    (2, False, C(block_n=256, block_d=8, defer=4), jnp.float32),            # defer at B=2
    (1, True, C(block_n=16, block_d=64), jnp.bfloat16),
    (3, True, C(block_n=32, block_d=32, split_d=3), jnp.float32),
    (8, True, C(block_n=32, block_d=64, dot=True), jnp.bfloat16),
    (16, False, None, jnp.bfloat16),                                        # the default
    (16, True, None, jnp.float32),
]


@pytest.mark.parametrize("B,transposed,cfg,dtype", CASES)
def test_kernel_matches_float32_reference(B, transposed, cfg, dtype, pallas_interpret):
    d, n = 200, 333
    x, w = make(B + 7 * transposed, B, d, n, dtype, transposed)
    f = jax.jit(lambda x, w: gemv(x, w, transposed=transposed, implementation="pallas",
                                  config=cfg))
    y = f(x, w)
    assert y.dtype == dtype
    assert_close(y, x, w, transposed)
    y32 = gemv(x, w, transposed=transposed, implementation="pallas", config=cfg,
               out_dtype=jnp.float32)
    assert y32.dtype == jnp.float32
    assert_close(y32, x, w, transposed)
    if dtype == jnp.float32:           # float32 sums: only their order differs
        np.testing.assert_allclose(np.asarray(y), np.asarray(y32), rtol=0, atol=0)


LIVE_CASES = [   # B, transposed, config, dtype
    (4, True, C(block_n=16, block_d=64, split_d=2), jnp.bfloat16),
    (3, False, C(block_n=32, block_d=16, split_d=3), jnp.float32),
    (8, False, C(block_n=16, block_d=32, dot=True), jnp.bfloat16),
    (2, True, C(block_n=32, block_d=32, dot=True), jnp.bfloat16),
]


@pytest.mark.parametrize("B,transposed,cfg,dtype", LIVE_CASES)
def test_live_rows_count_as_zero_and_are_not_read(B, transposed, cfg, dtype, pallas_interpret):
    """live: W's rows where it is False are skipped (NaN there, so a read would show) and
    count as zero; random, all and none live; ragged sizes; a stacked layer in place."""
    d, n = 200, 333
    x, w = make(30 + B, B, d, n, dtype, transposed, layers=2)
    rows = n if transposed else d
    rng = np.random.default_rng(31)
    for case, live in (("random", rng.random(rows) < 0.3), ("all", np.ones(rows, bool)),
                       ("none", np.zeros(rows, bool))):
        live = jnp.asarray(live)
        wl = jnp.where(live[:, None], w[1], 0)                 # the zeroed rows, for the reference
        poisoned = w.at[1].set(jnp.where(live[:, None], w[1], jnp.nan))
        y = jax.jit(lambda x, w, l: gemv(x, w, layer=jnp.int32(1), transposed=transposed,
                                         implementation="pallas", config=cfg, live=l,
                                         out_dtype=jnp.float32))(x, poisoned, live)
        if case == "none":
            np.testing.assert_array_equal(np.asarray(y), 0.0)
        else:
            assert_close(y, x, wl, transposed)
        ref = gemv(x, w, layer=1, transposed=transposed, live=live, out_dtype=jnp.float32)
        assert_close(ref, x, wl, transposed)                  # the "xla" path's live
    with pytest.raises(ValueError, match="live must be bool"):
        gemv(x, w[0], transposed=transposed, live=jnp.ones((rows + 1,), bool))


ROWS_CASES = [   # B, transposed, config, dtype
    (3, True, C(block_n=16, block_d=32, split_d=3), jnp.float32),
    (5, True, C(block_n=32, block_d=64, dot=True, split_d=2), jnp.bfloat16),
    (1, True, C(block_n=64, block_d=128), jnp.bfloat16),                 # deferred sum
    (3, False, C(block_n=32, block_d=16, split_d=3), jnp.float32),
    (8, False, C(block_n=16, block_d=32, dot=True, split_d=4), jnp.bfloat16),
    (2, False, C(block_n=64, block_d=64), jnp.float32),                  # one split
]


@pytest.mark.parametrize("B,transposed,cfg,dtype", ROWS_CASES)
def test_compact_rows_equal_the_gathered_reference(B, transposed, cfg, dtype,
                                                   pallas_interpret):
    """rows + count: W's rows rows[:count] only (every other row NaN: a read would show;
    plain, x's compact columns past count NaN too); transposed, a compact [B, C] output,
    0 past count. C = 150 ascending random rows of 333 (ragged against every tile), count
    0, 61 and all; a stacked layer in place; the "xla" path the same."""
    d, n, C = 200, 333, 150
    x, w = make(50 + B, B, d, n, dtype, transposed, layers=2)
    rows_w = n if transposed else d
    rng = np.random.default_rng(51 + B)
    rows = jnp.asarray(np.sort(rng.choice(rows_w, C, replace=False)).astype(np.int32))
    if not transposed:
        x = jnp.asarray(rng.standard_normal((B, C)), dtype)          # compact x
    f = jax.jit(lambda x, w, r, c: gemv(x, w, layer=jnp.int32(1), transposed=transposed,
                                        implementation="pallas", config=cfg, rows=r,
                                        count=c, out_dtype=jnp.float32))
    for count in (0, 61, C):
        read = np.zeros(rows_w, bool)
        read[np.asarray(rows[:count])] = True
        poisoned = w.at[1].set(jnp.where(jnp.asarray(read)[:, None], w[1], jnp.nan))
        xp = x if transposed else x.at[:, count:].set(jnp.nan)
        y = f(xp, poisoned, rows, jnp.int32(count))
        assert y.shape == (B, C if transposed else n)
        # the reference: the same sums over the gathered rows, densely
        wg = jnp.take(w[1], rows[:count], axis=0)
        if transposed:
            ref_w = jnp.zeros((C, d), dtype).at[:count].set(wg)
            ref_x = x
        else:
            ref_w = jnp.zeros((C, n), dtype).at[:count].set(wg)
            ref_x = x.at[:, count:].set(0)
        if count == 0:
            np.testing.assert_array_equal(np.asarray(y), 0.0)
        else:
            assert_close(y, ref_x, ref_w, transposed)
        if transposed:           # exact zeros past count
            np.testing.assert_array_equal(np.asarray(y[:, count:]), 0.0)
        xla = gemv(xp, poisoned, layer=1, transposed=transposed, rows=rows, count=count,
                   out_dtype=jnp.float32)
        if count:
            assert_close(xla, ref_x, ref_w, transposed)
        else:
            np.testing.assert_array_equal(np.asarray(xla), 0.0)
    # count left out: all of rows
    y_all = gemv(x, w[1], transposed=transposed, implementation="pallas", config=cfg,
                 rows=rows, out_dtype=jnp.float32)
    assert_close(y_all, x, jnp.take(w[1], rows, axis=0), transposed)


def test_bad_rows_name_the_problem():
    x, w = make(0, 2, 32, 24, jnp.float32)            # w [32, 24] plain
    rows = jnp.arange(5, dtype=jnp.int32)
    with pytest.raises(ValueError, match="rows must be int32"):
        gemv(x, w, transposed=True, rows=rows.astype(jnp.int16))
    with pytest.raises(ValueError, match="rows must be int32"):
        gemv(x, w, transposed=True, rows=rows.reshape(1, 5))
    with pytest.raises(ValueError, match="rows must be int32"):
        gemv(x, w, transposed=True, rows=np.arange(5))
    with pytest.raises(ValueError, match="count given without rows"):
        gemv(x, w, count=3)
    with pytest.raises(ValueError, match="live .* or rows .*not both"):
        gemv(x, w, rows=rows, live=jnp.ones((32,), bool))
    with pytest.raises(ValueError, match="count must be an integer scalar"):
        gemv(x[:, :5], w, rows=rows, count=jnp.ones((2,), jnp.int32))
    with pytest.raises(ValueError, match=r"x must be compact \[..., C\] with C = 5"):
        gemv(x, w, rows=rows, count=3)                 # plain: x is the compact [B, 5]


@pytest.mark.parametrize("transposed", [False, True])
def test_stack_read_in_place_at_a_traced_layer(transposed, pallas_interpret):
    """[L, d, n] with a traced layer reads that layer only (the others are NaN); x's
    leading axes are kept."""
    L, d, n = 3, 72, 100
    x, w = make(5, 6, d, n, jnp.float32, transposed, layers=L)
    x = x.reshape(2, 3, d)
    for layer in range(L):
        wn = np.array(w)
        wn[[i for i in range(L) if i != layer]] = np.nan
        got = jax.jit(lambda x, w, l: gemv(x, w, layer=l, transposed=transposed,
                                           implementation="pallas",
                                           config=C(block_n=32, block_d=16, split_d=2)))(
            x, jnp.asarray(wn), jnp.int32(layer))
        assert got.shape == (2, 3, n)
        assert_close(got.reshape(6, n), x.reshape(6, d), w[layer], transposed)


def test_stack_past_int32_offsets_reads_the_layer_slice(monkeypatch, pallas_interpret):
    x, w = make(2, 2, 40, 50, jnp.float32, layers=3)
    monkeypatch.setattr(_platform, "MAX_FLAT_ELEMENTS", w[0].size)      # one layer fits
    got = gemv(x, w, layer=jnp.int32(2), implementation="pallas", config=C(block_n=16))
    assert_close(got, x, w[2])
    monkeypatch.setattr(_platform, "MAX_FLAT_ELEMENTS", w[0].size - 1)
    with pytest.raises(ValueError, match="int32 offsets"):
        gemv(x, w, layer=0, implementation="pallas")


def test_xla_implementation_is_the_xla_dot():
    x, w = make(1, 3, 64, 48, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(gemv(x, w)), np.asarray(gemv_xla(x, w)))
    np.testing.assert_array_equal(np.asarray(gemv(x, w.T, transposed=True)),
                                  np.asarray(gemv_xla(x, w)))
    assert_close(gemv(x, w, out_dtype=jnp.float32), x, w)


def test_bad_inputs_name_the_problem():
    x, w = make(0, 2, 32, 24, jnp.float32)
    with pytest.raises(ValueError, match="unknown gemv implementation"):
        gemv(x, w, implementation="cuda")
    with pytest.raises(ValueError, match="no 'pallas_tpu' backend"):
        gemv(x, w, implementation="pallas_tpu")
    with pytest.raises(ValueError, match=r"w must be \[d, n\], got shape"):
        gemv(x, w[None])
    with pytest.raises(ValueError, match=r"stacked as \[L, d, n\] \(layer= given\)"):
        gemv(x, w, layer=0)
    with pytest.raises(ValueError, match=r"x must be \[..., d\] with d = 32"):
        gemv(x[:, :20], w)
    with pytest.raises(ValueError, match=r"d = 24 \(w \[n, d\]"):
        gemv(x, w, transposed=True)
    with pytest.raises(ValueError, match="x must be"):
        gemv(jnp.float32(1.0), w)
    with pytest.raises(ValueError, match="share one dtype"):
        gemv(x.astype(jnp.bfloat16), w)
    with pytest.raises(ValueError, match="w must be float32, bfloat16 or float16"):
        gemv(x, w.astype(jnp.int8))
    with pytest.raises(ValueError, match="at most 16 rows"):
        gemv(jnp.zeros((17, 32)), w, implementation="pallas_gpu", interpret=True)
    with pytest.raises(ValueError, match="rounds to TF32"):
        gemv(x, w, implementation="pallas_gpu", interpret=True, config=C(dot=True))
    with pytest.raises(ValueError, match="power of two"):
        C(block_n=48)
    with pytest.raises(ValueError, match="split_d"):
        C(split_d=0)
    with pytest.raises(ValueError, match="dot needs"):
        C(block_n=8, dot=True)


def test_pallas_on_cpu_falls_back_to_xla_with_a_warning():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU fallback only")
    x, w = make(3, 2, 32, 24, jnp.float32)
    _platform.reset_fallback_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = gemv(x, w, implementation="pallas")
    assert any("gemv falls back" in str(i.message) for i in caught)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(gemv(x, w)))


# --------------------------------------------------------------------------- compiled GPU

@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_kernel_compiled_on_gpu():
    """Triton-compiled: ragged and Llama-8B shapes, every option, a stacked weight."""
    configs = [None, C(block_n=128, block_d=64, split_d=4), C(block_n=32, block_d=256),
               C(block_n=64, block_d=64, dot=True, split_d=2), C(block_n=256, num_warps=8)]
    for (d, n), B, transposed, dtype in [((200, 333), 3, False, jnp.float32),
                                         ((200, 333), 8, True, jnp.bfloat16),
                                         ((4096, 1024), 1, False, jnp.bfloat16),
                                         ((2048, 4096), 8, True, jnp.bfloat16)]:
        x, w = make(d + B, B, d, n, dtype, transposed, layers=2)
        for cfg in configs:
            if cfg is not None and cfg.dot and dtype == jnp.float32:
                continue
            got = jax.jit(lambda x, w: gemv(x, w, layer=jnp.int32(1), transposed=transposed,
                                            implementation="pallas", config=cfg))(x, w)
            assert_close(got, x, w[1], transposed)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_live_rows_compiled_on_gpu():
    """Triton-compiled live rows (NaN where not live: a read would show), FMA and dot, a
    ragged and the Llama-8B FFN shape."""
    rng = np.random.default_rng(40)
    for (d, n), B, transposed in [((200, 333), 4, True), ((200, 333), 3, False),
                                  ((4096, 14336), 4, True), ((14336, 4096), 8, False)]:
        x, w = make(d + B, B, d, n, jnp.bfloat16, transposed)
        rows = n if transposed else d
        for share in (0.0, 0.3, 1.0):
            live = jnp.asarray(rng.random(rows) < share)
            poisoned = jnp.where(live[:, None], w, jnp.nan)
            for cfg in (None, C(block_n=64, block_d=128, split_d=4, dot=True)):
                got = jax.jit(lambda x, w, l: gemv(x, w, transposed=transposed, live=l,
                                                   implementation="pallas", config=cfg,
                                                   out_dtype=jnp.float32))(x, poisoned, live)
                assert_close(got, x, jnp.where(live[:, None], w, 0), transposed)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_compact_rows_compiled_on_gpu():
    """Triton-compiled rows + count (rows not listed NaN), FMA and dot, a ragged and the
    Llama-8B FFN shape, count 0, a half and all."""
    rng = np.random.default_rng(41)
    for (d, n), B, transposed in [((200, 333), 4, True), ((200, 333), 3, False),
                                  ((4096, 14336), 8, True), ((14336, 4096), 8, False)]:
        x, w = make(d + B, B, d, n, jnp.bfloat16, transposed)
        rows_w = n if transposed else d
        cap = rows_w // 2 + 1
        rows = jnp.asarray(np.sort(rng.choice(rows_w, cap, replace=False)).astype(np.int32))
        if not transposed:
            x = jnp.asarray(rng.standard_normal((B, cap)), jnp.bfloat16)
        for count in (0, cap // 2, cap):
            read = jnp.zeros(rows_w, bool).at[rows[:count]].set(True)
            poisoned = jnp.where(read[:, None], w, jnp.nan)
            for cfg in (None, _dot(64, 128, 4), _dot(32, 128, 8)):
                got = jax.jit(lambda x, w, c: gemv(x, w, transposed=transposed, rows=rows,
                                                   count=c, implementation="pallas",
                                                   config=cfg, out_dtype=jnp.float32))(
                    x, poisoned, jnp.int32(count))
                ref = gemv(x, w, transposed=transposed, rows=rows, count=count,
                           out_dtype=jnp.float32)
                np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-2,
                                           atol=2e-2 * float(jnp.abs(ref).max() + 1e-6))


def _dot(bn, bd, split):
    return C(block_n=bn, block_d=bd, split_d=split, num_stages=3, dot=True)
