"""Metrics (lm-eval-harness definitions) and the tidy summary rows of a scored run."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np

from countdown_jax.policy import SparseSpec

if TYPE_CHECKING:
    from countdown_jax.evaluate.items import Item
    from countdown_jax.evaluate.scoring import Scores

def mc_accuracy(ll: np.ndarray, nbytes: np.ndarray, groups: Sequence[Sequence[int]],
                gold: Sequence[int]):
    """Per-document correctness: (acc [D] bool, acc_norm [D] bool). groups[d] are the item
    indices of document d's choices in choice order; gold[d] the right choice."""
    acc = np.zeros(len(groups), bool)
    acc_norm = np.zeros(len(groups), bool)
    for d, g in enumerate(groups):
        ll_d = ll[list(g)]
        acc[d] = int(np.argmax(ll_d)) == gold[d]
        acc_norm[d] = int(np.argmax(ll_d / np.maximum(nbytes[list(g)], 1))) == gold[d]
    return acc, acc_norm


def mean_stderr(x) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    se = x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else float("nan")
    return float(x.mean()), float(se)


def perplexity(nll_sum: np.ndarray, counts: np.ndarray) -> float:
    """exp(total NLL / total tokens)."""
    return float(math.exp(np.sum(nll_sum) / max(np.sum(counts), 1)))


def perplexity_stderr(nll_sum, counts) -> float:
    """Delta-method stderr of the corpus perplexity from per-item (ratio estimator)."""
    nll_sum = np.asarray(nll_sum, np.float64)
    counts = np.asarray(counts, np.float64)
    n = nll_sum.size
    if n < 2:
        return float("nan")
    mu = nll_sum.sum() / counts.sum()
    resid = nll_sum - mu * counts
    se_mu = math.sqrt(np.sum(resid ** 2) / (n - 1) / n) / counts.mean()
    return float(math.exp(mu) * se_mu)


def doc_groups(items: list[Item], task: str):
    """Item indices per document of a multiple-choice task, and the items' task mask."""
    by_doc: dict[int, list[tuple[int, int]]] = {}
    for i, it in enumerate(items):
        if it.task == task:
            by_doc.setdefault(it.doc, []).append((it.choice, i))
    docs = sorted(by_doc)
    return docs, [[i for _, i in sorted(by_doc[d])] for d in docs]


def summarize(scores: Scores, mc_gold: dict, *, model: str = "") -> list[dict]:
    """Tidy rows: per setting x r x task x metric, with the dense score of the same items.

    mc_gold: {task: {doc_id: gold}} for the multiple-choice tasks; other tasks present in
    the items are perplexity-style (ppl over scored tokens, plus accuracy for LAMBADA).
    """
    rows = []
    dense_idx = next((s for s, st in enumerate(scores.settings) if st.spec.is_dense), None)
    if dense_idx is None:
        raise ValueError("summarize needs a dense setting among the scored settings")
    tasks = sorted({it.task for it in scores.items})
    nbytes = np.array([it.nbytes for it in scores.items])
    counts = scores.item_count()
    per = {}
    for s, st in enumerate(scores.settings):
        for r in range(st.size):
            per[(s, r)] = (scores.item_ll(s, r), scores.item_greedy(s, r))
    for task in tasks:
        if task in mc_gold:
            docs, groups = doc_groups(scores.items, task)
            gold = [mc_gold[task][d] for d in docs]
            metric_vals = {}
            for key, (ll, _) in per.items():
                acc, accn = mc_accuracy(ll, nbytes, groups, gold)
                metric_vals[key] = {"acc": acc.astype(float), "acc_norm": accn.astype(float)}
            n_ex = len(docs)
        else:
            mask = np.array([it.task == task for it in scores.items])
            metric_vals = {}
            for key, (ll, greedy) in per.items():
                metric_vals[key] = {"nll": -ll[mask], "count": counts[mask],
                                    "acc": greedy[mask].astype(float)}
            n_ex = int(mask.sum())
        dense_m = metric_vals[(dense_idx, 0)]
        for (s, r), mv in metric_vals.items():
            st = scores.settings[s]
            realised, _ = scores.realised_sparsity(s, r, task)
            if st.spec.is_dense:
                realised = 0.0
            base = dict(model=model, method=st.spec.method, mode=_mode_label(st.spec),
                        setting=st.name, policy_index=r, sparsity_target=st.sparsities[r],
                        sparsity_realised=realised, task=task, n_examples=n_ex)
            if task in mc_gold:
                for metric in ("acc", "acc_norm"):
                    v, se = mean_stderr(mv[metric])
                    dv, _ = mean_stderr(dense_m[metric])
                    _, dse = mean_stderr(mv[metric] - dense_m[metric])
                    rows.append({**base, "metric": metric, "score": v, "stderr": se,
                                 "dense_score": dv, "diff_stderr": dse})
            else:
                ppl = perplexity(mv["nll"], mv["count"])
                dppl = perplexity(dense_m["nll"], dense_m["count"])
                rows.append({**base, "metric": "ppl", "score": ppl,
                             "stderr": perplexity_stderr(mv["nll"], mv["count"]),
                             "dense_score": dppl,
                             "diff_stderr": _paired_log_ppl_se(mv, dense_m, ppl, dppl)})
                if task == "lambada":
                    v, se = mean_stderr(mv["acc"])
                    dv, _ = mean_stderr(dense_m["acc"])
                    _, dse = mean_stderr(mv["acc"] - dense_m["acc"])
                    rows.append({**base, "metric": "acc", "score": v, "stderr": se,
                                 "dense_score": dv, "diff_stderr": dse})
    return rows


def _paired_log_ppl_se(mv, dense_m, ppl, dppl):
    """Stderr of ppl - dense ppl from the per-item NLL differences (delta method)."""
    diff = np.asarray(mv["nll"], np.float64) - np.asarray(dense_m["nll"], np.float64)
    c = np.asarray(mv["count"], np.float64)
    n = diff.size
    if n < 2:
        return float("nan")
    mu = diff.sum() / c.sum()
    se_mu = math.sqrt(np.sum((diff - mu * c) ** 2) / (n - 1) / n) / c.mean()
    return float(ppl * se_mu)


def _mode_label(spec: SparseSpec) -> str:
    if spec.is_dense:
        return "dense"
    return "ideal" if spec.mode in ("ideal", "topk") else "practical"
