"""y = x @ W for a few rows of x (decode projections): ``implementation=`` picks the backend
("xla", or the Pallas GPU kernel; TPU and CPU fall back to "xla", ``kernels._platform``).
How the kernel walks W and where it wins: experiments/KERNEL_NOTES.md ("Decode
projections").
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from countdown_jax.kernels import _platform
from countdown_jax.kernels.gemv.pallas_gpu import MAX_ROWS
from countdown_jax.kernels.gemv.reference import gemv_xla

__all__ = ["IMPLEMENTATIONS", "MAX_ROWS", "gemv"]

IMPLEMENTATIONS = _platform.IMPLEMENTATIONS
_FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def _check(x, w, layer, transposed: bool, width=None):
    """(d, n) of a valid call, else a ValueError naming the problem. width: x's last
    axis when it is not d (compact x)."""
    stacked = layer is not None
    form = "[n, d]" if transposed else "[d, n]"
    if w.ndim != (3 if stacked else 2):
        raise ValueError(f"gemv: w must be {form}"
                         f"{', stacked as [L, ' + form[1:] + ' (layer= given)' if stacked else ''}"
                         f", got shape {w.shape}")
    d, n = (w.shape[-1], w.shape[-2]) if transposed else (w.shape[-2], w.shape[-1])
    if width is not None and (x.ndim < 1 or x.shape[-1] != width):
        raise ValueError(f"gemv: with rows (plain), x must be compact [..., C] with C = "
                         f"{width} (len(rows)), got x of shape {x.shape}")
    if width is None and (x.ndim < 1 or x.shape[-1] != d):
        raise ValueError(f"gemv: x must be [..., d] with d = {d} (w {form} of shape "
                         f"{w.shape}), got x of shape {x.shape}")
    for name, a in (("x", x), ("w", w)):
        if a.dtype not in _FLOATS:
            raise ValueError(f"gemv: {name} must be float32, bfloat16 or float16, got "
                             f"{a.dtype}")
    if x.dtype != w.dtype:
        raise ValueError(f"gemv: x and w must share one dtype, got {x.dtype} and {w.dtype}")
    return d, n


def _check_rows(rows, count, live):
    """count as an int32 scalar in [0, C] for rows [C], else a ValueError."""
    if rows is None:
        if count is not None:
            raise ValueError("gemv: count given without rows (count says how many of rows "
                             "are valid)")
        return None
    if live is not None:
        raise ValueError("gemv: give live (a predicate) or rows (an index list), not both")
    if getattr(rows, "dtype", None) != jnp.int32 or rows.ndim != 1 or rows.shape[0] < 1:
        raise ValueError(f"gemv: rows must be int32 [C] (C >= 1, W's rows to read), got "
                         f"{getattr(rows, 'dtype', type(rows).__name__)}"
                         f"{list(getattr(rows, 'shape', ()))}")
    if count is None:
        return jnp.int32(rows.shape[0])
    count = jnp.asarray(count)
    if count.shape != () or not jnp.issubdtype(count.dtype, jnp.integer):
        raise ValueError(f"gemv: count must be an integer scalar, got {count.dtype}"
                         f"{list(count.shape)}")
    return jnp.clip(count.astype(jnp.int32), 0, rows.shape[0])


def gemv(x, w, *, layer=None, transposed: bool = False, out_dtype=None,
         implementation: str = "xla", interpret: bool | None = None, config=None,
         live=None, rows=None, count=None):
    """x [..., d] (at most ``MAX_ROWS`` rows for the kernel, leading axes flattened); w
    [d, n] (the params' layout flattened, e.g. wq [d, Hq, hd] -> [d, Hq*hd]) or, with
    ``transposed``, [n, d]; or a stack [L, d, n] / [L, n, d] with ``layer`` (a traced
    index), read in place. x and w share one floating dtype. Returns [..., n] in
    ``out_dtype`` (default x.dtype); products and sums in float32.

    live (bool [rows of W]: [n] transposed, [d] plain): rows where it is False count as
    zero and are not read. rows (int32 [C], instead of live; W's rows to read, best
    ascending) with count (an int32 scalar, default C; the first count valid): the compact
    form. Transposed, returns [..., C]: column j is x . W[rows[j]] for j < count, 0 past
    it; plain, x is compact [..., C] and y = sum over j < count of x[..., j] W[rows[j]].
    rows[j] for j < count must be valid rows of W (traced values: not checked).
    config: ``pallas_gpu.GemvConfig`` (None: its default).
    """
    _platform.check_implementation(implementation, "gemv")
    count = _check_rows(rows, count, live)
    compact_x = rows is not None and not transposed
    d, n = _check(x, w, layer, transposed, rows.shape[0] if compact_x else None)
    if live is not None:
        rows_w = n if transposed else d
        if live.shape != (rows_w,) or live.dtype != jnp.bool_:
            raise ValueError(f"gemv: live must be bool [{rows_w}] (one flag per row of W), "
                             f"got {live.dtype}{list(live.shape)}")
    if rows is not None:          # the kernel's view: C compact outputs / inputs
        d, n = (d, rows.shape[0]) if transposed else (rows.shape[0], n)
    lead = x.shape[:-1]
    nrows = math.prod(lead)
    x2 = x.reshape(nrows, d)
    interpret = _platform.interpret_enabled(interpret)
    impl = _platform.resolve(implementation, interpret, "gemv", backends=("pallas_gpu",))
    if impl == "pallas_gpu" and nrows > MAX_ROWS:
        raise ValueError(f"gemv: the Pallas kernel serves at most {MAX_ROWS} rows of x "
                         f"(decode), got {nrows}; use implementation='xla'")
    sel = dict(live=live, rows=rows, count=count)
    if impl == "xla" or nrows == 0:
        if layer is not None:
            (w,) = _platform.layer_slice((w,), layer)
        out = gemv_xla(x2, w, transposed=transposed, out_dtype=out_dtype, **sel)
    else:
        from countdown_jax.kernels.gemv.pallas_gpu import gemv_pallas_gpu
        # a stack as flat rows (free) + this layer's first row; past int32 offsets, the
        # layer's slice (a copy)
        (wf,), off, _ = _platform.flat_stack((w,), layer, "gemv")
        if wf.size > _platform.MAX_FLAT_ELEMENTS:
            raise ValueError(f"gemv: a weight of {wf.size} elements is past the kernel's "
                             "int32 offsets; use implementation='xla'")
        out = gemv_pallas_gpu(x2, wf, d=d, n=n, offset=off, transposed=transposed,
                              out_dtype=out_dtype, config=config, interpret=interpret,
                              **sel)
    return out.reshape(lead + (n,))
