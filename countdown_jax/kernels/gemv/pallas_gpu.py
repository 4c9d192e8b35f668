"""Pallas (Triton lowering) GPU kernel: y = x @ W for B <= 16 rows of x (decode).

At decode the attention projections are GEMVs: every weight byte is read once and used B
times, so the floor is the HBM read time of W. XLA lowers them to Triton GEMM fusions or
column-reduction fusions that read at ~2.2-2.7 TB/s of H200's ~4.3 (profiles in
experiments/results/bench_decode_profile.csv, bench_spmd_profile_ops.csv); this kernel is
a plain streaming read to sweep against them (experiments/bench_gemv.py).

Layouts. W [d, n] (the params' own layout: x @ W reduces over the MAJOR axis): a program
owns ``block_n`` output columns and walks d in [block_d, block_n] tiles, each tile row a
contiguous run of block_n elements, each row of x's block_d values broadcast across it.
W [n, d] (``transposed``, a copy the model does not keep): a program owns block_n rows of
W, each read contiguously along d. A stacked [L, d, n] weight is read in place as flat
[L*d, n] rows from ``offset`` = l*d on (no slice copied).

Grid: (column blocks, split_d). With split_d > 1 each program reduces one slice of d and
writes float32 partials [split_d, B, n] that XLA sums (one small extra kernel), so a narrow
output (k/v: n = 1024) still spreads over the GPU's ~132 SMs.

Products: float32 FMAs of the stored values (exact for bf16) summed in float32, or, with
``dot``, a tensor-core dot with x's rows padded to 16 (bf16 / f16 only: Triton's float32
dot rounds to TF32). For B <= ``defer`` rows the per-tile products are accumulated
elementwise and reduced across the tile once, after the loop.

``live`` [rows of W] (optional): rows where it is 0 are not read (predicated loads move no
bytes) and count as zero: a decode batch's union of kept neurons read once, the gate / up
rows as output columns of W [m, d] (transposed) and the W_down rows as inputs of
W [m, d] (plain) (``batch_union``).

``rows`` [R] + ``count`` (optional, instead of ``live``): the same union as an index list,
so that no program walks rows that are not read. A random half of m live leaves almost
every tile with some live row, and then every program runs the whole loop on partly
masked loads; compact, the work is the union's. Transposed: the output is compact,
out[:, j] = x . W[rows[j]] for j < count (0 past it); a program owns block_n positions,
gathers their rows of W (each contiguous along d) and, past count, runs no loop step.
Plain: x is compact [B, R], y = sum_{j < count} x[:, j] W[rows[j]]; the loop walks
blocks of block_d positions, ceil(count / block_d) of them split over split_d programs.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

__all__ = ["DEFAULT_CONFIG", "GemvConfig", "MAX_ROWS", "gemv_pallas_gpu"]

MAX_ROWS = 16          # rows of x one call serves (decode batches)
_DOT_ROWS = 16         # Triton's smallest dot tile


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Defaults: the fastest of bench_gemv.py's sweep on an H200 at every Llama-3.1-8B
    projection shape, batch 1 (experiments/results/bench_gemv.md); end to end it still
    loses to XLA's projections (results/bench_decode.md), so decode keeps XLA's."""
    block_n: int = 64      # output columns per program (power of two)
    block_d: int = 128     # reduction rows per loop step (power of two)
    split_d: int = 4       # programs along d per column block (> 1: partials summed by XLA)
    num_warps: int = 4
    num_stages: int = 1
    dot: bool = False      # tensor-core dot (rows padded to 16) instead of FMAs
    defer: int = 1         # batches up to this many rows reduce across the tile once

    def __post_init__(self):
        for name in ("block_n", "block_d"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two, got {v}")
        if self.split_d < 1 or self.num_warps < 1 or self.num_stages < 1:
            raise ValueError(f"GemvConfig needs split_d, num_warps and num_stages >= 1, got "
                             f"{self.split_d}, {self.num_warps}, {self.num_stages}")
        if self.dot and min(self.block_n, self.block_d) < 16:
            raise ValueError("GemvConfig.dot needs block_n and block_d >= 16 (Triton's dot "
                             f"tile), got {self.block_n} and {self.block_d}")


# Used when no config is passed (the model passes none). Benchmarks may replace it.
DEFAULT_CONFIG = GemvConfig()


def _all(masks):
    """The AND of the masks that are not None (None: no mask)."""
    masks = [m for m in masks if m is not None]
    return functools.reduce(jnp.logical_and, masks) if masks else None


def _kernel(x_ref, w_ref, off_ref, *refs, B, d, n, steps, nblocks, transposed, sel,
            cfg: GemvConfig):
    """sel: None, "live" (refs: live, out) or "rows" (refs: rows, count, out)."""
    o_ref = refs[-1]
    live_ref = refs[0] if sel == "live" else None
    rows_ref, count = (refs[0], refs[1][0]) if sel == "rows" else (None, None)
    # Triton: every tensor dimension a power of two, no slicing of loaded values - so x
    # is loaded row by row (FMA path) or as one [16, bd] tile (dot path), never sliced.
    def masked_load(ref, idx, mask, shape):
        if mask is None:
            return ref[idx]
        return plt.load(ref.at[idx], mask=jnp.broadcast_to(mask, shape), other=0)

    bn, bd = cfg.block_n, cfg.block_d
    j, s = pl.program_id(0), pl.program_id(1)
    cols = j * bn + jnp.arange(bn, dtype=jnp.int32)         # output columns
    col_ok = cols < n if n % bn else None                  # stores: every column
    col_rd = col_ok                                          # loads: the live ones
    wcols = cols                                             # transposed: their rows of W
    if live_ref is not None and transposed:       # W's rows are the output columns
        col_live = masked_load(live_ref, cols, col_ok, (bn,)) != 0
        col_rd = col_live if col_ok is None else col_ok & col_live
    if rows_ref is not None and transposed:       # compact output columns: rows gathered
        col_rd = cols < count
        wcols = masked_load(rows_ref, cols, col_rd, (bn,))
    off = off_ref[0]
    if rows_ref is not None and not transposed:   # compact inputs: the blocks below count
        nblk = jax.lax.div(count + bd - 1, bd)
        steps = jax.lax.div(nblk + cfg.split_d - 1, cfg.split_d)
        first = s * steps
        hi = jnp.maximum(jnp.minimum(steps, nblk - first), 0)
    else:
        first = s * steps                                    # this split's first d block
        # the last split may hold fewer blocks (a traced trip count, still lowered to
        # scf.for: seen in the Triton IR); only the ragged last block is masked
        hi = (steps if steps * cfg.split_d == nblocks
              else jnp.minimum(steps, nblocks - first))
        if rows_ref is not None:                  # every position past count: no step
            # (a product, not jnp.where: its literal operands lowered to i1 constants
            # in jax 0.10's Triton IR, an invalid loop bound)
            hi = hi * (j * bn < count).astype(jnp.int32)
    row_mask = d % bd != 0
    brow = jnp.arange(_DOT_ROWS, dtype=jnp.int32)           # dot path: x's rows, padded
    defer = not cfg.dot and B <= cfg.defer
    wshape = (bn, bd) if transposed else (bd, bn)
    lead = () if cfg.split_d == 1 else (s,)                 # split: its partials' slot

    def body(k, acc):
        r = (first + k) * bd + jnp.arange(bd, dtype=jnp.int32)     # this d block (compact
        # inputs: these positions of x and of rows)
        r_ok = r < d if row_mask else None
        wr = r                                                  # plain: their rows of W
        if live_ref is not None and not transposed:   # W's rows are the inputs
            r_live = masked_load(live_ref, r, r_ok, (bd,)) != 0
            r_ok = r_live if r_ok is None else r_ok & r_live
        if rows_ref is not None and not transposed:   # compact inputs: rows gathered
            r_ok = r < count
            wr = masked_load(rows_ref, r, r_ok, (bd,))
        if transposed:
            idx = (off + wcols[:, None], r[None, :])
            masks = (None if col_rd is None else col_rd[:, None],
                     None if r_ok is None else r_ok[None, :])
        else:
            idx = (off + wr[:, None], cols[None, :])
            masks = (None if r_ok is None else r_ok[:, None],
                     None if col_rd is None else col_rd[None, :])
        w = masked_load(w_ref, idx, _all(masks), wshape)
        if cfg.dot:         # [16, bd] . W -> [16, bn], float32 accumulation
            xmask = _all(((brow < B)[:, None], None if r_ok is None else r_ok[None, :]))
            x = masked_load(x_ref, (jnp.minimum(brow, B - 1)[:, None], r[None, :]), xmask,
                            (_DOT_ROWS, bd))
            dims = (((1,), (1,)), ((), ())) if transposed else (((1,), (0,)), ((), ()))
            return acc + jax.lax.dot_general(x, w, dims, preferred_element_type=jnp.float32)
        w = w.astype(jnp.float32)
        out = []
        for b in range(B):
            xb = masked_load(x_ref, (b, r), r_ok, (bd,)).astype(jnp.float32)
            p = w * (xb[None, :] if transposed else xb[:, None])
            out.append(acc[b] + (p if defer else jnp.sum(p, axis=1 if transposed else 0)))
        return tuple(out)

    if cfg.dot:
        acc = jax.lax.fori_loop(0, hi, body, jnp.zeros((_DOT_ROWS, bn), jnp.float32))
        omask = _all(((brow < B)[:, None], None if col_ok is None else col_ok[None, :]))
        plt.store(o_ref.at[(*lead, brow[:, None], cols[None, :])], acc.astype(o_ref.dtype),
                  mask=jnp.broadcast_to(omask, (_DOT_ROWS, bn)))
        return
    acc0 = tuple(jnp.zeros(wshape if defer else (bn,), jnp.float32) for _ in range(B))
    acc = jax.lax.fori_loop(0, hi, body, acc0)
    for b, a in enumerate(acc):
        val = (jnp.sum(a, axis=1 if transposed else 0) if defer else a).astype(o_ref.dtype)
        if col_ok is None:
            o_ref[(*lead, b, cols)] = val
        else:
            plt.store(o_ref.at[(*lead, b, cols)], val, mask=col_ok)


def gemv_pallas_gpu(x, w, *, d: int, n: int, offset=0, transposed: bool = False,
                    out_dtype=None, config: GemvConfig | None = None,
                    interpret: bool = False, live=None, rows=None, count=None):
    """x [B, d] (B <= MAX_ROWS); w [R, n] whose rows offset..offset+d are W [d, n], or,
    ``transposed``, [R, d] whose rows offset..offset+n are W [n, d]. Returns [B, n] in
    ``out_dtype`` (default x.dtype); live: None or [n] (transposed) / [d] (plain) of
    W's rows, nonzero = read; or rows int32 [C] + count int32 [] (0 <= count <= C), with
    n = C (transposed: compact output) or d = C (plain: compact x) (module docstring).
    Checks are the api's (``api.gemv``)."""
    cfg = config or DEFAULT_CONFIG
    if cfg.dot and x.dtype == jnp.float32:
        raise ValueError("gemv: GemvConfig.dot is for bfloat16 / float16 (Triton's float32 "
                         "dot rounds to TF32); use dot=False for float32")
    B = x.shape[0]
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    nblocks = -(-d // cfg.block_d)              # compact x: the most blocks count allows
    steps = -(-nblocks // min(cfg.split_d, nblocks))
    split = -(-nblocks // steps)                # no split without a block of its own
    cfg = dataclasses.replace(cfg, split_d=split)
    sel, extra = None, ()
    if live is not None:
        sel, extra = "live", (live.astype(jnp.int32),)
    elif rows is not None:
        sel, extra = "rows", (rows, jnp.reshape(count, (1,)).astype(jnp.int32))
    kern = functools.partial(_kernel, B=B, d=d, n=n, steps=steps, nblocks=nblocks,
                             transposed=transposed, sel=sel, cfg=cfg)
    shape = (B, n) if split == 1 else (split, B, n)
    out = pl.pallas_call(
        kern, grid=(-(-n // cfg.block_n), split), interpret=interpret,
        out_shape=jax.ShapeDtypeStruct(shape, out_dtype if split == 1 else jnp.float32),
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
        name=("gemv_t" if transposed else "gemv") + (f"_{sel}" if sel else ""),
    )(x, w, jnp.reshape(jnp.asarray(offset, jnp.int32), (1,)), *extra)
    return out if split == 1 else jnp.sum(out, axis=0).astype(out_dtype)
