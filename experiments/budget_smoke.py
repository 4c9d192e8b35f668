"""A CPU smoke run of the budget measurements on SmolLM2 (a few hundred fitting tokens and a
few dozen evaluation passages: not the full-scale claim, which is quality_frontier's on a
GPU): uniform against allocated at equal bytes (D-ideal at oracle bytes, the 4-bit proxy),
and the per-token comparison (experiments/token_budget.py).

    python -m experiments.budget_smoke [--rows 4] [--seq-len 64] [--n 40]

Writes results/budget_smoke_<name>.csv / .md, budget_<name>.png (kept share by layer) and
token_budget.csv / token_budget_<name>.md under the model name ``<model>-cpu-smoke``.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from countdown_jax import budget as B
from countdown_jax import evaluate as E
from countdown_jax.policy import make_policy
from experiments import quality_frontier as Q
from experiments import token_budget
from experiments.frontier_report import by_setting, kept_share, plot_allocation

DELTAS = (0.6, 0.3, 0.0, -0.3, -0.6)
STEPS = (0.5, 1.0)
BUDGETS = (0.4, 0.55)
FIELDS = ["model", "rule", "budget", "allocation", "step", "bytes_share", "kept_realised",
          "kl_fit", "task", "metric", "score", "stderr", "dense_score", "diff_stderr",
          "n_examples"]


def rules(proxy):
    return (("d_countdown-ideal", B.Rule("d_countdown", "ideal", oracle=True)),
            (f"d_countdown-proxy-{proxy[0]}bit", B.Rule("d_countdown", "proxy", proxy=proxy)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--rows", type=int, default=4, help="fitting rows")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--n", type=int, default=40, help="BoolQ passages and LAMBADA items")
    ap.add_argument("--proxy-group", type=int, default=64)
    ap.add_argument("--out", default="experiments/results")
    args = ap.parse_args(argv)
    out, name = Path(args.out), f"{args.model}-cpu-smoke"
    t0 = time.perf_counter()
    model = Q.load_model(args.model, "float32", Path(f"out/budget-smoke-{args.model}"))
    params, cfg = model.params, model.cfg
    m, d, L = cfg.d_ff, cfg.d_model, cfg.num_layers
    sc = Q.Scale(seq_len=args.seq_len, sample_rows=0, val_rows=4)
    train, _ = Q.fitting_rows(model, sc)
    rows = train[np.random.default_rng(3).permutation(len(train))[:args.rows]]
    lens = np.full((len(rows),), args.seq_len, np.int32)
    settings, info, fit_rows = [E.dense_setting()], {}, []
    proxy = (4, args.proxy_group)
    for rname, rule in rules(proxy):
        got = B.allocate_budgets(params, cfg, rows, lens, rule, BUDGETS, deltas=DELTAS,
                                 steps=STEPS)
        kmean = np.asarray([B.kept_for_budget(rule, b, m=m, d=d) for b in BUDGETS])
        uniform = np.repeat(kmean[:, None], L, 1)
        taus = (B.fit_thresholds(params, cfg, rows, lens, rule, uniform,
                                 proxy=rule.make_proxy(params))
                if rule.key == "threshold" else None)
        pr = rule.make_proxy(params)
        for kind, vals in (("uniform", B.policies(rule, uniform, taus)[rule.key]),
                           ("allocated", got.values)):
            pols = [make_policy(L, **{rule.key: v}, proxy=pr) for v in vals]
            st = E.stacked_setting(f"{rname}/{kind}", rule.spec, list(1 - kmean), pols)
            settings.append(st)
            info[st.name] = (rname, rule, kind, got)
        fit_rows += [dict(model=name, kind="allocation", rule=rname, budget=b, layer=l,
                          kept=float(got.kept[i, l]))
                     for i, b in enumerate(BUDGETS) for l in range(L)]
    items, gold = E.build_items(model.tokenizer, ("boolq_ppl", "lambada"), args.n,
                                ppl_texts=args.n, lambada=args.n)
    scores = E.score(params, cfg, items, settings, max_rows=16, desc=name)
    res = []
    for row in E.summarize(scores, gold, model=name):
        if row["setting"] not in info:
            continue
        rname, rule, kind, got = info[row["setting"]]
        i = row["policy_index"]
        kept = kept_share(row)
        a, b = rule.line(m, d)
        j = got.chosen[i] if kind == "allocated" else 0                  # 0: uniform
        res.append(dict(row, rule=rname, budget=BUDGETS[i], allocation=kind,
                        step=got.steps[j], kept_realised=kept, kl_fit=got.path_kl[i, j],
                        bytes_share=a + b * kept))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"budget_smoke_{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()}
                    for r in res)
    (out / f"budget_smoke_{name}.md").write_text(table(name, res, args))
    plot_allocation(fit_rows, name, out / f"budget_{name}.png")
    tok = token_budget.run(model, name, rows, kept=(0.3,), bands=(2.0,), proxy=proxy,
                           text=dict(tasks=("boolq_ppl", "lambada"), n_docs=args.n,
                                     max_rows=16, held_rows=8, seq_len=args.seq_len))
    token_budget.write(out, name, tok)
    print(f"{name}: {time.perf_counter() - t0:.0f} s")


def table(name, res, args) -> str:
    by = by_setting(res, lambda r: (r["rule"], r["budget"], r["allocation"]))
    lines = [f"### {name}: uniform against allocated at equal bytes", "",
             f"Fitting text: {args.rows} rows x {args.seq_len} tokens; evaluation: {args.n} "
             "held-out BoolQ passages and LAMBADA items; ± one standard error.", "",
             "| rule | budget | allocation | line-search step | bytes (realised) | KL to dense, "
             "fitting text | ppl | LAMBADA acc |", "|---|---|---|---|---|---|---|---|"]
    for key in sorted(by):
        rm = by[key]
        any_row = next(iter(rm.values()))
        ppl, lam = rm.get(("boolq_ppl", "ppl")), rm.get(("lambada", "acc"))
        lines.append(f"| {key[0]} | {key[1]:.2f} | {key[2]} | {any_row['step']:.2f} | "
                     f"{any_row['bytes_share']:.4f} | {any_row['kl_fit']:.4f} | "
                     f"{ppl['score']:.3f} ± {ppl['stderr']:.2f} | "
                     f"{lam['score']:.3f} ± {lam['stderr']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
