"""Pallas (Triton lowering) GPU kernel: one decode token per row against the KV cache.

One program per (row b, query head, split of the cache): it walks the visible slots of
its split, [max(0, pos - window + 1), pos] intersected with [j*split, (j+1)*split), in
blocks of ``bs`` slots with a running (online) softmax in float32 registers, reading the
stacked cache in place (flat [L*B*S*Hkv, hd] rows); slots past pos or before the window
are never read. With one split the program normalises and writes the output; otherwise a
small XLA combine merges the splits (flash-decoding). Why a kernel, and what it measured:
experiments/KERNEL_NOTES.md ("Decode attention").

Numerics: products of the stored values, float32 sums, float32 softmax weights (the XLA
reference rounds the weights to the compute dtype before the value product, so bf16
results differ by that rounding).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

_MASKED = -1e30


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """Default: the fastest of 18 configs on an H100 at Llama-3.1-8B decode shapes, cache
    lengths 161 and 2081 (experiments/results/bench_attention.csv): one 64-slot block per
    program, the splits merged by XLA."""
    bs: int = 64          # cache slots per block (power of two)
    split: int = 64       # cache slots per program (a power of two >= bs)
    num_warps: int = 4

    def __post_init__(self):
        for name in ("bs", "split"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"AttentionConfig.{name} must be a power of two, got {v}")
        if self.split < self.bs:
            raise ValueError(f"AttentionConfig.split ({self.split}) must be >= bs ({self.bs})")


# Used when no config is passed (the model passes none). Benchmarks may replace it.
DEFAULT_CONFIG = AttentionConfig()


def _kernel(q_ref, k_ref, v_ref, pos_ref, meta_ref, *out_refs, B, S, Hkv, G, hd, scale,
            softcap, cfg, nsplit):
    b = pl.program_id(0)
    h = pl.program_id(1)
    j = pl.program_id(2)
    kh = h // G
    bs = cfg.bs
    bd = pl.next_power_of_2(hd)
    cols = jnp.arange(bd, dtype=jnp.int32)
    cmask = cols < hd if bd > hd else None
    layer, window = meta_ref[0], meta_ref[1]
    pos = pos_ref[b]
    lo = jnp.maximum(jnp.maximum(pos - window + 1, 0), j * cfg.split)
    hi = jnp.minimum(pos, (j + 1) * cfg.split - 1)          # inclusive
    base = (layer * B + b) * S                  # slot 0 of (layer, b), in units of Hkv rows

    def load_row(ref, idx):
        if cmask is None:
            return ref[idx].astype(jnp.float32)
        return plt.load(ref.at[idx], mask=cmask, other=0).astype(jnp.float32)

    q = load_row(q_ref, (b, h, cols))

    def body(i, carry):
        m, l, acc = carry
        slots = i * bs + jnp.arange(bs, dtype=jnp.int32)
        ok = (slots >= lo) & (slots <= hi)
        rows = (base + slots) * Hkv + kh
        mask = ok[:, None] if cmask is None else ok[:, None] & cmask[None, :]
        idx = (rows[:, None], cols[None, :])
        kt = plt.load(k_ref.at[idx], mask=mask, other=0).astype(jnp.float32)   # [bs, bd]
        vt = plt.load(v_ref.at[idx], mask=mask, other=0).astype(jnp.float32)
        s = jnp.sum(kt * q[None, :], axis=1) * scale
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        s = jnp.where(ok, s, _MASKED)
        m_new = jnp.maximum(m, jnp.max(s))
        alpha = jnp.exp(m - m_new)
        p = jnp.where(ok, jnp.exp(s - m_new), 0.0)
        return m_new, l * alpha + jnp.sum(p), acc * alpha + jnp.sum(p[:, None] * vt, axis=0)

    init = (jnp.float32(_MASKED), jnp.float32(0.0), jnp.zeros((bd,), jnp.float32))
    m, l, acc = jax.lax.fori_loop(lo // bs, jnp.where(hi >= lo, hi // bs + 1, lo // bs),
                                  body, init)

    def store(ref, idx, val):
        if cmask is None:
            ref[idx] = val
        else:
            plt.store(ref.at[idx], val, mask=cmask)

    if nsplit == 1:                 # the only split saw every visible slot (l > 0)
        (o_ref,) = out_refs
        store(o_ref, (b, h, cols), (acc / l).astype(o_ref.dtype))
    else:
        m_ref, l_ref, a_ref = out_refs
        m_ref[b, h, j] = m
        l_ref[b, h, j] = l
        store(a_ref, (b, h, j, cols), acc)


def decode_attention_pallas_gpu(q, k_cache, v_cache, pos, *, scale, softcap=None, window,
                                layer=0, config: AttentionConfig | None = None,
                                interpret: bool = False):
    """q [B, Hq, hd]; caches [L, B, S, Hkv, hd] (read in place at ``layer``); pos [B]."""
    cfg = config or DEFAULT_CONFIG
    L, B, S, Hkv, hd = k_cache.shape
    Hq = q.shape[1]
    nsplit = -(-S // cfg.split)
    kern = functools.partial(_kernel, B=B, S=S, Hkv=Hkv, G=Hq // Hkv, hd=hd,
                             scale=float(scale), softcap=softcap, cfg=cfg, nsplit=nsplit)
    meta = jnp.stack([jnp.asarray(layer, jnp.int32), jnp.asarray(window, jnp.int32)])
    if nsplit == 1:
        out_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
    else:
        out_shape = (jax.ShapeDtypeStruct((B, Hq, nsplit), jnp.float32),
                     jax.ShapeDtypeStruct((B, Hq, nsplit), jnp.float32),
                     jax.ShapeDtypeStruct((B, Hq, nsplit, hd), jnp.float32))
    out = pl.pallas_call(
        kern, grid=(B, Hq, nsplit), interpret=interpret,
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=1),
        out_shape=out_shape, name="decode_attention",
    )(q, k_cache.reshape(L * B * S * Hkv, hd), v_cache.reshape(L * B * S * Hkv, hd),
      jnp.asarray(pos, jnp.int32).reshape(B), meta)
    if nsplit == 1:
        return out
    m, l, acc = out                 # merge the splits' online-softmax states
    w = jnp.exp(m - jnp.max(m, axis=-1, keepdims=True))
    y = jnp.sum(w[..., None] * acc, axis=2) / jnp.sum(w * l, axis=-1)[..., None]
    return y.astype(q.dtype)
