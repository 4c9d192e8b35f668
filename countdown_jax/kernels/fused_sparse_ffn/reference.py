"""Plain-JAX reference of the fused sparse FFN: selection by threshold, then the FFN.

One token's path (float32 throughout, every neuron computed densely: this is the oracle
the kernels are checked against, not a fast path):

    method "m"    (M-COUNTDOWN): u = W_up x,               keep |u_i|      > tau
    method "cats" (CATS):        a = act(W_gate x),        keep |a_i|      > tau
    method "d"    (D-COUNTDOWN): z = U h, h = V^T x (rank r), keep z_i    > tau (theta)
    s_i = act(g_i) * u_i  for kept i, else 0;   y = sum_i s_i * W_down[i]

Weights are row-per-neuron [m, d] (W_down transposed); the predictor is V [d, r] and
U [m, r]. tau is a scalar or one value per token. Returns y (x.dtype) and the number of
kept neurons per token (int32).
"""

from __future__ import annotations

import jax.numpy as jnp

from countdown_jax.ffn import activation
from countdown_jax.kernels.sparse_ffn.reference import HIGHEST

METHODS = ("m", "cats", "d")


def check_method(method, pred_v, pred_u):
    if method not in METHODS:
        raise ValueError(f"fused sparse FFN method must be one of {METHODS}, got {method!r}")
    if method == "d" and (pred_v is None or pred_u is None):
        raise ValueError("method 'd' needs the predictor: pred_v [d, r] and pred_u [m, r]")


def project(x, w):
    """x [N, k] . w [m, k] -> [N, m] float32 (float32 accumulation, no TF32, no f32 copy of w).

    Mixed dtypes (float32 h against bf16 U): written as multiply + reduce so XLA fuses the
    upcast into one pass over w instead of materialising a float32 copy of it."""
    if x.dtype != w.dtype:
        return jnp.sum(x.astype(jnp.float32)[:, None, :] * w.astype(jnp.float32)[None], axis=-1)
    return jnp.einsum("nk,mk->nm", x, w, preferred_element_type=jnp.float32, precision=HIGHEST)


def predictor_hidden(x, pred_v):
    """h = x V [N, r] in float32. Kept in float32: rounding h to bf16 moves logits by ~1e-3
    relative, so two XLA programs that round differently would select differently near
    the threshold; in float32 only the summation order differs (~1e-6)."""
    return jnp.einsum("nd,dr->nr", x, pred_v, preferred_element_type=jnp.float32,
                      precision=HIGHEST)


def selection_scores(x, w_gate, w_up, *, act, method, pred_v=None, pred_u=None):
    """(quantity compared with tau [N, m] float32, the dense coefficient or None)."""
    if method == "m":
        u = project(x, w_up)
        return jnp.abs(u), u
    if method == "cats":
        a = activation(act)(project(x, w_gate))
        return jnp.abs(a), a
    return project(predictor_hidden(x, pred_v), pred_u), None


def fused_sparse_ffn_reference(x, w_gate, w_up, w_down, tau, *, act, method,
                               pred_v=None, pred_u=None):
    check_method(method, pred_v, pred_u)
    q, _ = selection_scores(x, w_gate, w_up, act=act, method=method,
                            pred_v=pred_v, pred_u=pred_u)
    tau = jnp.broadcast_to(jnp.asarray(tau, jnp.float32).reshape(-1, 1), (x.shape[0], 1))
    keep = q > tau
    s = jnp.where(keep, activation(act)(project(x, w_gate)) * project(x, w_up), 0.0)
    y = jnp.einsum("nm,md->nd", s, w_down.astype(jnp.float32), precision=HIGHEST)
    return y.astype(x.dtype), jnp.sum(keep, axis=-1, dtype=jnp.int32)
