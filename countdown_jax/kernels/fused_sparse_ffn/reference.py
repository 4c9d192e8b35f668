"""Plain-JAX reference of the fused sparse FFN: selection by threshold, then the FFN.

One token's path (float32 throughout, every neuron computed densely: this is the oracle
the kernels are checked against, not a fast path). A ``Rule`` names its ``policy.Method``:

    M_COUNTDOWN: u = W_up x,                  keep |u_i| > tau
    CATS:        a = act(W_gate x),           keep |a_i| > tau
    D_COUNTDOWN: z = U h, h = Vt x (rank r),  keep z_i > tau (theta);
                 with tau_s (the cascade) then keep |s_i| > tau_s of those
    s_i = act(g_i) * u_i  for kept i, else 0;   y = sum_i s_i * W_down[i]

Weights: the MLP's {"gate", "up", "down"} [m, d] (row-per-neuron, W_down transposed); the
predictor is Vt [r, d] (V transposed, as policies store it: both its GEMVs read rows) and
U [m, r]. tau (and tau_s) is a scalar or one value per token. Returns y (x.dtype) and the
number of kept neurons per token (int32).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from countdown_jax.gated import HIGHEST, activation, project
from countdown_jax.policy import Method

__all__ = ["DENSE_PROJECTION", "FUSED_METHODS", "Rule", "check_rule", "dense_scores",
           "fused_method", "fused_sparse_ffn_reference", "predictor_hidden", "project_f32",
           "scores_to_selection", "selection_scores"]

FUSED_METHODS = (Method.M_COUNTDOWN, Method.CATS, Method.D_COUNTDOWN)
# The FFN projection each rule's score computes densely (``sparse_ffn``'s ``dense``): u for
# M, act(g) for CATS; D's predictor computes none.
DENSE_PROJECTION = {Method.M_COUNTDOWN: "up", Method.CATS: "gate", Method.D_COUNTDOWN: None}
# Short names of earlier versions: refused with the name that replaced them.
_RENAMED = {"m": "Method.M_COUNTDOWN", "d": "Method.D_COUNTDOWN",
            "dc": "Method.D_COUNTDOWN with tau_s (the cascade)"}

# x [N, k] . w [m, k] -> [N, m] float32 (float32 accumulation, no TF32, no f32 copy of w).
project_f32 = functools.partial(project, float32=True)


def fused_method(method) -> Method:
    """``method`` as one of ``FUSED_METHODS``; anything else is refused by name."""
    if isinstance(method, str) and method in _RENAMED:
        raise ValueError(f"fused sparse FFN method {method!r} was renamed: use "
                         f"{_RENAMED[method]}")
    try:
        method = Method(method)
    except ValueError:
        pass
    if method not in FUSED_METHODS:
        raise ValueError(f"fused sparse FFN method must be one of "
                         f"{tuple(m.value for m in FUSED_METHODS)}, got {method!r}")
    return method


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["tau", "pred_vt", "pred_u", "scores", "tau_s"],
                   meta_fields=["method"])
@dataclasses.dataclass(frozen=True)
class Rule:
    """Which neurons the fused op keeps: those whose score passes ``tau`` (module
    docstring). A pytree: its arrays may be traced, its method is static.

    pred_vt, pred_u: D_COUNTDOWN's predictor (not read when ``scores`` is given).
    scores: the dense score [..., m] the rule compares, computed by the caller: u
    (M_COUNTDOWN), act(g) (CATS) or z (D_COUNTDOWN); None: computed from the weights.
    tau_s: D_COUNTDOWN only, the cascade's |s| threshold.
    """

    method: Method
    tau: Any
    pred_vt: Any = None
    pred_u: Any = None
    scores: Any = None
    tau_s: Any = None

    def __post_init__(self):
        object.__setattr__(self, "method", fused_method(self.method))

    @property
    def predicted(self) -> bool:
        """Selects on the predictor's logits z (no dense projection of the FFN)."""
        return self.method == Method.D_COUNTDOWN

    @property
    def cascade(self) -> bool:
        return self.tau_s is not None


def check_rule(rule: Rule):
    if not isinstance(rule, Rule):
        raise TypeError(f"fused sparse FFN: the selection is a Rule(method, tau, ...), got "
                        f"{type(rule).__name__}")
    if rule.predicted and rule.scores is None and (rule.pred_vt is None or rule.pred_u is None):
        raise ValueError(f"method {rule.method.value!r} needs the predictor: pred_vt [r, d] "
                         f"and pred_u [m, r] (or its logits as scores)")
    if rule.cascade and not rule.predicted:
        raise ValueError(f"tau_s (the cascade's |s| threshold) is for "
                         f"{Method.D_COUNTDOWN.value!r} only, got method {rule.method.value!r}")


def predictor_hidden(x, pred_vt):
    """h = x V = x Vt^T [N, r] in float32. Kept in float32: rounding h to bf16 moves
    logits by ~1e-3 relative, so two XLA programs that round differently would select
    differently near the threshold; in float32 only the summation order differs (~1e-6)."""
    return jnp.einsum("nd,rd->nr", x, pred_vt, preferred_element_type=jnp.float32,
                      precision=HIGHEST)


def dense_scores(x, mlp, *, act, method, pred_vt=None, pred_u=None):
    """The dense projection each rule selects on, [N, m] float32: u (M_COUNTDOWN),
    act(g) (CATS), z = (x V) U^T (D_COUNTDOWN)."""
    method = fused_method(method)
    if method == Method.M_COUNTDOWN:
        return project_f32(x, mlp["up"])
    if method == Method.CATS:
        return activation(act)(project_f32(x, mlp["gate"]))
    return project_f32(predictor_hidden(x, pred_vt), pred_u)


def scores_to_selection(method, scores):
    """``dense_scores`` -> (quantity compared with tau, the dense coefficient or None)."""
    scores = scores.astype(jnp.float32)
    return ((scores, None) if fused_method(method) == Method.D_COUNTDOWN     # signed z
            else (jnp.abs(scores), scores))


def selection_scores(x, mlp, *, act, method, pred_vt=None, pred_u=None):
    """(quantity compared with tau [N, m] float32, the dense coefficient or None)."""
    return scores_to_selection(method, dense_scores(x, mlp, act=act, method=method,
                                                    pred_vt=pred_vt, pred_u=pred_u))


def per_token(t, n):
    """A scalar or one value per token -> float32 [n, 1]."""
    return jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(-1, 1), (n, 1))


def fused_sparse_ffn_reference(x, mlp, rule: Rule, *, act):
    """x [N, d]; ``rule.scores``: ``dense_scores`` computed by the caller (None: here)."""
    check_rule(rule)
    scores = rule.scores
    if scores is None:
        scores = dense_scores(x, mlp, act=act, method=rule.method, pred_vt=rule.pred_vt,
                              pred_u=rule.pred_u)
    q, _ = scores_to_selection(rule.method, scores)
    keep = q > per_token(rule.tau, x.shape[0])
    s = activation(act)(project_f32(x, mlp["gate"])) * project_f32(x, mlp["up"])
    if rule.cascade:                    # the cascade's second stage, on the exact s
        keep = keep & (jnp.abs(s) > per_token(rule.tau_s, x.shape[0]))
    s = jnp.where(keep, s, 0.0)
    y = jnp.einsum("nm,md->nd", s, mlp["down"].astype(jnp.float32), precision=HIGHEST)
    return y.astype(x.dtype), jnp.sum(keep, axis=-1, dtype=jnp.int32)
