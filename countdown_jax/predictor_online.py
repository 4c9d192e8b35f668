"""Predictor training at scale: stream the model's own MLP inputs instead of storing them.

``predictor.train`` records every (x, label) pair first: [L, N, d] float32 is 69 GB for 1M
SmolLM2 tokens. Here each step runs the frozen model densely over a batch of packed
rows, labels the tokens with the oracle masks at every target r (``predictor._record_batch``,
the same labels), and updates the predictors of every rank at once (one forward serves
them all; their losses are independent, so one AdamW over all of them equals separate
runs). Validation BCE on held-out rows is checked every ``eval_every`` steps and each rank
keeps its best parameters; training stops once no rank improved for ``patience`` checks
(or at ``max_epochs``).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from countdown_jax.predictor import (PREDICTOR_METHODS, PredictorData, _bce, _logits,
                                     _record_batch, schedule, svd_init,
                                     validation_bce)


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    ranks: tuple[int, ...] = (64, 128, 256)
    batch_rows: int = 16            # packed rows per step (x seq_len tokens)
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    max_epochs: float = 4.0
    eval_every: int = 50
    patience: int = 3               # checks without a validation improvement before stopping
    seed: int = 0


def train_online(params, cfg, tokens, val: PredictorData, *, method: str = "d_countdown",
                 oc: OnlineConfig = OnlineConfig(), progress: bool = True):
    """Train one predictor per (rank, r) on packed full rows tokens [N, T].

    val: held-out ``predictor.record`` data (its sparsities are the targets r).
    Returns ({rank: {"V": [R, L, d, k], "U": [R, L, m, k]}} at each rank's best validation
    BCE, history {"steps", "tokens", "val_bce": {rank: [(step, bce)]}, "seconds"}).
    """
    if method not in PREDICTOR_METHODS:
        raise ValueError(f"predictors are trained for {PREDICTOR_METHODS}, not {method!r}")
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[0] < oc.batch_rows:
        raise ValueError(f"need at least batch_rows={oc.batch_rows} packed rows, got "
                         f"{tokens.shape}")
    rs = val.sparsities
    R, L = len(rs), cfg.num_layers
    gate = params["layers"]["mlp"]["gate"]
    preds = {}
    for k in oc.ranks:
        init = svd_init(np.asarray(gate, np.float32), k)
        preds[str(k)] = {n: jnp.asarray(np.broadcast_to(v, (R,) + v.shape).copy())
                         for n, v in init.items()}
    n_rows, T = tokens.shape
    steps_per_epoch = n_rows // oc.batch_rows
    max_steps = max(1, int(oc.max_epochs * steps_per_epoch))
    opt = optax.adamw(schedule(oc.lr, oc.warmup_steps), weight_decay=oc.weight_decay)
    state = opt.init(preds)
    lengths = jnp.full((oc.batch_rows,), T, jnp.int32)
    rs_arr = jnp.asarray(rs, jnp.float32)
    r_idx = jnp.arange(R)

    @jax.jit
    def step(preds, state, batch):
        x, lev = _record_batch(params, cfg, batch, lengths, rs_arr, method=method)
        x = x.reshape(L, -1, x.shape[-1])
        labels = lev.reshape(L, -1, lev.shape[-1])[None] > r_idx[:, None, None, None]

        def loss_fn(ps):
            return sum(_bce(p, x, labels) for p in ps.values())

        loss, grads = jax.value_and_grad(loss_fn)(preds)
        updates, state = opt.update(grads, state, preds)
        return optax.apply_updates(preds, updates), state, loss / (R * len(preds))

    best = {k: (validation_bce(p, val), p) for k, p in preds.items()}
    history = {"val_bce": {k: [(0, b)] for k, (b, _) in best.items()}, "loss": []}
    rng = np.random.default_rng(oc.seed)
    order = np.zeros((0,), np.int64)
    stale, t0, i = 0, time.perf_counter(), 0
    bar = tqdm(range(max_steps), desc=f"train predictors online (ranks {list(oc.ranks)}, "
                                      f"R={R}, L={L})", disable=not progress)
    for i in bar:
        if order.size < oc.batch_rows:
            order = np.concatenate([order, rng.permutation(n_rows)])
        idx, order = order[:oc.batch_rows], order[oc.batch_rows:]
        preds, state, loss = step(preds, state, jnp.asarray(tokens[np.sort(idx)]))
        if (i + 1) % oc.eval_every and i + 1 < max_steps:
            continue
        history["loss"].append((i + 1, float(loss)))
        improved = False
        for k, p in preds.items():
            b = validation_bce(p, val)
            history["val_bce"][k].append((i + 1, b))
            if b < best[k][0] - 1e-5:
                best[k], improved = (b, p), True
        bar.set_postfix(bce=f"{float(loss):.4f}")
        stale = 0 if improved else stale + 1
        if stale >= oc.patience:
            break
    bar.close()
    history.update(steps=i + 1, tokens=(i + 1) * oc.batch_rows * T,
                   seconds=time.perf_counter() - t0,
                   best_val_bce={k: b for k, (b, _) in best.items()})
    return {int(k): p for k, (_, p) in best.items()}, history


@jax.jit
def _z_quantile(pred, x, q):
    z = _logits(pred, x)                                             # [R, L, b, m]
    R, L = z.shape[:2]
    return jnp.quantile(jnp.moveaxis(z, 1, 0).reshape(L, R, -1), q, axis=-1)   # [S, L, R]


def theta_for_share(pred, data: PredictorData, shares: Sequence[float],
                    max_tokens: int = 4096) -> np.ndarray:
    """theta [R, L, S]: per predictor and layer, the logit above which a share ``shares[s]``
    of the (token, neuron) pairs of ``data`` lies (z > theta keeps about that share)."""
    q = jnp.asarray([1.0 - s for s in shares], jnp.float32)
    out = _z_quantile(pred, jnp.asarray(data.x[:, :max_tokens]), q)   # [S, L, R]
    return np.transpose(np.asarray(out), (2, 1, 0))
