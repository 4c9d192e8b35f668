"""Plain-JAX reference of the gathered sparse FFN (float32 accumulation).

Given a capacity-padded index list per token, only the listed neuron rows are read:

    s_i = act(gate_i . x) * (up_i . x)     for i in idx[:count]
    y   = sum_i s_i * down_i

``dense`` names a projection already computed densely by the caller (it decided the
selection from it): "up" (M-COUNTDOWN: coefficient u given), "gate" (CATS: act(g) given)
or None (D-COUNTDOWN / predictor: gate, up and down all gathered).
"""

from __future__ import annotations

import jax.numpy as jnp

from countdown_jax.gated import HIGHEST, activation   # HIGHEST: float32 means float32 (no TF32)

__all__ = ["sparse_ffn_reference"]


def sparse_ffn_reference(x, mlp, idx, count, *, act, dense=None, coef=None, row_offset=0,
                         m=None, s_tau=None):
    """x [N, d]; mlp {"gate", "up", "down"} [R, d]; idx [N, C] int32; count [N] int32;
    coef [N, m] when dense is set.

    s_tau [N] float32 (the cascade rule): of the listed neurons only those with
    |s_i| > s_tau contribute; returns (y, kept [N] int32) instead of y.

    Neuron i of the layer is weight row ``row_offset + i`` (R = m and offset 0 for one
    layer's matrices; a flattened [L*m, d] stack with offset l*m reads layer l in place).
    """
    n, c = idx.shape
    m = mlp["down"].shape[0] if m is None else m
    # Entries past count (and any outside [0, m)) are padding: read row 0, weight 0, so
    # junk in the padding can neither fault nor poison the sum (NaN * 0).
    valid = (jnp.arange(c)[None, :] < count[:, None]) & (idx >= 0) & (idx < m)   # [N, C]
    idx = jnp.where(valid, idx, 0)

    def rows(name):            # [N, C, d] in the weights' dtype (no float32 copy of W)
        return jnp.take(mlp[name], idx + row_offset, axis=0)

    def dots(name):            # [N, C]: row . x with float32 accumulation, no TF32
        return jnp.einsum("nd,ncd->nc", x, rows(name), preferred_element_type=jnp.float32,
                          precision=HIGHEST)

    def picked(v):             # [N, m] -> [N, C]
        return jnp.take_along_axis(v.astype(jnp.float32), idx, axis=1)

    if dense == "up":
        s = activation(act)(dots("gate")) * picked(coef)
    elif dense == "gate":
        s = picked(coef) * dots("up")
    elif dense is None:
        s = activation(act)(dots("gate")) * dots("up")
    else:
        raise ValueError(f"dense must be 'up', 'gate' or None, got {dense!r}")
    if s_tau is not None:
        valid = valid & (jnp.abs(s) > s_tau[:, None])
    s = jnp.where(valid, s, 0.0)
    y = jnp.einsum("nc,ncd->nd", s, rows("down").astype(jnp.float32), precision=HIGHEST)
    if s_tau is not None:
        return y.astype(x.dtype), jnp.sum(valid, axis=1, dtype=jnp.int32)
    return y.astype(x.dtype)
