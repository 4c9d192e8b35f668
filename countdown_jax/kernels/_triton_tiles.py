"""Tile helpers shared by the Pallas-Triton (GPU) sparse FFN kernels.

Every weight matrix is row-per-neuron [m, d], so a kept neuron is one contiguous row.
A tile is ``rows x [c0, c0+bd)``: a [R, bd] block of (possibly gathered) rows, loaded with
predicated loads (masked-off rows move no bytes). The column axis is walked in static
chunks so per-chunk accumulators can live in registers as a Python list.

All indexing uses full integer-array indexers (rows[:, None], cols[None, :]): the Triton
lowering turns them into one pointer tensor (row stride is a compile-time constant, so
loads still vectorise along the contiguous column axis), and interpret mode (CPU tests)
supports them, which mixed slice/array indexers are not.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.experimental.pallas import triton as plt


def chunks(d: int, bd: int):
    """Static (start, needs_col_mask) for each column chunk of width bd covering [0, d)."""
    return [(c0, c0 + bd > d) for c0 in range(0, d, bd)]


def col_index(c0: int, bd: int):
    return c0 + jnp.arange(bd, dtype=jnp.int32)


def load_vec(ref, lead, c0: int, bd: int, n: int):
    """ref[*lead, c0:c0+bd] as float32, zero past n (lead: tuple of scalar indices)."""
    cols = col_index(c0, bd)
    if c0 + bd > n:
        v = plt.load(ref.at[(*lead, cols)], mask=cols < n, other=0)
    else:
        v = ref[(*lead, cols)]
    return v.astype(jnp.float32)


def load_tile(w_ref, rows, row_ok, c0: int, bd: int, n: int):
    """w_ref[rows, c0:c0+bd] as float32 [R, bd]; rows with row_ok False are not read (0).

    row_ok=None means every row is valid and in bounds (no predicate on the row axis).
    """
    cols = col_index(c0, bd)
    idx = (rows[:, None], cols[None, :])
    col_ok = (cols < n)[None, :] if c0 + bd > n else None
    if row_ok is None and col_ok is None:
        t = w_ref[idx]
    else:
        if row_ok is None:
            mask = jnp.broadcast_to(col_ok, (rows.shape[0], bd))
        elif col_ok is None:
            mask = jnp.broadcast_to(row_ok[:, None], (rows.shape[0], bd))
        else:
            mask = row_ok[:, None] & col_ok
        t = plt.load(w_ref.at[idx], mask=mask, other=0)
    return t.astype(jnp.float32)


def load_rows(w_ref, rows, row_ok, bd: int, n: int):
    """Every column chunk of the rows, [R, bd] float32 tiles: issued together, so all of
    them are in flight at once (a prefetch: nothing waits on them until they are used)."""
    return [load_tile(w_ref, rows, row_ok, c0, bd, n) for c0, _ in chunks(n, bd)]


def tile_dots(tiles, vecs):
    """[row . v for each row of the tiles] for each v in vecs (``load_rows`` tiles). Every
    tile serves every vector (batch rows share the gather); with one vector the products
    are summed over chunks first and reduced across columns once."""
    if len(vecs) == 1:
        acc = None
        for ci, t in enumerate(tiles):
            p = t * vecs[0][ci][None, :]
            acc = p if acc is None else acc + p
        return [jnp.sum(acc, axis=1)]
    return [sum(jnp.sum(t * v[ci][None, :], axis=1) for ci, t in enumerate(tiles))
            for v in vecs]


def accumulate_tiles(acc, tiles, coefs):
    """acc[b][c] += sum_r coefs[b][r] * tiles[c][r]  (down projection, tiles preloaded)."""
    return [[a + jnp.sum(coefs[b][:, None] * t, axis=0) for a, t in zip(acc[b], tiles)]
            for b in range(len(coefs))]


def row_dots(w_ref, rows, row_ok, vecs, bd: int, n: int):
    """[w_ref[r] . v for r in rows] for each v in vecs (lists of float32 [bd] chunks)."""
    return tile_dots(load_rows(w_ref, rows, row_ok, bd, n), vecs)


def store_vec(ref, lead, c0: int, bd: int, n: int, val):
    cols = col_index(c0, bd)
    if c0 + bd > n:
        plt.store(ref.at[(*lead, cols)], val, mask=cols < n)
    else:
        ref[(*lead, cols)] = val


def kept_row_dots(refs, wd_ref, rows, row_ok, vecs, bd: int, n: int, prefetch: bool):
    """Dots of the kept rows of each matrix in ``refs`` (gate and/or up) with each vector,
    and W_down's tiles of the same rows when ``prefetch`` (else None: read them later in
    ``accumulate_kept``). Prefetch puts the down loads in flight with the gate/up loads,
    one memory round trip per tile instead of two, at the cost of registers for both."""
    tiles = [load_rows(w, rows, row_ok, bd, n) for w in refs]
    down = load_rows(wd_ref, rows, row_ok, bd, n) if prefetch else None
    return [tile_dots(t, vecs) for t in tiles], down


def accumulate_kept(acc, wd_ref, down, rows, row_ok, coefs, bd: int, n: int):
    """acc += coefs * W_down[rows] from ``kept_row_dots``'s prefetched tiles or a new read."""
    if down is None:
        down = load_rows(wd_ref, rows, row_ok, bd, n)
    return accumulate_tiles(acc, down, coefs)
