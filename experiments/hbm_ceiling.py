"""Measured HBM ceilings of the card, for GB/s comparisons in the benchmarks.

copy: device-to-device copy (x <- x * s), bytes read + written; read: a reduction
(c <- c + sum(x + c)), bytes read only; that is what a batch-1 GEMV (all reads) can reach.
Each is timed as a jitted 10-step loop over a 2 GiB float32 array, median of ``reps``.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np


def ceilings(n: int = 1 << 29, reps: int = 10):
    """(copy GB/s, read GB/s) over n float32 elements (default 2 GiB)."""
    a = jnp.ones((n,), jnp.float32)
    cp = jax.jit(lambda a, s: jax.lax.fori_loop(0, 10, lambda i, c: c * s, a))
    rd = jax.jit(lambda a: jax.lax.fori_loop(0, 10, lambda i, c: c + jnp.sum(a + c), 0.0))
    out = []
    for f, args, nbytes in ((cp, (a, jnp.float32(1.0)), 2 * 4 * n), (rd, (a,), 4 * n)):
        jax.block_until_ready(f(*args))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append((time.perf_counter() - t0) / 10)
        out.append(nbytes / np.median(ts) / 1e9)
    return tuple(out)
