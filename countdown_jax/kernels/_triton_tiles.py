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
    """[row . v for each row of the tiles] for each v in vecs (``load_rows`` tiles)."""
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
    """[w_ref[r] . v for r in rows] for each v in vecs (lists of float32 [bd] chunks).

    Each tile is loaded once and used by every vector (batch rows share the gather).
    With one vector, products are summed over chunks first and reduced across columns
    once (one cross-thread reduction per call instead of one per chunk).
    """
    nb = len(vecs)
    if nb == 1:
        acc = None
        for ci, (c0, _) in enumerate(chunks(n, bd)):
            p = load_tile(w_ref, rows, row_ok, c0, bd, n) * vecs[0][ci][None, :]
            acc = p if acc is None else acc + p
        return [jnp.sum(acc, axis=1)]
    outs = [None] * nb
    for ci, (c0, _) in enumerate(chunks(n, bd)):
        t = load_tile(w_ref, rows, row_ok, c0, bd, n)
        for b in range(nb):
            p = jnp.sum(t * vecs[b][ci][None, :], axis=1)
            outs[b] = p if outs[b] is None else outs[b] + p
    return outs


def row_dots2(wa_ref, wb_ref, rows, row_ok, vecs, bd: int, n: int):
    """row_dots of two matrices over the same gathered rows in one pass (gate and up)."""
    nb = len(vecs)
    acc_a, acc_b = [None] * nb, [None] * nb
    for ci, (c0, _) in enumerate(chunks(n, bd)):
        ta = load_tile(wa_ref, rows, row_ok, c0, bd, n)
        tb = load_tile(wb_ref, rows, row_ok, c0, bd, n)
        for b in range(nb):
            if nb == 1:
                pa, pb = ta * vecs[b][ci][None, :], tb * vecs[b][ci][None, :]
            else:
                pa = jnp.sum(ta * vecs[b][ci][None, :], axis=1)
                pb = jnp.sum(tb * vecs[b][ci][None, :], axis=1)
            acc_a[b] = pa if acc_a[b] is None else acc_a[b] + pa
            acc_b[b] = pb if acc_b[b] is None else acc_b[b] + pb
    if nb == 1:
        return [jnp.sum(acc_a[0], axis=1)], [jnp.sum(acc_b[0], axis=1)]
    return acc_a, acc_b


def accumulate_rows(acc, wd_ref, rows, row_ok, coefs, bd: int, n: int):
    """acc[b][c] += sum_r coefs[b][r] * wd_ref[rows[r], chunk c]  (down projection)."""
    new = [list(a) for a in acc]
    for ci, (c0, _) in enumerate(chunks(n, bd)):
        t = load_tile(wd_ref, rows, row_ok, c0, bd, n)
        for b in range(len(coefs)):
            new[b][ci] = new[b][ci] + jnp.sum(coefs[b][:, None] * t, axis=0)
    return new


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
    if prefetch:
        tiles = [load_rows(w, rows, row_ok, bd, n) for w in refs]
        down = load_rows(wd_ref, rows, row_ok, bd, n)
        return [tile_dots(t, vecs) for t in tiles], down
    if len(refs) == 2:
        return list(row_dots2(refs[0], refs[1], rows, row_ok, vecs, bd, n)), None
    return [row_dots(refs[0], rows, row_ok, vecs, bd, n)], None


def accumulate_kept(acc, wd_ref, down, rows, row_ok, coefs, bd: int, n: int):
    """acc += coefs * W_down[rows] from ``kept_row_dots``'s prefetched tiles or a new read."""
    if down is not None:
        return accumulate_tiles(acc, down, coefs)
    return accumulate_rows(acc, wd_ref, rows, row_ok, coefs, bd, n)
