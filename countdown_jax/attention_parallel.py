"""The Pallas decode attention under a mesh: the kernel per device, on its heads and rows.

XLA cannot partition a custom kernel, so under a multi-device mesh the model's decode
attention runs inside a shard_map: each device reads its kv heads of the cache (split over
"model" as ``sharding.cache_specs`` placed them, when Hkv divides; else every device runs
every head) and its rows (split over "data" when the batch divides). The kernel's output
is this device's query heads; the output projection over the split heads then makes the
one all-reduce per attention block that tensor parallelism needs, as with XLA attention.
Nothing is gathered: q, the cache and the output stay where the placement put them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from countdown_jax.kernels.decode_attention.api import decode_attention
from countdown_jax.sharding import context_mesh, head_axis, multi_device_mesh, token_axis

__all__ = ["pallas_decode_attention"]


def pallas_decode_attention(q, k_cache, v_cache, pos, *, layer, window, scale, softcap):
    """``decode_attention(..., implementation="pallas")`` on the stacked cache
    [L, B, S, Hkv, hd] at ``layer``; q [B, Hq, hd], pos [B] -> [B, Hq, hd]. Per device
    inside a shard_map when the context mesh spans several devices, else directly."""
    def attend(q, kc, vc, pos, meta):
        return decode_attention(q, kc, vc, pos, layer=meta[0], window=meta[1], scale=scale,
                                softcap=softcap, implementation="pallas")  # interpret: _platform

    meta = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(window, jnp.int32)])
    if not multi_device_mesh():
        return attend(q, k_cache, v_cache, pos, meta)
    rows, heads = token_axis(q.shape[0]), head_axis(k_cache.shape[3])
    q_spec = P(rows, heads, None)
    cache_spec = P(None, rows, None, heads, None)
    run = jax.shard_map(attend, mesh=context_mesh(),
                        in_specs=(q_spec, cache_spec, cache_spec, P(rows), P()),
                        out_specs=q_spec, check_vma=False)
    return run(q, k_cache, v_cache, pos, meta)
