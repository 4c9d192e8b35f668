"""Gathered sparse FFN: one entry point, ``implementation=`` picks the backend.

implementation (the vocabulary of every kernel op, ``kernels._platform``):
  "xla"         plain-JAX reference (jnp.take of the listed rows, float32 accumulation)
  "pallas"      the Pallas kernel for the running platform: pallas_gpu on GPU, pallas_tpu
                on TPU. On CPU there is no compiled Pallas: it falls back to "xla" and
                warns once (interpret mode runs the GPU kernel in the interpreter).
  "pallas_gpu"  the Triton-lowered kernel (compiled on GPU, or interpreted anywhere)
  "pallas_tpu"  the Mosaic TPU block-gather kernel (compiled on TPU, or interpreted)
interpret: True / False, or None = the ``_platform.interpret_mode`` setting.

Contract: x [N, d]; w_gate, w_up, w_down [m, d] (row-per-neuron, down transposed), or the
model's stacked [L, m, d] with ``layer`` (a traced index): the stack is then read in place
as flat [L*m, d] rows from l*m on (slicing a layer out for a custom call would copy it);
idx [N, C] int32 (capacity-padded neuron list per token); count [N] int32 (entries of idx
beyond count are ignored; count is clipped to C); coef [N, m] when dense is "up"
(u, M-COUNTDOWN) or "gate" (act(g), CATS). Returns y [N, d] in x.dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from countdown_jax.kernels._platform import (IMPLEMENTATIONS, flat_stack, index_list,
                                             interpret_enabled, layer_slice, resolve,
                                             warn_once)
from countdown_jax.kernels.sparse_ffn.reference import sparse_ffn_reference

__all__ = ["IMPLEMENTATIONS", "index_list", "sparse_ffn"]


def _check(x, w_gate, w_up, w_down, idx, count, dense, coef):
    if x.ndim != 2:
        raise ValueError(f"sparse_ffn: x must be [N, d], got shape {x.shape}")
    n, d = x.shape
    m = w_down.shape[0]
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        if w.shape != (m, d):
            raise ValueError(f"sparse_ffn: {name} must be [m, d] = {(m, d)} (row-per-neuron, "
                             f"down transposed), got {w.shape}")
    if idx.ndim != 2 or idx.shape[0] != n:
        raise ValueError(f"sparse_ffn: idx must be [N={n}, C], got {idx.shape}")
    if count.shape != (n,):
        raise ValueError(f"sparse_ffn: count must be [N={n}], got {count.shape}")
    if dense not in (None, "up", "gate"):
        raise ValueError(f"sparse_ffn: dense must be 'up', 'gate' or None, got {dense!r}")
    if dense is not None and (coef is None or coef.shape != (n, m)):
        raise ValueError(f"sparse_ffn: dense={dense!r} needs coef [N, m] = {(n, m)}, got "
                         f"{None if coef is None else coef.shape}")


def sparse_ffn(x, w_gate, w_up, w_down, idx, count, *, act, dense=None, coef=None,
               implementation: str = "xla", interpret: bool | None = None, config=None,
               layer=None, s_tau=None):
    """See module docstring. ``config``: backend tuning (GatherConfig or TPU block size).

    s_tau [N] float32 (cascade rule, dense=None only): listed neurons with |s| <= s_tau
    are dropped after their s is computed (the GPU kernel then reads no W_down row of
    theirs); returns (y, kept [N] int32). The TPU kernel has no cascade: XLA runs it there.
    """
    if s_tau is not None:
        if dense is not None or s_tau.shape != (x.shape[0],):
            raise ValueError(f"sparse_ffn: s_tau must be [N={x.shape[0]}] with dense=None, "
                             f"got {s_tau.shape} with dense={dense!r}")
    if layer is not None and w_down.ndim == 3:
        _check(x, w_gate[0], w_up[0], w_down[0], idx, count, dense, coef)
    else:
        _check(x, w_gate, w_up, w_down, idx, count, dense, coef)
    interpret = interpret_enabled(interpret)
    impl = resolve(implementation, interpret, "sparse_ffn")
    if impl == "pallas_tpu" and s_tau is not None:
        warn_once("the TPU sparse FFN kernel has no cascade (s_tau); it runs on the XLA "
                  "reference")
        impl = "xla"
    if impl in ("xla", "pallas_gpu"):
        (w_gate, w_up, w_down), off, m = flat_stack((w_gate, w_up, w_down), layer)
    if impl == "xla":
        return sparse_ffn_reference(x, w_gate, w_up, w_down, idx, count, act=act,
                                    dense=dense, coef=coef, row_offset=off, m=m, s_tau=s_tau)
    if impl == "pallas_gpu":
        from countdown_jax.kernels.sparse_ffn.pallas_gpu import sparse_ffn_pallas_gpu
        return sparse_ffn_pallas_gpu(x, w_gate, w_up, w_down, idx, count, act=act,
                                     dense=dense, coef=coef, config=config,
                                     interpret=interpret, row_offset=off, m=m, s_tau=s_tau)
    if layer is not None:  # TPU block gather: one layer's matrices (a sliced copy)
        w_gate, w_up, w_down = layer_slice((w_gate, w_up, w_down), layer)
    from countdown_jax.kernels.sparse_ffn.pallas_tpu import sparse_ffn_pallas_tpu
    return sparse_ffn_pallas_tpu(x, w_gate, w_up, w_down, idx, count, act=act,
                                 dense=dense, coef=coef, block=config or 128,
                                 interpret=interpret)
