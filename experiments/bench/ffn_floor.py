"""Plans "floor" and "union", each ONE GPU process.

floor (budget ~170 s, compile included):
1. HBM ceilings; Llama-3.1-8B bf16 batch 1: the loop's own cost, XLA dense; M, CATS and D
   (rank-512 predictor) at r = 0.5, 0.9 and 1.0 (nothing kept), the shipped kernels
   ("old") against the overhead variants (``floor_variants``), each row checked against
   the float32 reference; byte floors at the measured read ceiling.
2. If time is left: stage profiles (per-kernel GPU time) of the old and new batch-1 kernels.
Writes bench_kernels.csv (+ _stages.csv) and bench_kernels_floor.md into --out.

union: decode batches (--batches) at r = 0.5, 0.7, 0.9 for --methods: XLA dense, the
union read once by the GEMV with row predicates (``batch_union``) with its GEMV tiles
(``UNION_TILES``: its defaults, then the gate / up side or the W_down side changed), the
union as an index list (form="compact", ``COMPACT_TILES``), per-token index lists and
masked dense, each checked against the float32 reference, the union's realised share and
the byte floor beside them; bench_kernels_union.md. --labels: only those columns.
"""

from __future__ import annotations

import collections
import os

import jax.numpy as jnp

from countdown_jax.batch_union import DOWN_CONFIG, GATE_CONFIG
from countdown_jax.kernels.gemv.pallas_gpu import GemvConfig

from .ffn_problem import CATS, D, M, batch_step
from .ffn_runner import Runner, log
from .ffn_variants import floor_variants

LLAMA = "llama-3.1-8b"
BATCH_RATIOS = (0.5, 0.7, 0.9)


def floor(R: Runner, best=None):
    R.add_ceilings()
    read_bw = float(next(r["gb_per_s"] for r in R.rows if r["method"] == "hbm-read"))
    p1 = p = R.problem(LLAMA, jnp.bfloat16, 1)
    R.baseline(p)
    won = {}
    for method, variants in floor_variants().items():
        res = {}
        for label, cfg in variants.items():
            if R.left() < 60:                    # keep time for the stage profiles
                log(f"budget: skip {method} {label}")
                break
            t = R.pallas(p, method, label, cfg, (0.9, 0.5, 1.0))
            if 0.9 in t:
                res[label] = t[0.9]
        if res:
            won[method] = min(res, key=res.get)
            log(f"floor {method}: fastest at r=0.9 {won[method]} {res[won[method]]:.2f} us")
    if R.left() > 40:              # batch 1's compiled loops are still cached on p1
        R.profile_baseline(p1)
        for method, label in won.items():
            old = next(iter(floor_variants()[method]))
            for lab in dict.fromkeys((old, label)):
                for r in (0.9, 1.0):
                    R.stage_profile(p1, method, "pallas-fused", lab, r)
    write_markdown(R, read_bw)


def write_markdown(R: Runner, read_bw: float):
    """bench_kernels_floor.md: the batch-1 table with byte floors."""
    rows = [r for r in R.rows if r["us_per_call"] and "poison" not in r["variant"]]
    dense = {r["batch"]: float(r["us_per_call"]) for r in rows if r["method"] == "dense"}
    loop = {r["batch"]: r["us_per_call"] for r in rows if r["method"] == "loop-overhead"}
    L = ["# Fixed overhead (bench_kernels.py --plan floor)", "",
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
    L += ["", f"XLA dense batch 1: {dense.get(1, float('nan')):.1f} us."]
    path = os.path.join(R.args.out, "bench_kernels_floor.md")
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")
    log(f"wrote {path}")


def _gemv(bn, bd, split, stages=1, warps=4, dot=True):
    return GemvConfig(block_n=bn, block_d=bd, split_d=split, num_stages=stages,
                      num_warps=warps, dot=dot)


# The union's GEMV tiles (bench_kernels_union.md: the FMA GEMV unrolls the tokens and
# ran 0.24-0.80x dense at batches 2-8; the tensor-core dot 0.66-0.99x): the shipped defaults
# (``batch_union``), then one side changed at a time: gate / up rows (W [m, d]
# transposed: [bn neurons, bd] tiles) and W_down's rows (W [m, d] plain: [bd neurons, bn]
# tiles; more programs for its 4096 output columns).
_GATE = {"g64x128s4": _gemv(64, 128, 4), "g32x256s2st3": _gemv(32, 256, 2, stages=3),
         "g128x64s4st3": _gemv(128, 64, 4, stages=3),
         "g64x256s2st3": _gemv(64, 256, 2, stages=3)}
_DOWN = {"d64x128s4st3": _gemv(64, 128, 4, stages=3), "d64x64s16st3": _gemv(64, 64, 16,
                                                                          stages=3),
         "d128x128s8w8": _gemv(128, 128, 8, warps=8), "d64x128s16st3": _gemv(64, 128, 16,
                                                                            stages=3)}
UNION_TILES = {"union": (GATE_CONFIG, DOWN_CONFIG),
               **{f"union-{k}": (v, DOWN_CONFIG) for k, v in _GATE.items()},
               **{f"union-{k}": (GATE_CONFIG, v) for k, v in _DOWN.items()}}
# The compact form (the union as an index list): the shipped tiles, then one side
# changed. Gate / up: active programs = ceil(count / bn) x split (at batch 2, r = 0.9 the
# union is ~2.7k rows: 43 x 4 with bn 64 - so smaller bn or split 8); W_down: its d / bn
# column blocks x split, each over ceil(count / bd / split) blocks of rows.
_COMPACT_GATE = {"g32x128s4st3": _gemv(32, 128, 4, stages=3),
                 "g64x128s8st3": _gemv(64, 128, 8, stages=3),
                 "g128x128s4st3": _gemv(128, 128, 4, stages=3)}
_COMPACT_DOWN = {"d64x128s4st3": _gemv(64, 128, 4, stages=3),
                 "d32x128s8st3": _gemv(32, 128, 8, stages=3)}
COMPACT_TILES = {"compact": (GATE_CONFIG, DOWN_CONFIG),
                 **{f"compact-{k}": (v, DOWN_CONFIG) for k, v in _COMPACT_GATE.items()},
                 **{f"compact-{k}": (GATE_CONFIG, v) for k, v in _COMPACT_DOWN.items()}}
# label -> (batch kind, GEMV tiles)
UNION_STEPS = {**{k: ("union", v) for k, v in UNION_TILES.items()},
               **{k: ("compact", v) for k, v in COMPACT_TILES.items()},
               "lists": ("lists", None), "masked": ("masked", None)}


def union_labels(wanted=None):
    """The UNION_STEPS labels to time, in table order (None / empty: all); an unknown
    label is a ValueError listing the known ones."""
    if not wanted:
        return list(UNION_STEPS)
    bad = [w for w in wanted if w not in UNION_STEPS]
    if bad:
        raise ValueError(f"--labels: unknown {bad}; known: {' '.join(UNION_STEPS)}")
    return [k for k in UNION_STEPS if k in wanted]


def union(R: Runner, best=None):
    labels = union_labels(getattr(R.args, "labels", None))
    R.add_ceilings()
    read_bw = float(next(r["gb_per_s"] for r in R.rows if r["method"] == "hbm-read"))
    for batch in R.args.batches:
        if R.left() < 30:
            R.add(shape=LLAMA, dtype="bfloat16", batch=batch, note="not run: time budget")
            continue
        p = R.problem(LLAMA, jnp.bfloat16, batch)
        R.baseline(p)
        for method in [m for m in (M, D, CATS) if m in R.args.methods]:
            for label in labels:
                if R.left() < 25:
                    break
                kind, tiles = UNION_STEPS[label]
                R.time_variant(p, method, "batch-union", label,
                               batch_step(p, method, kind, tiles),
                               BATCH_RATIOS if label != "masked" else (0.9,))
        del p
        write_union_markdown(R, read_bw, labels)


def write_union_markdown(R: Runner, read_bw: float, labels=None):
    """bench_kernels_union.md: per batch, method and r, each branch's us and x dense."""
    rows = [r for r in R.rows if r["us_per_call"]]
    dense = {r["batch"]: float(r["us_per_call"]) for r in rows if r["method"] == "dense"}
    labels = labels or list(UNION_STEPS)
    L = ["# Decode batches: the union read once by the GEMV (bench_kernels.py --plan union)",
         "", f"Card: {R.device}; HBM read ceiling {read_bw:.0f} GB/s (same run). us per FFN "
         "call (Llama-3.1-8B bf16, incl. the timing loop's cost), x = XLA dense / time; "
         "union share = the realised fraction of m kept by any token; floor = the bytes "
         "the method must read with that union / the read ceiling; `union*` = the union "
         "as a row predicate, `compact*` = as an index list; rows failing the reference "
         "check say FAILED.", "",
         "| batch | method | r | union share | dense | floor | " + " | ".join(labels) + " |",
         "|---|---|---|---|---|---|" + "---|" * len(labels)]
    by = collections.defaultdict(dict)
    share, floor_us = {}, {}
    for r in rows:
        if r["implementation"] == "batch-union":
            key = (r["batch"], r["method"], r["sparsity"])
            by[key][r["variant"]] = float(r["us_per_call"]), "FAILED" in r["note"]
            if r["variant"] != "lists":
                share[key] = r["kept_frac"]
                if r["bytes_needed"]:
                    floor_us[key] = float(r["bytes_needed"]) / read_bw / 1e3
    for (b, method, sp), v in sorted(by.items()):
        base = dense.get(b)
        cells = []
        for lab in labels:
            t = v.get(lab)
            if lab == "masked" and t is None:      # timed at r = 0.9 only: r-independent
                t = next((w.get("masked") for k, w in by.items() if k[:2] == (b, method)
                          and "masked" in w), None)
            cells.append("-" if t is None else
                         f"{t[0]:.1f} ({base / t[0]:.2f}x){' FAILED' if t[1] else ''}"
                         if base else f"{t[0]:.1f}")
        fl = floor_us.get((b, method, sp))
        L.append(f"| {b} | {method} | {sp} | {share.get((b, method, sp), '-')} | "
                 f"{'-' if base is None else f'{base:.1f}'} | "
                 f"{'-' if fl is None else f'{fl:.1f}'} | " + " | ".join(cells) + " |")
    path = os.path.join(R.args.out, "bench_kernels_union.md")
    with open(path, "w") as fh:
        fh.write("\n".join(L) + "\n")
    log(f"wrote {path}")
