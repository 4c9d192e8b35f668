"""A low-bit copy of W_gate and W_up that estimates D-COUNTDOWN's |s| before the FFN runs.

D-COUNTDOWN keeps the neurons with large |s| = |act(W_gate x) * (W_up x)|. Computing s
exactly needs both dense projections (2/3 of the FFN's bytes); a low-rank predictor is
cheap but ranks s poorly (its recall is what limits the practical rule). The proxy
quantizes the two matrices to ``bits`` per weight (symmetric, one scale per ``group``
consecutive inputs of a row), so

    s_hat = act(x Gq^T) * (x Uq^T),   keep |s_hat| > tau   (per-layer tau, calibrated)

reads 2 m d (bits + 16 / group) / 8 bytes, e.g. 17% of the dense FFN's at 4 bits and
group 128, and ranks neurons almost as the exact s does. The kept rows of all three
matrices are then read in full precision, so the output is exact on the kept set.

Storage (one layer; a policy stacks a leading layer axis):

    {"packed": uint8 [2, m, d * bits / 8],   [0] = gate, [1] = up
     "scale":  bfloat16 [2, m, d / group]}

A byte holds P = 8 / bits codes from P planes of the row: bits [j*bits, (j+1)*bits) of
byte b are the code of input j * d / P + b (at 4 bits the low nibbles are the first half
of the row, the high nibbles the second). So a tile of bytes unpacks with one shift and
one mask per plane into P operand tiles, each against a contiguous slice of x. A code c
stands for (c - 2^(bits-1)) * scale, c in [1, 2^bits - 1] (symmetric: the code 0 is
unused). bits and group are read back from the shapes, so the
pytree carries no static metadata and sweeps ``vmap`` over it like any policy entry.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from countdown_jax.gated import HIGHEST, activation

__all__ = ["BITS", "check_proxy", "dequantize", "proxy_format", "proxy_scores",
           "proxy_share", "quantize", "quantize_mlp"]

BITS = (2, 4, 8)
SCALE_BITS = 16          # bfloat16 scales


def proxy_share(bits: int, group: int) -> float:
    """Bytes the proxy reads (gate and up, codes and scales) / the dense FFN's 3 m d."""
    return 2.0 * (bits + SCALE_BITS / group) / 16.0 / 3.0


def _check_format(bits: int, group: int, d: int):
    if bits not in BITS:
        raise ValueError(f"proxy bits must be one of {BITS}, got {bits!r}")
    if isinstance(group, bool) or not isinstance(group, (int, np.integer)) or group < 1:
        raise ValueError(f"proxy group must be a positive int, got {group!r}")
    if d % group:
        raise ValueError(f"proxy group {group} must divide the model width d={d}")


def quantize(w, bits: int = 4, group: int = 128):
    """w [..., m, d] float -> (packed uint8 [..., m, d*bits/8], scale bfloat16 [..., m, d/group])."""
    w = jnp.asarray(w, jnp.float32)
    d = w.shape[-1]
    _check_format(bits, group, d)
    qmax = 2 ** (bits - 1) - 1
    grouped = w.reshape(w.shape[:-1] + (d // group, group))
    scale = (jnp.max(jnp.abs(grouped), axis=-1) / qmax).astype(jnp.bfloat16)
    s32 = scale.astype(jnp.float32)[..., None]
    q = jnp.clip(jnp.round(grouped / jnp.where(s32 > 0, s32, 1.0)), -qmax, qmax)
    codes = (q + 2 ** (bits - 1)).astype(jnp.uint8).reshape(w.shape)
    per = 8 // bits
    if d % per:
        raise ValueError(f"proxy width d={d} must be a multiple of {per} at {bits} bits")
    planes = codes.reshape(w.shape[:-1] + (per, d // per))         # plane j: inputs j*d/per...
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits)[:, None]
    packed = jnp.sum(planes << shifts, axis=-2, dtype=jnp.uint8)    # disjoint bits: sum = or
    return packed, scale


def proxy_format(proxy, d: int) -> tuple[int, int]:
    """(bits, group) of a proxy for width d, read from its shapes (see the module docstring)."""
    packed, scale = proxy["packed"], proxy["scale"]
    bits = packed.shape[-1] * 8 // d
    if bits not in BITS or packed.shape[-1] * 8 != bits * d:
        raise ValueError(f"proxy 'packed' last axis {packed.shape[-1]} does not hold "
                         f"d={d} codes of {BITS} bits")
    if scale.shape[-1] < 1 or d % scale.shape[-1]:
        raise ValueError(f"proxy 'scale' last axis {scale.shape[-1]} does not divide d={d}")
    if scale.shape[-2] != packed.shape[-2]:
        raise ValueError(f"proxy 'scale' has {scale.shape[-2]} rows, 'packed' "
                         f"{packed.shape[-2]}")
    return bits, d // scale.shape[-1]


def check_proxy(proxy, *, m: int, d: int | None, leading: tuple[int, ...] = ()):
    """Validate a proxy's keys, dtypes and shapes for an FFN of m neurons and width d
    (None: the width is not known yet, e.g. when a policy is built). Returns (bits,
    group), or None without d."""
    if not isinstance(proxy, dict) or set(proxy) != {"packed", "scale"}:
        got = sorted(proxy) if isinstance(proxy, dict) else type(proxy).__name__
        raise ValueError(f"proxy must be a dict with keys 'packed' and 'scale', got {got}")
    packed, scale = proxy["packed"], proxy["scale"]
    if packed.dtype != jnp.uint8:
        raise ValueError(f"proxy 'packed' must be uint8, got {packed.dtype}")
    if not jnp.issubdtype(scale.dtype, jnp.floating):
        raise ValueError(f"proxy 'scale' must be floating point, got {scale.dtype}")
    want = tuple(leading) + (2, m)
    for key, a in (("packed", packed), ("scale", scale)):
        if tuple(a.shape[:-1]) != want:
            raise ValueError(f"proxy {key!r} must have shape {list(want)} + [...] "
                             f"(gate and up rows), got {list(a.shape)}")
    return None if d is None else proxy_format(proxy, d)


def dequantize(proxy, d: int):
    """float32 [..., 2, m, d]: the proxy's gate ([..., 0, :, :]) and up weights."""
    packed, scale = proxy["packed"], proxy["scale"]
    bits, group = proxy_format(proxy, d)
    per = 8 // bits
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits)[:, None]
    codes = (packed[..., None, :] >> shifts) & jnp.uint8(2 ** bits - 1)   # [..., per, d/per]
    full = codes.reshape(packed.shape[:-1] + (packed.shape[-1] * per,))
    q = full.astype(jnp.float32) - 2 ** (bits - 1)
    dd = full.shape[-1]
    q = q.reshape(q.shape[:-1] + (dd // group, group))
    return (q * scale.astype(jnp.float32)[..., None]).reshape(full.shape)


def proxy_scores(proxy, x, act: str):
    """|s_hat| [..., m] float32 for one layer's proxy and MLP inputs x [..., d] (reference:
    dequantize, then float32 GEMVs; ``kernels.proxy_scores`` reads the packed codes)."""
    w = dequantize(proxy, x.shape[-1])
    xf = x.astype(jnp.float32)
    g = jnp.einsum("...d,md->...m", xf, w[0], precision=HIGHEST)
    u = jnp.einsum("...d,md->...m", xf, w[1], precision=HIGHEST)
    return jnp.abs(activation(act)(g) * u)


def quantize_mlp(mlp, bits: int = 4, group: int = 128):
    """The proxy of a model's MLP weights {"gate", "up"} [(L,) m, d] -> {"packed", "scale"}
    with a [(L,) 2, m, ...] layout (what ``policy.make_policy(proxy=...)`` takes)."""
    gp, gs = quantize(mlp["gate"], bits, group)
    up, us = quantize(mlp["up"], bits, group)
    axis = gp.ndim - 2
    return {"packed": jnp.stack([gp, up], axis=axis), "scale": jnp.stack([gs, us], axis=axis)}
