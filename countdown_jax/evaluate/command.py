"""The ``countdown-jax eval`` command."""

from __future__ import annotations

from countdown_jax.evaluate.items import build_items
from countdown_jax.evaluate.metrics import summarize
from countdown_jax.evaluate.scoring import score
from countdown_jax.evaluate.settings import settings_for

def _run(args):
    import csv
    import sys

    from countdown_jax import api

    model = api.load(args.model_dir)
    items, gold = build_items(model.tokenizer, args.tasks, args.n, seed=args.seed,
                              ppl_texts=args.n, lambada=args.n)
    settings = settings_for(model, args.method, args.mode, args.sparsity)
    scores = score(model.params, model.cfg, items, settings)
    rows = summarize(scores, gold, model=str(args.model_dir))
    w = csv.DictWriter(open(args.out, "w", newline="") if args.out else sys.stdout,
                       fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    print(f"scored {len(items)} items x {sum(s.size for s in settings)} settings in "
          f"{scores.seconds:.1f} s", file=sys.stderr)


def register(subparsers):
    from countdown_jax import data

    p = subparsers.add_parser("eval", help="offline zero-shot / perplexity evaluation, "
                                           "dense context and sparse continuation")
    p.add_argument("model_dir")
    p.add_argument("--tasks", nargs="+", default=["arc_easy", "boolq_ppl"],
                   choices=list(data.MC_TASKS) + ["boolq_ppl", "lambada"])
    p.add_argument("--method", nargs="+", default=["m_countdown"],
                   choices=("cats", "m_countdown", "d_countdown", "dejavu", "s_countdown"))
    p.add_argument("--mode", nargs="+", default=["ideal"], choices=("ideal", "practical"))
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    p.add_argument("--n", type=int, default=50, help="examples per task (deterministic "
                                                      "subsample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="CSV path (default: stdout)")
    p.set_defaults(func=_run)
