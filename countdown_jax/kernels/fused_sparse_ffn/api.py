"""Sparse FFN with the selection included: x, the MLP's weights, a ``Rule`` -> y, kept count.

``implementation`` (``kernels._platform``): "xla" is the dense masked reference; "pallas"
is one fused kernel (scores, threshold and the kept rows' FFN; GPU). ``config``:
``FusedConfig`` tunes that kernel; ``IndexLists`` runs the rule as index lists instead
(XLA scores -> ``sparse_ffn``, the only route on TPU). Dispatch, stacked weights and the
cascade: experiments/KERNEL_NOTES.md ("The fused op's routes").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from countdown_jax.gated import MLP_KEYS, layer_weights
from countdown_jax.kernels._platform import (IMPLEMENTATIONS, check_implementation, flat_mlp,
                                             index_list, interpret_enabled, resolve)
from countdown_jax.kernels.fused_sparse_ffn.reference import (
    DENSE_PROJECTION, Rule, check_rule, dense_scores, fused_sparse_ffn_reference, per_token,
    scores_to_selection)
from countdown_jax.kernels.sparse_ffn.api import sparse_ffn

__all__ = ["IMPLEMENTATIONS", "IndexLists", "Rule", "fused_sparse_ffn"]

# Names of earlier versions: refused with what replaced them.
_REMOVED = {"xla_gather": "implementation='xla', config=IndexLists()",
            "pallas_gather": "implementation='pallas', config=IndexLists()"}


@dataclasses.dataclass(frozen=True)
class IndexLists:
    """``config=`` for the index-list route: XLA's scores and threshold -> a list of kept
    neurons per token (static length ``capacity``, None = m) -> ``sparse_ffn``. A count
    above the capacity truncates the list; the returned count is the untruncated one, so
    callers can detect it. ``kernel``: sparse_ffn's own config (GatherConfig on GPU, the
    block size on TPU)."""

    capacity: int | None = None
    kernel: Any = None


def fused_sparse_ffn(x, mlp, rule: Rule, *, act, implementation: str = "xla", config=None,
                     layer=None, interpret: bool | None = None):
    """x [..., d]; mlp {"gate", "up", "down"} [m, d], or stacked [L, m, d] with ``layer``
    (a traced index; the kernels read layer l's rows in place); returns (y [..., d], kept
    count [...])."""
    check_rule(rule)
    if implementation in _REMOVED:
        raise ValueError(f"fused_sparse_ffn: implementation {implementation!r} was removed; "
                         f"use {_REMOVED[implementation]}")
    check_implementation(implementation, "fused_sparse_ffn")
    interpret = interpret_enabled(interpret)
    lead, d = x.shape[:-1], x.shape[-1]
    flat, off, m = flat_mlp(mlp, layer, "fused_sparse_ffn")       # checks stacks vs layer=
    m = mlp["down"].shape[0] if m is None else m
    for name in MLP_KEYS:
        if mlp[name].shape[-2:] != (m, d):
            raise ValueError(f"fused_sparse_ffn: {name} must be [m, d] = {(m, d)}"
                             f"{' per layer' if layer is not None else ''}, got {mlp[name].shape}")
    if rule.predicted and rule.pred_vt is not None and rule.pred_u is not None and (
            rule.pred_vt.shape[1] != d or rule.pred_u.shape[0] != m
            or rule.pred_vt.shape[0] != rule.pred_u.shape[1]):
        raise ValueError(f"fused_sparse_ffn: predictor must be Vt [r, d={d}] and U [m={m}, r], "
                         f"got {rule.pred_vt.shape} and {rule.pred_u.shape}")
    x2 = x.reshape(-1, d)
    n = x2.shape[0]
    scores = rule.scores
    if scores is not None:
        if scores.shape != lead + (m,):
            raise ValueError(f"fused_sparse_ffn: scores must be [..., m] = {lead + (m,)}, "
                             f"got {scores.shape}")
        scores = scores.reshape(n, m).astype(jnp.float32)
    rule = dataclasses.replace(
        rule, tau=_tokens("tau", rule.tau, n), scores=scores,
        tau_s=None if rule.tau_s is None else _tokens("tau_s", rule.tau_s, n))
    one_layer = layer_weights(mlp, layer)   # whole matrices for XLA (it fuses the slice)

    def with_scores():
        if rule.scores is not None:
            return rule
        return dataclasses.replace(rule, scores=dense_scores(
            x2, one_layer, act=act, method=rule.method, pred_vt=rule.pred_vt,
            pred_u=rule.pred_u))

    # The index lists resolve their backend in sparse_ffn; the fused kernel is GPU only.
    lists = config if isinstance(config, IndexLists) else None
    impl = implementation if lists else resolve(implementation, interpret, "fused_sparse_ffn")
    if impl == "pallas_tpu":
        lists = IndexLists()

    if lists is not None:
        y, cnt = _index_lists(x2, mlp, with_scores(), lists, act=act, m=m,
                              implementation=implementation, interpret=interpret, layer=layer)
    elif impl == "xla":
        y, cnt = fused_sparse_ffn_reference(x2, one_layer, rule, act=act)
    else:
        from countdown_jax.kernels.fused_sparse_ffn.pallas_gpu import (
            default_config, fused_sparse_ffn_pallas_gpu)
        cfg = config or default_config(mlp["down"].dtype, rule.method, rule.cascade)
        if cfg.score == "xla":
            rule = with_scores()
        elif rule.scores is not None:
            raise ValueError("fused_sparse_ffn: scores are read only with "
                             "FusedConfig(score='xla')")
        y, cnt = fused_sparse_ffn_pallas_gpu(x2, flat, rule, act=act, config=cfg,
                                             interpret=interpret, row_offset=off, m=m)
    return y.reshape(*lead, d), cnt.reshape(lead)


def _index_lists(x2, mlp, rule, lists, *, act, m, implementation, interpret, layer):
    """The rule as a capacity-padded index list per token, then ``sparse_ffn`` (the
    cascade lists its candidates; sparse_ffn keeps those with |s| > tau_s)."""
    cap = m if lists.capacity is None else int(lists.capacity)
    q, coef = scores_to_selection(rule.method, rule.scores)
    idx, cnt = index_list(q > rule.tau[:, None], cap)
    y = sparse_ffn(x2, mlp, idx, jnp.minimum(cnt, cap), act=act,
                   dense=DENSE_PROJECTION[rule.method], coef=coef,
                   implementation=implementation, interpret=interpret, config=lists.kernel,
                   layer=layer, s_tau=rule.tau_s)
    return y if rule.cascade else (y, cnt)   # the cascade: the count kept after |s| > tau_s


def _tokens(name, t, n):
    """A threshold given as a scalar or one value per token -> float32 [n]."""
    t = jnp.asarray(t, jnp.float32)
    if t.size not in (1, n):
        raise ValueError(f"fused_sparse_ffn: {name} must be a scalar or one value per token "
                         f"({n}), got shape {t.shape}")
    return per_token(t, n)[:, 0]
