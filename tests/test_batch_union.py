"""batch_union.union_ffn's two forms of the union (interpret mode, as on a GPU): the row
predicate ("live", shipped) and the index list ("compact"), against the float32 masked
FFN (each token's s zero off its own kept set). The routing from ffn and the rule's
thresholds are tested in test_ffn.py."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax.batch_union import union_ffn
from countdown_jax.gated import activation
from countdown_jax.kernels.gemv.pallas_gpu import GemvConfig as C

HI = jax.lax.Precision.HIGHEST
D, M = 72, 200                   # ragged against every tile below


def _problem(seed, n, dtype):
    """A stacked [2, M, D] MLP whose layer 0 is NaN (read in place at layer 1), xs [n, D]."""
    rng = np.random.default_rng(seed)
    w = {k: rng.standard_normal((M, D)) / np.sqrt(D) for k in ("gate", "up", "down")}
    stack = {k: jnp.asarray(np.stack([np.full_like(v, np.nan), v]), dtype)
             for k, v in w.items()}
    xs = jnp.asarray(rng.standard_normal((n, D)), dtype)
    return stack, xs


def _masked_reference(stack, xs, mask):
    """float32: y = (mask * act(g) * u) @ W_down, from the stored values."""
    f32 = {k: stack[k][1].astype(jnp.float32) for k in ("gate", "up", "down")}
    x = xs.astype(jnp.float32)
    g = jnp.einsum("nd,md->nm", x, f32["gate"], precision=HI)
    u = jnp.einsum("nd,md->nm", x, f32["up"], precision=HI)
    s = jnp.where(mask, activation("silu")(g) * u, 0.0)
    return g, u, jnp.einsum("nm,md->nd", s, f32["down"], precision=HI)


CASES = [   # tokens, dense projection, dtype, (gate / up, down) tiles
    (3, "up", jnp.float32, (C(block_n=16, block_d=32, split_d=2),
                            C(block_n=32, block_d=16, split_d=3))),
    (4, "gate", jnp.float32, (C(block_n=32, block_d=16), C(block_n=16, block_d=64))),
    (5, None, jnp.float32, (C(block_n=64, block_d=32, split_d=3),
                            C(block_n=32, block_d=32, split_d=8))),
    (8, "up", jnp.bfloat16, (C(block_n=32, block_d=32, split_d=2, dot=True),
                             C(block_n=16, block_d=64, split_d=4, dot=True))),
    (2, None, jnp.bfloat16, None),                       # the shipped tiles
]


@pytest.mark.parametrize("n,dense,dtype,configs", CASES)
def test_compact_union_equals_the_masked_ffn(n, dense, dtype, configs, pallas_interpret):
    """form="compact" (and "live", the same sums) equal the float32 masked FFN when the
    tokens' kept sets cover some, all and none of m; the stack is read in place (the
    other layer NaN)."""
    stack, xs = _problem(n + 10, n, dtype)
    rng = np.random.default_rng(n)
    run = jax.jit(lambda st, x, mk, cf, form: union_ffn(
        st, x, mk, act="silu", dense=dense, coef=cf, layer=jnp.int32(1), configs=configs,
        form=form), static_argnums=4)
    tol = 1e-4 if dtype == jnp.float32 else 2e-2
    for case, mask in (("some", rng.random((n, M)) < 0.15), ("all", np.ones((n, M), bool)),
                       ("none", np.zeros((n, M), bool))):
        mask = jnp.asarray(mask)
        g, u, ref = _masked_reference(stack, xs, mask)
        coef = {"up": u, "gate": activation("silu")(g), None: None}[dense]
        coef = None if coef is None else coef.astype(jnp.float32)
        y = run(stack, xs, mask, coef, "compact")
        assert y.shape == (n, D) and y.dtype == dtype
        assert np.isfinite(np.asarray(y, np.float32)).all(), case
        scale = float(jnp.abs(ref).max()) + 1e-6
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=0,
                                   atol=tol * scale, err_msg=case)
        if case == "none":
            np.testing.assert_array_equal(np.asarray(y, np.float32), 0.0)
        live = run(stack, xs, mask, coef, "live")
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(live, np.float32),
                                   rtol=0, atol=tol * scale, err_msg=case)


def test_bad_form_is_refused_by_name():
    w = {k: jnp.zeros((8, 4)) for k in ("gate", "up", "down")}
    with pytest.raises(ValueError, match="form must be one of"):
        union_ffn(w, jnp.zeros((2, 4)), jnp.ones((2, 8), bool), act="silu", form="dense")
