"""Tables, plots and the goal check of the quality frontier (quality_frontier.py writes the
CSVs through ``write_outputs``; run this alone to rebuild the report from them).

    python -m experiments.frontier_report [--out experiments/results]

Goal check (issue: "close at least half of the log-perplexity gap between the best paper
rule (practical) and D-ideal at 40% and 55% of dense FFN bytes, with mean MC accuracy no
worse within error"): every curve is interpolated linearly in (bytes_share, log ppl) and
(bytes_share, accuracy); D-ideal sits at its oracle bytes (kept share: a free, perfect
predictor); a point outside a curve's span is not extrapolated (reported as n/a).
Budget goal (frontier_budget_goal.csv): at the same bytes, a practical rule (the allocated
proxy, or any practical rule) with perplexity at most uniform D-ideal's and mean MC
accuracy no worse than D-ideal's within one standard error; the allocated D-ideal beside
it as the new bound. budget_<model>.png: each allocation's kept share by layer.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

MC_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "openbookqa")
FIELDS = ["model", "rule", "method", "mode", "setting", "policy_index", "rank",
          "proxy_bits", "proxy_group", "candidates", "candidates_target", "predictor_r", "sparsity_target",
          "sparsity_realised", "bytes_share", "bytes_share_oracle", "task", "metric", "score",
          "stderr", "dense_score", "diff_stderr", "n_examples"]
PAPER_PRACTICAL = ("cats-practical", "m_countdown-practical", "d_countdown-practical")
# rules beyond the paper (issue 12, item 4): the cascade and the low-bit proxy
NEW_RULES = ("d_countdown-cascade", "d_countdown-proxy")
GOAL_BYTES = (0.40, 0.55)
# drawn at oracle bytes (the kept share): uniform and allocated D-ideal
ORACLE_RULES = ("d_countdown-ideal", "d_countdown-alloc-ideal")
# practical rules the budget goal tries, allocated first (quality_frontier.alloc_rules)
BUDGET_RULES = ("d_countdown-alloc-proxy", "d_countdown-proxy", "cats-alloc",
                "m_countdown-alloc")


def _f(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return float("nan")


def mc_mean_rows(rows):
    """Per (model, setting, policy, target r, metric; a run's policy index alone does not
    tell two runs' budgets apart): the mean over the multiple-choice tasks with
    sparse positions (BoolQ's one-token answers cannot change), stderrs combined. Only
    settings scored on every such task the model has get one (a task group may be run
    with fewer settings, e.g. HellaSwag at one predictor rank): means over different task
    sets are not comparable."""
    groups = defaultdict(list)
    for r in rows:
        if r["task"] in MC_TASKS and r["metric"] in ("acc", "acc_norm"):
            groups[(r["model"], r["setting"], int(r["policy_index"]),
                    _cell(r.get("sparsity_target")), r["metric"])].append(r)
    tasks = defaultdict(set)
    for (model, *_, metric), rs in groups.items():
        tasks[model, metric] |= {r["task"] for r in rs}
    out = []
    for (model, *_, metric), rs in groups.items():
        if {r["task"] for r in rs} != tasks[model, metric]:
            continue
        n = len(rs)
        base = dict(rs[0])
        base.update(task="mc_mean", n_examples=sum(int(r["n_examples"]) for r in rs),
                    score=np.mean([_f(r["score"]) for r in rs]),
                    dense_score=np.mean([_f(r["dense_score"]) for r in rs]),
                    stderr=math.sqrt(sum(_f(r["stderr"]) ** 2 for r in rs)) / n,
                    diff_stderr=math.sqrt(sum(_f(r["diff_stderr"]) ** 2 for r in rs)) / n)
        out.append(base)
    return out


def with_oracle_bytes(row):
    kept = 1.0 - (_f(row["sparsity_realised"]) if row["rule"] != "dense" else 0.0)
    oracle = row["mode"] == "ideal" and row["method"] in ("d_countdown", "dejavu", "s_countdown")
    row["bytes_share_oracle"] = kept if oracle else row["bytes_share"]
    return row


def read_csv(path: Path):
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, rows, fields, model=None, by=()):
    """Rows of other models already in the file are kept (models run one at a time), and
    of the model's own those whose values of the columns ``by`` no new row has (task
    groups and rule subsets run apart: ``by=ROW_KEY``)."""
    key = lambda r: tuple(_cell(r.get(k)) for k in by)      # as written: "0.5" == 0.5
    new = {key(r) for r in rows}
    old = [r for r in read_csv(path) if model is not None and (
        r.get("model") != model or (by and key(r) not in new))]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in old + list(rows):
            w.writerow({k: _cell(v) for k, v in r.items()})


def _cell(v):
    """A value as the CSV holds it (floats to 6 significant digits; None as empty)."""
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def curve(rows, model, rule, task, metric, oracle=False):
    """(bytes, score, stderr) sorted by bytes for one rule."""
    pts = [(_f(r["bytes_share_oracle" if oracle else "bytes_share"]), _f(r["score"]),
            _f(r["stderr"])) for r in rows
           if r["model"] == model and r["rule"].startswith(rule) and r["task"] == task
           and r["metric"] == metric]
    return sorted(p for p in pts if np.isfinite(p[0]) and np.isfinite(p[1]))


def frontier(pts):
    """The best score reachable at or under each byte share (lower-left hull for ppl is
    taken by the caller with a sign): keeps the Pareto points in bytes order."""
    out, best = [], -np.inf
    for b, s, se in pts:
        if s > best:
            out.append((b, s, se))
            best = s
    return out


def at(front, b, log=False):
    """The Pareto curve ``front`` (from ``pareto``) at bytes b: interpolated between its
    points (linear in log score when ``log``); past its last point up to the largest bytes
    measured on the rule the last point's score holds (every point measured there is worse);
    None outside the measured span (never extrapolated)."""
    pts, hi = front
    if not pts or not pts[0][0] <= b <= hi:
        return None
    if b >= pts[-1][0]:
        return pts[-1][1], pts[-1][2]
    xs = [p[0] for p in pts]
    ys = [math.log(p[1]) if log else p[1] for p in pts]
    se = np.interp(b, xs, [p[2] for p in pts])
    y = float(np.interp(b, xs, ys))
    return (math.exp(y) if log else y), float(se)


def pareto(rows, model, rule, task, metric, lower_is_better=False, oracle=False):
    """(the rule's Pareto points in bytes order, the largest bytes measured on the rule)."""
    pts = curve(rows, model, rule, task, metric, oracle)
    hi = max((p[0] for p in pts), default=-1.0)
    if lower_is_better:
        return [(b, -s, se) for b, s, se in frontier([(b, -s, se) for b, s, se in pts])], hi
    return frontier(pts), hi


def goal_check(rows, model):
    """Rows of the goal table for one model (ppl on boolq_ppl, acc_norm mean over MC): per
    goal byte share and new rule (NEW_RULES, where measured), the share of the log-ppl gap
    between the best paper rule (practical) and D-ideal (oracle bytes) that it closes."""
    new = [r for r in NEW_RULES if any(x["model"] == model and x["rule"].startswith(r)
                                       for x in rows)]
    ppl = {rule: pareto(rows, model, rule, "boolq_ppl", "ppl", lower_is_better=True)
           for rule in PAPER_PRACTICAL + tuple(new)}
    ppl["d_countdown-ideal"] = pareto(rows, model, "d_countdown-ideal", "boolq_ppl", "ppl",
                                      lower_is_better=True, oracle=True)
    acc = {rule: pareto(rows, model, rule, "mc_mean", "acc_norm")
           for rule in PAPER_PRACTICAL + tuple(new)}

    def closed(ref, ideal, got):
        gap = math.log(ref) - math.log(ideal)
        return (math.log(ref) - math.log(got)) / gap if gap > 0 else float("nan")

    out = []
    for b in GOAL_BYTES:
        paper = {r: at(ppl[r], b, log=True) for r in PAPER_PRACTICAL}
        paper = {r: v for r, v in paper.items() if v is not None}
        best = min(paper, key=lambda r: paper[r][0]) if paper else None
        thr = {r: v for r, v in paper.items() if r != "d_countdown-practical"}
        best_thr = min(thr, key=lambda r: thr[r][0]) if thr else None
        ideal = at(ppl["d_countdown-ideal"], b, log=True)
        a_best = at(acc[best], b) if best else None
        for rule in new:
            got, a_new = at(ppl[rule], b, log=True), at(acc[rule], b)
            c = closed(paper[best][0], ideal[0], got[0]) if best and ideal and got else \
                float("nan")
            c_thr = closed(thr[best_thr][0], ideal[0], got[0]) if best_thr and ideal and got \
                else float("nan")
            err = max(a_best[1], a_new[1]) if a_best and a_new else None
            out.append(dict(model=model, bytes_share=b, new_rule=rule, best_paper_rule=best,
                            ppl_best_paper=paper[best][0] if best else None,
                            ppl_d_ideal=ideal[0] if ideal else None,
                            ppl_new=got[0] if got else None, gap_closed=c,
                            best_threshold_rule=best_thr,
                            ppl_best_threshold=thr[best_thr][0] if best_thr else None,
                            gap_closed_vs_threshold=c_thr,
                            acc_best_paper=a_best[0] if a_best else None,
                            acc_new=a_new[0] if a_new else None, acc_stderr=err,
                            goal_met=bool(c >= 0.5 and err is not None
                                          and a_new[0] >= a_best[0] - 2 * err)))
    return out


def budget_goal_check(rows, model):
    """Rows of the budget goal (issue 26, item 4) for one model: per goal byte share and
    practical rule of BUDGET_RULES (where measured), its perplexity and MC accuracy
    against uniform D-ideal's (oracle bytes), with allocated D-ideal's beside them."""
    def ppl(rule, oracle=False):
        return pareto(rows, model, rule, "boolq_ppl", "ppl", lower_is_better=True,
                      oracle=oracle)

    def acc(rule, oracle=False):
        return pareto(rows, model, rule, "mc_mean", "acc_norm", oracle=oracle)

    ideal_p, ideal_a = ppl("d_countdown-ideal", True), acc("d_countdown-ideal", True)
    alloc_p = ppl("d_countdown-alloc-ideal", True)
    out = []
    for b in GOAL_BYTES:
        ip, ia, ap = at(ideal_p, b, log=True), at(ideal_a, b), at(alloc_p, b, log=True)
        for rule in BUDGET_RULES:
            if not any(r["model"] == model and r["rule"].startswith(rule) for r in rows):
                continue
            got_p, got_a = at(ppl(rule), b, log=True), at(acc(rule), b)
            err = max(ia[1], got_a[1]) if ia and got_a else None
            out.append(dict(model=model, bytes_share=b, rule=rule,
                            ppl=got_p[0] if got_p else None,
                            ppl_d_ideal=ip[0] if ip else None,
                            ppl_d_ideal_alloc=ap[0] if ap else None,
                            acc=got_a[0] if got_a else None,
                            acc_d_ideal=ia[0] if ia else None, acc_stderr=err,
                            goal_met=bool(got_p and ip and err is not None
                                          and got_p[0] <= ip[0]
                                          and got_a[0] >= ia[0] - err)))
    return out


def plot_allocation(fit_rows, model, path: Path):
    """Kept share by layer of each allocated rule (frontier_fit.csv, kind allocation),
    one line per budget, the budget's uniform share dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in fit_rows if r.get("model") == model and r.get("kind") == "allocation"]
    rules = sorted({r["rule"] for r in sel})
    if not rules:
        return
    fig, axes = plt.subplots(1, len(rules), figsize=(4.2 * len(rules), 3.6), squeeze=False)
    every = sorted({_f(r["budget"]) for r in sel})      # one colour per budget in every panel
    cmap = plt.get_cmap("viridis")
    for ax, rule in zip(axes[0], rules):
        mine = [r for r in sel if r["rule"] == rule]
        for b in sorted({_f(r["budget"]) for r in mine}):
            pts = sorted((int(r["layer"]), _f(r["kept"])) for r in mine if _f(r["budget"]) == b)
            color = cmap(every.index(b) / max(len(every) - 1, 1))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=2, lw=1,
                    color=color, label=f"{b:.2f}")
            ax.axhline(np.mean([p[1] for p in pts]), color=color, ls=":", lw=0.7)
        ax.set_title(f"{model}: {rule}", fontsize=9)
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1)
        ax.legend(title="bytes", fontsize=6, title_fontsize=7)
    axes[0][0].set_ylabel("kept share (dotted: uniform at the same bytes)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(rows, model, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rules = sorted({r["rule"] for r in rows if r["model"] == model and r["rule"] != "dense"})
    colors = {"cats": "tab:blue", "m_countdown": "tab:orange", "d_countdown-ideal": "k",
              "d_countdown-alloc-ideal": "k", "d_countdown-alloc-proxy": "tab:purple",
              "d_countdown-practical": "tab:green", "d_countdown-cascade": "tab:red",
              "d_countdown-proxy": "tab:purple"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    n_mc = len({r["task"] for r in rows if r["model"] == model and r["task"] in MC_TASKS})
    for ax, (task, metric, title) in zip(axes, (
            ("boolq_ppl", "ppl", "BoolQ-passage perplexity / dense (log)"),
            ("mc_mean", "acc_norm", f"mean MC acc_norm ({n_mc} tasks)"))):
        dense = [_f(r["score"]) for r in rows if r["model"] == model and r["rule"] == "dense"
                 and r["task"] == task and r["metric"] == metric]
        for rule in rules:
            oracle = rule in ORACLE_RULES
            pts = curve(rows, model, rule, task, metric, oracle=oracle)
            if not pts:
                continue
            base = next((c for k, c in colors.items() if rule.startswith(k)), "tab:gray")
            ls = "-." if "alloc" in rule else "--" if ("ideal" in rule and not oracle) else "-"
            scale = dense[0] if metric == "ppl" and dense else 1.0
            front = pareto(rows, model, rule, task, metric, lower_is_better=metric == "ppl",
                           oracle=oracle)
            alpha = 0.5 + 0.5 * (("rank" not in rule or rule.endswith("rank64"))
                                 and not rule.endswith("2bit"))     # variants lighter
            ax.scatter([p[0] for p in pts], [p[1] / scale for p in pts], s=8, color=base,
                       alpha=0.4 * alpha)
            ax.plot([p[0] for p in front[0]], [p[1] / scale for p in front[0]], ls, marker="o",
                    ms=3, color=base, alpha=alpha,
                    label=rule + (" (oracle bytes)" if oracle else ""))
        if dense and metric != "ppl":
            ax.axhline(dense[0], color="gray", lw=0.8, label="dense")
        if metric == "ppl":
            ax.set_yscale("log")
            ax.axhline(1.0, color="gray", lw=0.8)
        for b in GOAL_BYTES:
            ax.axvline(b, color="gray", ls=":", lw=0.8)
        ax.set_xlabel("FFN weight bytes read per decode token / dense")
        ax.set_title(f"{model}: {title}", fontsize=10)
    axes[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def kept_share(row) -> float:
    """The kept share a summarised row realised: 1 - sparsity_realised, where a task with no
    sparse (decode) token realises nan and counts as dense."""
    r = _f(row["sparsity_realised"])
    return 1.0 - (r if np.isfinite(r) else 0.0)


def _fmt(v, se=None, digits=3):
    if v is None or not np.isfinite(_f(v)):
        return "n/a"
    txt = f"{_f(v):.{digits}g}"
    return txt if se is None or not np.isfinite(_f(se)) else f"{txt} ± {_f(se):.2g}"


def fmt_score(row, digits=3) -> str:
    """'score ± stderr' of a result row ("n/a" for None): the tables' cells."""
    return _fmt(row and row["score"], row and row["stderr"], digits)


def by_setting(rows, key):
    """{key(row): {(task, metric): row}}: each setting's rows of every task, for tables."""
    by = defaultdict(dict)
    for r in rows:
        by[key(r)][(r["task"], r["metric"])] = r
    return by


def tables(rows, model) -> str:
    """Markdown: per rule and setting, bytes, realised sparsity, perplexity, LAMBADA and
    mean MC accuracy with standard errors (what RESULTS.md quotes)."""
    by = by_setting([r for r in rows if r["model"] == model],
                    lambda r: (r["rule"], r["setting"], int(r["policy_index"])))
    lines = [f"### {model}", "", "Realised r, candidates and bytes on the perplexity "
             "text; ± one standard error.", "",
             "| rule | target r | realised r | candidates | bytes | ppl | LAMBADA acc | "
             "MC acc_norm (mean) |", "|---|---|---|---|---|---|---|---|"]
    for key in sorted(by, key=lambda k: (k[0], _f(next(iter(by[k].values()))["bytes_share"]))):
        m = by[key]
        ppl, lam, mc = (m.get(("boolq_ppl", "ppl")), m.get(("lambada", "acc")),
                        m.get(("mc_mean", "acc_norm")))
        any_row = ppl or next(iter(m.values()))      # realised sparsity on the ppl text
        lines.append("| " + " | ".join([
            key[0], f"{_f(any_row['sparsity_target']):.2f}",
            f"{_f(any_row['sparsity_realised']):.3f}",
            _fmt(any_row.get("candidates"), digits=2), f"{_f(any_row['bytes_share']):.3f}",
            fmt_score(ppl), fmt_score(lam, 2), fmt_score(mc, 3)]) + " |")
    return "\n".join(lines) + "\n"


def report(out: Path):
    rows = read_csv(out / "frontier.csv")
    fit_rows = read_csv(out / "frontier_fit.csv")
    models = sorted({r["model"] for r in rows})
    goal = [g for m in models for g in goal_check(rows, m)]
    if goal:
        write_csv(out / "frontier_goal.csv", goal, list(goal[0]))
    budget_goal = [g for m in models for g in budget_goal_check(rows, m)]
    if budget_goal:
        write_csv(out / "frontier_budget_goal.csv", budget_goal, list(budget_goal[0]))
    for m in models:
        plot(rows, m, out / f"frontier_{m}.png")
        plot_allocation(fit_rows, m, out / f"budget_{m}.png")
        (out / f"frontier_{m}.md").write_text(tables(rows, m))
    return goal


def write_outputs(out: Path, model: str, *, fit_rows=None, rows=None, timing=None):
    if fit_rows:
        for r in fit_rows:
            r["model"] = model
        fields = ["model"] + sorted({k for r in fit_rows for k in r} - {"model"})
        write_csv(out / "frontier_fit.csv", fit_rows, fields, model=model, by=FIT_KEY)
    if rows:
        write_task_rows(out, model, [with_oracle_bytes(r) for r in rows])
    if timing:
        merge_timing(out, {model: {timing["tasks"]: timing}})
    return report(out)


# What a merged row replaces: the same setting measured again. An allocated rule's
# budgets differ in their target r (and its fit rows in their budget), so runs of other
# budgets of one rule add to each other.
ROW_KEY = ("task", "rule", "sparsity_target")
FIT_KEY = ("kind", "rule", "budget")


def write_task_rows(out: Path, model: str, rows):
    """A model's per-task rows into frontier.csv (its rows of other tasks, rules or targets
    kept: task groups, rule subsets and budget subsets run apart), then its MC mean
    recomputed over every MC task now in the file."""
    path = out / "frontier.csv"
    write_csv(path, [r for r in rows if r["task"] != "mc_mean"], FIELDS, model=model,
              by=ROW_KEY)
    mine = [r for r in read_csv(path) if r["model"] == model and r["task"] != "mc_mean"]
    mean = [with_oracle_bytes(r) for r in mc_mean_rows(mine)]
    if mean:
        write_csv(path, mean, FIELDS, model=model, by=ROW_KEY)


def merge_timing(out: Path, timing: dict):
    path = out / "frontier_timing.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    for model, runs in timing.items():
        old.setdefault(model, {}).update(runs)
    path.write_text(json.dumps(old, indent=1))


def merge(src: Path, out: Path):
    """Results written elsewhere (e.g. a GPU run's --out per model) into ``out``: each
    model's rows replace that model's rows of the same task, rule and target r
    (``ROW_KEY``), its fit rows those of the same kind, rule and budget (``FIT_KEY``);
    per-token budgets (token_budget.csv) replace the model's."""
    rows = read_csv(src / "frontier.csv") if (src / "frontier.csv").is_file() else []
    for model in sorted({r["model"] for r in rows}):
        write_task_rows(out, model, [r for r in rows if r["model"] == model])
    if (src / "frontier_fit.csv").is_file():
        fit = read_csv(src / "frontier_fit.csv")
        for model in sorted({r["model"] for r in fit}):
            mine = [r for r in fit if r["model"] == model]
            old = read_csv(out / "frontier_fit.csv") if (out / "frontier_fit.csv").is_file() \
                else []
            fields = ["model"] + sorted({k for r in old + mine for k in r} - {"model"})
            write_csv(out / "frontier_fit.csv", mine, fields, model=model, by=FIT_KEY)
    if (src / "frontier_timing.json").is_file():
        merge_timing(out, json.loads((src / "frontier_timing.json").read_text()))
    tokens = read_csv(src / "token_budget.csv")
    if tokens:
        from experiments import token_budget      # it imports this module

        for model in sorted({r["model"] for r in tokens}):
            token_budget.write(out, model, [r for r in tokens if r["model"] == model])
    return report(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--merge", nargs="*", default=(), type=Path,
                    help="result folders (e.g. a GPU run's per-model --out) to merge first")
    args = ap.parse_args(argv)
    goal = report(Path(args.out)) if not args.merge else None
    for src in args.merge:
        goal = merge(src, Path(args.out))
    for g in goal:
        print(json.dumps(g))


if __name__ == "__main__":
    main()
