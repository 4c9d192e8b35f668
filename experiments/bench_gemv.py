"""Decode projections as GEMVs: XLA's x @ W against the Pallas GEMV (kernels/gemv) over a
sweep of its configs, at Llama-3.1-8B shapes and their 2-way tensor-parallel shards.

Run on a GPU, from the repository root (about 2 minutes on an H200):
    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 experiments/bench_gemv.py --out DIR
CPU smoke run (tiny shapes, the kernel in the Pallas interpreter):
    python -m experiments.bench_gemv --tiny --out /tmp/gemv

Each (shape, batch, implementation) is checked first - its first output against the
float32 reference (``gemv_reference``) - and only then timed: one jitted program calls it
``iters`` x ``sets`` times inside a ``lax.fori_loop`` over ``sets`` weight copies (more
bytes than the L2), each output fed back into the next input (``harness.timed_loop``).
The feedback (output trimmed / padded to d) is one tiny op per call, timed on its own as
the "loop+feedback" row and not subtracted. A failing or wrong config is recorded and
skipped. GB/s counts the weight bytes (what a GEMV must read) against the measured HBM
read ceiling (``harness.ceilings``). Writes bench_gemv.csv and bench_gemv.md to --out.

Configs (--configs, comma list): tokens joined by "-": bn<block_n> bd<block_d>
s<split_d> w<num_warps> st<num_stages> df<defer> dot (tensor cores) t (W stored [n, d]).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax.kernels._platform import interpret_mode
from countdown_jax.kernels.gemv.api import gemv
from countdown_jax.kernels.gemv.pallas_gpu import GemvConfig
from countdown_jax.kernels.gemv.reference import gemv_reference, gemv_xla
from experiments.bench.harness import ceilings, gb_per_s, measure, timed_loop, write_csv
from experiments.bench.shapes import LLAMA_3_1_8B

D = LLAMA_3_1_8B["hidden_size"]
QW = LLAMA_3_1_8B["num_attention_heads"] * LLAMA_3_1_8B["head_dim"]
KW = LLAMA_3_1_8B["num_key_value_heads"] * LLAMA_3_1_8B["head_dim"]
# name -> (d, n): x [B, d] @ W [d, n]
SHAPES = {"q,o": (D, QW), "k,v": (D, KW), "qkv fused": (D, QW + 2 * KW),
          "tp2 q": (D, QW // 2), "tp2 o": (QW // 2, D), "tp2 k,v": (D, KW // 2)}
TINY_SHAPES = {"ragged": (200, 333), "narrow": (96, 40)}
CONFIGS = ("bn64-bd128,bn128-bd64,bn32-bd256,bn64-bd128-s4,bn128-bd128-s8,bn64-bd128-dot,"
           "bn128-bd64-dot-s4,bn128-bd128-w8,t-bn16-bd512,t-bn32-bd256-s2")
TINY_CONFIGS = "bn64-bd32,bn32-bd64-s3,bn32-bd32-dot,t-bn16-bd64-s2"
L2_BYTES = 50 << 20           # H100 / H200: the weight sets of a program read more
MAX_SETS = 16
CALLS_PER_ITER = 12           # calls per loop iteration (sets x unroll): amortise its
                              # host round trip (harness.UNROLL)
TOL = {"bfloat16": 2 ** -7, "float16": 2 ** -9, "float32": 1e-5}


def parse_config(name: str):
    """'bn64-bd128-s4-dot-t' -> (GemvConfig, transposed)."""
    kw, transposed = {}, False
    keys = (("bn", "block_n"), ("bd", "block_d"), ("st", "num_stages"), ("s", "split_d"),
            ("w", "num_warps"), ("df", "defer"))
    for tok in name.split("-"):
        if tok == "t":
            transposed = True
        elif tok == "dot":
            kw["dot"] = True
        else:
            for prefix, field in keys:
                if tok.startswith(prefix) and tok[len(prefix):].isdigit():
                    kw[field] = int(tok[len(prefix):])
                    break
            else:
                raise ValueError(f"config {name!r}: unknown token {tok!r}")
    return GemvConfig(**kw), transposed


def implementations(config_names):
    """name -> (transposed, f(x, w) -> [B, n]) for XLA and each Pallas config; a config
    that does not parse -> (False, the error), recorded as such."""
    out = {"xla": (False, lambda x, w: gemv_xla(x, w)),
           "xla t": (True, lambda x, w: gemv_xla(x, w, transposed=True))}
    for name in config_names:
        try:
            cfg, tr = parse_config(name)
        except ValueError as e:
            out[f"pallas {name}"] = (False, e)
            continue
        out[f"pallas {name}"] = (tr, lambda x, w, cfg=cfg, tr=tr: gemv(
            x, w, transposed=tr, implementation="pallas", config=cfg))
    return out


def fit(y, d: int):
    """[B, n] -> [B, d] (trimmed or zero-padded): the next input of the timed loop."""
    n = y.shape[1]
    return y[:, :d] if n >= d else jnp.pad(y, ((0, 0), (0, d - n)))


def bench_one(f, x, ws, iters: int, reps: int):
    """(median, min, max us per call, first-run seconds) of f(x, w) over the weight sets
    in a timed loop."""
    d = x.shape[1]
    ones = jnp.ones((len(ws),), jnp.float32)
    step = lambda x, w, _: (fit(f(x, w), d), jnp.ones(x.shape[:1], jnp.int32))
    run = timed_loop(step, len(ws), iters, unroll=max(1, -(-CALLS_PER_ITER // len(ws))))
    return measure(run, (x, ws, ones), iters * len(ws) + 1, reps)[:4]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    ap.add_argument("--tiny", action="store_true", help="tiny shapes, interpret mode (CPU)")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--shapes", default="", help="comma list of shape names (default all)")
    ap.add_argument("--configs", default=None, help="Pallas configs (see above)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget-s", type=float, default=240.0,
                    help="start no new row after this many seconds (recorded as skipped)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        shapes = {k: shapes[k] for k in args.shapes.split(",")}
    impls = implementations((args.configs or (TINY_CONFIGS if args.tiny else CONFIGS))
                            .split(","))
    dtype = jnp.dtype(args.dtype)
    dev = jax.devices()[0].device_kind
    _, read_bw = ceilings(n=1 << 16 if args.tiny else 1 << 29, reps=1 if args.tiny else 5)
    print(f"{dev}: HBM read ceiling {read_bw:.0f} GB/s", flush=True)
    rows = []

    def record(**row):
        rows.append(dict(device=dev, dtype=args.dtype, **row))
        print({k: v for k, v in row.items() if v != ""}, flush=True)
        write_csv(os.path.join(args.out, "bench_gemv.csv"), rows)

    for B in (int(b) for b in args.batches.split(",")):
        for shape, (d, n) in shapes.items():
            nbytes = d * n * dtype.itemsize
            nsets = 1 if args.tiny else min(MAX_SETS, 1 + math.ceil(L2_BYTES / nbytes))
            key = jax.random.key(d * n + B)
            w = [(jax.random.normal(jax.random.fold_in(key, i), (d, n), jnp.float32)
                  * d ** -0.5).astype(dtype) for i in range(nsets)]
            wt = [a.T.copy() for a in w]                      # the [n, d] layout
            x = jax.random.normal(jax.random.fold_in(key, nsets), (B, d), jnp.float32
                                  ).astype(dtype)
            ref = np.asarray(gemv_reference(x, w[0], out_dtype=jnp.float32))
            base = dict(shape=shape, d=d, n=n, batch=B, weight_bytes=nbytes, sets=nsets)
            us, *_ = bench_one(lambda x, w: x[:, :1] * 0, x, w, args.iters, args.reps)
            record(**base, impl="loop+feedback", status="ok", us_per_call=round(us, 2))
            for name, (tr, f) in impls.items():
                if time.perf_counter() - t0 > args.budget_s:
                    record(**base, impl=name, status="skipped: budget")
                    continue
                try:
                    if isinstance(f, Exception):
                        raise f
                    ws = wt if tr else w
                    with interpret_mode(args.tiny):      # correctness first, then time
                        y = np.asarray(jax.jit(f)(x, ws[0]), np.float32)
                        err = float(np.max(np.abs(y - ref)) / np.max(np.abs(ref)))
                        if err > TOL[args.dtype]:
                            record(**base, impl=name, status="wrong", rel_err=f"{err:.2e}")
                            continue
                        us, lo, hi, first_s = bench_one(f, x, ws, args.iters, args.reps)
                    bw = gb_per_s(nbytes, us)
                    record(**base, impl=name, status="ok", rel_err=f"{err:.2e}",
                           us_per_call=round(us, 2), us_min=round(lo, 2), us_max=round(hi, 2),
                           gb_per_s=round(bw), pct_of_read=round(float(100 * bw / read_bw), 1),
                           compile_s=round(first_s, 2))
                except Exception as e:            # noqa: BLE001 - record and go on
                    traceback.print_exc(limit=3)
                    record(**base, impl=name, status=f"error: {type(e).__name__}: "
                                                     f"{str(e).splitlines()[0][:200]}")
            del w, wt
    write_markdown(os.path.join(args.out, "bench_gemv.md"), rows, dev, read_bw, args)
    print(f"wrote {args.out}/bench_gemv.csv, bench_gemv.md in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def write_markdown(path, rows, dev, read_bw, args):
    """Per (batch, shape): every implementation, fastest first, against XLA's [d, n]."""
    lines = [f"# Decode GEMVs: XLA x @ W vs the Pallas GEMV ({dev}, {args.dtype})", "",
             f"HBM read ceiling {read_bw:.0f} GB/s. us per call includes the loop+feedback "
             "row's overhead (not subtracted). Produced by experiments/bench_gemv.py.", ""]
    groups = {}
    for r in rows:
        groups.setdefault((r["batch"], r["shape"]), []).append(r)
    for (B, shape), rs in groups.items():
        xla = next((r for r in rs if r["impl"] == "xla" and r.get("status") == "ok"), None)
        fb = next((r["us_per_call"] for r in rs if r["impl"] == "loop+feedback"), "")
        rs = [r for r in rs if r["impl"] != "loop+feedback"]
        lines += [f"## batch {B}, {shape}: d={rs[0]['d']} -> n={rs[0]['n']} "
                  f"({rs[0]['weight_bytes'] / 2**20:.1f} MiB, {rs[0]['sets']} sets; "
                  f"loop+feedback alone {fb} us/call)", "",
                  "| impl | us/call | GB/s | % of read | vs xla | status |",
                  "|---|---|---|---|---|---|"]
        timed = sorted((r for r in rs if r.get("us_per_call", "") != ""),
                       key=lambda r: r["us_per_call"])
        for r in timed + [r for r in rs if r.get("us_per_call", "") == ""]:
            speed = (f"{xla['us_per_call'] / r['us_per_call']:.2f}x"
                     if xla and r.get("us_per_call") not in ("", None) else "")
            lines.append(f"| {r['impl']} | {r.get('us_per_call', '')} | "
                         f"{r.get('gb_per_s', '')} | {r.get('pct_of_read', '')} | {speed} | "
                         f"{r.get('status', '')} |")
        lines.append("")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


if __name__ == "__main__":
    main()
    sys.exit(0)
