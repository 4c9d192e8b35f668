"""Decode attention (one token per row against the KV cache): ``implementation=`` picks
the backend.

implementation (the vocabulary of every kernel op, ``kernels._platform``):
  "xla"         the model's attention (``reference``): what XLA makes of scores, mask,
                softmax and the value product
  "pallas"      the Pallas GPU kernel ("pallas_gpu": one program per row, query head and
                cache split, online softmax, splits merged in XLA, the stacked cache read
                in place). TPU and CPU: falls back to "xla" with a warning (CPU: unless
                in interpret mode). There is no "pallas_tpu" backend.
interpret: True / False, or None = the ``_platform.interpret_mode`` setting.

q [B, Hq, hd] (Hq a multiple of Hkv); caches [B, S, Hkv, hd], or the model's stacked
[L, B, S, Hkv, hd] with ``layer`` (a traced index); pos int [B]: each row's query
position, slot s holds position s, keys at pos - window < s <= pos are visible (so the
row's own key must already be in the cache). Returns [B, Hq, hd] in q.dtype.
"""

from __future__ import annotations

import jax.numpy as jnp

from countdown_jax.attention import NO_WINDOW
from countdown_jax.kernels import _platform
from countdown_jax.kernels.decode_attention.reference import decode_attention_reference

__all__ = ["IMPLEMENTATIONS", "decode_attention"]

IMPLEMENTATIONS = _platform.IMPLEMENTATIONS


def decode_attention(q, k_cache, v_cache, pos, *, scale: float, softcap=None, window=None,
                     layer=None, implementation: str = "xla", interpret: bool | None = None,
                     config=None):
    _platform.check_implementation(implementation, "decode_attention")
    stacked = layer is not None
    if k_cache.shape != v_cache.shape or k_cache.ndim != (5 if stacked else 4):
        raise ValueError("decode_attention: k and v caches must both be [B, S, Hkv, hd]"
                         f"{' stacked as [L, B, S, Hkv, hd] (layer= given)' if stacked else ''}"
                         f", got {k_cache.shape} and {v_cache.shape}")
    B, S, Hkv, hd = k_cache.shape[-4:]
    if q.ndim != 3 or q.shape[0] != B or q.shape[2] != hd or q.shape[1] % Hkv:
        raise ValueError(f"decode_attention: q must be [B={B}, Hq, hd={hd}] with Hq a "
                         f"multiple of Hkv={Hkv}, got {q.shape}")
    window = NO_WINDOW if window is None else window
    interpret = _platform.interpret_enabled(interpret)
    impl = _platform.resolve(implementation, interpret, "decode_attention",
                             backends=("pallas_gpu",))
    if impl == "pallas_gpu":
        from countdown_jax.kernels.decode_attention.pallas_gpu import (
            decode_attention_pallas_gpu)
        kc, vc, li = (k_cache, v_cache, layer) if stacked else (k_cache[None], v_cache[None], 0)
        limit = _platform.MAX_FLAT_ELEMENTS
        if kc.size > limit and stacked:   # int32 offsets: this layer's slice
            kc, vc, li = k_cache[layer][None], v_cache[layer][None], 0     # (a copy)
        if kc.size > limit:
            raise ValueError(f"decode_attention: a cache of {kc.size} elements per layer is "
                             "past the kernel's int32 offsets; use implementation='xla'")
        return decode_attention_pallas_gpu(q, kc, vc, pos, scale=scale, softcap=softcap,
                                           window=window, layer=li, config=config,
                                           interpret=interpret)
    if stacked:
        k_cache, v_cache = k_cache[layer], v_cache[layer]
    return decode_attention_reference(q, k_cache, v_cache, pos, scale=scale,
                                      softcap=softcap, window=window)
