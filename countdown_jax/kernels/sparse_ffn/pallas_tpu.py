"""Pallas TPU kernel for the gathered sparse FFN: whole neuron blocks via scalar prefetch.

TPU DMAs move tiles, not single rows, so the unit of skipping is a block of ``block``
consecutive neurons. The index list is turned into (a) a per-token 0/1 selection over
neurons and (b) a compacted list of the blocks that hold any selected neuron (union over
the batch). That block list is scalar-prefetched into SMEM; the weight BlockSpecs' index
maps read it, so grid step j DMAs the j-th live block of gate / up / down. Steps past the
live count re-point at the last live block (no new DMA) and skip compute. y accumulates
in the resident float32 output block. Tested in interpret mode on CPU (no TPU here).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from countdown_jax.gated import HIGHEST, activation



def block_list(idx, count, m: int, block: int):
    """Per-token selection [N, mp] float32 and the live-block list [nblk] + count [1]."""
    n, cap = idx.shape
    nblk = -(-m // block)
    mp = nblk * block
    valid = (jnp.arange(cap)[None, :] < count[:, None]) & (idx >= 0) & (idx < m)
    rows = jnp.where(valid, idx, mp)                      # mp is out of range: dropped
    sel = jnp.zeros((n, mp), jnp.float32).at[jnp.arange(n)[:, None], rows].set(1.0, mode="drop")
    live = jnp.max(sel.reshape(n, nblk, block), axis=(0, 2)) > 0
    blocks = jnp.nonzero(live, size=nblk, fill_value=0)[0].astype(jnp.int32)
    return sel, blocks, jnp.sum(live, dtype=jnp.int32).reshape(1)


def _kernel(blocks_ref, nlive_ref, x_ref, wg_ref, wu_ref, wd_ref, sel_ref, coef_ref, out_ref,
            *, act, dense, m, block):
    j = pl.program_id(0)

    @pl.when(j == 0)
    def _():
        out_ref[...] = jnp.zeros_like(out_ref)

    @pl.when(j < nlive_ref[0])
    def _():
        x = x_ref[...]
        first = blocks_ref[j] * block
        row_ok = (first + jax.lax.broadcasted_iota(jnp.int32, (block, 1), 0)) < m

        def proj(w_ref):   # [N, block]; rows past m (ragged last block) are zeroed first
            w = jnp.where(row_ok, w_ref[...], 0)
            return jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), precision=HIGHEST,
                                       preferred_element_type=jnp.float32)

        f = activation(act)
        if dense == "up":
            s = f(proj(wg_ref)) * coef_ref[...]
        elif dense == "gate":
            s = coef_ref[...] * proj(wu_ref)
        else:
            s = f(proj(wg_ref)) * proj(wu_ref)
        s = jnp.where(sel_ref[...] > 0, s, 0.0)
        wd = jnp.where(row_ok, wd_ref[...], 0).astype(jnp.float32)
        out_ref[...] += jnp.dot(s, wd, precision=HIGHEST, preferred_element_type=jnp.float32)


def sparse_ffn_pallas_tpu(x, mlp, idx, count, *, act, dense=None, coef=None,
                          block: int = 128, interpret: bool = False):
    n, d = x.shape
    m = mlp["down"].shape[0]
    sel, blocks, nlive = block_list(idx, count, m, block)
    nblk, mp = blocks.shape[0], sel.shape[1]
    coef = jnp.zeros((n, mp), jnp.float32) if coef is None else jnp.pad(
        coef.astype(jnp.float32), ((0, 0), (0, mp - m)))

    def wmap(j, blocks_ref, nlive_ref):
        return (blocks_ref[jnp.maximum(jnp.minimum(j, nlive_ref[0] - 1), 0)], 0)

    def cmap(j, blocks_ref, nlive_ref):
        return (0, wmap(j, blocks_ref, nlive_ref)[0])

    wspec = pl.BlockSpec((block, d), wmap)
    cspec = pl.BlockSpec((n, block), cmap)
    full = pl.BlockSpec((n, d), lambda j, *_: (0, 0))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2, grid=(nblk,),
        in_specs=[full, wspec, wspec, wspec, cspec, cspec], out_specs=full)
    y = pl.pallas_call(
        functools.partial(_kernel, act=act, dense=dense, m=m, block=block),
        grid_spec=grid_spec, interpret=interpret,
        out_shape=jax.ShapeDtypeStruct((n, d), jnp.float32),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
        name="sparse_ffn_blocks_tpu",
    )(blocks, nlive, x, mlp["gate"], mlp["up"], mlp["down"], sel, coef)
    return y.astype(x.dtype)
