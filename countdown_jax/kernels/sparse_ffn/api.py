"""Gathered sparse FFN: x, the MLP's weights and an index list per token -> y.

``implementation`` (``kernels._platform``): "xla" (jnp.take of the listed rows), "pallas"
(the platform's kernel), "pallas_gpu", "pallas_tpu". Contract: x [N, d]; mlp {"gate",
"up", "down"} [m, d] (row-per-neuron, down transposed), or stacked [L, m, d] with
``layer`` (a traced index: the stack is read in place); idx [N, C] int32 (entries past
count are ignored; count is clipped to C); coef [N, m] when dense is "up" (u, M-COUNTDOWN)
or "gate" (act(g), CATS). Returns y [N, d] in x.dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from countdown_jax.gated import MLP_KEYS, layer_weights
from countdown_jax.kernels._platform import (IMPLEMENTATIONS, flat_mlp, index_list,
                                             interpret_enabled, resolve, warn_once)
from countdown_jax.kernels.sparse_ffn.reference import sparse_ffn_reference

__all__ = ["IMPLEMENTATIONS", "index_list", "sparse_ffn"]


def _check(x, mlp, idx, count, dense, coef):
    if x.ndim != 2:
        raise ValueError(f"sparse_ffn: x must be [N, d], got shape {x.shape}")
    n, d = x.shape
    m = mlp["down"].shape[0]
    for name in MLP_KEYS:
        if mlp[name].shape != (m, d):
            raise ValueError(f"sparse_ffn: {name} must be [m, d] = {(m, d)} (row-per-neuron, "
                             f"down transposed), got {mlp[name].shape}")
    if idx.ndim != 2 or idx.shape[0] != n:
        raise ValueError(f"sparse_ffn: idx must be [N={n}, C], got {idx.shape}")
    if count.shape != (n,):
        raise ValueError(f"sparse_ffn: count must be [N={n}], got {count.shape}")
    if dense not in (None, "up", "gate"):
        raise ValueError(f"sparse_ffn: dense must be 'up', 'gate' or None, got {dense!r}")
    if dense is not None and (coef is None or coef.shape != (n, m)):
        raise ValueError(f"sparse_ffn: dense={dense!r} needs coef [N, m] = {(n, m)}, got "
                         f"{None if coef is None else coef.shape}")


def sparse_ffn(x, mlp, idx, count, *, act, dense=None, coef=None, implementation: str = "xla",
               interpret: bool | None = None, config=None, layer=None, s_tau=None):
    """See module docstring. ``config``: backend tuning (GatherConfig or TPU block size).

    s_tau [N] float32 (cascade rule, dense=None only): listed neurons with |s| <= s_tau
    are dropped after their s is computed (the GPU kernel then reads no W_down row of
    theirs); returns (y, kept [N] int32). The TPU kernel has no cascade: XLA runs it there.
    """
    if s_tau is not None:
        if dense is not None or s_tau.shape != (x.shape[0],):
            raise ValueError(f"sparse_ffn: s_tau must be [N={x.shape[0]}] with dense=None, "
                             f"got {s_tau.shape} with dense={dense!r}")
    if layer is not None and mlp["down"].ndim == 3:
        _check(x, {k: mlp[k][0] for k in MLP_KEYS}, idx, count, dense, coef)
    else:
        _check(x, mlp, idx, count, dense, coef)
    interpret = interpret_enabled(interpret)
    impl = resolve(implementation, interpret, "sparse_ffn")
    if impl == "pallas_tpu" and s_tau is not None:
        warn_once("the TPU sparse FFN kernel has no cascade (s_tau); it runs on the XLA "
                  "reference")
        impl = "xla"
    if impl == "pallas_tpu":   # TPU block gather: one layer's matrices (a sliced copy)
        from countdown_jax.kernels.sparse_ffn.pallas_tpu import sparse_ffn_pallas_tpu
        return sparse_ffn_pallas_tpu(x, layer_weights(mlp, layer), idx, count, act=act,
                                     dense=dense, coef=coef, block=config or 128,
                                     interpret=interpret)
    flat, off, m = flat_mlp(mlp, layer, "sparse_ffn")
    if impl == "xla":
        return sparse_ffn_reference(x, flat, idx, count, act=act, dense=dense, coef=coef,
                                    row_offset=off, m=m, s_tau=s_tau)
    from countdown_jax.kernels.sparse_ffn.pallas_gpu import sparse_ffn_pallas_gpu
    return sparse_ffn_pallas_gpu(x, flat, idx, count, act=act, dense=dense, coef=coef,
                                 config=config, interpret=interpret, row_offset=off, m=m,
                                 s_tau=s_tau)
