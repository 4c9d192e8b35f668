"""One short experiment: can Pallas Mosaic GPU gather weight rows on Hopper? (a) the TMA
row gather (Layout.TMA_GATHER_INDICES + copy_gmem_to_smem(ref.at[idxs, :])), (b) one TMA
copy per row with the row index read from SMEM. Returns {attempt: outcome}."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def probe_mosaic_gpu():
    out = {}
    try:
        from jax.experimental import pallas as pl
        from jax.experimental.pallas import mosaic_gpu as plgpu
    except Exception as e:   # noqa: BLE001
        return {"import": f"failed: {e!r}"}
    m, d, k = 256, 128, 8
    w = jax.random.normal(jax.random.key(0), (m, d), jnp.float32)
    idx = jnp.asarray(np.random.default_rng(0).choice(m, k, replace=False), jnp.int32)
    # weights in GMEM, indices in SMEM, k gathered rows out in SMEM
    smem_call = functools.partial(
        pl.pallas_call, out_shape=jax.ShapeDtypeStruct((k, d), jnp.float32),
        in_specs=(pl.BlockSpec(memory_space=plgpu.GMEM), pl.BlockSpec(memory_space=plgpu.SMEM)),
        out_specs=plgpu.BlockSpec(memory_space=plgpu.SMEM),
        scratch_shapes=[plgpu.Barrier()], compiler_params=plgpu.CompilerParams())

    try:
        @smem_call
        def gather_tma(w_ref, idx_ref, o_ref, bar):
            ids = plgpu.load(idx_ref, (), layout=plgpu.Layout.TMA_GATHER_INDICES)
            plgpu.copy_gmem_to_smem(w_ref.at[ids, :], o_ref, bar)
            plgpu.barrier_wait(bar)
        y = gather_tma(w, idx.astype(jnp.uint32))
        out["tma_gather"] = f"ran, max err {float(jnp.max(jnp.abs(y - w[idx]))):.3g}"
    except Exception as e:   # noqa: BLE001
        out["tma_gather"] = f"failed: {type(e).__name__}: {str(e)[:400]}"

    try:
        @smem_call
        def per_row_tma(w_ref, idx_ref, o_ref, bar):
            for j in range(k):
                r = idx_ref[j]
                plgpu.copy_gmem_to_smem(w_ref.at[pl.ds(r, 1)], o_ref.at[pl.ds(j, 1)], bar)
                plgpu.barrier_wait(bar)
        y = per_row_tma(w, idx)
        out["per_row_tma"] = f"ran, max err {float(jnp.max(jnp.abs(y - w[idx]))):.3g}"
    except Exception as e:   # noqa: BLE001
        out["per_row_tma"] = f"failed: {type(e).__name__}: {str(e)[:400]}"
    return out
