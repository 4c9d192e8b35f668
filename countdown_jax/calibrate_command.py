"""The ``countdown-jax calibrate`` command: per-layer thresholds at each --sparsity
(``calibrate``), or per-layer allocations at each bytes --budget (``budget``)."""

from __future__ import annotations

import json
import time

from countdown_jax.argtypes import positive_int
from countdown_jax.budget import (DELTAS, calibrate_budgets, check_budgets, check_deltas,
                                  rule_for, summary)
from countdown_jax.calibrate import (AGGREGATES, FORWARDS, PROXY_GROUPS, STATS,
                                     CalibrationText, calibrate_thresholds,
                                     default_proxy_group)
from countdown_jax.policy import BUDGET_MODES, Budget
from countdown_jax.proxy import BITS

METHODS = ("cats", "m_countdown", "d_countdown", "s_countdown")


def _mode(args) -> str:
    """--mode, defaulting to proxy with --proxy-bits and to threshold otherwise."""
    if args.mode is not None:
        return args.mode
    return "proxy" if args.proxy_bits is not None else "threshold"


def _check(args):
    """Before the model loads: the rule (method x mode, the proxy for d_countdown only),
    budgets in (0, 1] on the 0.01 grid, oracle modes only with --budget, and an explicit
    proxy group dividing the model width."""
    mode = _mode(args)
    if args.proxy_bits is not None and mode != "proxy":
        raise ValueError(f"--proxy-bits calibrates the proxy mode, not --mode {mode}")
    if mode == "proxy" and args.method != "d_countdown":
        raise ValueError(f"--proxy-bits calibrates D-COUNTDOWN's proxy mode: use --method "
                         f"d_countdown, not {args.method!r}")
    if args.budget is None and mode not in ("threshold", "proxy"):
        raise ValueError(f"--mode {mode} ranks per token and has nothing to calibrate at a "
                         f"uniform --sparsity; give --budget to allocate it per layer")
    if args.proxy_group is not None and mode != "proxy":
        raise ValueError("--proxy-group sets the proxy's format: give --proxy-bits too")
    from conversion.checkpoint import read_config
    from countdown_jax.config import ModelConfig

    cfg = ModelConfig.from_hf(read_config(args.model_dir))
    d = cfg.d_model
    if args.budget is not None:
        for b in args.budget:
            Budget(b)                                            # (0, 1], the 0.01 grid
        check_deltas(args.deltas)
        if args.proxy_group is None or d % args.proxy_group == 0:
            check_budgets(rule_for(args.method, mode, d, args.proxy_bits, args.proxy_group),
                          args.budget, m=cfg.d_ff, d=d)          # reachable by the rule
    if args.proxy_group is not None:
        if d % args.proxy_group:
            raise ValueError(f"proxy group {args.proxy_group} must divide the model width "
                             f"d={d} (default: {default_proxy_group(d)}, the largest of "
                             f"{', '.join(map(str, PROXY_GROUPS[:4]))}, ... dividing d)")


def _run(args):
    from countdown_jax import api

    t0 = time.perf_counter()
    model = api.load(args.model_dir)
    text = CalibrationText(rows=args.rows, seq_len=args.seq_len,
                           held_out_rows=args.held_out_rows, batch_size=args.batch_size)
    mode = _mode(args)
    if args.budget is not None:
        rule = rule_for(args.method, mode, model.cfg.d_model, args.proxy_bits,
                        args.proxy_group)
        for fit in calibrate_budgets(model, rule, args.budget, text=text,
                                     deltas=args.deltas):
            print(summary(fit))
    else:
        fits = calibrate_thresholds(model, args.method, args.sparsity, stat=args.stat,
                                    agg=args.agg, offset=args.offset, forward=args.forward,
                                    proxy_bits=(args.proxy_bits or 4) if mode == "proxy"
                                    else None, proxy_group=args.proxy_group, text=text)
        for fit in fits:
            print(json.dumps({**fit.meta, "saved": str(fit.path)}))
    print(f"calibrated in {time.perf_counter() - t0:.1f} s")


def register(subparsers):
    p = subparsers.add_parser(
        "calibrate", help="per-layer thresholds for CATS / M-COUNTDOWN (threshold mode) or "
                          "D-COUNTDOWN's low-bit proxy (proxy mode) at each --sparsity, or "
                          "a per-layer allocation of any of them (and of the oracle modes) "
                          "at each bytes --budget",
        description="--sparsity R: per-layer thresholds keeping about 1 - R of the neurons "
                    "in every layer. --budget B: the share of each layer chosen so the FFN "
                    "reads B of the dense FFN's weight bytes in all, where the loss on the "
                    "calibration text grows least (docs/budgets.md); it measures one "
                    "forward per layer and --deltas entry.")
    p.add_argument("model_dir")
    p.add_argument("--method", choices=METHODS, required=True)
    amount = p.add_mutually_exclusive_group(required=True)
    amount.add_argument("--sparsity", type=float, nargs="+", metavar="R",
                        help="uniform target sparsities (threshold / proxy mode)")
    amount.add_argument("--budget", type=float, nargs="+", metavar="B",
                        help="FFN weight bytes per decode token as a share of dense, in "
                             "(0, 1] (cost.bytes_share of the rule): allocate per layer")
    p.add_argument("--mode", choices=BUDGET_MODES, default=None,
                   help="the rule calibrated: threshold (default), proxy (default with "
                        "--proxy-bits), or with --budget also ideal / topk (per-layer r)")
    p.add_argument("--deltas", type=float, nargs="+", default=list(DELTAS), metavar="D",
                   help="--budget: each layer's KL is measured at logit(K) + D around the "
                        "budget's uniform kept share K (decreasing, with 0)")
    p.add_argument("--stat", choices=STATS, default="mean_kth")
    p.add_argument("--agg", choices=AGGREGATES, default="mean")
    p.add_argument("--offset", type=float, default=0.0)
    p.add_argument("--forward", choices=FORWARDS, default=None,
                   help="MLP inputs from an ideal-sparse (release) or dense forward; default "
                        "ideal for mean_kth, dense for quantile and the proxy")
    p.add_argument("--seq-len", type=positive_int, default=CalibrationText.seq_len)
    p.add_argument("--rows", type=positive_int, default=CalibrationText.rows,
                   help="calibration rows of seq-len tokens")
    p.add_argument("--held-out-rows", type=positive_int, default=CalibrationText.held_out_rows)
    p.add_argument("--batch-size", type=positive_int, default=CalibrationText.batch_size)
    p.add_argument("--proxy-bits", type=int, choices=BITS, default=None,
                   help="the proxy mode's copy of W_gate / W_up at this many bits "
                        "(--method d_countdown; default 4 with --mode proxy)")
    p.add_argument("--proxy-group", type=int, default=None,
                   help="inputs per scale of the proxy (must divide the model width); "
                        "default: the largest of 128, 64, 32, ... that divides it")
    p.set_defaults(func=_run, check=_check)
