"""What the FFN benchmark times, by purpose. Each plan measures the HBM ceilings and the
Llama-3.1-8B bf16 batch-1 baseline (the loop's own cost, XLA dense) in the same run, so
comparisons stay within a run (a device call may land on another card).

- tune:       sweep the in-kernel-scoring and index-list variants at Llama bf16 (r = 0.9,
              0.5), poison-check the winners, then the matrix with them.
- matrix:     every shape x dtype x method x r with given kernels; batch 4/8 at Llama bf16.
- xla-scores: sweep the sparse-only kernels fed by XLA's dense GEMV, then all r, batch
              4/8, the other shapes and fp32 with the winners.
- prefetch:   the W_down-prefetch variants against given kernels, stage profiles of the
              winners, their full r sweep, then the rest of the matrix.
- probe:      one knob of the chosen kernels changed at a time against them; stage
              profile and poison check of any that wins; then the matrix steps in --only.
- stages:     per-kernel stage times of given kernels at r = 0.9 and 1.0.
- proxy:      the low-bit proxy rule (issue #12): the proxy-scores kernel alone and the
              proxy D-COUNTDOWN FFN at r = 0.5 / 0.9 (proxy_plan.py).
- floor:      fixed-overhead variants vs the shipped kernels at batch 1 (r = 0.5, 0.9,
              1.0), stage profiles (ffn_floor).
- union:      decode batches: the union read once by the GEMV with row predicates
              (``batch_union``), its tiles, per-token lists and masked dense,
              r = 0.5 / 0.7 / 0.9 (ffn_floor).

``best``: {method: label, "lists": label} of the kernels to use (--best): the fused
kernel's variant per method, and the index-list kernel's (``LISTS``).
"""

from __future__ import annotations

import json

import jax.numpy as jnp

from .ffn_floor import floor, union
from .ffn_problem import CATS, D, M, METHODS
from .ffn_runner import LISTS, Runner, log
from .ffn_variants import TUNE_PREFETCH, TUNE_XLA_SCORE, probe_variants
from .proxy_plan import proxy

RATIOS = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
LLAMA = "llama-3.1-8b"


def _start(R: Runner):
    """Ceilings + the Llama bf16 batch-1 problem with its baseline rows."""
    R.add_ceilings()
    p = R.problem(LLAMA, jnp.bfloat16, 1)
    R.baseline(p)
    return p


def _fastest(R: Runner, p, method, candidates):
    """Times (label, config) candidates at r = 0.9 / 0.5; the fastest checked at 0.9."""
    res = {}
    for label, cfg in candidates:
        t = R.pallas(p, method, label, cfg, (0.9, 0.5))
        if 0.9 in t:
            res[label] = t[0.9]
    return res


def tune(R: Runner, best=None):
    fused, gather = dict(R.scale.tune_fused), R.scale.gather
    p = _start(R)
    best = {}

    def sweep(method, cfgs):
        res = {}
        for label in cfgs:
            if R.left() < R.args.budget_s * 0.55:     # keep time for the full matrix
                break
            res.update(_fastest(R, p, method, [(label, cfgs[label])]))
        if res:
            win = min(res, key=res.get)
            log(f"best {method}: {win} {res[win]:.2f} us")
            return win, sorted(res, key=res.get)
        return None, []

    best[M], order_m = sweep(M, fused)
    best[D], _ = sweep(D, fused)
    best[CATS], _ = sweep(CATS, {k: fused[k] for k in order_m[:3] or list(fused)[:3]})
    best[LISTS], _ = sweep(M, gather)
    best = {k: v for k, v in best.items() if v}
    log("BEST", json.dumps(best))
    for method in METHODS:
        if method in best:
            R.poison_check(p, method, best[method], fused[best[method]])
    if LISTS in best:
        R.poison_check(p, D, best[LISTS], gather[best[LISTS]])
    matrix(R, best, first=p)


def matrix(R: Runner, best, first=None, only=None):
    """Every shape x dtype x method x r; batch 4/8 for the chosen kernels (Llama bf16).
    ``first``: the Llama bf16 batch-1 problem if a plan made it already (no new ceilings);
    ``only``: step names "shape/dtype/batch[:kind]" (default --only; empty: all)."""
    fused, gather = R.scale.fused, R.scale.gather
    if first is None:
        R.add_ceilings()
    pick = {m: best.get(m, R.scale.tune_fused[0][0]) for m in METHODS}
    gpick = best.get(LISTS, R.scale.tune_gather[0][0])
    others = [s for s in R.scale.shapes if s != LLAMA]
    cache = {}

    def problem(name, dtype, batch):
        key = (name, dtype.__name__, batch)
        if key not in cache:
            if first is not None and key == (LLAMA, "bfloat16", 1):
                cache[key] = first
            else:
                cache.clear()                     # one problem's weights on the GPU at a time
                cache[key] = R.problem(name, dtype, batch)
                R.baseline(cache[key])
        return cache[key]

    def fused_all(p, ratios):
        for method in METHODS:
            R.pallas(p, method, pick[method], fused[pick[method]], ratios)

    def gathered(p, ratios, xla_ratios):
        for method in METHODS:
            R.pallas(p, method, gpick, gather[gpick], ratios)
        for method in METHODS:
            R.xla_index_lists(p, method, xla_ratios)

    # in order of importance, each step guarded by the time budget; kind: which kernels
    # (--only "shape/dtype/batch" runs every step of that problem, ":kind" just one)
    steps = [(LLAMA, jnp.bfloat16, 1, "both",
              lambda p: (fused_all(p, RATIOS + (1.0,)), gathered(p, RATIOS, RATIOS[1:])))]
    steps += [(s, jnp.bfloat16, 1, "fused", lambda p: fused_all(p, RATIOS)) for s in others]
    steps += [(LLAMA, jnp.bfloat16, b, "both",
               lambda p: (fused_all(p, (0.5, 0.8, 0.9, 0.95)), gathered(p, (0.9,), ())))
              for b in R.args.batches]
    steps += [(LLAMA, jnp.float32, 1, "both",
               lambda p: (fused_all(p, RATIOS), gathered(p, (0.5, 0.9), (0.9,))))]
    steps += [(s, jnp.float32, 1, "fused", lambda p: fused_all(p, RATIOS)) for s in others]
    steps += [(s, jnp.bfloat16, 1, "gathered", lambda p: gathered(p, (0.5, 0.9), (0.9,)))
              for s in others]
    only = [t for t in (R.args.only if only is None else only).split(",") if t]
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


def xla_scores(R: Runner, kernel_best):
    """``kernel_best``: in-kernel-scoring winners timed alongside for comparison;
    --xs-best skips the sweep (and those comparison rows and the poison checks)."""
    xs, fused = dict(TUNE_XLA_SCORE), dict(R.scale.tune_fused)
    p = _start(R)
    best = dict(R.args.xs_best)
    for method in (M, D, CATS):
        if method in best:
            continue
        res = _fastest(R, p, method, TUNE_XLA_SCORE)
        if res:
            best[method] = min(res, key=res.get)
    log("BEST", json.dumps(best))
    for method in METHODS:
        if kernel_best.get(method) in fused and not R.args.xs_best:
            R.pallas(p, method, kernel_best[method], fused[kernel_best[method]], (0.9, 0.5))
    for method in R.args.methods:
        if method in best:
            R.pallas(p, method, best[method], xs[best[method]], RATIOS + (1.0,))
            if not R.args.xs_best:
                R.poison_check(p, method, best[method], xs[best[method]])
    del p
    others = [s for s in R.scale.shapes if s != LLAMA]
    steps = [(LLAMA, jnp.bfloat16, b, (0.5, 0.8, 0.9, 0.95)) for b in R.args.batches]
    steps += [(LLAMA, jnp.float32, 1, (0.5, 0.9))]
    steps += [(s, jnp.bfloat16, 1, (0.5, 0.9, 0.95)) for s in others]
    steps += [(s, jnp.float32, 1, (0.5, 0.9)) for s in others]
    for name, dtype, batch, ratios in steps:
        if R.left() < 25:
            log(f"budget left {R.left():.0f}s: skip {name} {dtype.__name__} B={batch}")
            R.add(shape=name, dtype=dtype.__name__, batch=batch, note="not run: time budget")
            continue
        p = R.problem(name, dtype, batch)
        R.baseline(p)
        for method in METHODS:
            if method in best:
                R.pallas(p, method, best[method], xs[best[method]], ratios)
        del p


def prefetch(R: Runner, best):
    """The matrix after the prefetch comparison skips Llama bf16 batch 1 (timed here)
    unless --only names steps."""
    fused, gather = R.scale.fused, R.scale.gather
    p = _start(R)
    xs_pf = [label for label, _ in TUNE_PREFETCH if label.startswith("xs-")]
    cand = {M: [best[M]] + xs_pf, CATS: [best[CATS]] + xs_pf,
            D: [best[D]] + [label for label, _ in TUNE_PREFETCH],
            LISTS: [best[LISTS]] + [label for label, _ in R.scale.tune_gather
                                          if label.endswith("-pf")]}
    won = {}
    for key, labels in cand.items():
        method, cfgs = (M, gather) if key == LISTS else (key, fused)
        res = _fastest(R, p, method, [(label, cfgs[label]) for label in labels])
        if res:
            won[key] = min(res, key=res.get)
            log(f"best {key}: {won[key]} {res[won[key]]:.2f} us (was {best[key]}: "
                f"{res.get(best[key], float('nan')):.2f})")
    log("BEST", json.dumps(won))
    R.profile_baseline(p)
    for key, label in won.items():
        method, impl = (M, "pallas-gather") if key == LISTS else (key, "pallas-fused")
        R.stage_profile(p, method, impl, label, 0.9)
    for method in METHODS:
        if method in won and won[method] != best[method]:
            R.pallas(p, method, won[method], fused[won[method]], RATIOS + (1.0,))
            R.poison_check(p, method, won[method], fused[won[method]])
    only = R.args.only or ",".join(
        f"{name}/{dt}/{b}" for name in R.scale.shapes for dt in ("bfloat16", "float32")
        for b in [1, *R.args.batches] if (name, dt, b) != (LLAMA, "bfloat16", 1))
    matrix(R, {**best, **won}, first=p, only=only)


def probe(R: Runner, best):
    p = _start(R)
    fused = R.scale.fused
    for method, variants in probe_variants().items():
        res = _fastest(R, p, method, [(best[method], fused[best[method]]), *variants.items()])
        if res:
            win = min(res, key=res.get)
            log(f"probe {method}: best {win} {res[win]:.2f} us (chosen {best[method]}: "
                f"{res.get(best[method], float('nan')):.2f})")
            if win != best[method] and R.left() > 120:
                R.stage_profile(p, method, "pallas-fused", win, 0.9)
                R.poison_check(p, method, win, variants[win])
    if R.args.only:
        matrix(R, best, first=p)


def stages(R: Runner, best):
    """r = 1.0 keeps nothing: what a call costs before any row is gathered."""
    p = _start(R)
    fused = R.scale.fused
    R.profile_baseline(p)
    for method in METHODS:
        R.pallas(p, method, best[method], fused[best[method]], (0.9, 1.0))
        for r in (0.9, 1.0):
            R.stage_profile(p, method, "pallas-fused", best[method], r)


PLANS = {"tune": tune, "matrix": matrix, "xla-scores": xla_scores, "prefetch": prefetch,
         "probe": probe, "stages": stages, "proxy": proxy, "floor": floor, "union": union}
