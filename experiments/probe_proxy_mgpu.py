"""Probe: the Mosaic GPU proxy-scores kernel against the float32 reference, and its time
against the Triton scores kernel and a dense bf16 XLA gate+up GEMV (same run).

    PYTHONPATH=$PWD python3 experiments/probe_proxy_mgpu.py [--quick] [--sets 4] [--out DIR]

Correctness: max |kernel - ref| / max |ref| on random data (Llama-3.1-8B shapes and a
ragged small shape, batch 1 / 8 / 3 / 12, all-zero x). Timing, two ways, ``--sets`` weight
sets in rotation so nothing sits in L2, compile excluded: (1) CUPTI kernel durations
(median per kernel; the main kernel and the sum of the call's kernels: x pad, kernel,
output slice), which stay meaningful when another process time-slices the GPU; (2) one
jitted loop (experiments/bench/harness.py: output fed back into x, median of ``--reps``
runs, host loop overhead included). GB/s = proxy (or dense) bytes / time.
"""

from __future__ import annotations

import argparse
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax.kernels.proxy_scores import mosaic_gpu as M
from countdown_jax.kernels.proxy_scores.api import proxy_scores as triton_scores
from countdown_jax.proxy import proxy_scores as ref_scores
from countdown_jax.proxy import quantize_mlp
from experiments.bench import harness

D, MM = 4096, 14336


def make(key, m, d, bits=4, group=128):
    kg, ku = jax.random.split(key)
    mlp = {"gate": jax.random.normal(kg, (m, d), jnp.float32) * 0.02,
           "up": jax.random.normal(ku, (m, d), jnp.float32) * 0.02}
    return mlp, quantize_mlp(mlp, bits, group)


def rel_err(a, r):
    a, r = np.asarray(a, np.float64), np.asarray(r, np.float64)
    if not np.all(np.isfinite(a)):
        return float("nan")
    scale = max(np.max(np.abs(r)), 1e-30)
    return float(np.max(np.abs(a - r)) / scale)


def check(args):
    print("== correctness (max |k - ref| / max |ref|; ref = proxy.proxy_scores, float32)")
    cases = [(MM, D, 1, "silu"), (MM, D, 8, "silu"), (200, 640, 3, "silu"),
             (200, 640, 3, "gelu_tanh"), (192, 512, 12, "silu")]
    if args.quick:
        cases = cases[2:]
    ok = True
    for m, d, t, act in cases:
        _, prox = make(jax.random.key(m + d + t), m, d)
        x = (jax.random.normal(jax.random.key(7), (t, d), jnp.float32)).astype(jnp.bfloat16)
        ref = jax.jit(lambda p, x: ref_scores(p, x, act))(prox, x)
        for tiled, relabel, nsub in ((False, True, 1), (True, True, 2), (True, False, 1),
                                     (True, True, 4)):
            cfg = M.MgpuConfig(relabel=relabel, nsub=nsub)
            if d % (128 * nsub):
                continue
            try:
                out = M.proxy_scores_mgpu(prox, x, act=act, config=cfg, tiled=tiled)
                e = rel_err(out, ref)
                z = M.proxy_scores_mgpu(prox, jnp.zeros_like(x), act=act, config=cfg,
                                        tiled=tiled)
                zok = bool(np.all(np.asarray(z) == 0))
                good = e < 2e-3 and zok
                ok &= good
                print(f"m={m} d={d} T={t} {act} tiled={tiled} relabel={relabel} "
                      f"nsub={nsub}: rel err {e:.2e}, zero x -> zeros: {zok} "
                      f"{'OK' if good else 'FAIL'}", flush=True)
            except Exception as exc:   # report and go on: the probe is for finding out
                ok = False
                print(f"m={m} d={d} T={t} {act} tiled={tiled} relabel={relabel} nsub={nsub}: ERROR "
                      f"{type(exc).__name__}: {str(exc)[:2000]}", flush=True)
                traceback.print_exc(limit=3)
        try:
            tri = triton_scores(x, prox["packed"], prox["scale"], act=act,
                                implementation="pallas")
            print(f"   triton kernel rel err {rel_err(tri, ref):.2e}")
        except Exception as exc:
            print(f"   triton kernel ERROR {type(exc).__name__}: {str(exc)[:300]}")
    print("correctness:", "ALL OK" if ok else "FAILURES", flush=True)
    return ok


def timing(args):
    print(f"== timing: Llama-3.1-8B gate+up (m={MM}, d={D}), 4 bits group 128, "
          f"{args.sets} weight sets in rotation, median of {args.reps} runs x "
          f"{args.iters} iterations")
    read_gbs = harness.ceilings(n=1 << 28, reps=5)[1]
    proxy_bytes = 2 * MM * D * 4 / 8 + 2 * MM * (D // 128) * 2
    dense_bytes = 2 * MM * D * 2
    print(f"read ceiling {read_gbs:.0f} GB/s; proxy {proxy_bytes / 1e6:.1f} MB (floor "
          f"{proxy_bytes / read_gbs / 1e3:.1f} us), dense gate+up {dense_bytes / 1e6:.1f} MB "
          f"(floor {dense_bytes / read_gbs / 1e3:.1f} us)", flush=True)
    keys = jax.random.split(jax.random.key(1), args.sets)
    canon, prep, prep_t, dense = [], [], [], []
    for k in keys:
        mlp, prox = make(k, MM, D)
        canon.append(prox)
        prep.append(M.prepare(prox, D, tiled=False))
        prep_t.append(M.prepare(prox, D, tiled=True))
        dense.append(jnp.concatenate([mlp["gate"], mlp["up"]]).astype(jnp.bfloat16))
        del mlp
    jax.block_until_ready((canon, prep, prep_t, dense))

    def stack(sets):
        return jax.tree.map(lambda *a: jnp.stack(a), *sets)

    def dense_step(x, w):
        y = jnp.einsum("td,md->tm", x, w, preferred_element_type=jnp.float32)
        return jnp.abs(jax.nn.silu(y[:, :MM]) * y[:, MM:])

    variants = [("dense bf16 XLA", stack(dense), dense_step, dense_bytes),
                ("triton scores (shipped)", stack(canon),
                 lambda x, p: triton_scores(x, p["packed"], p["scale"], act="silu",
                                            implementation="pallas"), proxy_bytes)]
    for tiled, cfg in args.configs:
        variants.append((f"mosaic {'tiled' if tiled else 'rows'} nsub={cfg.nsub} stages="
                         f"{cfg.stages} relabel={int(cfg.relabel)}{' DRY' if cfg.dry else ''}",
                         stack(prep_t if tiled else prep),
                         lambda x, p, cfg=cfg: M.proxy_scores_mgpu(p, x, act="silu",
                                                                   config=cfg),
                         proxy_bytes))
    variants.append(("loop overhead (feedback only)", stack(dense),
                     lambda x, w: jnp.zeros((x.shape[0], MM), jnp.float32) + x[:, :1], 0))
    rows = []
    if args.cupti:
        rows += cupti(args, variants, proxy_bytes, dense_bytes)
    for t in args.tokens if not args.no_loop else []:
        x0 = jax.random.normal(jax.random.key(3), (t, D), jnp.float32).astype(jnp.bfloat16)
        for name, sets, fn, nbytes in variants:
            def step(x, s, _tau, fn=fn):
                y = fn(x, s)
                return y, jnp.zeros((), jnp.int32)

            def feed_step(x, s, tau, step=step):
                y, c = step(x, s, tau)
                return jnp.pad(y[:, :D], ((0, 0), (0, max(0, D - y.shape[1])))), c
            run = harness.timed_loop(feed_step, args.sets, args.iters)
            taus = jnp.zeros((args.sets,), jnp.float32)
            sets_list = [jax.tree.map(lambda a, i=i: a[i], sets) for i in range(args.sets)]
            try:
                med, lo, hi, first, _ = harness.measure(
                    run, (x0, sets_list, taus), harness.calls_per_run(args.iters, args.sets),
                    args.reps)
            except Exception as exc:
                print(f"T={t} {name}: ERROR {type(exc).__name__}: {str(exc)[:1500]}",
                      flush=True)
                continue
            gbs = harness.gb_per_s(nbytes, med) if nbytes else 0.0
            rows.append(dict(timer="loop", tokens=t, variant=name, us=round(med, 2),
                             us_min=round(lo, 2), us_max=round(hi, 2), gb_per_s=round(gbs),
                             floor_us=round(proxy_bytes / read_gbs / 1e3, 2),
                             read_ceiling_gb_per_s=round(read_gbs)))
            print(f"T={t} {name:48s} {med:8.1f} us (min {lo:.1f}, max {hi:.1f})  "
                  f"{gbs:6.0f} GB/s  compile+first {first:.1f}s", flush=True)
    return rows


def cupti(args, variants, proxy_bytes, dense_bytes):
    """GPU kernel time by CUPTI (jax.experimental.mosaic.gpu.profiler): each iteration calls
    the variant once per weight set; per call, the sum of its kernels and the largest one.
    Kernel durations stay meaningful when another process shares the GPU (time-sliced),
    unlike wall-clock loops."""
    from collections import defaultdict

    from jax.experimental.mosaic.gpu import profiler
    print(f"== CUPTI kernel times ({args.cupti} iterations x {args.sets} sets; us per call; "
          f"GB/s of the proxy / dense bytes over the largest kernel)")
    rows = []
    for t in args.tokens:
        x0 = jax.random.normal(jax.random.key(3), (t, D), jnp.float32).astype(jnp.bfloat16)
        for name, sets, fn, nbytes in variants[:-1]:
            sets_list = [jax.tree.map(lambda a, i=i: a[i], sets) for i in range(args.sets)]
            f = jax.jit(lambda x, ss, fn=fn: [fn(x, s) for s in ss])
            try:
                jax.block_until_ready(f(x0, sets_list))
                _, res = profiler.measure(f, aggregate=False, iterations=args.cupti)(
                    x0, sets_list)
            except Exception as exc:
                print(f"T={t} {name}: ERROR {type(exc).__name__}: {str(exc)[:1500]}")
                continue
            per, totals = defaultdict(list), []
            for it in res:
                totals.append(sum(ms for _, ms in it) * 1e3 / args.sets)
                for kname, ms in it:
                    per[kname].append(ms * 1e3)
            big = max(per, key=lambda k: np.median(per[k]))
            big_us = float(np.median(per[big]))
            others = ", ".join(f"{k[:40]} {np.median(v):.1f}" for k, v in per.items()
                               if k != big)
            print(f"T={t} {name:48s} all kernels {np.median(totals):6.1f} us | main "
                  f"{big_us:6.1f} us {nbytes / big_us / 1e3:6.0f} GB/s "
                  f"(n={len(per[big])}) | others: {others}", flush=True)
            rows.append(dict(timer="cupti", tokens=t, variant=name, us=round(big_us, 2),
                             us_all_kernels=round(float(np.median(totals)), 2),
                             gb_per_s=round(nbytes / big_us / 1e3)))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="small shapes only, no timing")
    ap.add_argument("--no-check", action="store_true")
    ap.add_argument("--sets", type=int, default=4)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--cupti", type=int, default=20, help="CUPTI iterations (0: skip)")
    ap.add_argument("--no-loop", action="store_true", help="CUPTI only, no wall-clock loop")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", default=None, help="write bench_proxy_mgpu.csv here")
    ap.add_argument("--cfg", nargs="*",
                    default=["r,2,4,1", "t,2,3,1", "t,2,4,1", "t,2,3,1,1"],
                    help="layout (t: tiled, r: rows),nsub,stages,relabel[,dry] per variant")
    args = ap.parse_args()
    args.configs = []
    for spec in args.cfg:
        lay, nsub, stages, *flags = spec.split(",")
        args.configs.append((lay == "t", M.MgpuConfig(
            nsub=int(nsub), stages=int(stages), **dict(zip(("relabel", "dry"),
                                                           (bool(int(f)) for f in flags))))))
    print(jax.devices(), jax.__version__, time.strftime("%H:%M:%S"), flush=True)
    if not args.no_check:
        check(args)
    if not args.quick:
        rows = timing(args)
        if args.out and rows:
            card = jax.devices()[0].device_kind
            rows = [dict(card=card, date=time.strftime("%Y-%m-%d"), **r) for r in rows]
            harness.write_csv(f"{args.out}/bench_proxy_mgpu.csv", rows)


if __name__ == "__main__":
    main()
