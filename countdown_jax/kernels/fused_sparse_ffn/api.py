"""Sparse FFN with the selection included: x, weights, threshold -> y, kept count.

implementation (the vocabulary of every kernel op, ``kernels._platform``):
  "xla"         dense masked reference (exact maths, dense cost: quality sweeps)
  "pallas"      ONE fused Pallas kernel: scoring GEMV, threshold and the gathered FFN
                (GPU, "pallas_gpu"). D's small first predictor GEMV (h = x V) runs in
                XLA. On TPU ("pallas_tpu", no fused kernel): the index list through the
                TPU block kernel; on CPU: falls back to "xla" with a warning unless in
                interpret mode.
gather=True: XLA scores + threshold -> index list (nonzero, size=capacity) ->
  ``sparse_ffn`` with the same implementation ("xla": plain jnp.take of the kept rows;
  "pallas": the Pallas gathered kernel).
The names of earlier versions are accepted: "xla_gather" = ("xla", gather=True),
"pallas_gather" = ("pallas", gather=True).

Everything stays on device in one jitted program: thresholds are traced arrays, index
lists have a static capacity, counts are device scalars. With gather=True a
count above ``capacity`` truncates the list (the returned count is the untruncated one, so
callers can detect it); the fused kernel and the reference never truncate.

Weights: [m, d] each, or the model's stacked [L, m, d] with ``layer`` (a traced index):
the kernels then read layer l's rows in place as flat [L*m, d] rows from l*m on (a
sliced layer handed to a custom call is copied whole); whole-matrix XLA work (the dense
scoring GEMV, the "xla" reference) slices the layer, which XLA fuses into its GEMV.
The predictor (pred_vt [r, d] = V transposed, pred_u [m, r]) is always one layer's.

scores: optionally the dense projection the rule compares, [..., m] float32, computed by
the caller: u (m), act(g) (cats), z = (x V) U^T (d, dc); keep |u| > tau, |act(g)| > tau,
z > tau. The "pallas" kernel reads it with FusedConfig(score="xla") (the measured
default for every method; without ``scores`` it is computed here first).

method "dc" (the cascade): z > tau picks candidates as "d", their exact s is computed and
only |s| > tau_s (scalar or one per token, required) are kept; the count returned is the
final kept count. The "pallas" kernel reads W_down rows of those only; the index-list
paths list the candidates and sparse_ffn refines them (``s_tau``).
"""

from __future__ import annotations

import jax.numpy as jnp

from countdown_jax.kernels._platform import (IMPLEMENTATIONS, check_implementation, flat_stack,
                                             index_list, interpret_enabled, layer_slice,
                                             resolve)
from countdown_jax.kernels.fused_sparse_ffn.reference import (
    PREDICTED, check_method, dense_scores, fused_sparse_ffn_reference, per_token,
    predictor_hidden, scores_to_selection)
from countdown_jax.kernels.sparse_ffn.api import sparse_ffn

__all__ = ["IMPLEMENTATIONS", "LEGACY_IMPLEMENTATIONS", "fused_sparse_ffn"]

# Earlier names -> (implementation, gather).
LEGACY_IMPLEMENTATIONS = {"xla_gather": ("xla", True), "pallas_gather": ("pallas", True)}
_DENSE = {"m": "up", "cats": "gate", "d": None, "dc": None}


def fused_sparse_ffn(x, w_gate, w_up, w_down, tau, *, act, method, pred_vt=None, pred_u=None,
                     implementation: str = "xla", gather: bool = False,
                     capacity: int | None = None, interpret: bool | None = None, config=None,
                     layer=None, scores=None, tau_s=None):
    """x [..., d]; tau (and tau_s for "dc") scalar or one per token; returns
    (y [..., d], kept count [...])."""
    check_method(method, pred_vt, pred_u, scores, tau_s)
    if implementation in LEGACY_IMPLEMENTATIONS:
        implementation, gather = LEGACY_IMPLEMENTATIONS[implementation]
    check_implementation(implementation, "fused_sparse_ffn")
    interpret = interpret_enabled(interpret)
    lead, d = x.shape[:-1], x.shape[-1]
    stack = (w_gate, w_up, w_down)
    flat, off, m = flat_stack(stack, layer, "fused_sparse_ffn")   # checks stacks vs layer=
    m = w_down.shape[0] if m is None else m
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.shape[-2:] != (m, d):
            raise ValueError(f"fused_sparse_ffn: {name} must be [m, d] = {(m, d)}"
                             f"{' per layer' if layer is not None else ''}, got {w.shape}")
    if method in PREDICTED and pred_vt is not None and pred_u is not None and (
            pred_vt.shape[1] != d or pred_u.shape[0] != m or pred_vt.shape[0] != pred_u.shape[1]):
        raise ValueError(f"fused_sparse_ffn: predictor must be Vt [r, d={d}] and U [m={m}, r], "
                         f"got {pred_vt.shape} and {pred_u.shape}")
    x2 = x.reshape(-1, d)
    n = x2.shape[0]
    tau = _tokens("tau", tau, n)
    if tau_s is not None:
        tau_s = _tokens("tau_s", tau_s, n)
    if scores is not None:
        if scores.shape != lead + (m,):
            raise ValueError(f"fused_sparse_ffn: scores must be [..., m] = {lead + (m,)}, "
                             f"got {scores.shape}")
        scores = scores.reshape(n, m).astype(jnp.float32)

    def layer_matrices():      # whole matrices for XLA (it fuses the slice into its GEMV)
        return stack if layer is None else layer_slice(stack, layer)

    def get_scores():
        if scores is not None:
            return scores
        wg, wu, _ = layer_matrices()
        return dense_scores(x2, wg, wu, act=act, method=method, pred_vt=pred_vt, pred_u=pred_u)

    # The index list resolves its backend in sparse_ffn; the fused kernel is GPU only.
    impl = implementation if gather else resolve(implementation, interpret, "fused_sparse_ffn")
    if impl == "pallas_tpu":
        gather = True

    if impl == "xla" and not gather:
        y, cnt = fused_sparse_ffn_reference(x2, *layer_matrices(), tau, act=act,
                                            method=method, pred_vt=pred_vt, pred_u=pred_u,
                                            scores=scores, tau_s=tau_s)
    elif gather:
        cap = m if capacity is None else int(capacity)
        q, coef = scores_to_selection(method, get_scores())
        idx, cnt = index_list(q > tau[:, None], cap)
        y = sparse_ffn(x2, w_gate, w_up, w_down, idx, jnp.minimum(cnt, cap), act=act,
                       dense=_DENSE[method], coef=coef, implementation=implementation,
                       interpret=interpret, config=config, layer=layer, s_tau=tau_s)
        if tau_s is not None:       # the cascade: the count kept after |s| > tau_s
            y, cnt = y
    else:
        from countdown_jax.kernels.fused_sparse_ffn.pallas_gpu import (
            default_config, fused_sparse_ffn_pallas_gpu)
        cfg = config or default_config(w_down.dtype, method)
        h = sc = None
        if cfg.score == "xla":
            sc = get_scores()
        elif scores is not None:
            raise ValueError("fused_sparse_ffn: scores are read only with "
                             "FusedConfig(score='xla')")
        elif method in PREDICTED:
            h = predictor_hidden(x2, pred_vt)
        y, cnt = fused_sparse_ffn_pallas_gpu(x2, *flat, tau, act=act, method=method, h=h,
                                             pred_u=pred_u, config=cfg, interpret=interpret,
                                             scores=sc, row_offset=off, m=m, tau_s=tau_s)
    return y.reshape(*lead, d), cnt.reshape(lead)


def _tokens(name, t, n):
    """A threshold given as a scalar or one value per token -> float32 [n]."""
    t = jnp.asarray(t, jnp.float32)
    if t.size not in (1, n):
        raise ValueError(f"fused_sparse_ffn: {name} must be a scalar or one value per token "
                         f"({n}), got shape {t.shape}")
    return per_token(t, n)[:, 0]
