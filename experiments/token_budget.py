"""Budgets per token at equal mean bytes: per-token top-k against a per-layer threshold
against a per-layer threshold with a per-token floor / ceiling, on one ranked quantity.

The three are one rule: keep q > tau_l, each token's kept count clamped to [floor, ceiling]
x m (``selection.clamp_kept``): top-k is floor = ceiling = k, the threshold has no bounds,
a band of factor F is [k / F, min(1, F k)]. tau_l is fit on the fitting text so every
variant keeps exactly the share k of each layer there (``budget.fit_thresholds``), so the
variants read equal mean bytes; on the evaluation text the realised share is measured.
Quantities: D's exact |s| (bytes at the oracle, k) and the low-bit proxy's |s_hat|
(x + k). Run through ``quality_frontier --stage tokens``; writes token_budget.csv and
token_budget_<model>.md (the spread of kept counts per token from held-out text).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from countdown_jax import budget as B
from countdown_jax import calibrate as C
from countdown_jax import evaluate as E
from countdown_jax.cost import bytes_share
from countdown_jax.policy import make_policy
from experiments.frontier_report import by_setting, fmt_score, kept_share, mc_mean_rows

FIELDS = ["model", "quantity", "variant", "kept_target", "sparsity_realised", "bytes_share",
          "task", "metric", "score", "stderr", "dense_score", "diff_stderr", "n_examples",
          "kept_mean", "kept_std", "kept_layer_std", "kept_p05", "kept_p50", "kept_p95",
          "kept_min", "kept_max"]


def variants(bands) -> dict:
    """{name: bounds(k) -> {"floor", "ceiling"} kept shares} of the compared rules."""
    out = {"topk": lambda k: {"floor": k, "ceiling": k}, "threshold": lambda k: {}}
    for f in bands:
        out[f"band-x{f:g}"] = lambda k, f=f: {"floor": k / f, "ceiling": min(1.0, k * f)}
    return out


def quantities(proxy) -> dict:
    """{name: Rule}: D's |s| (threshold mode: bytes counted at the oracle) and the proxy."""
    bits, group = proxy
    return {"s": B.Rule("d_countdown", "threshold"),
            f"proxy-{bits}bit": B.Rule("d_countdown", "proxy", proxy=(bits, group))}


def spread(kept_lt: np.ndarray) -> dict:
    """Kept shares per (layer, token) [L, N] -> pooled and per-layer spread."""
    k = np.asarray(kept_lt, np.float64)
    q = np.quantile(k, [0.05, 0.5, 0.95])
    return dict(kept_mean=k.mean(), kept_std=k.std(), kept_layer_std=k.std(axis=1).mean(),
                kept_p05=q[0], kept_p50=q[1], kept_p95=q[2], kept_min=k.min(),
                kept_max=k.max())


def run(model, name: str, rows, *, kept: tuple[float, ...], bands: tuple[float, ...],
        proxy: tuple[int, int], text: dict, progress: bool = True) -> list[dict]:
    """Fit every quantity x variant x k on fitting rows [N, T] (one batch), score them on
    the items of text = {"tasks", "n_docs", "max_rows", "held_rows", "seq_len"}."""
    params, cfg = model.params, model.cfg
    L, m = cfg.num_layers, cfg.d_ff
    lens = np.full((len(rows),), rows.shape[1], np.int32)
    shares = np.repeat(np.asarray(kept, np.float64)[:, None], L, axis=1)       # [P, L]
    settings, meta = [], {}
    for qname, rule in quantities(proxy).items():
        pr = rule.make_proxy(params)
        for vname, bounds_of in variants(bands).items():
            bounds = {key: np.asarray([[bounds_of(k)[key]] * L for k in kept])
                      for key in bounds_of(kept[0])}
            taus = (np.full(shares.shape, -1.0) if vname == "topk" else   # tau unused
                    B.fit_thresholds(params, cfg, rows, lens, rule, shares, proxy=pr,
                                     bounds=bounds, progress=progress))
            pols = [make_policy(L, threshold=taus[i], proxy=pr,
                                **{key: v[i] for key, v in bounds.items()})
                    for i in range(len(kept))]
            st = E.stacked_setting(f"{qname}/{vname}", rule.spec, [1.0 - k for k in kept],
                                   pols)
            settings.append(st)
            meta[st.name] = (qname, vname, rule, pols)
    items, gold = E.build_items(model.tokenizer, text["tasks"], text["n_docs"],
                                ppl_texts=text["n_docs"], lambada=text["n_docs"])
    scores = E.score(params, cfg, items, [E.dense_setting()] + settings,
                     max_rows=text["max_rows"], desc=f"{name} tokens", progress=progress)
    held, held_len = C.calibration_rows(model.tokenizer, text["seq_len"], text["held_rows"],
                                        held_out=True)
    out = []
    spreads = {}
    for row in E.summarize(scores, gold, model=name):
        if row["setting"] not in meta:
            continue
        qname, vname, rule, pols = meta[row["setting"]]
        i = row["policy_index"]
        if (row["setting"], i) not in spreads:
            spreads[row["setting"], i] = spread(C.kept_per_token(
                params, cfg, held, held_len, rule.spec, pols[i], batch_size=8))
        k = kept_share(row)
        out.append(dict(row, quantity=qname, variant=vname, kept_target=kept[i],
                        bytes_share=bytes_share(rule.method, rule.mode, k, m=m,
                                                d=cfg.d_model, proxy=rule.proxy,
                                                oracle=rule.mode == "threshold"),
                        **spreads[row["setting"], i]))
    return out + mc_mean_rows(out)


def write(out: Path, model: str, rows) -> None:
    """token_budget.csv (this model's rows replaced) and token_budget_<model>.md."""
    path = out / "token_budget.csv"
    old = []
    if path.is_file():
        with open(path, newline="") as f:
            old = [r for r in csv.DictReader(f) if r["model"] != model]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in old + list(rows):
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    (out / f"token_budget_{model}.md").write_text(table(model, rows))


def table(model: str, rows) -> str:
    """Markdown: per quantity, k and variant: realised bytes, ppl, LAMBADA, MC, spread."""
    by = by_setting(rows, lambda r: (r["quantity"], float(r["kept_target"]), r["variant"]))
    lines = [f"### {model}: per-token budgets at equal mean bytes", "",
             "Kept share per token over held-out text, layers pooled: mean, std, "
             "5th / 50th / 95th percentile; ± one standard error.", "",
             "| quantity | k | variant | bytes | ppl | LAMBADA acc | MC acc_norm | kept mean "
             "± std (p05 / p50 / p95) |", "|---|---|---|---|---|---|---|---|"]
    for key in sorted(by):
        m = by[key]
        any_row = next(iter(m.values()))
        ppl, lam = m.get(("boolq_ppl", "ppl")), m.get(("lambada", "acc"))
        mc = m.get(("mc_mean", "acc_norm"))
        lines.append(f"| {key[0]} | {key[1]:.2f} | {key[2]} | "
                     f"{float(any_row['bytes_share']):.3f} | {fmt_score(ppl)} | "
                     f"{fmt_score(lam, 2)} | {fmt_score(mc)} | "
                     f"{float(any_row['kept_mean']):.3f} ± {float(any_row['kept_std']):.3f} "
                     f"({float(any_row['kept_p05']):.3f} / {float(any_row['kept_p50']):.3f}"
                     f" / {float(any_row['kept_p95']):.3f}) |")
    return "\n".join(lines) + "\n"
