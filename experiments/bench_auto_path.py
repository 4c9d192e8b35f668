"""Fast by default, measured (issue #13 item 4): the decode tokens/s the user path gets
with no flags (``api.generate_tokens``, the code ``countdown-jax generate`` and
``cj.generate_text`` run once the prompt is tokenized and the rule loaded, every choice
"auto") against ``bench_decode``'s best path for the same model and rule (unstacked
layers, Pallas FFN with no capacity, Pallas attention; ``bench.decode.time_decode``), in
one table with their ratio: the target is the user path within 10% of the best.

The model is random, Llama-3.1-8B-shaped (32 layers, bf16, made on the device; --tiny:
the CPU smoke shapes), no stop tokens, so every decode step runs. The rules and their
thresholds / predictor offsets come from bench_decode's calibration (realised sparsity
near the target; both sides report it). Both sides decode ``--steps`` tokens after a
``--prompt-len`` prompt; the user path's rate is the median of ``--repeats`` calls of
the compiled program (compile excluded, as ``generate_text`` reports it).

    PYTHONPATH=. python3 experiments/bench_auto_path.py --out DIR      # GPU, ~2 min
    ... --batches 2,4,8 --sparsity 0.5,0.7,0.9 --best none     # the batch grid, x dense
    python -m experiments.bench_auto_path --tiny --out /tmp/auto       # CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax import api
from countdown_jax.config import ModelConfig
from countdown_jax.generate import decode_params
from countdown_jax.policy import SparseSpec, make_policy
from countdown_jax.sharding import random_params
from experiments.bench.decode import (PROXY, calibrate, cats_policy, proxy_policy,
                                      random_predictor, time_decode)
from experiments.bench.harness import write_csv
from experiments.bench.shapes import LLAMA_3_1_8B, TINY_DECODER

TARGET = 0.9        # the user path's decode rate over the best path's, at least


def _setups(params, cfg, predictor, r, methods):
    """method -> (sparsity method, mode, policy) at sparsity r (dense: no policy; cats: its
    thresholds on |act(gate x)|; "proxy":
    D-COUNTDOWN in proxy mode, its proxy quantized from the random weights)."""
    tau, theta = calibrate(params, cfg, predictor, r, jax.random.PRNGKey(2))
    out = {"dense": ("dense", "ideal", None),
           "m_countdown": ("m_countdown", "threshold", make_policy(cfg.num_layers, threshold=tau)),
           "d_countdown": ("d_countdown", "predictor", make_policy(cfg.num_layers, theta=theta,
                                                                   predictor=predictor))}
    if "cats" in methods:
        out["cats"] = ("cats", "threshold", cats_policy(params, cfg, r, jax.random.PRNGKey(2)))
    if PROXY in methods:
        out[PROXY] = ("d_countdown", "proxy",
                      proxy_policy(params, cfg, r, jax.random.PRNGKey(2)))
    return out


def user_path(model, spec, policy, batch, steps, prompt_len, repeats):
    """(median decode tokens/s, realised sparsity, resolved path) of the no-flag path."""
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (batch, prompt_len), 3,
                                           model.cfg.vocab_size), np.int32)
    lengths = np.full((batch,), prompt_len, np.int32)
    outs = [api.generate_tokens(model, tokens, lengths, spec, policy,
                                max_new_tokens=steps + 1) for _ in range(repeats + 1)]
    for o in outs:
        if any(len(ids) != steps + 1 for ids in o.token_ids):
            raise RuntimeError("a row stopped early: the rates would not compare")
    rate = statistics.median(o.tokens_per_s for o in outs[1:])   # the first warms up
    return rate, outs[-1].realised_sparsity, outs[-1].path


CANDIDATES = ("lists", "union", "compact", "masked", "dense")


def best_path(params, cfg, spec, policy, batch, steps, prompt_len, repeats, candidates):
    """bench_decode's best path: unstacked, Pallas attention, the fastest FFN of
    ``candidates`` ("lists" / "union" / "compact": the Pallas FFN with that batch kernel, "masked",
    "dense": the dense FFN; one token: the Pallas FFN): (tokens/s, realised sparsity,
    the winner's name)."""
    if spec.is_dense:
        candidates = ("dense",)
    elif batch == 1:
        candidates = ("lists",)
    best = None
    for name in candidates:
        if name == "dense":
            fast = dataclasses.replace(spec, method="dense", mode="ideal",
                                       implementation="xla")
        elif name == "masked":
            fast = dataclasses.replace(spec, implementation="masked")
        else:
            fast = dataclasses.replace(spec, implementation="pallas", batch_kernel=name)
        tps, realised, _, _, _ = time_decode(params, cfg, fast, policy, batch, steps,
                                             repeats, prompt_len, jax.random.PRNGKey(0),
                                             attention="pallas")
        print(f"  best candidate {name}: {tps:.1f} tokens/s", flush=True)
        if best is None or tps > best[0]:
            best = tps, realised, name
    return best


def write(out: Path, name: str, rows):
    write_csv(out / f"{name}.csv", rows)
    lines = [f"User path (no flags) vs bench_decode's best path, {rows[0]['shape']}, "
             f"{rows[0]['device']}, bf16; target: user / best >= {TARGET}.", "",
             "x dense: the user path's rate over the dense user path's at the same batch, "
             "same run.", "",
             "| method | mode | r | batch | user path (layers / FFN / attention) | user tokens/s | "
             "x dense | best tokens/s (its FFN) | user / best | r realised user / best | "
             "within 10% | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r.get('mode', '')} | {r['sparsity']} | {r['batch']} | {r['user_path']} | "
                     f"{r['user_tokens_per_s']} | {r['x_dense']} | {r['best_tokens_per_s']} "
                     f"({r.get('best_ffn', '')}) | {r['ratio']} | "
                     f"{r['realised_user']} / {r['realised_best']} | {r['within_10pct']} | "
                     f"{r['note']} |")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--name", default=None,
                    help="output file stem (default bench_auto_path, tiny: bench_auto_path_tiny)")
    ap.add_argument("--methods", default="m_countdown,d_countdown,dense",
                    help=f"comma list of dense, m_countdown, cats, d_countdown, {PROXY} "
                    "(D-COUNTDOWN, proxy mode); put dense first for x dense")
    ap.add_argument("--sparsity", default="0.9", help="target r, comma-separated")
    ap.add_argument("--best", default="lists,masked",
                    help=f"the best path's FFN candidates at batches, from {CANDIDATES}; "
                         "'none': time the user path only")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--budget-s", type=float, default=75.0,
                    help="start no new setting after this many seconds")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    cfg = ModelConfig.from_hf(TINY_DECODER if args.tiny else LLAMA_3_1_8B)
    cfg = dataclasses.replace(cfg, eos_token_ids=())          # every step decodes
    params = random_params(cfg, jax.random.PRNGKey(0), jnp.bfloat16)
    predictor = random_predictor(jax.random.PRNGKey(1), cfg, min(args.rank, cfg.d_model))
    model = api.Model(params=params, cfg=cfg, path=Path("random"), tokenizer=None)
    best = () if args.best == "none" else tuple(args.best.split(","))
    if set(best) - set(CANDIDATES):
        raise SystemExit(f"--best: unknown candidates {sorted(set(best) - set(CANDIDATES))}")
    sparsities = [float(r) for r in args.sparsity.split(",")]
    methods = args.methods.split(",")
    setups = {r: _setups(params, cfg, predictor, r, methods) for r in sparsities}
    # one unstacked copy, shared: the user path's (cached by decode_params) is the best's
    fast_params = decode_params(params, "unstacked")
    device = jax.devices()[0].device_kind
    shape = "tiny" if args.tiny else "llama3.1-8b"
    name = args.name or ("bench_auto_path_tiny" if args.tiny else "bench_auto_path")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"setup {time.perf_counter() - t_start:.1f} s", flush=True)
    settings = [(b, m, r) for b in (int(b) for b in args.batches.split(","))
                for m in methods
                for r in ((0.0,) if m == "dense" else sparsities)]
    dense_rate = {}
    for batch, method, r in settings:
        if time.perf_counter() - t_start > args.budget_s:
            print("budget spent: stop", flush=True)
            break
        rule, mode, policy = setups[sparsities[0] if method == "dense" else r][method]
        spec = SparseSpec(method=rule, mode=mode,
                          target_sparsity=None if method == "dense" else r)
        row = dict(device=device, shape=shape, method=rule, mode=mode, sparsity=r, batch=batch,
                   user_path="", batch_kernel="", user_tokens_per_s=float("nan"),
                   x_dense=float("nan"), best_tokens_per_s=float("nan"), best_ffn="",
                   ratio=float("nan"), realised_user=float("nan"),
                   realised_best=float("nan"), within_10pct="", note="")
        t0 = time.perf_counter()
        try:
            u_tps, u_real, path = user_path(model, spec, policy, batch, args.steps,
                                            args.prompt_len, args.repeats)
            row.update(user_path="/".join((path.layers, path.ffn, path.attention)),
                       batch_kernel=path.batch_kernel if path.ffn == "pallas" else "",
                       user_tokens_per_s=round(u_tps, 2), realised_user=round(u_real, 4))
            if method == "dense":
                dense_rate[batch] = u_tps
            if batch in dense_rate:
                row["x_dense"] = round(u_tps / dense_rate[batch], 3)
            if best:
                b_tps, b_real, b_name = best_path(fast_params, cfg, spec, policy, batch,
                                                  args.steps, args.prompt_len, args.repeats,
                                                  best)
                row.update(best_tokens_per_s=round(b_tps, 2), realised_best=round(b_real, 4),
                           best_ffn=b_name, ratio=round(u_tps / b_tps, 3),
                           within_10pct="yes" if u_tps >= TARGET * b_tps else "NO")
        except Exception as e:      # keep the other rows; say what failed
            row["note"] = f"{type(e).__name__}: {str(e)[:200]}"
        row["note"] = (row["note"] + f" ({time.perf_counter() - t0:.0f} s)").strip()
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(out, name, rows)
    if rows:
        print((out / f"{name}.md").read_text())
    return rows


if __name__ == "__main__":
    main()
