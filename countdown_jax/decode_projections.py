"""The attention projections of a decode step through the Pallas GEMV (``kernels.gemv``).

At decode (one token per row, a small batch) q/k/v/o are GEMVs that XLA reads at well
under the HBM ceiling (issues #13, #16). With ``projections="pallas"`` the model
(``extend`` at T = 1, at most ``MAX_ROWS`` rows) computes them here: each weight in the
params' own layout, flattened to [d, H*hd] / [H*hd, d] (free reshapes), stacked weights
read in place at the layer index. Prefill and longer chunks keep XLA's einsums.

Under a multi-device mesh XLA cannot partition the kernel, so it runs per device inside
a shard_map on the heads ``sharding`` placed there (``head_axis``, the cache's rule) and
the rows on "data" (``token_axis``): q/k/v are per-device heads, and the output
projection's partial sums over the local heads meet in one float32 psum over "model" -
the one all-reduce per attention block that XLA's tensor parallel einsum makes too.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from countdown_jax.kernels.gemv.api import MAX_ROWS as KERNEL_ROWS
from countdown_jax.kernels.gemv.api import gemv
from countdown_jax.sharding import (MODEL, context_mesh, head_axis, multi_device_mesh,
                                    token_axis)

__all__ = ["MAX_ROWS", "STACKED_KEYS", "project_heads", "project_out",
           "uses_kernel"]

MAX_ROWS = min(8, KERNEL_ROWS)      # decode rows per call that take the kernel
# projection weights the stacked model hands over whole (read in place at the layer)
STACKED_KEYS = ("wq", "wk", "wv", "wqkv", "wo")


def uses_kernel(projections: str, batch: int, tokens: int) -> bool:
    """The decode projections run the kernel: "pallas" (resolved, ``fast_path``), one token
    per row, a small batch."""
    return projections == "pallas" and tokens == 1 and batch <= MAX_ROWS


def _stack(w, layer):
    """(stacked, layer index [1]) of a per-layer [a, b, c] or stacked [L, a, b, c] weight
    (index 0 for a per-layer weight)."""
    stacked = w.ndim == 4
    if stacked and layer is None:
        raise ValueError(f"decode projections: a stacked weight {w.shape} needs the layer "
                         "index")
    return stacked, jnp.asarray(layer if stacked else 0, jnp.int32).reshape(1)


def _run(f, args, in_specs, out_spec):
    """f(*args) directly, or per device in a shard_map under a multi-device mesh."""
    if not multi_device_mesh():
        return f(*args)
    return jax.shard_map(f, mesh=context_mesh(), in_specs=in_specs, out_specs=out_spec,
                         check_vma=False)(*args)


def project_heads(h, w, layer, *, kv_heads: int):
    """h [B, d] @ w [(L,) d, H, hd] -> [B, H, hd] (q, k, v or fused qkv heads), the stack
    read at ``layer``. ``kv_heads``: the model's Hkv (heads split as the cache is)."""
    stacked, li = _stack(w, layer)
    if h.dtype != w.dtype:                          # XLA's promotion, not the kernel's
        return jnp.einsum("bd,dhk->bhk", h, w[li[0]] if stacked else w)

    def f(h, w, li):
        d, H, hd = w.shape[-3:]
        y = gemv(h, w.reshape(w.shape[:-3] + (d, H * hd)), layer=li[0] if stacked else None,
                 implementation="pallas")
        return y.reshape(h.shape[0], H, hd)

    rows, heads = token_axis(h.shape[0]), head_axis(kv_heads)
    w_spec = P(*([None] * (w.ndim - 3)), None, heads, None)
    return _run(f, (h, w, li), (P(rows, None), w_spec, P()), P(rows, heads, None))


def project_out(a, w, layer, *, kv_heads: int):
    """a [B, H, hd] @ w [(L,) H, hd, d] -> [B, d] (the output projection), the stack read
    at ``layer``; under a mesh splitting heads, one float32 psum of the partial sums."""
    stacked, li = _stack(w, layer)
    if a.dtype != w.dtype:
        return jnp.einsum("bhk,hkd->bd", a, w[li[0]] if stacked else w)
    heads = head_axis(kv_heads) if multi_device_mesh() else None

    def f(a, w, li):
        H, hd, d = w.shape[-3:]
        y = gemv(a.reshape(a.shape[0], H * hd), w.reshape(w.shape[:-3] + (H * hd, d)),
                 layer=li[0] if stacked else None, out_dtype=jnp.float32,
                 implementation="pallas")
        if heads is not None:                       # partial sums over the local heads
            y = jax.lax.psum(y, MODEL)
        return y.astype(a.dtype)

    rows = token_axis(a.shape[0])
    w_spec = P(*([None] * (w.ndim - 3)), heads, None, None)
    return _run(f, (a, w, li), (P(rows, heads, None), w_spec, P()), P(rows, None))
