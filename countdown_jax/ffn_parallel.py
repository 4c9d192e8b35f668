"""The FFN tensor parallel: the m neurons split over the "model" axis of the context mesh.

``ffn.ffn`` decides (``sharding.splits_neurons``, or any multi-device mesh when the FFN
runs Pallas kernels, which XLA cannot partition) and hands over its single-device body;
this module never imports ``ffn``, so the route is ffn -> ffn_parallel -> the body it was
given, with no circle. What is placed where is ``sharding``'s business; selection that
ranks across neurons is ``parallel_selection``'s.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from countdown_jax import parallel_selection
from countdown_jax.selection import kept_fraction
from countdown_jax.sharding import MODEL, axis_size, context_mesh, policy_specs, token_axis

__all__ = ["tensor_parallel_ffn"]


def tensor_parallel_ffn(one_device_ffn, mlp, x, *, act, spec, policy=None, sparse=None):
    """``one_device_ffn`` with the m neurons split over the "model" axis; (y, kept, dropped).

    one_device_ffn(mlp, x, *, act, spec, policy, sparse, shard) -> (y, kept, dropped): the
    FFN on the neurons it is given (``ffn``'s body). Each device runs it on its [m/S, d]
    rows; selection that ranks across neurons goes through ``parallel_selection``. One float32
    psum sums the partial down projections together with the kept / dropped counts
    (none when model = 1: a data-parallel mesh, where the body's Pallas kernels run per
    device on its tokens). Tokens are split over "data" when the batch (x's leading
    axis) divides; otherwise they are replicated there (same result, no data
    parallelism in the FFN).
    """
    mesh = context_mesh()
    S = axis_size(mesh, MODEL)
    m, d = mlp["gate"].shape
    if m % S:
        raise ValueError(f"tensor parallel FFN: m={m} neurons do not split over "
                         f"model={S} devices")
    m_local = m // S
    tok = token_axis(x.shape[0]) if x.ndim >= 2 else None
    x_spec = P(tok) if x.ndim >= 2 else P()
    scope = "global"
    if not spec.is_dense and spec.shard_capacity is not None and S > 1:
        # Per-shard capacity: each device's FFN sees it as its capacity.
        scope = "shard"
        spec = dataclasses.replace(spec, capacity=spec.shard_capacity)
    shard = parallel_selection.Shard(MODEL, S, scope)
    mlp_specs = {k: P(MODEL, None) for k in mlp}
    pol_specs = P() if policy is None else policy_specs(policy)

    def body(mlp_l, x_l, pol_l, sparse_l):
        y, kept, dropped = one_device_ffn(mlp_l, x_l, act=act, spec=spec, policy=pol_l,
                                          sparse=sparse_l, shard=shard)
        parts = [y.astype(jnp.float32)]
        if not spec.is_dense:
            # kept is count / m_local in float32: rounding recovers the count exactly.
            count = jnp.round(kept * m_local)
            parts += [count[..., None], dropped.astype(jnp.float32)[..., None]]
        total = jnp.concatenate(parts, axis=-1)
        if S > 1:
            total = jax.lax.psum(total, MODEL)
        y = total[..., :d].astype(x_l.dtype)
        if spec.is_dense:
            return y, jnp.ones(y.shape[:-1], jnp.float32), jnp.zeros(y.shape[:-1], jnp.int32)
        count, dropped = (jnp.round(total[..., d + i]).astype(jnp.int32) for i in (0, 1))
        return y, kept_fraction(count, m), dropped

    out_tok = P(tok) if x.ndim >= 2 else P()
    run = jax.shard_map(body, mesh=mesh, in_specs=(mlp_specs, x_spec, pol_specs, x_spec),
                        out_specs=(x_spec, out_tok, out_tok), check_vma=False)
    return run(mlp, x, policy, sparse)
