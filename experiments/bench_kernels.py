"""Per-FFN GPU time of one decode token: dense vs CATS / M-COUNTDOWN / D-COUNTDOWN.

Run on a GPU (device tool):  PYTHONPATH=. python3 experiments/bench_kernels.py --plan full

Timing: every measurement is one jitted program that runs the FFN ``iters`` times inside
``lax.fori_loop`` (one compile, no per-call Python dispatch). Each iteration feeds the
previous output back into the input (x <- x0 + 1e-3*y), so XLA cannot hoist the call and
the selection stays put. Each iteration calls the FFN on ``sets`` different weight sets in
turn, so a small sparse working set cannot sit in the 50 MB L2 between calls. Compile is
excluded; the reported time is the median over ``reps`` runs divided by the calls per run.
The input-update op costs one tiny kernel per call; its cost is measured as its own row
(method "loop-overhead") and is NOT subtracted.

Selection: per weight set and sparsity r a threshold halfway between two neighbouring
scores of token 0 keeps exactly k = m(1-r) neurons (realised counts are reported).
Correctness: before timing, every (method, implementation, variant) is compared with the
float32 plain-JAX reference at r=0.5 and 0.9 (relative error, kept-count equality).

Bytes needed (for GB/s): dense 3md; CATS and M md + 2kd; D (d+m)R + 3kd  (x element
size; k = kept neurons, union over the batch). The HBM copy ceiling is measured in the
same run (device-to-device copy, bytes read + written).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax.kernels.fused_sparse_ffn.api import fused_sparse_ffn
from countdown_jax.kernels.fused_sparse_ffn.pallas_gpu import FusedConfig
from countdown_jax.kernels.fused_sparse_ffn.pallas_gpu import default_config as fused_default
from countdown_jax.kernels.fused_sparse_ffn.reference import project_f32 as project, selection_scores
from countdown_jax.kernels.sparse_ffn.pallas_gpu import GatherConfig
from countdown_jax.gated import activation

SHAPES = {  # name: (d, m, act)
    "llama-3.1-8b": (4096, 14336, "silu"),
    "gemma-2-9b": (3584, 14336, "gelu_tanh"),
    "qwen2.5-14b": (5120, 13824, "silu"),
    "phi-4": (5120, 17920, "silu"),
}
RATIOS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
RANK = 512
UNROLL = 5          # timed loop unroll (runs 1-5: 1)
METHODS = ("cats", "m", "d")
INTERPRET = False   # --smoke: tiny shapes, Pallas interpret mode (CPU dry run of this script)
FIELDS = ["device", "shape", "dtype", "method", "implementation", "variant", "sparsity", "batch",
          "kept_frac", "us_per_call", "gb_per_s", "bytes_needed", "rel_err", "note"]


def log(*a):
    print(*a, flush=True)


# ----------------------------------------------------------------------------- problem

@dataclasses.dataclass
class Problem:
    name: str
    d: int
    m: int
    act: str
    dtype: object
    sets: list            # [(wg, wu, wd, V, U)] * K
    x0: jax.Array         # [B, d]


def make_problem(name, dtype, batch, nsets, seed=0):
    d, m, act = SHAPES[name]
    sets = []
    for s in range(nsets):
        k = jax.random.split(jax.random.key(seed * 100 + s), 5)
        f = lambda kk, shape, scale: (jax.random.normal(kk, shape, jnp.float32) * scale).astype(dtype)
        sets.append((f(k[0], (m, d), d ** -0.5), f(k[1], (m, d), d ** -0.5),
                     f(k[2], (m, d), m ** -0.5), f(k[3], (RANK, d), d ** -0.5),
                     f(k[4], (m, RANK), RANK ** -0.5)))
    x0 = jax.random.normal(jax.random.key(seed + 7), (batch, d), jnp.float32).astype(dtype)
    jax.block_until_ready((sets, x0))
    return Problem(name, d, m, act, dtype, sets, x0)


_score_fn = {}


def scores(p: Problem, method, s):
    key = (p.name, str(p.dtype), method, p.x0.shape[0])
    if key not in _score_fn:
        _score_fn[key] = jax.jit(lambda x, wg, wu, v, u: selection_scores(
            x, wg, wu, act=p.act, method=method, pred_vt=v, pred_u=u)[0])
    wg, wu, _, v, u = p.sets[s]
    return np.asarray(_score_fn[key](p.x0, wg, wu, v, u), np.float64)


def thresholds(p: Problem, method, r):
    """tau per weight set: keeps k = m(1-r) of token 0's neurons, with a gap both sides."""
    taus, kept = [], []
    for s in range(len(p.sets)):
        q = scores(p, method, s)
        qs = np.sort(q[0])
        kd = int(round(r * p.m))
        if kd == 0:
            tau = qs[0] - 1.0
        elif kd >= p.m:
            tau = qs[-1] + 1.0
        else:
            tau = (qs[kd - 1] + qs[kd]) / 2
        taus.append(tau)
        kept.append(np.sum(np.any(q > tau, axis=0)))            # union over the batch
    return jnp.asarray(taus, jnp.float32), float(np.mean(kept))


# ----------------------------------------------------------------------------- steps

def dense_step(p: Problem):
    def f(x, w, tau):
        wg, wu, wd, _, _ = w
        hi = jax.lax.Precision.HIGHEST           # float32 means float32 (no TF32)
        g = jnp.einsum("nd,md->nm", x, wg, preferred_element_type=jnp.float32, precision=hi)
        u = jnp.einsum("nd,md->nm", x, wu, preferred_element_type=jnp.float32, precision=hi)
        s = (activation(p.act)(g) * u).astype(x.dtype)
        y = jnp.einsum("nm,md->nd", s, wd, preferred_element_type=jnp.float32,
                       precision=hi).astype(x.dtype)
        return y, jnp.full(x.shape[:1], p.m, jnp.int32)
    return f


def sparse_step(p: Problem, method, impl, config=None, capacity=None):
    def f(x, w, tau):
        wg, wu, wd, v, u = w
        return fused_sparse_ffn(x, wg, wu, wd, tau, act=p.act, method=method, pred_vt=v,
                                pred_u=u, implementation=impl, capacity=capacity,
                                config=config, interpret=INTERPRET)
    return f


def overhead_step(p: Problem):
    return lambda x, w, tau: (x, jnp.zeros(x.shape[:1], jnp.int32))


def timed_loop(step, p: Problem, iters):
    """jit: one call on (x0, set 0) whose output is checked, then ``iters`` x len(sets)
    calls with the output fed back into the input. Calls per run: iters*len(sets) + 1."""
    nsets = len(p.sets)

    def run(x0, sets, taus):
        y0, c0 = step(x0, sets[0], taus[0])

        def body(i, x):
            for s in range(nsets):
                y, _ = step(x, sets[s], taus[s])
                x = (x0.astype(jnp.float32) + 1e-3 * y.astype(jnp.float32)).astype(x0.dtype)
            return x
        # unrolled by UNROLL: each loop iteration costs a host round trip for its
        # condition (~10-20 us measured), paid once per UNROLL*len(sets) calls
        return jax.lax.fori_loop(0, iters, body, x0, unroll=min(UNROLL, iters)), y0, c0
    return jax.jit(run)


def measure(f, p: Problem, taus, iters, reps):
    """(median, min, max us per call, first-call seconds, checked y0, c0)."""
    t0 = time.perf_counter()
    _, y0, c0 = jax.block_until_ready(f(p.x0, p.sets, taus))   # compile (once) + warm-up
    first_s = time.perf_counter() - t0
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(f(p.x0, p.sets, taus))
        ts.append(time.perf_counter() - t0)
    per_call = np.array(ts) / (iters * len(p.sets) + 1) * 1e6
    return (float(np.median(per_call)), float(np.min(per_call)), float(np.max(per_call)),
            first_s, y0, c0)


_ref_cache = {}
_ref_fn = {}


def reference(p: Problem, method, tau0):
    """float32 reference output and counts for set 0 at threshold tau0 (cached)."""
    key = (p.name, p.dtype.__name__, p.x0.shape[0], method, float(tau0))
    if key not in _ref_cache:
        wg, wu, wd, v, u = p.sets[0]
        if method == "dense":
            g, uu = project(p.x0, wg), project(p.x0, wu)
            y = jnp.einsum("nm,md->nd", activation(p.act)(g) * uu, wd.astype(jnp.float32),
                           precision=jax.lax.Precision.HIGHEST)
            c = jnp.full((p.x0.shape[0],), p.m, jnp.int32)
        else:
            fkey = key[:4]           # one compile per problem and method; tau is an argument
            if fkey not in _ref_fn:
                _ref_fn.clear()
                _ref_fn[fkey] = jax.jit(lambda x, wg, wu, wd, v, u, t: fused_sparse_ffn(
                    x, wg, wu, wd, t, act=p.act, method=method, pred_vt=v, pred_u=u,
                    implementation="xla"))
            y, c = _ref_fn[fkey](p.x0, wg, wu, wd, v, u, tau0)
        _ref_cache[key] = (np.asarray(y, np.float64), np.asarray(c))
    return _ref_cache[key]


def bytes_needed(p: Problem, method, kept):
    b = jnp.dtype(p.dtype).itemsize
    d, m = p.d, p.m
    if method == "dense":
        return 3 * m * d * b
    if method in ("cats", "m"):
        return (m * d + 2 * kept * d) * b
    if method == "d":
        return ((d + m) * RANK + 3 * kept * d) * b
    return 0


def check(p: Problem, method, impl, config, capacity, rs=(0.5, 0.9)):
    """max relative error vs the float32 reference over rs (set 0), and count equality."""
    wg, wu, wd, v, u = p.sets[0]
    worst = 0.0
    for r in rs:
        taus, _ = thresholds(p, method, r)
        tau = taus[0]
        kw = dict(act=p.act, method=method, pred_vt=v, pred_u=u)
        ref, rc = jax.jit(lambda x: fused_sparse_ffn(x, wg, wu, wd, tau, implementation="xla",
                                                     **kw))(p.x0)
        y, c = jax.jit(lambda x: fused_sparse_ffn(x, wg, wu, wd, tau, implementation=impl,
                                                  config=config, capacity=capacity,
                                                  interpret=INTERPRET, **kw))(p.x0)
        y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
        if not np.all(np.isfinite(y)):
            raise AssertionError(f"non-finite output ({method}, {impl}, r={r})")
        if not np.array_equal(np.asarray(c), np.asarray(rc)):
            raise AssertionError(f"kept counts differ: {np.asarray(c)} vs {np.asarray(rc)}")
        worst = max(worst, float(np.linalg.norm(y - ref) / np.linalg.norm(ref)))
    tol = 1e-2 if p.dtype == jnp.bfloat16 else 1e-4
    if worst > tol:
        raise AssertionError(f"relative error {worst:.2e} > {tol} ({method}, {impl}, {config})")
    return worst


# ----------------------------------------------------------------------------- ceilings

def add_ceilings(R):
    """Copy (read + write) and read ceilings of this card, as rows of the run."""
    from hbm_ceiling import ceilings
    copy_bw, read_bw = ceilings(n=(1 << 29) if not INTERPRET else (1 << 20))
    R.add(shape="copy-2GiB", dtype="float32", method="hbm-copy", implementation="xla",
          gb_per_s=f"{copy_bw:.0f}", note="device-to-device copy, read+write bytes")
    R.add(shape="read-2GiB", dtype="float32", method="hbm-read", implementation="xla",
          gb_per_s=f"{read_bw:.0f}", note="reduction over 2 GiB, bytes read")
    log(f"device {R.device}; HBM copy ceiling {copy_bw:.0f} GB/s, read {read_bw:.0f} GB/s")
    return copy_bw


# ----------------------------------------------------------------------------- Mosaic GPU

def probe_mosaic_gpu():
    """One short experiment: can Pallas Mosaic GPU gather rows on Hopper?"""
    out = {}
    try:
        import functools
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

    # (a) TMA gather (Layout.TMA_GATHER_INDICES + copy_gmem_to_smem(ref.at[idxs, :]))
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

    # (b) one TMA copy per row, row index read from SMEM (Hopper has no gather TMA)
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


# ----------------------------------------------------------------------------- variants

def fcfg(**kw):
    return FusedConfig(**kw)


def gcfg(**kw):
    return GatherConfig(**kw)


TUNE_FUSED = [  # (label, config) tried at llama bf16; for fp32 bd/bds are halved
    ("bn8-bd1024-w4-b8", fcfg(bn=8, bd=1024, num_warps=4, blocks_per_program=8)),
    ("bn4-bd1024-w4-b16", fcfg(bn=4, bd=1024, num_warps=4, blocks_per_program=16)),
    ("bn16-bd512-w4-b4", fcfg(bn=16, bd=512, num_warps=4, blocks_per_program=4)),
    ("bn8-bd2048-w8-b8", fcfg(bn=8, bd=2048, num_warps=8, blocks_per_program=8)),
    ("bn8-bd1024-w4-b4", fcfg(bn=8, bd=1024, num_warps=4, blocks_per_program=4)),
    ("bn8-bd1024-w4-b8-atomic", fcfg(bn=8, bd=1024, num_warps=4, blocks_per_program=8,
                                      reduce="atomic")),
    ("bn32-bds256-bd1024-w4-b2-c8", fcfg(bn=32, bds=256, bd=1024, num_warps=4,
                                         blocks_per_program=2, compact=8)),
    ("bn64-bds128-bd1024-w4-b1-c8", fcfg(bn=64, bds=128, bd=1024, num_warps=4,
                                         blocks_per_program=1, compact=8)),
    ("bn8-bd1024-w4-b8-s3", fcfg(bn=8, bd=1024, num_warps=4, blocks_per_program=8,
                                 num_stages=3)),
]
TUNE_XLA_SCORE = [  # sparse-only kernels: XLA's dense GEMV computes u / g / z first
    ("xs-bn16-bd1024-w4-p264", fcfg(bn=16, bd=1024, num_warps=4, programs=264, score="xla")),
    ("xs-bn8-bd2048-w8-p264", fcfg(bn=8, bd=2048, num_warps=8, programs=264, score="xla")),
    ("xs-bn64-bd1024-w4-p264-c8", fcfg(bn=64, bd=1024, num_warps=4, programs=264, compact=8,
                                       score="xla")),
    ("xs-bn128-bd2048-w8-p132-c16", fcfg(bn=128, bd=2048, num_warps=8, programs=132,
                                         compact=16, score="xla")),
]
TUNE_PREFETCH = [  # session 3: W_down tiles loaded with the gate/up tiles ("-pf")
    ("xs-bn64-bd1024-w8-p264-c8-pf", fcfg(bn=64, bd=1024, num_warps=8, programs=264,
                                          compact=8, score="xla", prefetch=True)),
    ("xs-bn64-bd1024-w4-p264-c4-pf", fcfg(bn=64, bd=1024, num_warps=4, programs=264,
                                          compact=4, score="xla", prefetch=True)),
    ("xs-bn32-bd1024-w4-p448-c4-pf", fcfg(bn=32, bd=1024, num_warps=4, programs=448,
                                          compact=4, score="xla", prefetch=True)),
    ("xs-bn64-bd2048-w8-p264-c8-pf", fcfg(bn=64, bd=2048, num_warps=8, programs=264,
                                          compact=8, score="xla", prefetch=True)),
    ("bn64-bds128-bd1024-w8-b1-c8-pf", fcfg(bn=64, bds=128, bd=1024, num_warps=8,
                                            blocks_per_program=1, compact=8, prefetch=True)),
    ("bn64-bds128-bd1024-w4-b1-c4-pf", fcfg(bn=64, bds=128, bd=1024, num_warps=4,
                                            blocks_per_program=1, compact=4, prefetch=True)),
]
TUNE_GATHER = [
    ("bj8-bd1024-w4-p132", gcfg(bj=8, bd=1024, num_warps=4, programs=132)),
    ("bj16-bd512-w4-p132", gcfg(bj=16, bd=512, num_warps=4, programs=132)),
    ("bj8-bd1024-w4-p264", gcfg(bj=8, bd=1024, num_warps=4, programs=264)),
    ("bj4-bd1024-w4-p264-atomic", gcfg(bj=4, bd=1024, num_warps=4, programs=264,
                                       reduce="atomic")),
    ("bj8-bd1024-w8-p264-pf", gcfg(bj=8, bd=1024, num_warps=8, programs=264, prefetch=True)),
    ("bj4-bd1024-w4-p264-pf", gcfg(bj=4, bd=1024, num_warps=4, programs=264, prefetch=True)),
]


def for_dtype(cfg, dtype):
    """fp32 rows hold half the elements per 16-byte vector: halve the column chunk."""
    if dtype == jnp.float32 and cfg.bd > 256:
        return dataclasses.replace(cfg, bd=cfg.bd // 2,
                                   **({"bds": cfg.bds // 2} if getattr(cfg, "bds", None) else {}))
    return cfg


# ----------------------------------------------------------------------------- driver

class Runner:
    def __init__(self, args):
        self.args = args
        self.device = jax.devices()[0].device_kind
        self.rows = []
        self.stage_rows = []
        self.fns = {}
        self.t_start = time.time()
        os.makedirs(args.out, exist_ok=True)
        self.csv_path = os.path.join(args.out, "bench_kernels.csv")

    def left(self):
        return self.args.budget_s - (time.time() - self.t_start)

    def add(self, **row):
        row.setdefault("device", self.device)
        self.rows.append({k: row.get(k, "") for k in FIELDS})
        with open(self.csv_path, "w", newline="") as fh:
            w = csv.DictWriter(fh, FIELDS)
            w.writeheader()
            w.writerows(self.rows)

    def time_variant(self, p, method, impl, variant, step, ratios, capacity_of=None):
        """One compile per variant (thresholds are arguments), timed at each r; the first
        call's output is checked against the float32 reference at the same r."""
        key = (p.name, p.dtype.__name__, p.x0.shape[0], method, impl, variant)
        out = {}
        if key not in self.fns:          # one jit per variant: later calls reuse its compile
            self.fns[key] = timed_loop(step, p, self.args.iters)
        f = self.fns[key]
        for r in ratios:
            if self.left() < 20:
                log("  (budget exhausted, skipping)")
                return out
            base = dict(shape=p.name, dtype=p.dtype.__name__, method=method, implementation=impl,
                        variant=variant, sparsity=r, batch=p.x0.shape[0])
            try:
                if method in ("dense", "loop-overhead"):
                    taus, kept = jnp.zeros(len(p.sets), jnp.float32), p.m
                else:
                    taus, kept = thresholds(p, method, r)
                med, lo, hi, first, y0, c0 = measure(f, p, taus, self.args.iters, self.args.reps)
            except Exception as e:   # noqa: BLE001
                log(f"  FAILED {p.name} {p.dtype.__name__} {method} {impl} {variant} r={r}: "
                    f"{type(e).__name__}: {str(e)[:300]}")
                self.add(**base, note=f"FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            rel, flag = "", ""
            if method != "loop-overhead":
                try:
                    ref, rc = reference(p, method, taus[0])
                    y0 = np.asarray(y0, np.float64)
                    if not np.all(np.isfinite(y0)):
                        raise AssertionError("non-finite output")
                    if not np.array_equal(np.asarray(c0), rc):
                        raise AssertionError(f"kept counts {np.asarray(c0)} != reference {rc}")
                    nr = np.linalg.norm(ref)
                    rel = np.linalg.norm(y0 - ref) / nr if nr > 0 else np.linalg.norm(y0)
                    tol = 1e-2 if p.dtype == jnp.bfloat16 else 1e-4
                    rel_s = f"{rel:.1e}"
                    if rel > tol:
                        raise AssertionError(f"relative error {rel:.2e} > {tol}")
                    rel = rel_s
                except Exception as e:   # noqa: BLE001   keep the time, flag the row
                    flag = f"CHECK FAILED: {str(e)[:160]}; "
                    log(f"  {flag}")
                    rel = rel if isinstance(rel, str) else f"{rel:.1e}"
            nbytes = bytes_needed(p, method, kept)
            gbps = nbytes / med / 1e3 if nbytes else ""
            self.add(**base, kept_frac=f"{kept / p.m:.4f}", us_per_call=f"{med:.2f}",
                     gb_per_s=f"{gbps:.0f}" if gbps != "" else "", bytes_needed=nbytes,
                     rel_err=rel, note=f"{flag}min {lo:.2f} max {hi:.2f} first-call {first:.1f}s")
            log(f"  {p.name:13s} {p.dtype.__name__:8s} B={p.x0.shape[0]} {method:5s} "
                f"{impl:13s} {variant:28s} r={r:<4} kept={kept / p.m:.3f} "
                f"{med:8.2f} us  {gbps if gbps == '' else round(gbps):>5} GB/s  "
                f"(first {first:.1f}s) rel={rel}")
            if not flag:                 # a variant that failed its check never wins a sweep
                out[r] = med
        return out

    def baseline(self, p):
        self.time_variant(p, "loop-overhead", "xla", "x<-x0+eps*y only", overhead_step(p), (0.0,))
        return self.time_variant(p, "dense", "xla-dense", "einsum", dense_step(p), (0.0,))

    def xla_gather(self, p, method, ratios):
        for r in ratios:
            cap = max(16, int(math.ceil(p.m * (1 - r) * 1.02)) + 8)
            self.time_variant(p, method, "xla-gather", f"cap={cap}",
                              sparse_step(p, method, "xla_gather", capacity=cap), (r,))

    def pallas(self, p, method, label, cfg, ratios, impl="pallas"):
        cfg = for_dtype(cfg, p.dtype)
        name = "pallas-fused" if impl == "pallas" else "pallas-gather"
        return self.time_variant(p, method, name, label, sparse_step(p, method, impl, config=cfg),
                                 ratios)

    def poison_check(self, p, method, label, cfg, impl="pallas"):
        """Outputs start as NaN / INT_MIN: every element must be written (r = 0.5, 0.9)."""
        cfg = dataclasses.replace(for_dtype(cfg, p.dtype), poison=True)
        try:
            rel = check(p, method, impl, cfg, None)
            note = f"poison check passed, max rel err {rel:.1e}"
        except Exception as e:   # noqa: BLE001
            note = f"poison check FAILED: {type(e).__name__}: {str(e)[:200]}"
        log(f"  {method} {impl} {label}: {note}")
        self.add(shape=p.name, dtype=p.dtype.__name__, method=method,
                 implementation="pallas-fused" if impl == "pallas" else "pallas-gather",
                 variant=label + " [poison check]", batch=p.x0.shape[0], note=note)


STAGE_FIELDS = ["device", "shape", "dtype", "method", "implementation", "variant", "sparsity",
                "batch", "op", "us_per_call", "launches_per_call"]


def stage_profile(R: Runner, p: Problem, method, impl, variant, r):
    """Per-kernel GPU time per FFN call of an already-timed variant (profiler trace of one
    timed run; the harness's input update shows as its own op). Rows go to
    bench_kernels_stages.csv; "(busy)" is the union of kernel intervals per call."""
    from gpu_profile import profile_call
    key = (p.name, p.dtype.__name__, p.x0.shape[0], method, impl, variant)
    if key not in R.fns or R.left() < 20:
        return
    if method in ("dense", "loop-overhead"):
        taus = jnp.zeros(len(p.sets), jnp.float32)
    else:
        taus, _ = thresholds(p, method, r)
    f = R.fns[key]
    calls = R.args.iters * len(p.sets) + 1
    try:
        jax.block_until_ready(f(p.x0, p.sets, taus))
        prof, summ = profile_call(f, p.x0, p.sets, taus)
    except Exception as e:   # noqa: BLE001
        log(f"  stage profile failed ({method} {variant}): {type(e).__name__}: {str(e)[:200]}")
        return
    base = dict(device=R.device, shape=p.name, dtype=p.dtype.__name__, method=method,
                implementation=impl, variant=variant, sparsity=r, batch=p.x0.shape[0])
    rows = [dict(base, op=row["op"], us_per_call=f"{row['us'] / calls:.2f}",
                 launches_per_call=f"{row['launches'] / calls:.2f}") for row in prof]
    rows.append(dict(base, op="(busy)", us_per_call=f"{summ['busy_us'] / calls:.2f}",
                     launches_per_call=f"{summ['kernels'] / calls:.2f}"))
    R.stage_rows += rows
    with open(os.path.join(R.args.out, "bench_kernels_stages.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, STAGE_FIELDS)
        w.writeheader()
        w.writerows(R.stage_rows)
    log(f"  stages {method} {variant} r={r}: " + ", ".join(
        f"{row['op'][:28]} {row['us_per_call']}" for row in rows[:5]) +
        f"; busy {summ['busy_us'] / calls:.2f} us/call")


def plan_s3(R: Runner, best):
    """Session 3: prefetch variants vs the chosen kernels (llama bf16, r = 0.9 / 0.5), stage
    profiles of the winners, their full r sweep, then the rest of the matrix (plan_full
    without llama bf16 batch 1, which runs 4-5 covered)."""
    add_ceilings(R)
    fused = dict(TUNE_FUSED + TUNE_XLA_SCORE + TUNE_PREFETCH)
    gather = dict(TUNE_GATHER)
    p = make_problem("llama-3.1-8b", jnp.bfloat16, 1, R.args.sets)
    R.baseline(p)
    xs_pf = [label for label, _ in TUNE_PREFETCH if label.startswith("xs-")]
    cand = {"m": [best["m"]] + xs_pf, "cats": [best["cats"]] + xs_pf,
            "d": [best["d"]] + [label for label, _ in TUNE_PREFETCH],
            "gather": [best["gather"]] + [label for label, _ in TUNE_GATHER
                                          if label.endswith("-pf")]}
    won = {}
    for key, labels in cand.items():
        res = {}
        for label in labels:
            method, impl = ("m", "pallas_gather") if key == "gather" else (key, "pallas")
            cfg = (gather if key == "gather" else fused)[label]
            t = R.pallas(p, method, label, cfg, (0.9, 0.5), impl=impl)
            if 0.9 in t:
                res[label] = t[0.9]
        if res:
            won[key] = min(res, key=res.get)
            log(f"best {key}: {won[key]} {res[won[key]]:.2f} us (was {best[key]}: "
                f"{res.get(best[key], float('nan')):.2f})")
    log("BEST", json.dumps(won))
    stage_profile(R, p, "loop-overhead", "xla", "x<-x0+eps*y only", 0.0)
    stage_profile(R, p, "dense", "xla-dense", "einsum", 0.0)
    for key, label in won.items():
        method, impl = ("m", "pallas-gather") if key == "gather" else (key, "pallas-fused")
        stage_profile(R, p, method, impl, label, 0.9)
    for method in METHODS:
        if method in won and won[method] != best[method]:
            R.pallas(p, method, won[method], fused[won[method]], RATIOS + (1.0,))
            R.poison_check(p, method, won[method], fused[won[method]])
    if not R.args.only:
        R.args.only = ",".join(f"{name}/{dt}/{b}" for name in SHAPES
                               for dt in ("bfloat16", "float32") for b in [1, *R.args.batches]
                               if (name, dt, b) != ("llama-3.1-8b", "bfloat16", 1))
    plan_full(R, {**best, **won}, first=p)


def s4_variants():
    """Session 4 probe of the chosen kernels (labels -> configs): software pipelining
    (num_stages), smaller compaction tiles (fewer registers held per round trip), several
    blocks per program (programs out of lock-step), narrower column chunks."""
    replace = dataclasses.replace
    m0 = fused_default(jnp.bfloat16, "m")
    d0 = fused_default(jnp.bfloat16, "d")
    return {
        "m": {"xs-bn64-bd1024-w4-p264-c4-pf-s2": replace(m0, num_stages=2),
              "xs-bn64-bd1024-w4-p264-c4-pf-s3": replace(m0, num_stages=3),
              "xs-bn64-bd1024-w4-p264-c2-pf": replace(m0, compact=2),
              "xs-bn64-bd512-w4-p264-c4-pf": replace(m0, bd=512),
              "xs-bn16-bd1024-w4-p264-c4-pf": replace(m0, bn=16),
              "xs-bn128-bd1024-w8-p132-c8-pf": replace(m0, bn=128, num_warps=8, programs=132,
                                                       compact=8)},
        "d": {"xs-bn32-bd1024-w4-p448-c4-pf-s2": replace(d0, num_stages=2),
              "xs-bn32-bd1024-w4-p448-c4-pf-s3": replace(d0, num_stages=3),
              "xs-bn32-bd1024-w4-p448-c2-pf": replace(d0, compact=2),
              "xs-bn16-bd1024-w4-p448-c4-pf": replace(d0, bn=16)},
    }


def plan_s4(R: Runner, best):
    """Session 4: a probe of variants of the chosen kernels against them (llama bf16, r =
    0.9 / 0.5, same run), stage profiles of any that win, then the plan_full steps named
    by --only (the index-list / plain-XLA rows run 6's budget skipped)."""
    add_ceilings(R)
    p = make_problem("llama-3.1-8b", jnp.bfloat16, 1, R.args.sets)
    R.baseline(p)
    fused = dict(TUNE_FUSED + TUNE_XLA_SCORE + TUNE_PREFETCH)
    for method, variants in s4_variants().items():
        res = {}
        for label, cfg in [(best[method], fused[best[method]]), *variants.items()]:
            t = R.pallas(p, method, label, cfg, (0.9, 0.5))
            if 0.9 in t:
                res[label] = t[0.9]
        if res:
            win = min(res, key=res.get)
            log(f"s4 {method}: best {win} {res[win]:.2f} us (chosen {best[method]}: "
                f"{res.get(best[method], float('nan')):.2f})")
            if win != best[method] and R.left() > 120:
                stage_profile(R, p, method, "pallas-fused", win, 0.9)
                R.poison_check(p, method, win, variants[win])
    if R.args.only:
        plan_full(R, best, first=p)


def plan_stages(R: Runner, best):
    """Per-kernel stage times of the chosen kernels (llama bf16, batch 1) at r = 0.9 and at
    r = 1.0 (nothing kept: what a call costs before any row is gathered), with dense and
    the harness's own update in the same run."""
    add_ceilings(R)
    p = make_problem("llama-3.1-8b", jnp.bfloat16, 1, R.args.sets)
    R.baseline(p)
    fused = dict(TUNE_FUSED + TUNE_XLA_SCORE + TUNE_PREFETCH)
    stage_profile(R, p, "loop-overhead", "xla", "x<-x0+eps*y only", 0.0)
    stage_profile(R, p, "dense", "xla-dense", "einsum", 0.0)
    for method in METHODS:
        R.pallas(p, method, best[method], fused[best[method]], (0.9, 1.0))
        for r in (0.9, 1.0):
            stage_profile(R, p, method, "pallas-fused", best[method], r)


def plan_all(R: Runner):
    """Ceiling; variant sweep at llama bf16 (r = 0.9, 0.5); poison checks of the winners;
    then every shape x dtype x method x r with the winners; batch 4/8 at llama bf16."""
    add_ceilings(R)
    fused, gather = dict(TUNE_FUSED), dict(TUNE_GATHER)
    p = make_problem("llama-3.1-8b", jnp.bfloat16, 1, R.args.sets)
    R.baseline(p)
    best = {}

    def sweep(method, labels, impl="pallas"):
        res = {}
        for label in labels:
            if R.left() < R.args.budget_s * 0.55:     # keep time for the full matrix
                break
            cfgs = fused if impl == "pallas" else gather
            t = R.pallas(p, method, label, cfgs[label], (0.9, 0.5), impl=impl)
            if 0.9 in t:
                res[label] = t[0.9]
        if res:
            win = min(res, key=res.get)
            log(f"best {impl} {method}: {win} {res[win]:.2f} us")
            return win, sorted(res, key=res.get)
        return None, []

    best["m"], order_m = sweep("m", list(fused))
    best["d"], _ = sweep("d", list(fused))
    best["cats"], _ = sweep("cats", order_m[:3] or list(fused)[:3])
    best["gather"], _ = sweep("m", list(gather), impl="pallas_gather")
    best = {k: v for k, v in best.items() if v}
    log("BEST", json.dumps(best))
    for method in METHODS:
        if method in best:
            R.poison_check(p, method, best[method], fused[best[method]])
    if "gather" in best:
        R.poison_check(p, "d", best["gather"], gather[best["gather"]], impl="pallas_gather")
    plan_full(R, best, first=p)


def plan_full(R: Runner, best, first=None):
    """Every shape x dtype x method x r; batch 4/8 for the chosen kernels (llama bf16)."""
    fused, gather = dict(TUNE_FUSED + TUNE_XLA_SCORE + TUNE_PREFETCH), dict(TUNE_GATHER)
    if first is None:
        add_ceilings(R)
    pick = {m: best.get(m, TUNE_FUSED[0][0]) for m in METHODS}
    gpick = best.get("gather", TUNE_GATHER[0][0])
    others = [s for s in SHAPES if s != "llama-3.1-8b"]
    cache = {}

    def problem(name, dtype, batch):
        key = (name, dtype.__name__, batch)
        if key not in cache:
            if first is not None and key == ("llama-3.1-8b", "bfloat16", 1):
                cache[key] = first
            else:
                cache.clear()                     # one problem's weights on the GPU at a time
                cache[key] = make_problem(name, dtype, batch, R.args.sets)
                R.baseline(cache[key])
        return cache[key]

    def fused_all(p, ratios):
        for method in METHODS:
            R.pallas(p, method, pick[method], fused[pick[method]], ratios)

    def gathered(p, ratios, xla_ratios):
        for method in METHODS:
            R.pallas(p, method, gpick, gather[gpick], ratios, impl="pallas_gather")
        for method in METHODS:
            R.xla_gather(p, method, xla_ratios)

    # in order of importance, each step guarded by the time budget; kind: which kernels
    # (--only "shape/dtype/batch" runs every step of that problem, ":kind" just one)
    steps = [("llama-3.1-8b", jnp.bfloat16, 1, "both",
              lambda p: (fused_all(p, RATIOS + (1.0,)), gathered(p, RATIOS, RATIOS[1:])))]
    steps += [(s, jnp.bfloat16, 1, "fused", lambda p: fused_all(p, RATIOS)) for s in others]
    steps += [("llama-3.1-8b", jnp.bfloat16, b, "both",
               lambda p: (fused_all(p, (0.5, 0.8, 0.9, 0.95)), gathered(p, (0.9,), ())))
              for b in R.args.batches]
    steps += [("llama-3.1-8b", jnp.float32, 1, "both",
               lambda p: (fused_all(p, RATIOS), gathered(p, (0.5, 0.9), (0.9,))))]
    steps += [(s, jnp.float32, 1, "fused", lambda p: fused_all(p, RATIOS)) for s in others]
    steps += [(s, jnp.bfloat16, 1, "gathered", lambda p: gathered(p, (0.5, 0.9), (0.9,)))
              for s in others]
    only = [t for t in R.args.only.split(",") if t]
    for name, dtype, batch, kind, run in steps:
        key = f"{name}/{dtype.__name__}/{batch}"
        if only and key not in only and f"{key}:{kind}" not in only:
            continue
        if R.left() < 45:
            log(f"budget left {R.left():.0f}s: skip {name} {dtype.__name__} B={batch} {kind}")
            R.add(shape=name, dtype=dtype.__name__, batch=batch, note="not run: time budget")
            continue
        run(problem(name, dtype, batch))
    cache.clear()


def plan_focus(R: Runner, kernel_best):
    """Second call: sparse-only kernels fed by XLA's dense GEMV (score="xla"), chosen at
    llama bf16 r=0.9, then all r, batch 4/8, the other shapes and fp32."""
    add_ceilings(R)
    xs, fused = dict(TUNE_XLA_SCORE), dict(TUNE_FUSED)
    p = make_problem("llama-3.1-8b", jnp.bfloat16, 1, R.args.sets)
    R.baseline(p)
    best = dict(R.args.xs_best and json.loads(R.args.xs_best) or {})
    for method in ("m", "d", "cats"):
        if method in best:
            continue
        res = {}
        for label, cfg in TUNE_XLA_SCORE:
            t = R.pallas(p, method, label, cfg, (0.9, 0.5))
            if 0.9 in t:
                res[label] = t[0.9]
        if res:
            best[method] = min(res, key=res.get)
    log("BEST", json.dumps(best))
    for method in METHODS:            # in-kernel scoring, run 1's winners, for comparison
        if kernel_best.get(method) in fused and not R.args.xs_best:
            R.pallas(p, method, kernel_best[method], fused[kernel_best[method]], (0.9, 0.5))
    for method in R.args.methods:
        if method in best:
            R.pallas(p, method, best[method], xs[best[method]], RATIOS + (1.0,))
            if not R.args.xs_best:
                R.poison_check(p, method, best[method], xs[best[method]])
    del p
    steps = [("llama-3.1-8b", jnp.bfloat16, b, (0.5, 0.8, 0.9, 0.95)) for b in R.args.batches]
    steps += [("llama-3.1-8b", jnp.float32, 1, (0.5, 0.9))]
    steps += [(s, jnp.bfloat16, 1, (0.5, 0.9, 0.95)) for s in SHAPES if s != "llama-3.1-8b"]
    steps += [(s, jnp.float32, 1, (0.5, 0.9)) for s in SHAPES if s != "llama-3.1-8b"]
    for name, dtype, batch, ratios in steps:
        if R.left() < 25:
            log(f"budget left {R.left():.0f}s: skip {name} {dtype.__name__} B={batch}")
            R.add(shape=name, dtype=dtype.__name__, batch=batch, note="not run: time budget")
            continue
        p = make_problem(name, dtype, batch, R.args.sets)
        R.baseline(p)
        for method in METHODS:
            if method in best:
                R.pallas(p, method, best[method], xs[best[method]], ratios)
        del p


# ----------------------------------------------------------------------------- report

CHOSEN = {  # (method, implementation, variant) of the current defaults (chosen in run 6)
    "m": ("pallas-fused", "xs-bn64-bd1024-w4-p264-c4-pf"),
    "cats": ("pallas-fused", "xs-bn64-bd1024-w4-p264-c4-pf"),
    "d": ("pallas-fused", "xs-bn32-bd1024-w4-p448-c4-pf"),
}
# runs that timed every shape x dtype x batch with the chosen kernels: 10 = the current code
# (predictor stored Vt [r, d]) on an H200; 6 = session 3 on an H100 (predictor V [d, r])
MATRIX_RUNS = ("10", "6")
MATRIX_RUN = MATRIX_RUNS[0]


def stage_table(path):
    """Per-kernel GPU time per call (profiler) of the chosen kernels, Llama-8B bf16 r=0.9."""
    import collections
    if not os.path.exists(path):
        return []
    by = collections.defaultdict(list)
    for r in csv.DictReader(open(path)):
        by[(r["run"], r["method"], r["variant"], r["sparsity"])].append(r)
    L = ["## Where the time goes (profiler, Llama-3.1-8B bf16, batch 1, us of GPU time per "
         "call)", "", "Ops above 0.3 us per call; \"busy\" is the union of kernel intervals "
         "per call (the harness's input update included, ~0.3 us). `input_reduce_fusion_14` "
         "is XLA's dense GEMV (gate+up for dense, up / gate for M / CATS, z = hU^T for D), "
         "`_9` the partial-sum reduce (`_20` for dense: the down GEMV's split-K reduce). D's "
         "predictor: runs 6 and 8 (V [d, r]) spend `_20` + `loop_multiply_fusion_6` + `_14` "
         "on h and z; run 9 (Vt [r, d]) `_24` (h) + `_14` (z).", "",
         "| run | method | variant | r | kernels (us per call) | busy |", "|---|---|---|---|---|---|"]
    for (run, method, variant, r), ops in by.items():
        busy = [o["us_per_call"] for o in ops if o["op"] == "(busy)"]
        parts = ", ".join(f"{o['op']} {o['us_per_call']}" for o in ops
                          if o["op"] != "(busy)" and float(o["us_per_call"]) > 0.3)
        L.append(f"| {run} | {method} | `{variant}` | {r} | {parts} | "
                 f"{busy[0] if busy else ''} |")
    return L + [""]


def matrix_tables(rows, run):
    """One table per (shape, dtype, batch) of ``run``: us per call per method and r."""
    import collections
    groups = collections.defaultdict(list)
    for r in rows:
        if (r["run"] == run and r["us_per_call"] and "poison" not in r["variant"]
                and r["method"] not in ("loop-overhead", "hbm-copy", "hbm-read")):
            groups[(r["shape"], r["dtype"], int(r["batch"]))].append(r)
    L = [f"## Every shape, dtype and batch (run {run}; us per FFN call, x dense in brackets)",
         "", "`pallas-fused` = the chosen kernels (selection inside; at batch > 1 the union "
         "of the tokens' kept rows, tokens unrolled); `pallas-gather` = one index list per "
         "token (XLA compaction + gather kernel `bj8-bd1024-w4-p264`); `xla-gather` = index "
         "list + `jnp.take`. Llama-3.1-8B bf16 batch 1 is in the sweep above.", ""]
    ratios = ("0.0", "0.5", "0.7", "0.8", "0.9", "0.95", "1.0")
    for key in sorted(groups, key=lambda k: (k[2], k[1] != "bfloat16", k[0])):
        if key == ("llama-3.1-8b", "bfloat16", 1):
            continue
        g = groups[key]
        dn = [float(r["us_per_call"]) for r in g if r["method"] == "dense"]
        dn = dn[0] if dn else None
        cols = [x for x in ratios if any(r["sparsity"] == x for r in g if r["method"] != "dense")]
        L += [f"**{key[0]}, {key[1]}, batch {key[2]}**: XLA dense "
              f"{dn if dn is not None else '-'} us", "",
              "| method | implementation | " + " | ".join(f"r={x}" for x in cols) + " |",
              "|---|---|" + "---|" * len(cols)]
        cells = collections.defaultdict(dict)
        for r in g:
            if r["method"] != "dense":
                cells[(r["method"], r["implementation"])][r["sparsity"]] = float(r["us_per_call"])
        for (method, impl), v in sorted(cells.items()):
            L.append(f"| {method} | {impl} | " + " | ".join(
                (f"{v[x]:.1f}" + (f" ({dn / v[x]:.2f}x)" if dn else "")) if x in v else ""
                for x in cols) + " |")
        L.append("")
    return L


def report(csv_path, md_path, png_path):
    """Markdown tables + plot from the benchmark CSV (numbers read, never typed in)."""
    import collections
    rows = [r for r in csv.DictReader(open(csv_path))]
    runs = sorted({r["run"] for r in rows}, key=int)
    dev = sorted({r["device"] for r in rows})
    val = collections.defaultdict(dict)        # (run, method, impl, variant) -> {r: row}
    for r in rows:
        if r["shape"] == "llama-3.1-8b" and r["dtype"] == "bfloat16" and r["batch"] == "1" \
                and r["us_per_call"]:
            val[(r["run"], r["method"], r["implementation"], r["variant"])][r["sparsity"]] = r

    def get(run, method, impl, variant, sp):
        return val.get((run, method, impl, variant), {}).get(sp)

    copy = {r["run"]: r["gb_per_s"] for r in rows if r["method"] == "hbm-copy"}
    read = {r["run"]: r["gb_per_s"] for r in rows if r["method"] == "hbm-read"}
    over = {r["run"]: r["us_per_call"] for r in rows if r["method"] == "loop-overhead"
            and r["shape"] == "llama-3.1-8b" and r["dtype"] == "bfloat16" and r["batch"] == "1"}
    dense = {run: float(get(run, "dense", "xla-dense", "einsum", "0.0")["us_per_call"])
             for run in runs if get(run, "dense", "xla-dense", "einsum", "0.0")}
    L = ["# Sparse FFN kernels: one decode token, per-FFN GPU time", "",
         f"Cards: {', '.join(dev)} (`jax.devices()[0].device_kind`), jax 0.11.2, Pallas Triton "
         "lowering. Each run is one call of the device tool (runs 1-3: session 1, 4-5: "
         "session 2, 6: session 3, all on H100s; 7-10: session 4, on H200s, the only card "
         "lent then: the card is in every CSV row); a call may get another card, so every "
         "run re-measures dense and the HBM ceilings and comparisons stay within a run. "
         "Runs 1-8 compute D's predictor hidden h = xV from V [d, r] (a column reduction); "
         "runs 9-10 from the stored transpose Vt [r, d] (the current code, policy.py). Time inside one "
         "jitted `fori_loop`, compile excluded, median of 5-7 runs; every time includes one "
         "input-update op per call (`loop-overhead` row, NOT subtracted; from run 6 the loop "
         "is unrolled 5x, which cut it from 5-10 us to 3-4 us per call). GB/s = bytes the "
         "method must read / time. Full rows: `bench_kernels.csv`; per-kernel stage times: "
         "`bench_kernels_stages.csv`; method: `bench_kernels.py`.", "",
         "| run | HBM copy (GB/s, read+write) | HBM read (GB/s) | loop overhead (us/call) | "
         "XLA dense bf16 (us) |", "|---|---|---|---|---|"]
    for run in runs:
        L.append(f"| {run} | {copy.get(run, '')} | {read.get(run, '-')} | {over.get(run, '')} "
                 f"| {dense.get(run, '')} |")
    L += ["", "## Summary: Llama-3.1-8B bf16, batch 1, r = 0.9, fastest checked kernel per run",
          "", "| run | XLA dense | M (pallas) | CATS (pallas) | D incl. rank-512 predictor "
          "(pallas) |", "|---|---|---|---|---|"]
    for run in runs:
        cells = []
        for method in ("m", "cats", "d"):
            cand = [v["0.9"] for (rn, me, im, va), v in val.items()
                    if rn == run and me == method and im == "pallas-fused" and "0.9" in v
                    and "CHECK FAILED" not in v["0.9"]["note"]]
            r = min(cand, key=lambda r: float(r["us_per_call"])) if cand else None
            cells.append(f"{float(r['us_per_call']):.1f} ({r['gb_per_s']} GB/s, "
                         f"`{r['variant']}`)" if r else "-")
        L.append(f"| {run} | {dense.get(run, '-')} | " + " | ".join(cells) + " |")
    L += ["", "Chosen (the kernels' defaults): " + "; ".join(
          f"{m}: `{v[1]}`" for m, v in CHOSEN.items()) +
          " (`xs-` = scores from XLA's dense GEMV, sparse part in the kernel; `-pf` = the "
          "kept rows' W_down loads issued with their gate/up loads; `cN` = kept rows "
          "compacted into tiles of N; `pN` = N programs). Targets (issue 5, on an H100): M, "
          "CATS <= 55 us and D <= 30 us; see the stage table and KERNEL_NOTES.md for what "
          "separates each kernel from them. Official release on an H100 (anchors.md): M 90, "
          "D 74, dense 134 us.", ""]
    L += stage_table(os.path.join(os.path.dirname(csv_path), "bench_kernels_stages.csv"))
    for run in MATRIX_RUNS:
        L += matrix_tables(rows, run)
    L += [
"## Llama-3.1-8B MLP (4096 x 14336), bf16, batch 1, r = 0.9, every variant", "",
          "| run | method | implementation | variant | us | x dense (same run) | GB/s needed-bytes | "
          "% of HBM ceiling (read; runs 1-5: copy) | check |", "|---|---|---|---|---|---|---|---|---|"]
    for (run, method, impl, variant), by in sorted(val.items()):
        r = by.get("0.9")
        if r is None or method in ("dense", "loop-overhead"):
            continue
        us = float(r["us_per_call"])
        chk = "count mismatch (bf16 h, fixed in run 2)" if "CHECK FAILED" in r["note"] \
            else f"rel {r['rel_err']}"
        ceil = read.get(run) or copy.get(run)
        pct = f"{100 * float(r['gb_per_s']) / float(ceil):.0f}%" if ceil else ""
        L.append(f"| {run} | {method} | {impl} | {variant} | {us:.1f} | "
                 f"{dense[run] / us:.2f} | {r['gb_per_s']} | {pct} | {chk} |")
    L += ["", "## Sparsity sweep, Llama-3.1-8B bf16 batch 1 (us per FFN call)", "",
          "| run | method | implementation | variant | " + " | ".join(
              f"r={x}" for x in ("0.0", "0.5", "0.7", "0.8", "0.9", "0.95", "1.0")) +
          " | dense |", "|---" * 12 + "|"]
    for (run, method, impl, variant), by in sorted(val.items()):
        if len(by) < 3:
            continue
        cells = [by[x]["us_per_call"] if x in by else "" for x in
                 ("0.0", "0.5", "0.7", "0.8", "0.9", "0.95", "1.0")]
        L.append(f"| {run} | {method} | {impl} | {variant} | " + " | ".join(cells) +
                 f" | {dense.get(run, '')} |")
    L += ["", "Run 1's D rows at 0 < r < 1 failed the kept-count check (h = xV rounded to bf16 "
          "before z = Uh: two XLA programs rounded differently and ~0.1% of neurons near the "
          "threshold flipped); from run 2 h stays float32 and D passes.",
          "", "r = 1.0 keeps nothing: it is the cost of the dense scoring stage alone "
          "(XLA GEMV + empty sparse kernel + reduce for `xs-` variants; the in-kernel scoring "
          "stream for the others).", ""]
    other = [r for r in rows if r["us_per_call"] and r["method"] not in ("loop-overhead",)
             and not (r["shape"] == "llama-3.1-8b" and r["dtype"] == "bfloat16"
                      and r["batch"] == "1") and r["run"] not in MATRIX_RUNS]
    if other:
        L += ["## Other shapes, other runs (runs 4-5: session 2's kernels; 7: session 4's "
              "first H200 call, predictor V [d, r])", "",
              "| run | shape | dtype | batch | method | implementation | variant | r | us | "
              "GB/s |", "|---|---|---|---|---|---|---|---|---|---|"]
        L += [f"| {r['run']} | {r['shape']} | {r['dtype']} | {r['batch']} | {r['method']} | "
              f"{r['implementation']} | {r['variant']} | {r['sparsity']} | {r['us_per_call']} | "
              f"{r['gb_per_s']} |" for r in other]
        L.append("")
    skipped = sorted({(r["shape"], r["dtype"], r["batch"]) for r in rows
                      if "not run" in r["note"]})
    if skipped:
        L += ["Not timed (device budget): " + "; ".join(f"{s} {d} batch {b}"
                                                       for s, d, b in skipped) + ".", ""]
    pois = [r for r in rows if "poison" in r["variant"]]
    if pois:
        L += ["## Poison checks (outputs start as NaN / INT_MIN)", ""]
        L += [f"- run {r['run']} {r['method']} {r['implementation']} {r['variant']}: {r['note']}"
              for r in pois]
    open(md_path, "w").write("\n".join(L) + "\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {"m": "tab:blue", "cats": "tab:orange", "d": "tab:green"}
    for (run, method, impl, variant), by in sorted(val.items()):
        if len(by) < 3 or method not in colors or run not in MATRIX_RUNS:
            continue
        xs_ = sorted(float(x) for x in by if float(x) < 1.0)
        ys = [float(by[str(x)]["us_per_call"]) for x in xs_]
        ax.plot(xs_, ys, "-" if run == MATRIX_RUN else ":", marker="o", color=colors[method],
                alpha=1.0 if impl == "pallas-fused" else 0.45,
                label=f"{method} {impl} {variant} (run {run})")
    for run in MATRIX_RUNS:
        if run in dense:
            ax.axhline(dense[run], color="black", lw=1, ls="-" if run == MATRIX_RUN else ":",
                       label=f"XLA dense bf16 (run {run})")
    ax.set_xlabel("sparsity r")
    ax.set_ylabel("us per FFN call (one token)")
    cards = {r["run"]: r["device"].replace("NVIDIA ", "") for r in rows}
    ax.set_title("Llama-3.1-8B MLP bf16, batch 1: " + ", ".join(
        f"run {run} {cards.get(run, '')}" + (" solid" if run == MATRIX_RUN else " dotted")
        for run in MATRIX_RUNS), fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    # right: speedup over the same run's dense, every shape and dtype (chosen kernels)
    marks = {"llama-3.1-8b": "o", "gemma-2-9b": "s", "qwen2.5-14b": "^", "phi-4": "D"}
    dn = {(r["shape"], r["dtype"]): float(r["us_per_call"]) for r in rows
          if r["run"] == MATRIX_RUN and r["method"] == "dense" and r["batch"] == "1"
          and r["us_per_call"]}
    for method, (impl, variant) in CHOSEN.items():
        for (shape, dtype), d0 in sorted(dn.items()):
            pts = sorted((float(r["sparsity"]), d0 / float(r["us_per_call"])) for r in rows
                         if r["run"] == MATRIX_RUN and r["shape"] == shape and r["dtype"] == dtype
                         and r["batch"] == "1" and r["method"] == method
                         and r["variant"] == variant and r["us_per_call"]
                         and float(r["sparsity"]) < 1.0)
            if pts:
                bx.plot(*zip(*pts), "-" if dtype == "bfloat16" else "--", marker=marks[shape],
                        color=colors[method], ms=4, lw=0.9,
                        label=f"{method} {shape} {dtype}")
    bx.axhline(1.0, color="black", lw=1)
    bx.set_xlabel("sparsity r")
    bx.set_ylabel("x XLA dense (same run, same shape and dtype)")
    bx.set_title(f"Chosen kernels, every shape, bf16 (solid) / fp32 (dashed), run {MATRIX_RUN} "
                 f"({cards.get(MATRIX_RUN, '')})", fontsize=9)
    bx.legend(fontsize=5, ncol=3)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main():
    global INTERPRET
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default="all", choices=["all", "full", "focus", "probe", "report", "s3", "s4",
                                              "stages"])
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sets", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--budget-s", type=float, default=520)
    ap.add_argument("--best", default="", help="json {method: label, 'gather': label}")
    ap.add_argument("--only", default="", help="full / s4: comma list of shape/dtype/batch "
                    "steps, each optionally :fused, :gathered or :both (one kind of step)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    ap.add_argument("--xs-best", default="", help="focus: json {method: label}, skips the sweep")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help="focus: all-r methods")
    args = ap.parse_args()
    if args.smoke:
        INTERPRET = True
        for k in list(SHAPES):
            SHAPES[k] = (64, 96, SHAPES[k][2])
            if k not in ("llama-3.1-8b", "gemma-2-9b"):
                del SHAPES[k]
        global RANK
        RANK = 16
        del TUNE_FUSED[2:-3], TUNE_FUSED[-2:], TUNE_GATHER[1:-1]   # keep a few variants
    if args.plan == "report":
        report(os.path.join(args.out, "bench_kernels.csv"), os.path.join(args.out, "bench_kernels.md"),
               os.path.join(args.out, "bench_kernels.png"))
        return 0
    log(f"jax {jax.__version__} devices {jax.devices()}")
    if args.plan == "probe":
        log("mosaic gpu probe:", json.dumps(probe_mosaic_gpu(), indent=1))
        return 0
    R = Runner(args)
    try:
        if args.plan == "all":
            plan_all(R)
        elif args.plan == "s3":
            plan_s3(R, json.loads(args.best))
        elif args.plan == "stages":
            plan_stages(R, json.loads(args.best))
        elif args.plan == "s4":
            plan_s4(R, json.loads(args.best))
        elif args.plan == "focus":
            plan_focus(R, json.loads(args.best) if args.best else {})
        else:
            plan_full(R, json.loads(args.best) if args.best else {})
    finally:
        log(f"wrote {len(R.rows)} rows to {R.csv_path} in {time.time() - R.t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
