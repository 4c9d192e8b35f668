"""Plain-JAX reference of the fused sparse FFN: selection by threshold, then the FFN.

One token's path (float32 throughout, every neuron computed densely: this is the oracle
the kernels are checked against, not a fast path):

    method "m"    (M-COUNTDOWN): u = W_up x,               keep |u_i|      > tau
    method "cats" (CATS):        a = act(W_gate x),        keep |a_i|      > tau
    method "d"    (D-COUNTDOWN): z = U h, h = Vt x (rank r),  keep z_i    > tau (theta)
    method "dc"   (the cascade): candidates z_i > tau as "d", then keep |s_i| > tau_s
    s_i = act(g_i) * u_i  for kept i, else 0;   y = sum_i s_i * W_down[i]

Weights are row-per-neuron [m, d] (W_down transposed); the predictor is Vt [r, d] (V
transposed, as policies store it: both its GEMVs read rows) and U [m, r]. tau is a
scalar or one value per token (tau_s too, "dc" only). Returns y (x.dtype) and the number of kept neurons per
token (int32).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from countdown_jax.gated import HIGHEST, activation, project

__all__ = ["METHODS", "check_method", "dense_scores", "fused_sparse_ffn_reference",
           "predictor_hidden", "project_f32", "scores_to_selection", "selection_scores"]

METHODS = ("m", "cats", "d", "dc")
PREDICTED = ("d", "dc")          # methods that select on the predictor's logits z

# x [N, k] . w [m, k] -> [N, m] float32 (float32 accumulation, no TF32, no f32 copy of w).
project_f32 = functools.partial(project, float32=True)


def check_method(method, pred_vt, pred_u, scores=None, tau_s=None):
    if method not in METHODS:
        raise ValueError(f"fused sparse FFN method must be one of {METHODS}, got {method!r}")
    if method in PREDICTED and scores is None and (pred_vt is None or pred_u is None):
        raise ValueError(f"method {method!r} needs the predictor: pred_vt [r, d] and "
                         f"pred_u [m, r] (or its logits as scores)")
    if (method == "dc") != (tau_s is not None):
        raise ValueError(f"tau_s (the cascade's |s| threshold) is required for method 'dc' "
                         f"and only for it; got method {method!r} with tau_s "
                         f"{'unset' if tau_s is None else 'set'}")


def predictor_hidden(x, pred_vt):
    """h = x V = x Vt^T [N, r] in float32. Kept in float32: rounding h to bf16 moves
    logits by ~1e-3 relative, so two XLA programs that round differently would select
    differently near the threshold; in float32 only the summation order differs (~1e-6)."""
    return jnp.einsum("nd,rd->nr", x, pred_vt, preferred_element_type=jnp.float32,
                      precision=HIGHEST)


def dense_scores(x, w_gate, w_up, *, act, method, pred_vt=None, pred_u=None):
    """The dense projection each rule selects on, [N, m] float32: u (m), act(g) (cats),
    z = (x V) U^T (d, dc)."""
    if method == "m":
        return project_f32(x, w_up)
    if method == "cats":
        return activation(act)(project_f32(x, w_gate))
    return project_f32(predictor_hidden(x, pred_vt), pred_u)


def scores_to_selection(method, scores):
    """``dense_scores`` -> (quantity compared with tau, the dense coefficient or None)."""
    scores = scores.astype(jnp.float32)
    return (scores, None) if method in PREDICTED else (jnp.abs(scores), scores)


def selection_scores(x, w_gate, w_up, *, act, method, pred_vt=None, pred_u=None):
    """(quantity compared with tau [N, m] float32, the dense coefficient or None)."""
    return scores_to_selection(method, dense_scores(x, w_gate, w_up, act=act, method=method,
                                                    pred_vt=pred_vt, pred_u=pred_u))


def per_token(t, n):
    """A scalar or one value per token -> float32 [n, 1]."""
    return jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1, 1), (n, 1))


def fused_sparse_ffn_reference(x, w_gate, w_up, w_down, tau, *, act, method,
                               pred_vt=None, pred_u=None, scores=None, tau_s=None):
    """scores: ``dense_scores`` computed by the caller (None: computed here)."""
    check_method(method, pred_vt, pred_u, scores, tau_s)
    if scores is None:
        scores = dense_scores(x, w_gate, w_up, act=act, method=method,
                              pred_vt=pred_vt, pred_u=pred_u)
    q, _ = scores_to_selection(method, scores)
    keep = q > per_token(tau, x.shape[0])
    s = activation(act)(project_f32(x, w_gate)) * project_f32(x, w_up)
    if method == "dc":                  # the cascade's second stage, on the exact s
        keep = keep & (jnp.abs(s) > per_token(tau_s, x.shape[0]))
    s = jnp.where(keep, s, 0.0)
    y = jnp.einsum("nm,md->nd", s, w_down.astype(jnp.float32), precision=HIGHEST)
    return y.astype(x.dtype), jnp.sum(keep, axis=-1, dtype=jnp.int32)
