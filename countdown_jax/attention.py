"""Grouped-query attention with masks for causal, padding and sliding-window visibility.

Scores, softcapping and softmax run in float32; the value product in the compute dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["NO_WINDOW", "attend", "visibility"]

NO_WINDOW = 1 << 30  # window value for layers without a sliding window
_MASKED = -1e30  # finite, so a fully masked (padding) query row gives no NaN


def visibility(q_pos, kv_pos, kv_valid, window):
    """bool [B, T, S]: key at kv_pos visible from query at q_pos.

    q_pos: int [B, T]; kv_pos: int [S]; kv_valid: bool [B, S]; window: int scalar (traced
    per layer). HF's rule: q - window < kv <= q.
    """
    q = q_pos[:, :, None]
    kv = kv_pos[None, None, :]
    return (kv <= q) & (kv > q - window) & kv_valid[:, None, :]


def attend(q, k, v, mask, *, scale: float, softcap: float | None):
    """q: [B, T, Hq, hd]; k, v: [B, S, Hkv, hd]; mask: bool [B, T, S] -> [B, T, Hq, hd]."""
    B, T, Hq, hd = q.shape
    Hkv = k.shape[2]
    qg = q.reshape(B, T, Hkv, Hq // Hkv, hd)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(q.dtype),
                   preferred_element_type=jnp.float32) * scale
    if softcap is not None:
        s = jnp.tanh(s / softcap) * softcap
    s = jnp.where(mask[:, None, None, :, :], s, _MASKED)
    p = jax.nn.softmax(s, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", p, v.astype(q.dtype))
    return out.reshape(B, T, Hq, hd).astype(q.dtype)
