"""Plain-JAX forms of y = x @ W: the float32 reference the kernel is checked against, and
the XLA form (what the model's einsums do), the api's "xla" implementation.

x [B, d]; W [d, n] (the params' own layout, flattened: wq [d, Hq*hd], wo [Hq*hd, d]) or,
``transposed``, [n, d]. Both return [B, n] in x's dtype (or ``out_dtype``).
live (optional, [rows of W] bool): W's rows where it is False count as zero (the kernel
does not read them): the output columns of a transposed W, the inputs of a plain one.
rows [C] int32 + count (optional, instead of live): the compact form of the same: W's rows
rows[j] for j < count; transposed, the output is [B, C] (0 past count); plain, x is
[B, C] (its columns past count ignored).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["gemv_reference", "gemv_xla"]


def _spec(transposed: bool) -> str:
    return "bd,nd->bn" if transposed else "bd,dn->bn"


def _read(x, w, transposed, live, rows, count):
    """(x, W) of the rows the kernel reads: the others (and x past count) as zero."""
    if live is not None:
        w = jnp.where(live[:, None], w, jnp.zeros_like(w))
    if rows is not None:
        ok = jnp.arange(rows.shape[0]) < count
        w = jnp.where(ok[:, None], jnp.take(w, rows, axis=0, mode="clip"),
                      jnp.zeros((), w.dtype))
        if not transposed:
            x = jnp.where(ok, x, jnp.zeros((), x.dtype))
    return x, w


def gemv_reference(x, w, *, transposed: bool = False, out_dtype=None, live=None, rows=None,
                   count=None):
    """float32 inputs, float32 products and sums (no TF32 on GPU)."""
    x, w = _read(x, w, transposed, live, rows, count)
    y = jnp.einsum(_spec(transposed), x.astype(jnp.float32), w.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return y.astype(out_dtype or x.dtype)


def gemv_xla(x, w, *, transposed: bool = False, out_dtype=None, live=None, rows=None,
             count=None):
    """XLA's dot in the stored dtype with float32 accumulation."""
    x, w = _read(x, w, transposed, live, rows, count)
    y = jnp.einsum(_spec(transposed), x, w, preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)
