"""Per-FFN GPU time of one decode token: dense vs CATS / M-COUNTDOWN / D-COUNTDOWN, every
paper model's MLP shape (experiments/bench/shapes.py), bf16 and fp32, batch 1/4/8.

Run on a GPU (device tool), from the repository root:
    PYTHONPATH=. python3 experiments/bench_kernels.py --plan matrix --out DIR
    python -m experiments.bench_kernels --plan report     # tables + plot from the CSVs

Timing: experiments/bench/harness.py (one jitted fori_loop, output fed back into the
input, several weight sets per iteration, median per call; the loop's own update is its
own "loop-overhead" row). Correctness: every timed row's first call is compared with the
float32 plain-JAX reference (relative error, kept-count equality). The HBM ceilings are
measured in the same run. Plans by purpose: experiments/bench/ffn_plans.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from experiments.bench.ffn_problem import D, M, METHODS
from experiments.bench.ffn_runner import LISTS

EPILOG = ("plans: tune (variant sweep, then the matrix), matrix (every shape x dtype x "
          "method x r with --best), xla-scores (sparse-only kernels fed by XLA's GEMV), "
          "prefetch (W_down-prefetch variants vs --best, stage profiles, rest of the "
          "matrix), probe (one knob of the chosen kernels at a time), stages (profiler "
          "stage times of --best), proxy (the low-bit proxy rule: its scores kernel alone and the "
          "proxy D-COUNTDOWN FFN; bench_proxy.md), floor (fixed-overhead variants at batch 1, "
          "one process; bench_kernels_floor.md), union (decode batches: the union read once "
          "by the GEMV, its tiles, lists, masked; bench_kernels_union.md), mosaic-gpu (can "
          "Mosaic GPU gather rows?), report "
          "(bench_kernels.md/.png from the CSVs in --out).")
# Names of earlier versions, refused with the name that replaced them: plans, and the
# keys of --best / --xs-best and the names of --methods.
RENAMED_PLANS = {"all": "tune", "full": "matrix", "focus": "xla-scores"}
RENAMED_NAMES = {"gather": LISTS, "m": M, "d": D}


def _plan(name):
    if name in RENAMED_PLANS:
        raise argparse.ArgumentTypeError(f"plan {name!r} was renamed {RENAMED_PLANS[name]!r}")
    return name


def _name(name):
    if name in RENAMED_NAMES:
        raise argparse.ArgumentTypeError(f"{name!r} was renamed {RENAMED_NAMES[name]!r}")
    return name


def _labels_json(text):
    """--best / --xs-best: a JSON object whose keys are checked by ``_name``."""
    best = json.loads(text) if text else {}
    for key in best:
        _name(key)
    return best


def parse_args(argv=None):
    from experiments.bench.ffn_plans import PLANS
    ap = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", default="tune", type=_plan,
                    choices=[*PLANS, "mosaic-gpu", "report"])
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--sets", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--budget-s", type=float, default=520)
    ap.add_argument("--best", default={}, type=_labels_json, help="json {method: label, 'lists': label} (the "
                    "fused kernel's variant per method, the index-list kernel's); prefetch / "
                    "probe / stages default to the kernels' shipped defaults")
    ap.add_argument("--only", default="", help="matrix / prefetch / probe: comma list of "
                    "shape/dtype/batch steps, each optionally :fused, :gathered or :both "
                    "(one kind of step)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    ap.add_argument("--xs-best", default={}, type=_labels_json, help="xla-scores: json {method: label}, skips "
                    "the sweep")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), type=_name,
                    help="xla-scores: all-r methods; union: the batch's methods")
    ap.add_argument("--labels", nargs="*", default=[],
                    help="union: only these columns (ffn_floor.UNION_STEPS labels, e.g. "
                    "union compact compact-g64x128s8st3 masked); default all")
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.plan == "report":
        from experiments.bench.ffn_report import report
        report(os.path.join(args.out, "bench_kernels.csv"),
               os.path.join(args.out, "bench_kernels.md"),
               os.path.join(args.out, "bench_kernels.png"))
        return 0
    import jax

    from experiments.bench.ffn_plans import PLANS
    from experiments.bench.ffn_runner import LISTS, Runner, log
    from experiments.bench.ffn_variants import GPU, SMOKE, chosen
    log(f"jax {jax.__version__} devices {jax.devices()}")
    if args.plan == "mosaic-gpu":
        from experiments.bench.mosaic_probe import probe_mosaic_gpu
        log("mosaic gpu probe:", json.dumps(probe_mosaic_gpu(), indent=1))
        return 0
    R = Runner(args, SMOKE if args.smoke else GPU)
    best = dict(args.best)
    if not best and args.plan in ("prefetch", "probe", "stages"):    # these compare to them
        best = {**chosen(), LISTS: R.scale.tune_gather[0][0]}
    try:
        PLANS[args.plan](R, best)
    finally:
        log(f"wrote {len(R.rows)} rows to {R.csv_path} in {time.time() - R.t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
