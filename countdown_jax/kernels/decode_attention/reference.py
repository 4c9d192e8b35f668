"""Plain-JAX reference: the model's own grouped-query attention for one token per row.

q [B, Hq, hd] at position pos[b]; cache k, v [B, S, Hkv, hd] where slot s holds position
s; keys at slots pos - window < s <= pos are visible (``attention.visibility``). Scores,
softcap and softmax in float32 (``attention.attend``). Returns [B, Hq, hd] in q.dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from countdown_jax.attention import NO_WINDOW, attend, visibility


def decode_attention_reference(q, k, v, pos, *, scale: float, softcap=None, window=None):
    B, S = k.shape[:2]
    pos = jnp.asarray(pos, jnp.int32).reshape(B, 1)
    mask = visibility(pos, jnp.arange(S, dtype=jnp.int32), jnp.ones((B, S), bool),
                      NO_WINDOW if window is None else window)
    return attend(q[:, None], k, v, mask, scale=scale, softcap=softcap)[:, 0]
