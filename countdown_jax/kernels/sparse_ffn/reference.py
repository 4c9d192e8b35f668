"""Plain-JAX reference of the gathered sparse FFN (float32 accumulation).

Given a capacity-padded index list per token, only the listed neuron rows are read:

    s_i = act(gate_i . x) * (up_i . x)     for i in idx[:count]
    y   = sum_i s_i * down_i

``dense`` names a projection already computed densely by the caller (it decided the
selection from it): "up" (M-COUNTDOWN: coefficient u given), "gate" (CATS: act(g) given)
or None (D-COUNTDOWN / predictor: gate, up and down all gathered).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from countdown_jax.ffn import activation


def sparse_ffn_reference(x, w_gate, w_up, w_down, idx, count, *, act, dense=None, coef=None):
    """x [N, d]; w_* [m, d]; idx [N, C] int32; count [N] int32; coef [N, m] when dense is set."""
    n, c = idx.shape
    m = w_down.shape[0]
    # Entries past count (and any outside [0, m)) are padding: read row 0, weight 0, so
    # junk in the padding can neither fault nor poison the sum (NaN * 0).
    valid = (jnp.arange(c)[None, :] < count[:, None]) & (idx >= 0) & (idx < m)   # [N, C]
    idx = jnp.where(valid, idx, 0)
    xf = x.astype(jnp.float32)

    def rows(w):                                                         # [N, C, d]
        return jnp.take(w, idx, axis=0).astype(jnp.float32)

    def picked(v):                                                       # [N, m] -> [N, C]
        return jnp.take_along_axis(v.astype(jnp.float32), idx, axis=1)

    if dense == "up":
        a = activation(act)(jnp.einsum("nd,ncd->nc", xf, rows(w_gate)))
        s = a * picked(coef)
    elif dense == "gate":
        s = picked(coef) * jnp.einsum("nd,ncd->nc", xf, rows(w_up))
    elif dense is None:
        g = jnp.einsum("nd,ncd->nc", xf, rows(w_gate))
        u = jnp.einsum("nd,ncd->nc", xf, rows(w_up))
        s = activation(act)(g) * u
    else:
        raise ValueError(f"dense must be 'up', 'gate' or None, got {dense!r}")
    s = jnp.where(valid, s, 0.0)
    y = jnp.einsum("nc,ncd->nd", s, rows(w_down))
    return y.astype(x.dtype)
