"""Plan "floor": the fused kernels' fixed overhead against the byte floor, and decode
batches through ``batch_dispatch``, in ONE GPU process (budget ~170 s, compile included).

1. HBM ceilings; Llama-3.1-8B bf16 batch 1: the loop's own cost, XLA dense; M, CATS and D
   (rank-512 predictor) at r = 0.5, 0.9 and 1.0 (nothing kept), the shipped kernels
   ("old") against the overhead variants (``floor_variants``), each row checked against
   the float32 reference; byte floors at the measured read ceiling.
2. Batches (--batches) at r = 0.5, 0.7, 0.9: XLA dense, the dispatch (``lax.switch`` on
   the union's size) and forced branches (``FORCED``: union kernels with and without the
   XLA-compacted list, per-token lists, masked dense), the union's realised share
   (``kept_frac`` of those rows).
3. If time is left: stage profiles (per-kernel GPU time) of the old and new batch-1 kernels.
Writes bench_kernels.csv (+ _stages.csv) and bench_kernels_floor.md into --out.

Plan "union" (``union``): decode batches (--batches) at r = 0.5, 0.7, 0.9 for M and D:
XLA dense, the union read once by the GEMV kernel with row predicates (``UNION_GEMV``:
its configs for gate / up and for down), per-token lists and the masked dense branch,
each checked against the float32 reference; bench_kernels_union.md.
"""

from __future__ import annotations

import collections
import os

import jax.numpy as jnp

from countdown_jax.batch_dispatch import BatchDispatch
from countdown_jax.kernels.gemv.pallas_gpu import GemvConfig

from .ffn_problem import dispatch_step
from .ffn_runner import Runner, log
from .ffn_variants import floor_variants

LLAMA = "llama-3.1-8b"
BATCH_RATIOS = (0.5, 0.7, 0.9)
# forced branches per method, to keep one process within ~3 minutes of compiles: CATS
# reads what M reads (only its union branch is forced), per-token lists are timed for M
# (they lost to dense at batch 4 / 8 before), the masked dense branch's cost does not
# depend on r (M only, at r = 0.9)
FORCED = {"m": ("union", "union-nolist", "rows", "dense"),
          "d": ("union", "union-nolist"), "cats": ("union",)}


def floor(R: Runner, best=None):
    R.add_ceilings()
    read_bw = float(next(r["gb_per_s"] for r in R.rows if r["method"] == "hbm-read"))
    p1 = p = R.problem(LLAMA, jnp.bfloat16, 1)
    R.baseline(p)
    won = {}
    for method, variants in floor_variants().items():
        res = {}
        for label, cfg in variants.items():
            if R.left() < 100:                   # keep most of the time for the batches
                log(f"budget: skip {method} {label}")
                break
            t = R.pallas(p, method, label, cfg, (0.9, 0.5, 1.0))
            if 0.9 in t:
                res[label] = t[0.9]
        if res:
            won[method] = min(res, key=res.get)
            log(f"floor {method}: fastest at r=0.9 {won[method]} {res[won[method]]:.2f} us")
    for batch in R.args.batches:
        if R.left() < 30:
            R.add(shape=LLAMA, dtype="bfloat16", batch=batch, note="not run: time budget")
            continue
        p = R.problem(LLAMA, jnp.bfloat16, batch)
        R.baseline(p)
        for method in ("m", "d", "cats"):
            for force in (None, *FORCED[method]):
                if R.left() < 25:
                    break
                R.time_variant(p, method, "batch-dispatch", force or "dispatch",
                               dispatch_step(p, method, force),
                               BATCH_RATIOS if force != "dense" else (0.9,))
        del p
    if R.left() > 40:              # batch 1's compiled loops are still cached on p1
        R.profile_baseline(p1)
        for method, label in won.items():
            old = next(iter(floor_variants()[method]))
            for lab in dict.fromkeys((old, label)):
                for r in (0.9, 1.0):
                    R.stage_profile(p1, method, "pallas-fused", lab, r)
    write_markdown(R, read_bw)


def write_markdown(R: Runner, read_bw: float):
    """bench_kernels_floor.md: batch-1 table with byte floors, batch table with speed-ups."""
    rows = [r for r in R.rows if r["us_per_call"] and "poison" not in r["variant"]]
    dense = {r["batch"]: float(r["us_per_call"]) for r in rows if r["method"] == "dense"}
    loop = {r["batch"]: r["us_per_call"] for r in rows if r["method"] == "loop-overhead"}
    L = ["# Fixed overhead and batch dispatch (bench_kernels.py --plan floor)", "",
         f"Card: {R.device}; HBM read ceiling {read_bw:.0f} GB/s (same run); floor = bytes "
         "the method must read / that ceiling. Every time includes the timing loop's own "
         f"cost per call (loop-overhead row: {loop.get(1, '-')} us at batch 1). Rows failing "
         "the reference check are marked.", "",
         "## Batch 1, Llama-3.1-8B bf16 (us per FFN call)", "",
         "| method | variant | r | us | floor | over floor | GB/s | check |",
         "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["batch"] != 1 or r["implementation"] != "pallas-fused":
            continue
        fl = float(r["bytes_needed"]) / read_bw / 1e3 if r["bytes_needed"] else float("nan")
        us = float(r["us_per_call"])
        L.append(f"| {r['method']} | `{r['variant']}` | {r['sparsity']} | {us:.1f} | "
                 f"{fl:.1f} | {us - fl:+.1f} | {r['gb_per_s']} | "
                 f"{'FAILED' if 'FAILED' in r['note'] else 'ok'} |")
    L += ["", f"XLA dense batch 1: {dense.get(1, float('nan')):.1f} us.", "",
          "## Batches: dispatch and forced branches (us per FFN call; x = dense / time)", "",
          "union share = the realised fraction of m kept by any token of the batch.", "",
          "| batch | method | r | union share | dense | dispatch | union | union, no list | "
          "rows | masked dense |", "|---|---|---|---|---|---|---|---|---|---|"]
    by = collections.defaultdict(dict)
    share = {}
    for r in rows:
        if r["implementation"] == "batch-dispatch":
            key = (r["batch"], r["method"], r["sparsity"])
            by[key][r["variant"]] = float(r["us_per_call"]), "FAILED" in r["note"]
            share[key] = r["kept_frac"]
    dense_m = {(k[0], k[1]): v["dense"] for k, v in by.items() if "dense" in v}
    for (b, method, sp), v in by.items():
        if "dense" in v and len(v) == 1:
            continue
        base = dense.get(b)

        def cell(t):
            if t is None:
                return "-"
            us, bad = t
            return f"{us:.1f} ({base / us:.2f}x){' FAILED' if bad else ''}" if base else f"{us:.1f}"
        L.append(f"| {b} | {method} | {sp} | {share[(b, method, sp)]} | "
                 f"{base if base is None else f'{base:.1f}'} | {cell(v.get('dispatch'))} | "
                 f"{cell(v.get('union'))} | {cell(v.get('union-nolist'))} | "
                 f"{cell(v.get('rows'))} | "
                 f"{cell(dense_m.get((b, method)))} |")
    path = os.path.join(R.args.out, "bench_kernels_floor.md")
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")
    log(f"wrote {path}")


def _gemv(bn, bd, split, stages=1, warps=4, dot=True):
    return GemvConfig(block_n=bn, block_d=bd, split_d=split, num_stages=stages,
                      num_warps=warps, dot=dot)


def _union(gate=None, down=None):
    return BatchDispatch(force="union", union_impl="gemv", gemv_configs=(gate, down))


# The tensor-core dot GEMV (session 9, first run: the FMA GEMV unrolls the tokens and ran
# 0.24-0.80x dense, the dot 0.66-0.99x): its default tiles, then one side changed at a
# time: gate / up rows (W [m, d] transposed: [bn neurons, bd] tiles) and W_down's rows
# (W [m, d] plain: [bd neurons, bn] tiles; more programs for its 4096 output columns).
_GATE = {"g64x128s4": _gemv(64, 128, 4), "g32x256s2": _gemv(32, 256, 2),
         "g128x64s4": _gemv(128, 64, 4), "g64x128s4st3": _gemv(64, 128, 4, stages=3),
         "g64x256s2st3": _gemv(64, 256, 2, stages=3), "g16x512s1": _gemv(16, 512, 1),
         "g128x128s4w8": _gemv(128, 128, 4, warps=8)}
_DOWN = {"d64x128s4": _gemv(64, 128, 4), "d64x64s16": _gemv(64, 64, 16),
         "d32x128s8": _gemv(32, 128, 8), "d128x64s8": _gemv(128, 64, 8),
         "d64x128s8st3": _gemv(64, 128, 8, stages=3), "d32x64s16": _gemv(32, 64, 16),
         "d128x128s8w8": _gemv(128, 128, 8, warps=8)}
UNION_GEMV = {
    "dot": _union(_GATE["g64x128s4"], _DOWN["d64x128s4"]),
    **{f"dot-{k}": _union(v, _DOWN["d64x128s4"]) for k, v in _GATE.items()
       if k != "g64x128s4"},
    **{f"dot-{k}": _union(_GATE["g64x128s4"], v) for k, v in _DOWN.items()
       if k != "d64x128s4"},
    "rows": BatchDispatch(force="rows"),
    "dense": BatchDispatch(force="dense"),
}


def union(R: Runner, best=None):
    R.add_ceilings()
    read_bw = float(next(r["gb_per_s"] for r in R.rows if r["method"] == "hbm-read"))
    for batch in R.args.batches:
        if R.left() < 30:
            R.add(shape=LLAMA, dtype="bfloat16", batch=batch, note="not run: time budget")
            continue
        p = R.problem(LLAMA, jnp.bfloat16, batch)
        R.baseline(p)
        for method in [m for m in ("m", "d", "cats") if m in R.args.methods]:
            for label, cfg in UNION_GEMV.items():
                if R.left() < 25:
                    break
                R.time_variant(p, method, "batch-union", label,
                               dispatch_step(p, method, cfg=cfg),
                               BATCH_RATIOS if label != "dense" else (0.9,))
        del p
        write_union_markdown(R, read_bw)


def write_union_markdown(R: Runner, read_bw: float):
    """bench_kernels_union.md: per batch, method and r, each branch's us and x dense."""
    rows = [r for r in R.rows if r["us_per_call"]]
    dense = {r["batch"]: float(r["us_per_call"]) for r in rows if r["method"] == "dense"}
    labels = list(UNION_GEMV)
    L = ["# Decode batches: the union read once by the GEMV (bench_kernels.py --plan union)",
         "", f"Card: {R.device}; HBM read ceiling {read_bw:.0f} GB/s (same run). us per FFN "
         "call (Llama-3.1-8B bf16, incl. the timing loop's cost), x = XLA dense / time; "
         "union share = the realised fraction of m kept by any token; rows failing the "
         "reference check say FAILED.", "",
         "| batch | method | r | union share | dense | " + " | ".join(labels) + " |",
         "|---|---|---|---|---|" + "---|" * len(labels)]
    by = collections.defaultdict(dict)
    share = {}
    for r in rows:
        if r["implementation"] == "batch-union":
            key = (r["batch"], r["method"], r["sparsity"])
            by[key][r["variant"]] = float(r["us_per_call"]), "FAILED" in r["note"]
            if r["variant"] != "rows":
                share[key] = r["kept_frac"]
    for (b, method, sp), v in sorted(by.items()):
        base = dense.get(b)
        cells = []
        for lab in labels:
            t = v.get(lab)
            if lab == "dense" and t is None:       # timed at r = 0.9 only: r-independent
                t = next((w.get("dense") for k, w in by.items() if k[:2] == (b, method)
                          and "dense" in w), None)
            cells.append("-" if t is None else
                         f"{t[0]:.1f} ({base / t[0]:.2f}x){' FAILED' if t[1] else ''}"
                         if base else f"{t[0]:.1f}")
        L.append(f"| {b} | {method} | {sp} | {share.get((b, method, sp), '-')} | "
                 f"{'-' if base is None else f'{base:.1f}'} | " + " | ".join(cells) + " |")
    path = os.path.join(R.args.out, "bench_kernels_union.md")
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")
    log(f"wrote {path}")
