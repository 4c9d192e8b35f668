"""Markdown tables from experiments/results/quality.csv (for RESULTS.md).

    python experiments/summarize_quality.py [--csv experiments/results/quality.csv]

Per model and (method, mode, r): multiple-choice acc / acc_norm averaged over the tasks
with sparse positions (BoolQ's one-token answers are excluded: sparsity cannot change
them), with the paired standard error of the difference to dense (per-task paired stderrs
combined as sqrt(sum se^2) / n_tasks); BoolQ-passage perplexity and its paired stderr;
LAMBADA accuracy; generation agreement; realised sparsity on the held-out perplexity text.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MC = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "openbookqa")
ORDER = ["dense/dense", "cats/ideal", "cats/practical", "m_countdown/ideal",
         "m_countdown/practical", "d_countdown/ideal", "d_countdown/practical",
         "dejavu/ideal", "dejavu/practical"]


def f(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def table(rows, model):
    sel = [r for r in rows if r["model"] == model]
    key = lambda r: (f"{r['method']}/{r['mode']}", f(r["sparsity_target"]))  # noqa: E731
    groups = defaultdict(list)
    for r in sel:
        if "quantile" in r["setting"]:
            continue
        groups[key(r)].append(r)
    n_docs = {r["task"]: r["n_examples"] for r in sel if r["method"] == "dense"}
    out = [f"### {model}", "",
           "examples per task: " + ", ".join(f"{t} {n}" for t, n in sorted(n_docs.items())),
           "",
           "| method | mode | r | realised (ppl text) | MC acc | Δ vs dense ± se | "
           "MC acc_norm | Δ ± se | preservation (acc_norm) | ppl | Δppl ± se | "
           "LAMBADA acc | agreement |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, r), rs in sorted(groups.items(), key=lambda kv: (ORDER.index(kv[0][0])
                                                                  if kv[0][0] in ORDER else 99,
                                                                  kv[0][1])):
        method, mode = name.split("/")
        cells = {}
        for metric in ("acc", "acc_norm"):
            mc = [x for x in rs if x["task"] in MC and x["metric"] == metric]
            if mc:
                s = sum(f(x["score"]) for x in mc) / len(mc)
                d = sum(f(x["dense_score"]) for x in mc) / len(mc)
                se = math.sqrt(sum(f(x["diff_stderr"]) ** 2 for x in mc
                                   if not math.isnan(f(x["diff_stderr"])))) / len(mc)
                cells[metric] = (s, s - d, se, s / d if d else float("nan"))
        ppl = [x for x in rs if x["task"] == "boolq_ppl" and x["metric"] == "ppl"]
        lam = [x for x in rs if x["task"] == "lambada" and x["metric"] == "acc"]
        agr = [x for x in rs if x["task"] == "generation"]
        realised = f(ppl[0]["sparsity_realised"]) if ppl else float("nan")
        a = cells.get("acc", (math.nan,) * 4)
        an = cells.get("acc_norm", (math.nan,) * 4)
        pp = (f(ppl[0]["score"]), f(ppl[0]["score"]) - f(ppl[0]["dense_score"]),
              f(ppl[0]["diff_stderr"])) if ppl else (math.nan,) * 3
        out.append(
            f"| {method} | {mode} | {r:.1f} | {realised:.3f} | {a[0]:.3f} | "
            f"{a[1]:+.3f} ± {a[2]:.3f} | {an[0]:.3f} | {an[1]:+.3f} ± {an[2]:.3f} | "
            f"{an[3]:.3f} | {pp[0]:.2f} | {pp[1]:+.2f} ± {pp[2]:.2f} | "
            f"{f(lam[0]['score']) if lam else math.nan:.3f} | "
            f"{f(agr[0]['score']) if agr else math.nan:.3f} |")
    q = [r for r in sel if "quantile" in r["setting"]]
    if q:
        out += ["", "Calibration statistic (perplexity text, realised sparsity / ppl): "
                "release mean-k-th vs CATS quantile", "",
                "| method | r | mean-k-th: realised | ppl | quantile: realised | ppl |",
                "|---|---|---|---|---|---|"]
        for method in ("cats", "m_countdown"):
            for r in sorted({f(x["sparsity_target"]) for x in q if x["method"] == method}):
                a = [x for x in groups.get((f"{method}/practical", r), [])
                     if x["task"] == "boolq_ppl"]
                b = [x for x in q if x["method"] == method and f(x["sparsity_target"]) == r]
                if a and b:
                    out.append(f"| {method} | {r:.1f} | {f(a[0]['sparsity_realised']):.3f} | "
                               f"{f(a[0]['score']):.2f} | {f(b[0]['sparsity_realised']):.3f} | "
                               f"{f(b[0]['score']):.2f} |")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=str(ROOT / "experiments" / "results" / "quality.csv"))
    args = ap.parse_args(argv)
    rows = list(csv.DictReader(open(args.csv)))
    for model in sorted({r["model"] for r in rows}):
        print(table(rows, model))
        print()


if __name__ == "__main__":
    main()
