"""Sparse FFN with the selection included: x, weights, threshold -> y, kept count.

implementation:
  "xla"            dense masked reference (exact maths, dense cost: quality sweeps)
  "xla_gather"     XLA scores + threshold -> index list (nonzero, size=capacity) ->
                   sparse_ffn(implementation="xla"): plain jnp.take of the kept rows
  "pallas_gather"  the same index list -> the Pallas gathered kernel (sparse_ffn)
  "pallas"         ONE fused Pallas kernel: scoring GEMV, threshold and the gathered
                   FFN (GPU). D's small first predictor GEMV (h = x V) runs in XLA.
                   On TPU: "pallas_gather" through the TPU block kernel; on CPU: falls
                   back to "xla" with a warning unless interpret=True.

Everything stays on device in one jitted program: thresholds are traced arrays, index
lists have a static capacity, counts are device scalars. For "xla_gather" and
"pallas_gather" a count above ``capacity`` truncates the list (the returned count is the
untruncated one, so callers can detect it); "pallas" and "xla" never truncate.
"""

from __future__ import annotations

import jax.numpy as jnp

from countdown_jax.kernels.fused_sparse_ffn.reference import (
    check_method, fused_sparse_ffn_reference, predictor_hidden, selection_scores)
from countdown_jax.kernels.sparse_ffn.api import index_list, resolve_pallas, sparse_ffn

IMPLEMENTATIONS = ("xla", "xla_gather", "pallas_gather", "pallas")
_DENSE = {"m": "up", "cats": "gate", "d": None}


def fused_sparse_ffn(x, w_gate, w_up, w_down, tau, *, act, method, pred_v=None, pred_u=None,
                     implementation: str = "xla", capacity: int | None = None,
                     interpret: bool = False, config=None):
    """x [..., d]; tau scalar or one per token; returns (y [..., d], kept count [...])."""
    check_method(method, pred_v, pred_u)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown fused_sparse_ffn implementation {implementation!r}; "
                         f"expected one of {IMPLEMENTATIONS}")
    lead, d = x.shape[:-1], x.shape[-1]
    m = w_down.shape[0]
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.shape != (m, d):
            raise ValueError(f"fused_sparse_ffn: {name} must be [m, d] = {(m, d)}, got {w.shape}")
    if method == "d" and (pred_v.shape[0] != d or pred_u.shape[0] != m
                          or pred_v.shape[1] != pred_u.shape[1]):
        raise ValueError(f"fused_sparse_ffn: predictor must be V [d={d}, r] and U [m={m}, r], "
                         f"got {pred_v.shape} and {pred_u.shape}")
    x2 = x.reshape(-1, d)
    n = x2.shape[0]
    tau = jnp.broadcast_to(jnp.asarray(tau, jnp.float32).reshape(-1), (n,))

    impl = implementation
    if impl == "pallas":
        backend = resolve_pallas("pallas", interpret)
        impl = {"pallas_gpu": "pallas", "pallas_tpu": "pallas_gather", "xla": "xla"}[backend]

    if impl == "xla":
        y, cnt = fused_sparse_ffn_reference(x2, w_gate, w_up, w_down, tau, act=act,
                                            method=method, pred_v=pred_v, pred_u=pred_u)
    elif impl in ("xla_gather", "pallas_gather"):
        cap = m if capacity is None else int(capacity)
        q, coef = selection_scores(x2, w_gate, w_up, act=act, method=method,
                                   pred_v=pred_v, pred_u=pred_u)
        idx, cnt = index_list(q > tau[:, None], cap)
        kernel = "xla" if impl == "xla_gather" else "pallas"
        y = sparse_ffn(x2, w_gate, w_up, w_down, idx, jnp.minimum(cnt, cap), act=act,
                       dense=_DENSE[method], coef=coef, implementation=kernel,
                       interpret=interpret, config=config)
    else:
        from countdown_jax.kernels.fused_sparse_ffn.pallas_gpu import fused_sparse_ffn_pallas_gpu
        h = predictor_hidden(x2, pred_v) if method == "d" else None
        y, cnt = fused_sparse_ffn_pallas_gpu(x2, w_gate, w_up, w_down, tau, act=act,
                                             method=method, h=h, pred_u=pred_u,
                                             config=config, interpret=interpret)
    return y.reshape(*lead, d), cnt.reshape(lead)
