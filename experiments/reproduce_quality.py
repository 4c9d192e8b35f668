"""Reproduce the paper's quality comparison on the registry models, offline, on CPU.

    python experiments/reproduce_quality.py            # full run, from scratch
    python experiments/reproduce_quality.py --reuse    # reuse thresholds / predictors saved
                                                       # by an earlier run (scoring only)
    python experiments/reproduce_quality.py --quick    # smoke run (SmolLM2, a handful of items)

Measured on the 2-core dev box (RESULTS.md): scoring both models 62 min; from scratch add
calibration (3 + 7.5 min) and predictor training (21.5 + 18.5 min), those two measured
while other jobs shared the cores.

Per model (SmolLM2-135M, Gemma-3-270M):
  1. calibrate per-layer thresholds for CATS and M-COUNTDOWN at every r (the release's
     mean-k-th statistic under the ideal forward; CATS's histogram quantile as a variant),
  2. train the low-rank predictors of D-COUNTDOWN and the Deja Vu-style baseline,
  3. score {CATS, M, D, Deja Vu} x {ideal, practical} x r (+ dense) on zero-shot multiple
     choice (dense context, sparse continuation), BoolQ-passage perplexity and LAMBADA
     (sparse second half), and greedy generation agreement with dense,
  4. write experiments/results/{quality,calibration,predictor}.csv and plots.

Calibrations are written into a private copy of each model directory (params and tokenizer
linked, not copied) under --work-dir, so the shared converted-model cache stays untouched.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from countdown_jax import calibrate as C  # noqa: E402
from countdown_jax import data as D  # noqa: E402
from countdown_jax import evaluate as E  # noqa: E402
from countdown_jax import predictor as P  # noqa: E402
from countdown_jax.policy import SparseSpec  # noqa: E402

SPARSITIES = (0.5, 0.7, 0.8, 0.9)
THRESHOLD_METHODS = ("cats", "m_countdown")
PREDICTOR_METHODS = ("d_countdown", "dejavu")
MC_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "openbookqa",
            "boolq")

# Examples per task, sized for ~1 h on 2 CPU cores for both models (see RESULTS.md).
FULL = dict(
    smollm2=dict(n_docs=dict(arc_easy=12, arc_challenge=8, piqa=4, hellaswag=3,
                             winogrande=12, openbookqa=12, boolq=20),
                 ppl_texts=24, lambada=12, agree_prompts=6, calib_rows=24, pred_rows=96,
                 epochs=3.0, max_new_tokens=16),
    gemma3=dict(n_docs=dict(arc_easy=8, arc_challenge=6, piqa=3, hellaswag=2,
                            winogrande=8, openbookqa=8, boolq=16),
                ppl_texts=16, lambada=8, agree_prompts=4, calib_rows=12, pred_rows=48,
                epochs=3.0, max_new_tokens=16),
)
# Smoke run: every stage on a handful of items; fewer compiles (agreement for dense + two
# settings, no quantile-threshold variant) so it stays a few minutes on 2 cores.
QUICK = dict(
    smollm2=dict(n_docs=dict(arc_easy=3, winogrande=3, boolq=2), ppl_texts=3, lambada=2,
                 agree_prompts=2, calib_rows=4, pred_rows=12, epochs=1.0, max_rows=4,
                 agree_settings=("dense", "m_countdown/ideal", "d_countdown/predictor"),
                 quantile_eval=False, max_new_tokens=4),
)
FIELDS = ["model", "method", "mode", "setting", "sparsity_target", "sparsity_realised", "task",
          "metric", "score", "stderr", "dense_score", "diff_stderr", "preservation",
          "n_examples"]


def shadow_model_dir(src: Path, dst: Path) -> Path:
    """A model directory whose params/tokenizer link to src but whose trees/ are private."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("params", "tokenizer"):
        link = dst / name
        if not link.exists():
            os.symlink(src / name, link)
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def calibrate_model(model, sizes, sparsities, *, seq_len=128):
    """Thresholds for CATS and M at every r; returns calibration.csv rows."""
    params, cfg = model.params, model.cfg
    tokens, lengths = C.calibration_rows(model.tokenizer, seq_len, sizes["calib_rows"])
    rows = []
    for method in THRESHOLD_METHODS:
        ideal = C.collect_stats(params, cfg, tokens, lengths, method=method,
                                sparsities=sparsities, forward="ideal")
        dense = C.collect_stats(params, cfg, tokens, lengths, method=method,
                                sparsities=sparsities, forward="dense")
        for r in sparsities:
            for kind, stats, stat in (("thresholds", ideal, "mean_kth"),
                                      ("thresholds_quantile", dense, "quantile")):
                tau = stats.thresholds(r, stat)
                C.save_thresholds(model.path, method, r, tau, kind=kind,
                                  meta=dict(stat=stat, forward=stats.forward,
                                            calib_tokens=int(lengths.sum())))
                for layer, t in enumerate(tau):
                    rows.append(dict(method=method, stat=stat, forward=stats.forward,
                                     sparsity_target=r, layer=layer, threshold=float(t)))
    return rows


def train_predictors(model, sizes, sparsities, rank):
    rows = []
    for method in PREDICTOR_METHODS:
        tc = P.TrainConfig(rank=rank, epochs=sizes["epochs"])
        rows += P.train_and_save(model.path, model.tokenizer, model.params, model.cfg,
                                 method=method, sparsities=sparsities, tc=tc,
                                 rows=sizes["pred_rows"], theta_rule="match")
    return rows


def quantile_settings(model, sparsities):
    """CATS / M with CATS's quantile thresholds (the variant calibration statistic)."""
    from conversion.checkpoint import load_tree
    from countdown_jax.api import policy_name

    out = []
    for method in THRESHOLD_METHODS:
        pols = [C.threshold_policy(model.cfg, load_tree(
            model.path, policy_name("thresholds_quantile", method, r))["threshold"])
            for r in sparsities]
        out.append(E.stacked_setting(f"{method}/threshold-quantile",
                                     SparseSpec(method=method, mode="threshold"),
                                     sparsities, pols))
    return out


def agreement_prompts(tokenizer, n, prompt_len=24, seed=1):
    texts = D.subsample(D.perplexity_texts(), 4 * n, seed)
    ids = [tokenizer.encode(t, add_special_tokens=True)[:prompt_len] for t in texts]
    ids = [x for x in ids if len(x) == prompt_len][:n]
    return np.array(ids, np.int32), np.full((len(ids),), prompt_len, np.int32)


TASK_GROUPS = (("boolq_ppl",), ("lambada",), MC_TASKS)


def evaluate_model(name, model, sizes, sparsities, *, max_new_tokens=16, on_rows=None):
    """Score every setting, one task group at a time (``on_rows`` gets the rows so far
    after each group, so an interrupted run keeps what is done)."""
    params, cfg = model.params, model.cfg
    max_new_tokens = sizes.get("max_new_tokens", max_new_tokens)
    settings = E.settings_for(model, THRESHOLD_METHODS + PREDICTOR_METHODS,
                              ("ideal", "practical"), sparsities)
    rows = []

    def emit(new):
        for r in new:
            ds = r["dense_score"]
            if r["metric"] == "ppl":
                r["preservation"] = ds / r["score"] if r["score"] else float("nan")
            else:
                r["preservation"] = r["score"] / ds if ds else float("nan")
        rows.extend(new)
        if on_rows:
            on_rows(rows)

    for group in TASK_GROUPS:
        tasks = [t for t in group if t in sizes["n_docs"] or t in ("boolq_ppl", "lambada")]
        if not tasks:
            continue
        items, gold = E.build_items(model.tokenizer, tasks, sizes["n_docs"],
                                    ppl_texts=sizes["ppl_texts"], lambada=sizes["lambada"])
        n_sparse = sum(len(it.continuation) - 1 for it in items)
        log(f"{name}: {'+'.join(tasks) if len(tasks) < 3 else 'multiple choice'}: "
            f"{len(items)} items ({n_sparse} sparse tokens) x "
            f"{sum(s.size for s in settings)} settings")
        scores = E.score(params, cfg, items, settings, desc=f"{name} {group[0]}",
                         max_rows=sizes.get("max_rows", E.MAX_ROWS))
        emit(E.summarize(scores, gold, model=name))
        log(f"{name}: scored in {scores.seconds:.0f} s")
        if group == ("boolq_ppl",) and sizes.get("quantile_eval", True):
            # calibration variant (CATS's quantile statistic) on the perplexity text
            q_sets = [E.dense_setting()] + quantile_settings(model, sparsities)
            q_scores = E.score(params, cfg, items, q_sets, desc=f"{name} quantile thresholds",
                               max_rows=sizes.get("max_rows", E.MAX_ROWS))
            emit([r for r in E.summarize(q_scores, {}, model=name) if r["method"] != "dense"])
        if group == ("boolq_ppl",):
            # generation agreement right after: the cheapest informative signal
            keep = sizes.get("agree_settings")
            agree_sets = [st for st in settings if keep is None or st.name in keep]
            prompts, lengths = agreement_prompts(model.tokenizer, sizes["agree_prompts"])
            t0 = time.perf_counter()
            agree = E.agreement(params, cfg, prompts, lengths, agree_sets,
                                max_new_tokens=max_new_tokens)
            emit(E.agreement_rows(agree, agree_sets, model=name,
                                  max_new_tokens=max_new_tokens))
            log(f"{name}: agreement in {time.perf_counter() - t0:.0f} s")
    return rows


def saved_calibration(model, sparsities):
    """calibration.csv rows from thresholds already saved in the model dir, or None."""
    from conversion.checkpoint import load_tree, tree_meta
    from countdown_jax.api import policy_name

    rows = []
    try:
        for method in THRESHOLD_METHODS:
            for r in sparsities:
                for kind in ("thresholds", "thresholds_quantile"):
                    name = policy_name(kind, method, r)
                    tau = load_tree(model.path, name)["threshold"]
                    meta = tree_meta(model.path, name)
                    for layer, t in enumerate(tau):
                        rows.append(dict(method=method, stat=meta.get("stat"),
                                         forward=meta.get("forward"), sparsity_target=r,
                                         layer=layer, threshold=float(t)))
    except FileNotFoundError:
        return None
    return rows


def saved_predictors(model, sparsities):
    """predictor.csv summary rows (layer = -1: mean over layers) from saved metadata."""
    from conversion.checkpoint import tree_meta
    from countdown_jax.api import policy_name

    rows = []
    try:
        for method in PREDICTOR_METHODS:
            for r in sparsities:
                m = tree_meta(model.path, policy_name("predictors", method, r))
                rows.append(dict(method=method, sparsity_target=r, layer=-1,
                                 rank=m.get("rank"), theta=m.get("theta_rule"),
                                 precision=m.get("val_precision"), recall=m.get("val_recall"),
                                 f1=m.get("val_f1"),
                                 realised_sparsity=m.get("val_realised_sparsity"),
                                 label_sparsity=r, bce=m.get("val_bce_final")))
    except FileNotFoundError:
        return None
    return rows


def write_csv(path: Path, rows, fields=None, keep_other_models: bool = True):
    """Write rows; rows of models not in ``rows`` already in the file are kept, so models
    can be (re)run one at a time."""
    if not rows:
        return
    if keep_other_models and path.is_file():
        mine = {r["model"] for r in rows}
        with open(path, newline="") as f:
            old = [r for r in csv.DictReader(f) if r.get("model") not in mine]
        rows = old + list(rows)
    fields = fields or list(rows[0])
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(rows, out_dir: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def num(r):
        out = dict(r)
        for k in ("sparsity_target", "sparsity_realised", "score", "dense_score",
                  "preservation", "stderr"):
            try:
                out[k] = float(r[k])
            except (KeyError, TypeError, ValueError):
                out[k] = float("nan")
        return out

    rows = [num(r) for r in rows]
    models = sorted({r["model"] for r in rows})
    panels = [("MC avg acc_norm preservation", lambda r: r["metric"] == "acc_norm"
               and r["task"] in MC_TASKS),
              ("BoolQ-passage perplexity (sparse half)", lambda r: r["task"] == "boolq_ppl"),
              ("LAMBADA acc (sparse second half)", lambda r: r["task"] == "lambada"
               and r["metric"] == "acc"),
              ("generation agreement (greedy, vs dense)", lambda r: r["task"] == "generation")]
    fig, axes = plt.subplots(len(models), len(panels), figsize=(5 * len(panels),
                                                                 4 * len(models)),
                             squeeze=False)
    styles = {"cats": "tab:blue", "m_countdown": "tab:orange", "d_countdown": "tab:green",
              "dejavu": "tab:red"}
    for i, model in enumerate(models):
        for j, (title, sel) in enumerate(panels):
            ax = axes[i][j]
            sub = [r for r in rows if r["model"] == model and sel(r)
                   and "quantile" not in r["setting"]]
            dense = [r for r in sub if r["method"] == "dense"]
            for method, color in styles.items():
                for mode, ls in (("ideal", "-"), ("practical", "--")):
                    pts = {}
                    for r in sub:
                        if r["method"] == method and r["mode"] == mode:
                            key = r["sparsity_target"]
                            val = r["preservation"] if "preservation" in title else r["score"]
                            pts.setdefault(key, []).append(val)
                    if pts:
                        xs = sorted(pts)
                        ax.plot(xs, [np.mean(pts[x]) for x in xs], ls, color=color,
                                marker="o", label=f"{method} {mode}")
            if dense and "preservation" not in title:
                ax.axhline(np.mean([r["score"] for r in dense]), color="k", lw=0.8,
                           label="dense")
            if "perplexity" in title:
                ax.set_yscale("log")
            ax.set_title(f"{model}: {title}", fontsize=9)
            ax.set_xlabel("target sparsity r")
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "quality_vs_sparsity.png", dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run on a handful of items")
    ap.add_argument("--models", nargs="+", default=None, choices=("smollm2", "gemma3"))
    ap.add_argument("--sparsity", type=float, nargs="+", default=list(SPARSITIES))
    ap.add_argument("--rank", type=int, default=P.DEFAULT_RANK)
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    ap.add_argument("--work-dir", default=None,
                    help="private model dirs for calibrations (default: <cache>/experiments)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the CSV")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse thresholds / predictors already saved in the work dir")
    args = ap.parse_args(argv)
    if args.plot_only:
        with open(Path(args.out) / "quality.csv", newline="") as f:
            plot(list(csv.DictReader(f)), Path(args.out))
        return 0

    from conversion.registry_models import cache_dir, converted
    from countdown_jax import api

    import jax

    # Compiles dominate small runs: keep them across runs (a no-op where unsupported).
    try:
        jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation only
        log(f"no persistent compilation cache: {e}")

    sizes_all = QUICK if args.quick else FULL
    models = args.models or list(sizes_all)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir) if args.work_dir else cache_dir() / "experiments"
    sparsities = tuple(args.sparsity)
    t_all = time.perf_counter()
    quality, calib, pred, timing = [], [], [], {}
    for name in models:
        sizes = sizes_all.get(name) or sizes_all["smollm2"]
        t0 = time.perf_counter()
        src = converted(name)
        model = api.load(shadow_model_dir(src, work / name))
        timing[f"{name}_load_s"] = time.perf_counter() - t0
        log(f"{name}: loaded from {src}")
        t0 = time.perf_counter()
        reused = saved_calibration(model, sparsities) if args.reuse else None
        calib += [dict(model=name, **r) for r in
                  (reused or calibrate_model(model, sizes, sparsities))]
        timing[f"{name}_calibrate_s"] = time.perf_counter() - t0
        log(f"{name}: calibrated in {timing[f'{name}_calibrate_s']:.0f} s"
            + (" (reused saved thresholds)" if reused else ""))
        write_csv(out / "calibration.csv", calib)
        t0 = time.perf_counter()
        reused = saved_predictors(model, sparsities) if args.reuse else None
        pred += [dict(model=name, **r) for r in
                 (reused or train_predictors(model, sizes, sparsities, args.rank))]
        timing[f"{name}_predictors_s"] = time.perf_counter() - t0
        log(f"{name}: predictors in {timing[f'{name}_predictors_s']:.0f} s"
            + (" (reused saved predictors)" if reused else ""))
        write_csv(out / "predictor.csv", pred)
        t0 = time.perf_counter()
        done = list(quality)
        quality = done + evaluate_model(
            name, model, sizes, sparsities,
            on_rows=lambda rows: write_csv(out / "quality.csv", done + rows, FIELDS))
        timing[f"{name}_evaluate_s"] = time.perf_counter() - t0
        cost = P.cost(model.cfg, args.rank)
        timing[f"{name}_predictor_relative_cost"] = cost["relative"]
    timing["total_s"] = time.perf_counter() - t_all
    tpath = out / "timing.json"
    old = json.loads(tpath.read_text()) if tpath.is_file() else {}
    tpath.write_text(json.dumps({**old, **timing}, indent=1))
    with open(out / "quality.csv", newline="") as f:
        plot(list(csv.DictReader(f)), out)
    log(f"done in {timing['total_s']:.0f} s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
