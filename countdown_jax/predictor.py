"""The D-COUNTDOWN (and Deja Vu-style) low-rank neuron predictor: data, training, metrics.

Per layer a linear low-rank map on the MLP input x: z = (x V) U^T, V [d, rank], U [m, rank];
inference keeps neurons with z_i > theta (``selection.predictor_logits``). Labels are the
oracle masks of the ideal rule at the target r: top of |s| (D-COUNTDOWN) or of the signed
g (Deja Vu-style), from ``selection.rank_quantity`` / ``selection.ideal_mask``.

Data: MLP inputs of a dense forward over calibration text (``data.calibration_texts``),
split by document into train / validation (validation is the small side). The masks for
several r are nested (a larger r keeps a subset), so one uint8 "level" per (token,
neuron) stores them all: level = number of the sorted r's at which the neuron is kept.

Training: every layer and every r at once (their parameters never interact: the loss is a
sum of per-(r, layer) means and AdamW is elementwise), binary cross-entropy with logits,
optax AdamW (weight decay 0.01), linear warm-up then inverse-sqrt decay.

Init: the truncated SVD of W_gate (V = Q_k sqrt(S_k), U = P_k sqrt(S_k) for
W_gate = P S Q^T), i.e. z starts as the best rank-k approximation of g = W_gate x. The
signed g is exactly Deja Vu's ranked quantity and, through act(g), the main driver of
|s|, so training starts from a predictor that already ranks far above chance. (The
release's init overwrites the matrix it decomposes; this one leaves the model untouched.)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from countdown_jax import model as model_lib
from countdown_jax.cost import predictor_share
from countdown_jax.policy import DENSE
from countdown_jax.selection import ideal_mask, predictor_logits, rank_quantity

PREDICTOR_METHODS = ("d_countdown", "dejavu")
DEFAULT_RANK = 64


# -- data -----------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "method"))
def _record_batch(params, cfg, tokens, lengths, rs, *, method: str):
    """MLP inputs x [L, B, T, d] of a dense forward and label levels [L, B, T, m] uint8."""
    B = tokens.shape[0]
    _, _, xs = model_lib.forward(params, cfg, tokens, lengths, spec=DENSE, collect=True,
                                 logits_at=jnp.zeros((B, 0), jnp.int32))

    def one_layer(args):
        mlp, x = args
        q = rank_quantity(method, mlp, x, cfg.act)
        return sum(ideal_mask(q, r).astype(jnp.uint8) for r in rs)

    levels = jax.lax.map(one_layer, (params["layers"]["mlp"], xs))
    return xs.astype(jnp.float32), levels


@dataclasses.dataclass
class PredictorData:
    x: np.ndarray           # [L, N, d] float32 MLP inputs
    level: np.ndarray       # [L, N, m] uint8: kept at the first `level` of sorted sparsities
    sparsities: tuple[float, ...]  # ascending

    @property
    def num_tokens(self) -> int:
        return self.x.shape[1]

    def labels(self, i: int) -> np.ndarray:
        """bool [L, N, m] oracle mask at sparsities[i]."""
        return self.level > i


def record(params, cfg, tokens, lengths, *, method: str, sparsities: Sequence[float],
           batch_size: int = 8, progress: bool = True) -> PredictorData:
    """(x, labels) of every valid token of rows tokens [N, T]."""
    if method not in PREDICTOR_METHODS:
        raise ValueError(f"predictors are trained for {PREDICTOR_METHODS}, not {method!r}")
    rs = tuple(sorted(float(r) for r in sparsities))
    if not rs or any(not 0.0 < r < 1.0 for r in rs):
        raise ValueError(f"sparsities must lie in (0, 1), got {list(sparsities)}")
    tokens = np.asarray(tokens, np.int32)
    lengths = np.asarray(lengths, np.int32)
    xs, levels = [], []
    for s in tqdm(range(0, tokens.shape[0], batch_size), desc=f"record {method}",
                  disable=not progress):
        tb, lb = tokens[s:s + batch_size], lengths[s:s + batch_size]
        nb = tb.shape[0]
        if nb < batch_size:  # keep one compiled shape
            tb = np.concatenate([tb, np.zeros((batch_size - nb, tb.shape[1]), np.int32)])
            lb = np.concatenate([lb, np.zeros((batch_size - nb,), np.int32)])
        x, lev = _record_batch(params, cfg, jnp.asarray(tb), jnp.asarray(lb), rs, method=method)
        valid = np.arange(tb.shape[1])[None, :] < lb[:, None]
        valid[nb:] = False
        xs.append(np.asarray(x)[:, valid])
        levels.append(np.asarray(lev)[:, valid])
    return PredictorData(np.concatenate(xs, 1), np.concatenate(levels, 1), rs)


# -- model ----------------------------------------------------------------------------------
def svd_init(gate, rank: int):
    """{"V": [L, d, rank], "U": [L, m, rank]} with (x V) U^T = rank-k approximation of W_gate x.

    W = P S Q^T from the eigendecomposition of the small Gram matrix W^T W = Q S^2 Q^T
    (d x d, float64): V = Q_k sqrt(S_k), U = W Q_k / sqrt(S_k) = P_k sqrt(S_k).
    """
    gate = np.asarray(gate, np.float64)
    L, m, d = gate.shape
    if not 1 <= rank <= min(m, d):
        raise ValueError(f"rank must be in [1, min(m, d)] = [1, {min(m, d)}], got {rank}")
    if d > m:  # decompose the other side: W W^T = P S^2 P^T
        t = svd_init(np.swapaxes(gate, 1, 2), rank)
        return {"V": t["U"], "U": t["V"]}
    evals, evecs = np.linalg.eigh(np.swapaxes(gate, 1, 2) @ gate)       # ascending
    order = np.argsort(evals, axis=-1)[:, ::-1][:, :rank]
    s = np.sqrt(np.maximum(np.take_along_axis(evals, order, axis=-1), 1e-30))   # [L, k]
    Q = np.take_along_axis(evecs, order[:, None, :], axis=-1)                  # [L, d, k]
    root = np.sqrt(s)[:, None, :]
    return {"V": (Q * root).astype(np.float32), "U": (gate @ Q / root).astype(np.float32)}


def schedule(peak_lr: float, warmup: int):
    """Linear warm-up to peak_lr over ``warmup`` steps, then peak_lr * sqrt(warmup / t)."""
    warmup = max(int(warmup), 1)

    def lr(step):
        t = jnp.asarray(step, jnp.float32) + 1.0
        return peak_lr * jnp.minimum(t / warmup, jnp.sqrt(warmup / t))

    return lr


def _logits(pred, x):
    """z [R, L, b, m] for predictors {"V": [R, L, d, k], "U": [R, L, m, k]}, x [L, b, d]."""
    per_layer = jax.vmap(predictor_logits, in_axes=(0, 0))         # over L
    stored = {"Vt": jnp.swapaxes(pred["V"], -1, -2), "U": pred["U"]}  # policy.py's layout
    return jax.vmap(per_layer, in_axes=(0, None))(stored, x)       # over R


def _bce(pred, x, labels):
    """Sum over (r, layer) of the mean BCE-with-logits: the predictors stay independent."""
    z = _logits(pred, x)
    loss = optax.sigmoid_binary_cross_entropy(z, labels.astype(jnp.float32))
    return jnp.sum(jnp.mean(loss, axis=(2, 3)))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    rank: int = DEFAULT_RANK
    epochs: float = 3.0
    batch_size: int = 256
    lr: float = 1e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    seed: int = 0


def train(data: PredictorData, gate, tc: TrainConfig = TrainConfig(), *,
          progress: bool = True, val: PredictorData | None = None, init=None):
    """Train one predictor per (sparsity, layer). Returns (pred {"V": [R,L,d,k], "U": [R,L,m,k]},
    history dict with the train loss curve and, when val is given, the initial and final
    validation BCE)."""
    R = len(data.sparsities)
    init = init if init is not None else svd_init(gate, tc.rank)
    pred = {k: jnp.asarray(np.broadcast_to(v, (R,) + v.shape).copy()) for k, v in init.items()}
    n = data.num_tokens
    steps = max(1, int(round(tc.epochs * n / tc.batch_size)))
    opt = optax.adamw(schedule(tc.lr, int(tc.warmup_frac * steps)),
                      weight_decay=tc.weight_decay)
    state = opt.init(pred)
    rs_idx = jnp.arange(R)

    @jax.jit
    def step(pred, state, x, level):
        labels = level[None] > rs_idx[:, None, None, None]                  # [R, L, b, m]
        loss, grads = jax.value_and_grad(_bce)(pred, x, labels)
        updates, state = opt.update(grads, state, pred)
        return optax.apply_updates(pred, updates), state, loss / (R * x.shape[0])

    x_all, lev_all = data.x, data.level
    rng = np.random.default_rng(tc.seed)
    history = {"loss": []}
    if val is not None:
        history["val_bce_init"] = validation_bce(pred, val)
    order = np.zeros((0,), np.int64)
    bar = tqdm(range(steps), desc=f"train predictors (R={R}, L={data.x.shape[0]}, "
                                  f"rank {tc.rank})", disable=not progress)
    for i in bar:
        if order.size < tc.batch_size:
            order = np.concatenate([order, rng.permutation(n)])
        idx, order = np.sort(order[:tc.batch_size]), order[tc.batch_size:]
        pred, state, loss = step(pred, state, jnp.asarray(x_all[:, idx]),
                                 jnp.asarray(lev_all[:, idx]))
        if i % 10 == 0 or i == steps - 1:
            history["loss"].append((i, float(loss)))
            bar.set_postfix(bce=f"{float(loss):.4f}")
    if val is not None:
        history["val_bce_final"] = validation_bce(pred, val)
    return pred, history


@jax.jit
def _eval_chunk(pred, x, level, theta):
    """Per (r, layer) counts over a chunk: tp, predicted, positives, bce sum, tokens."""
    R = pred["V"].shape[0]
    z = _logits(pred, x)                                                    # [R, L, b, m]
    labels = level[None] > jnp.arange(R)[:, None, None, None]
    keep = z > theta[..., None, None]
    tp = jnp.sum(keep & labels, axis=(2, 3))
    predicted = jnp.sum(keep, axis=(2, 3))
    positives = jnp.sum(labels, axis=(2, 3))
    bce = jnp.sum(optax.sigmoid_binary_cross_entropy(z, labels.astype(jnp.float32)),
                  axis=(2, 3))
    return tp, predicted, positives, bce


def _counts(pred, data: PredictorData, theta=None, chunk: int = 512):
    R, L = pred["V"].shape[:2]
    theta = jnp.zeros((R, L), jnp.float32) if theta is None else jnp.asarray(theta, jnp.float32)
    acc = [np.zeros((R, L)) for _ in range(4)]
    for s in range(0, data.num_tokens, chunk):
        out = _eval_chunk(pred, jnp.asarray(data.x[:, s:s + chunk]),
                          jnp.asarray(data.level[:, s:s + chunk]), theta)
        for a, o in zip(acc, out):
            a += np.asarray(o, np.float64)
    return acc


def validation_bce(pred, data: PredictorData) -> float:
    tp, predicted, positives, bce = _counts(pred, data)
    m = data.level.shape[2]
    return float(bce.sum() / (bce.size * data.num_tokens * m))


def metrics(pred, data: PredictorData, theta=None) -> dict:
    """Per (r, layer) precision, recall, F1, realised sparsity and BCE on ``data``."""
    tp, predicted, positives, bce = _counts(pred, data, theta)
    m = data.level.shape[2]
    n = data.num_tokens
    precision = tp / np.maximum(predicted, 1)
    recall = tp / np.maximum(positives, 1)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return {"precision": precision, "recall": recall, "f1": f1,
            "realised_sparsity": 1.0 - predicted / (n * m),
            "label_sparsity": 1.0 - positives / (n * m),
            "bce": bce / (n * m)}


@jax.jit
def _z_quantiles(pred, x, qs):
    z = _logits(pred, x)                                                    # [R, L, b, m]
    R, L = z.shape[:2]
    return jax.vmap(lambda zr, q: jnp.quantile(zr.reshape(L, -1), q, axis=1))(z, qs)


def matched_theta(pred, data: PredictorData, max_tokens: int = 2048) -> np.ndarray:
    """theta [R, L]: per layer the sparsity-quantile of z, so that z > theta drops a share r
    of the neurons on ``data`` (the alternative to theta = 0: match the target sparsity)."""
    qs = jnp.asarray(data.sparsities, jnp.float32)
    x = jnp.asarray(data.x[:, :max_tokens])
    return np.asarray(_z_quantiles(pred, x, qs))


def save_predictor(model_dir, method: str, r: float, V, U, theta, meta: dict | None = None):
    from conversion.checkpoint import save_tree
    from countdown_jax.api import policy_name

    tree = {"V": np.asarray(V, np.float32), "U": np.asarray(U, np.float32),
            "theta": np.asarray(theta, np.float32)}
    return save_tree(model_dir, policy_name("predictors", method, r), tree, meta=meta or {})


def cost(cfg, rank: int) -> dict:
    """Predictor parameters and FLOPs per token relative to one dense gated FFN."""
    d, m = cfg.d_model, cfg.d_ff
    return {"predictor_params_per_layer": rank * (d + m), "ffn_params_per_layer": 3 * d * m,
            "relative": predictor_share(rank, m, d)}


@dataclasses.dataclass(frozen=True)
class TrainingText:
    """What a predictor is trained on: ``rows`` packed rows of ``seq_len`` tokens of the
    calibration text, ``val_share`` of its documents held out for validation (split with
    ``seed``), recorded ``batch_size`` rows per forward pass."""

    rows: int = 160
    seq_len: int = 128
    val_share: float = 0.1
    batch_size: int = 8
    seed: int = 0


def prepare_data(tokenizer, params, cfg, *, method: str, sparsities,
                 text: TrainingText = TrainingText(), progress: bool = True):
    """(train, val) PredictorData from calibration text, split by document."""
    from countdown_jax import data

    texts = data.calibration_texts()
    train_texts, val_texts = data.split_texts(texts, text.val_share, text.seed)
    n_val = max(1, int(round(text.rows * text.val_share)))
    out = []
    for ts, n in ((train_texts, text.rows - n_val), (val_texts, n_val)):
        tokens, lengths = data.pack_tokens(tokenizer, ts, text.seq_len, max_rows=n)
        out.append(record(params, cfg, tokens, lengths, method=method, sparsities=sparsities,
                          batch_size=text.batch_size, progress=progress))
    return out[0], out[1]


def train_and_save(model_dir, tokenizer, params, cfg, *, method: str, sparsities,
                   tc: TrainConfig = TrainConfig(), theta_rule: str = "zero",
                   text: TrainingText = TrainingText(), progress: bool = True,
                   data_pair=None) -> list[dict]:
    """Record, train, evaluate on validation and save one predictor per r. Returns one
    record per (r, layer) with validation metrics (for CSV). data_pair: (train, val)
    PredictorData already recorded (``prepare_data``), read instead of ``text``."""
    if theta_rule not in ("zero", "match"):
        raise ValueError(f"theta_rule must be 'zero' or 'match', got {theta_rule!r}")
    t0 = time.perf_counter()
    tr, va = data_pair or prepare_data(tokenizer, params, cfg, method=method,
                                       sparsities=sparsities, text=text, progress=progress)
    init = svd_init(params["layers"]["mlp"]["gate"], tc.rank)
    pred, hist = train(tr, None, tc, progress=progress, val=va, init=init)
    R = len(tr.sparsities)
    theta_zero = np.zeros((R, cfg.num_layers), np.float32)
    theta_match = matched_theta(pred, tr)
    theta = theta_zero if theta_rule == "zero" else theta_match
    met = metrics(pred, va, theta)
    other = metrics(pred, va, theta_match if theta_rule == "zero" else theta_zero)
    met0 = metrics({k: jnp.asarray(np.broadcast_to(v, (R,) + v.shape)) for k, v in init.items()},
                   va, theta=None)
    seconds = time.perf_counter() - t0
    rows_out = []
    for i, r in enumerate(tr.sparsities):
        meta = dict(method=method, sparsity=r, rank=tc.rank, theta_rule=theta_rule,
                    train_tokens=tr.num_tokens, val_tokens=va.num_tokens,
                    epochs=tc.epochs, lr=tc.lr, batch_size=tc.batch_size,
                    val_bce_init=hist.get("val_bce_init"), val_bce_final=hist.get("val_bce_final"),
                    val_f1=float(met["f1"][i].mean()), val_recall=float(met["recall"][i].mean()),
                    val_precision=float(met["precision"][i].mean()),
                    val_realised_sparsity=float(met["realised_sparsity"][i].mean()),
                    train_seconds=seconds)
        save_predictor(model_dir, method, r, pred["V"][i], pred["U"][i], theta[i], meta)
        for layer in range(cfg.num_layers):
            rows_out.append(dict(method=method, sparsity_target=r, layer=layer, rank=tc.rank,
                                 theta=float(theta[i, layer]),
                                 **{k: float(v[i, layer]) for k, v in met.items()},
                                 f1_other_theta=float(other["f1"][i, layer]),
                                 realised_sparsity_other_theta=float(
                                     other["realised_sparsity"][i, layer]),
                                 f1_svd_init=float(met0["f1"][i, layer]),
                                 recall_svd_init=float(met0["recall"][i, layer])))
    return rows_out


# -- command line ---------------------------------------------------------------------------
def _run(args):
    from countdown_jax import api

    model = api.load(args.model_dir)
    tc = TrainConfig(rank=args.rank, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr)
    t0 = time.perf_counter()
    rows = train_and_save(args.model_dir, model.tokenizer, model.params, model.cfg,
                          method=args.method, sparsities=args.sparsity, tc=tc,
                          theta_rule=args.theta,
                          text=TrainingText(rows=args.rows, seq_len=args.seq_len))
    for r in sorted(set(x["sparsity_target"] for x in rows)):
        sel = [x for x in rows if x["sparsity_target"] == r]
        summary = {k: float(np.mean([x[k] for x in sel]))
                   for k in ("precision", "recall", "f1", "realised_sparsity", "f1_svd_init")}
        print(json.dumps({"method": args.method, "sparsity": r, "rank": args.rank,
                          **{f"val_{k}": round(v, 4) for k, v in summary.items()}}))
    c = cost(model.cfg, args.rank)
    print(f"predictor: {c['predictor_params_per_layer']} params/layer = "
          f"{100 * c['relative']:.1f}% of the FFN; trained in {time.perf_counter() - t0:.1f} s")


def register(subparsers):
    p = subparsers.add_parser("train-predictor", help="train the low-rank neuron predictor "
                                                      "(D-COUNTDOWN / Deja Vu-style)")
    p.add_argument("model_dir")
    p.add_argument("--method", choices=PREDICTOR_METHODS, default="d_countdown")
    p.add_argument("--sparsity", type=float, nargs="+", required=True)
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--theta", choices=("zero", "match"), default="zero",
                   help="zero: keep z > 0 (the paper); match: per-layer theta at which the "
                        "training data's realised sparsity equals the target")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--rows", type=int, default=160)
    p.set_defaults(func=_run)
