"""bench_kernels.md and bench_kernels.png from the benchmark CSVs (numbers read, never
typed in): bench_kernels.csv (every timed row, a `run` column per device call),
bench_kernels_stages.csv (profiler stage times) and bench_kernels_runs.csv (what each run
timed and with which predictor layout and loop unroll)."""

from __future__ import annotations

import collections
import os

from .ffn_problem import CATS, D, M, METHODS
from .ffn_variants import chosen
from .harness import read_csv

SPARSITIES = ("0.0", "0.5", "0.7", "0.8", "0.9", "0.95", "1.0")



def matrix_runs(rows):
    """Runs that timed a sparse method at batch 1 on every (shape, dtype) of the CSV,
    newest first: the runs whose matrix tables and plot lines the report shows."""
    cover = collections.defaultdict(set)
    for r in rows:
        if r["us_per_call"] and r["method"] in METHODS and r["batch"] == "1":
            cover[r["run"]].add((r["shape"], r["dtype"]))
    every = set().union(*cover.values()) if cover else set()
    return tuple(sorted((run for run, c in cover.items() if c == every), key=int,
                        reverse=True))


def stage_table(path):
    """Per-kernel GPU time per call (profiler) of the chosen kernels, Llama-8B bf16 r=0.9."""
    if not os.path.exists(path):
        return []
    by = collections.defaultdict(list)
    for r in read_csv(path):
        by[(r["run"], r["method"], r["variant"], r["sparsity"])].append(r)
    L = ["## Where the time goes (profiler, Llama-3.1-8B bf16, batch 1, us of GPU time per "
         "call)", "", "Ops above 0.3 us per call; \"busy\" is the union of kernel intervals "
         "per call (the harness's input update included, ~0.3 us). `input_reduce_fusion_14` "
         "is XLA's dense GEMV (gate+up for dense, up / gate for M / CATS, z = hU^T for D), "
         "`_9` the partial-sum reduce (`_20` for dense: the down GEMV's split-K reduce). D's "
         "predictor stored V [d, r] spends `_20` + `loop_multiply_fusion_6` + `_14` on h and "
         "z; stored Vt [r, d], `_24` (h) + `_14` (z) (each run's layout: the runs table).", "",
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
    for key in sorted(groups, key=lambda k: (k[2], k[1] != "bfloat16", k[0])):
        if key == ("llama-3.1-8b", "bfloat16", 1):
            continue
        g = groups[key]
        dn = [float(r["us_per_call"]) for r in g if r["method"] == "dense"]
        dn = dn[0] if dn else None
        cols = [x for x in SPARSITIES if any(r["sparsity"] == x for r in g
                                             if r["method"] != "dense")]
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


def _llama_bf16_b1(r):
    return r["shape"] == "llama-3.1-8b" and r["dtype"] == "bfloat16" and r["batch"] == "1"


def report(csv_path, md_path, png_path):
    """Markdown tables + plot from the benchmark CSVs next to ``csv_path``."""
    here = os.path.dirname(csv_path)
    rows = read_csv(csv_path)
    runs_path = os.path.join(here, "bench_kernels_runs.csv")
    notes = {r["run"]: r for r in read_csv(runs_path)} if os.path.exists(runs_path) else {}
    runs = sorted({r["run"] for r in rows}, key=int)
    mruns = matrix_runs(rows)
    dev = sorted({r["device"] for r in rows})
    cards = {r["run"]: r["device"].replace("NVIDIA ", "") for r in rows}
    val = collections.defaultdict(dict)        # (run, method, impl, variant) -> {r: row}
    for r in rows:
        if _llama_bf16_b1(r) and r["us_per_call"]:
            val[(r["run"], r["method"], r["implementation"], r["variant"])][r["sparsity"]] = r

    def get(run, method, impl, variant, sp):
        return val.get((run, method, impl, variant), {}).get(sp)

    copy = {r["run"]: r["gb_per_s"] for r in rows if r["method"] == "hbm-copy"}
    read = {r["run"]: r["gb_per_s"] for r in rows if r["method"] == "hbm-read"}
    over = {r["run"]: r["us_per_call"] for r in rows if r["method"] == "loop-overhead"
            and _llama_bf16_b1(r)}
    dense = {run: float(get(run, "dense", "xla-dense", "einsum", "0.0")["us_per_call"])
             for run in runs if get(run, "dense", "xla-dense", "einsum", "0.0")}
    L = ["# Sparse FFN kernels: one decode token, per-FFN GPU time", "",
         f"Cards: {', '.join(dev)} (`jax.devices()[0].device_kind`), jax 0.11.2, Pallas Triton "
         "lowering. Each run is one call of the device tool; a call may get another card "
         "(the card is in every CSV row), so every run re-measures dense and the HBM "
         "ceilings and comparisons stay within a run. D's predictor hidden h = xV is "
         "computed from V [d, r] (a column reduction) or from the stored transpose Vt [r, d] "
         "(the current code, policy.py), as the runs table says. Time inside one jitted "
         "`fori_loop`, compile excluded, median of 5-7 runs; every time includes one "
         "input-update op per call (`loop-overhead` row, NOT subtracted; unrolling the loop "
         "5x cut it from 5-10 us to 3-4 us per call). GB/s = bytes the method must read / "
         "time. Full rows: `bench_kernels.csv`; per-kernel stage times: "
         "`bench_kernels_stages.csv`; what each run timed: `bench_kernels_runs.csv`; "
         "method: `bench_kernels.py` (`experiments/bench/`).", "",
         "| run | card | HBM copy (GB/s, read+write) | HBM read (GB/s) | loop overhead "
         "(us/call) | XLA dense bf16 (us) | D predictor | loop unroll | timed | note |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        n = notes.get(run, {})
        L.append(f"| {run} | {cards.get(run, '')} | {copy.get(run, '')} | {read.get(run, '-')} "
                 f"| {over.get(run, '')} | {dense.get(run, '')} | {n.get('d_predictor', '')} "
                 f"| {n.get('loop_unroll', '')} | {n.get('timed', '')} | {n.get('note', '')} |")
    L += ["", "## Summary: Llama-3.1-8B bf16, batch 1, r = 0.9, fastest checked kernel per run",
          "", "| run | XLA dense | M (pallas) | CATS (pallas) | D incl. rank-512 predictor "
          "(pallas) |", "|---|---|---|---|---|"]
    for run in runs:
        cells = []
        for method in (M, CATS, D):
            cand = [v["0.9"] for (rn, me, im, va), v in val.items()
                    if rn == run and me == method and im == "pallas-fused" and "0.9" in v
                    and "CHECK FAILED" not in v["0.9"]["note"]]
            r = min(cand, key=lambda r: float(r["us_per_call"])) if cand else None
            cells.append(f"{float(r['us_per_call']):.1f} ({r['gb_per_s']} GB/s, "
                         f"`{r['variant']}`)" if r else "-")
        L.append(f"| {run} | {dense.get(run, '-')} | " + " | ".join(cells) + " |")
    L += ["", "Chosen (the kernels' defaults): " + "; ".join(
          f"{m}: `{v}`" for m, v in chosen().items()) +
          " (`xs-` = scores from XLA's dense GEMV, sparse part in the kernel; `-pf` = the "
          "kept rows' W_down loads issued with their gate/up loads; `cN` = kept rows "
          "compacted into tiles of N; `pN` = N programs). Targets (issue 5, on an H100): M, "
          "CATS <= 55 us and D <= 30 us; see the stage table and KERNEL_NOTES.md for what "
          "separates each kernel from them. Official release on an H100 (anchors.md): M 90, "
          "D 74, dense 134 us.", ""]
    L += stage_table(os.path.join(here, "bench_kernels_stages.csv"))
    for run in mruns:
        L += matrix_tables(rows, run)
    L += [
"## Llama-3.1-8B MLP (4096 x 14336), bf16, batch 1, r = 0.9, every variant", "",
          "| run | method | implementation | variant | us | x dense (same run) | GB/s needed-bytes | "
          "% of HBM ceiling (read; copy where the run has no read row) | check |",
          "|---|---|---|---|---|---|---|---|---|"]
    for (run, method, impl, variant), by in sorted(val.items()):
        r = by.get("0.9")
        if r is None or method in ("dense", "loop-overhead"):
            continue
        us = float(r["us_per_call"])
        chk = "count mismatch (see the run's note)" if "CHECK FAILED" in r["note"] \
            else f"rel {r['rel_err']}"
        ceil = read.get(run) or copy.get(run)
        pct = f"{100 * float(r['gb_per_s']) / float(ceil):.0f}%" if ceil else ""
        L.append(f"| {run} | {method} | {impl} | {variant} | {us:.1f} | "
                 f"{dense[run] / us:.2f} | {r['gb_per_s']} | {pct} | {chk} |")
    L += ["", "## Sparsity sweep, Llama-3.1-8B bf16 batch 1 (us per FFN call)", "",
          "| run | method | implementation | variant | " + " | ".join(
              f"r={x}" for x in SPARSITIES) + " | dense |", "|---" * 12 + "|"]
    for (run, method, impl, variant), by in sorted(val.items()):
        if len(by) < 3:
            continue
        cells = [by[x]["us_per_call"] if x in by else "" for x in SPARSITIES]
        L.append(f"| {run} | {method} | {impl} | {variant} | " + " | ".join(cells) +
                 f" | {dense.get(run, '')} |")
    L += ["", "r = 1.0 keeps nothing: it is the cost of the dense scoring stage alone "
          "(XLA GEMV + empty sparse kernel + reduce for `xs-` variants; the in-kernel scoring "
          "stream for the others).", ""]
    other = [r for r in rows if r["us_per_call"] and r["method"] not in ("loop-overhead",)
             and not _llama_bf16_b1(r) and r["run"] not in mruns]
    if other:
        L += ["## Other shapes, runs without the full matrix", "",
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
    with open(md_path, "w") as fh:
        fh.write("\n".join(L) + "\n")
    plot(rows, val, dense, mruns, cards, png_path)


def plot(rows, val, dense, mruns, cards, png_path):
    """Left: Llama bf16 batch-1 sweeps of the matrix runs (newest solid); right: the chosen
    kernels' speedup over the same run's dense, every shape and dtype, newest matrix run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    newest = mruns[0] if mruns else None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    colors = {M: "tab:blue", CATS: "tab:orange", D: "tab:green"}
    for (run, method, impl, variant), by in sorted(val.items()):
        if len(by) < 3 or method not in colors or run not in mruns:
            continue
        xs_ = sorted(float(x) for x in by if float(x) < 1.0)
        ys = [float(by[str(x)]["us_per_call"]) for x in xs_]
        ax.plot(xs_, ys, "-" if run == newest else ":", marker="o", color=colors[method],
                alpha=1.0 if impl == "pallas-fused" else 0.45,
                label=f"{method} {impl} {variant} (run {run})")
    for run in mruns:
        if run in dense:
            ax.axhline(dense[run], color="black", lw=1, ls="-" if run == newest else ":",
                       label=f"XLA dense bf16 (run {run})")
    ax.set_xlabel("sparsity r")
    ax.set_ylabel("us per FFN call (one token)")
    ax.set_title("Llama-3.1-8B MLP bf16, batch 1: " + ", ".join(
        f"run {run} {cards.get(run, '')}" + (" solid" if run == newest else " dotted")
        for run in mruns), fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    marks = {"llama-3.1-8b": "o", "gemma-2-9b": "s", "qwen2.5-14b": "^", "phi-4": "D"}
    dn = {(r["shape"], r["dtype"]): float(r["us_per_call"]) for r in rows
          if r["run"] == newest and r["method"] == "dense" and r["batch"] == "1"
          and r["us_per_call"]}
    for method, variant in chosen().items():
        for (shape, dtype), d0 in sorted(dn.items()):
            pts = sorted((float(r["sparsity"]), d0 / float(r["us_per_call"])) for r in rows
                         if r["run"] == newest and r["shape"] == shape and r["dtype"] == dtype
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
    bx.set_title(f"Chosen kernels, every shape, bf16 (solid) / fp32 (dashed), run {newest} "
                 f"({cards.get(newest, '')})", fontsize=9)
    bx.legend(fontsize=5, ncol=3)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
