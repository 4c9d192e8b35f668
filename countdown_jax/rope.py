"""Rotary position embeddings in HF's rotate-half layout (default, linear, llama3 scaling).

Frequencies are computed in float32 as transformers does, so angles match its cos/sin tables.
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

from countdown_jax.config import ModelConfig, RopeConfig

__all__ = ["apply_rope", "inv_frequencies", "layer_inv_frequencies", "rotate_half"]


def inv_frequencies(rope: RopeConfig, head_dim: int) -> np.ndarray:
    """float32 [head_dim // 2] inverse frequencies, after the configured scaling."""
    exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv = (np.float32(1.0) / np.power(np.float32(rope.theta), exponent)).astype(np.float32)
    if rope.rope_type == "default":
        return inv
    if rope.rope_type == "linear":
        return (inv / np.float32(rope.factor)).astype(np.float32)
    if rope.rope_type == "llama3":
        # Llama 3.1: long wavelengths divided by factor, short kept, smooth blend between.
        old = rope.original_max_position_embeddings
        low_wavelen = old / rope.low_freq_factor
        high_wavelen = old / rope.high_freq_factor
        wavelen = (2 * math.pi / inv).astype(np.float32)
        scaled = np.where(wavelen > low_wavelen, inv / rope.factor, inv).astype(np.float32)
        smooth = ((old / wavelen - rope.low_freq_factor)
                  / (rope.high_freq_factor - rope.low_freq_factor)).astype(np.float32)
        blended = ((1 - smooth) * scaled / rope.factor + smooth * scaled).astype(np.float32)
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, blended, scaled).astype(np.float32)
    raise ValueError(f"unsupported rope_type {rope.rope_type!r}")


@functools.lru_cache(maxsize=64)
def layer_inv_frequencies(cfg: ModelConfig) -> np.ndarray:
    """float32 [L, head_dim // 2]: each layer's frequencies (Gemma 3: local vs global)."""
    return np.stack([inv_frequencies(cfg.layer_rope(i), cfg.head_dim)
                     for i in range(cfg.num_layers)])


def rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, positions, inv_freq):
    """x: [B, T, H, hd]; positions: int [B, T]; inv_freq: float32 [hd // 2]."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, hd]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    return x * cos + rotate_half(x) * sin
