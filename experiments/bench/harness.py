"""Timing and bookkeeping shared by the benchmarks.

Timing: one jitted program runs the step ``iters`` times inside ``lax.fori_loop`` (one
compile, no per-call Python dispatch). Each iteration feeds the previous output back into
the input (x <- x0 + 1e-3*y), so XLA can neither hoist the call out of the loop nor merge
calls, and a data-dependent selection stays put. Each iteration calls the step on
``nsets`` weight sets in turn, so a small sparse working set cannot sit in L2 between
calls. Compile is excluded; a time is the median over ``reps`` runs divided by the calls
per run. The feedback op is one tiny kernel per call, measured as its own row by the
callers and NOT subtracted.
"""

from __future__ import annotations

import csv
import time

import jax
import jax.numpy as jnp
import numpy as np

# Loop unroll: each fori_loop iteration pays a host round trip for its condition (~10-20 us
# measured on H100s), so it is paid once per UNROLL * nsets calls ("loop-overhead" rows of
# bench_kernels.csv: 5-10 us per call not unrolled, ~3-4 us unrolled 5x).
UNROLL = 5


def feedback(x0, y):
    """The next input: x0 + 1e-3*y in float32, back in x0's dtype (depends on the last call)."""
    return (x0.astype(jnp.float32) + 1e-3 * y.astype(jnp.float32)).astype(x0.dtype)


def calls_per_run(iters: int, nsets: int) -> int:
    """Step calls in one run of ``timed_loop``: the checked first call + the loop."""
    return iters * nsets + 1


def timed_loop(step, nsets: int, iters: int, unroll: int = UNROLL):
    """jit of run(x0, sets, taus) -> (x, y0, c0): one call on (x0, set 0) whose output
    (y0, c0) the caller checks, then ``iters`` x ``nsets`` calls ``step(x, sets[s],
    taus[s]) -> (y, counts)`` with the output fed back into the input."""
    def run(x0, sets, taus):
        y0, c0 = step(x0, sets[0], taus[0])

        def body(i, x):
            for s in range(nsets):
                y, _ = step(x, sets[s], taus[s])
                x = feedback(x0, y)
            return x
        return jax.lax.fori_loop(0, iters, body, x0, unroll=min(unroll, iters)), y0, c0
    return jax.jit(run)


def measure(f, args, calls: int, reps: int):
    """(median, min, max us per call, first-call seconds, first call's outputs) of ``reps``
    timed runs of the compiled ``f(*args)`` doing ``calls`` calls each; the first run
    (compile + warm-up) is not timed."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(f(*args))
    first_s = time.perf_counter() - t0
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    per_call = np.array(ts) / calls * 1e6
    return (float(np.median(per_call)), float(np.min(per_call)), float(np.max(per_call)),
            first_s, out)


def gb_per_s(nbytes: float, us: float) -> float:
    """Bytes moved per call over its time in microseconds, in GB/s."""
    return nbytes / us / 1e3


def ceilings(n: int = 1 << 29, reps: int = 10):
    """Measured HBM ceilings (copy GB/s, read GB/s) over n float32 elements (default
    2 GiB). copy: x <- x * s, bytes read + written; read: c <- c + sum(x + c), bytes read
    only, which is what a batch-1 GEMV (all reads) can reach. Each is a jitted 10-step
    loop, median of ``reps``."""
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


def write_csv(path, rows, fields=None):
    """Write ``rows`` (dicts) to ``path``; columns ``fields`` or, by default, every key in
    order of first appearance; missing values are empty, keys outside ``fields`` dropped."""
    if fields is None:
        fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fields, restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def read_csv(path):
    """Rows of a CSV as dicts of strings."""
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))
