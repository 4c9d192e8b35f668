"""Per-layer thresholds for the practical (threshold-mode) CATS and M-COUNTDOWN.

Two statistics (method.md, "Practical"):

  mean_kth  the release's: run the ideal rule at ratio r over calibration text; per record
            (one packed row of ``seq_len`` tokens) take the mean over its tokens of the
            per-token k-th smallest ranked value (k = int(m r), as the ideal rule); per
            layer aggregate the records by mean (or median); optional additive offset.
  quantile  CATS's: the r-quantile of the pooled per-layer distribution of the ranked
            quantity (|act(g)| for CATS) over all calibration tokens, read from a
            log-spaced histogram accumulated on device (relative bin width ~0.3%).

Which forward supplies the MLP inputs: ``forward="ideal"`` runs the model with the ideal
rule at r in every layer (the release; inputs of layer l see the sparsity of layers < l,
one pass per r), ``"dense"`` runs it dense (one pass serves every r; CATS's choice).
Everything per batch is one jitted function returning per-layer sums; the host only adds
batches. ``calibrate_thresholds`` / ``calibrate_proxy`` fit a loaded model and save the
thresholds in its directory (``save_tree``), where ``api.sparsity_setup`` reads them; the
proxy's group defaults to the largest of 128, 64, 32, ... that divides the model width.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from countdown_jax import model as model_lib
from countdown_jax.policy import DENSE, SparseSpec, make_policy
from countdown_jax.proxy import proxy_scores, quantize_mlp
from countdown_jax.selection import kth_smallest, num_dropped, rank_quantity

STATS = ("mean_kth", "quantile")
AGGREGATES = ("mean", "median")
FORWARDS = ("ideal", "dense")
# Histogram for the quantile statistic: log-spaced bins over [LO, HI] plus an underflow
# and an overflow bin. Ranked quantities are |.| of activations: O(1e-6 .. 1e3) in practice.
HIST_LO, HIST_HI, HIST_BINS = 1e-8, 1e4, 8192
_NONNEGATIVE = ("cats", "m_countdown", "d_countdown", "s_countdown")


def _bin_index(a):
    """Histogram bin of nonnegative a: 0 = below HIST_LO, HIST_BINS + 1 = at/above HIST_HI."""
    step = (np.log(HIST_HI) - np.log(HIST_LO)) / HIST_BINS
    t = (jnp.log(jnp.maximum(a, 1e-30)) - np.log(HIST_LO)) / step
    return jnp.clip(jnp.floor(t).astype(jnp.int32) + 1, 0, HIST_BINS + 1)


def _bin_edges():
    return np.exp(np.linspace(np.log(HIST_LO), np.log(HIST_HI), HIST_BINS + 1))


@functools.partial(jax.jit, static_argnames=("cfg", "method", "ideal_forward", "histogram"))
def _batch_stats(params, cfg, tokens, lengths, rs, forward_r, proxy, *, method: str,
                 ideal_forward: bool, histogram: bool):
    """One batch: per-row mean k-th value [R, L, B] at each r in rs, valid-token counts
    [B], and (histogram) the per-layer histogram of the ranked quantity [L, HIST_BINS+2].
    With a proxy ([L]-stacked, ``proxy.quantize_mlp``) the ranked quantity is its |s_hat|."""
    B, T = tokens.shape
    L = cfg.num_layers
    if ideal_forward:
        spec = SparseSpec(method=method, mode="ideal")
        policy = {"sparsity": jnp.full((L,), forward_r, jnp.float32)}
    else:
        spec, policy = DENSE, None
    _, _, xs = model_lib.forward(params, cfg, tokens, lengths, spec=spec, policy=policy,
                                 collect=True, logits_at=jnp.zeros((B, 0), jnp.int32))
    valid = jnp.arange(T)[None, :] < lengths[:, None]                    # [B, T]
    count = jnp.sum(valid, axis=1).astype(jnp.float32)

    def one_layer(args):
        mlp, x, pr = args
        q = (rank_quantity(method, mlp, x, cfg.act) if pr is None
             else proxy_scores(pr, x, cfg.act))                             # [B, T, m]
        k = jnp.maximum(num_dropped(rs, q.shape[-1]), 1)                    # [R]
        # the ideal rule's cut: ideal_mask(q, r) == q > kth_smallest(q, k)
        kth = jnp.stack([kth_smallest(q, k[j]) for j in range(len(rs))], -1)   # [B, T, R]
        row = jnp.sum(jnp.where(valid[..., None], kth, 0.0), axis=1)        # [B, R]
        row = row / jnp.maximum(count, 1.0)[:, None]
        if not histogram:
            return row.T, jnp.zeros((0,), jnp.float32)
        idx = _bin_index(jnp.abs(q))
        w = jnp.broadcast_to(valid[..., None], q.shape).astype(jnp.float32)
        hist = jnp.zeros((HIST_BINS + 2,), jnp.float32).at[idx.reshape(-1)].add(w.reshape(-1))
        return row.T, hist

    rows, hist = jax.lax.map(one_layer, (params["layers"]["mlp"], xs, proxy))  # [L, R, B]
    return jnp.transpose(rows, (1, 0, 2)), count, hist


@dataclasses.dataclass
class Stats:
    """Calibration statistics of one method over a set of rows."""

    method: str
    forward: str
    sparsities: tuple[float, ...]
    row_kth: np.ndarray                 # [R, N_rows, L] per-row mean k-th value
    row_tokens: np.ndarray              # [N_rows] valid tokens per row
    hist: np.ndarray | None             # [L, HIST_BINS + 2] (dense forward only)

    def thresholds(self, r: float, stat: str = "mean_kth", agg: str = "mean",
                   offset: float = 0.0) -> np.ndarray:
        """Per-layer threshold [L] at sparsity r."""
        if stat not in STATS:
            raise ValueError(f"unknown statistic {stat!r}; expected one of {STATS}")
        if stat == "quantile":
            if self.hist is None:
                raise ValueError("the quantile statistic needs the histogram of a dense "
                                 "calibration pass (forward='dense')")
            return quantile_from_histogram(self.hist, r) + offset
        if agg not in AGGREGATES:
            raise ValueError(f"unknown aggregate {agg!r}; expected one of {AGGREGATES}")
        i = _index_of(self.sparsities, r)
        per_row = self.row_kth[i]
        keep = self.row_tokens > 0
        per_row = per_row[keep]
        tau = per_row.mean(axis=0) if agg == "mean" else np.median(per_row, axis=0)
        return tau + offset


def _index_of(sparsities, r):
    for i, s in enumerate(sparsities):
        if abs(s - r) < 1e-9:
            return i
    raise ValueError(f"sparsity {r} was not calibrated; have {list(sparsities)}")


def quantile_from_histogram(hist: np.ndarray, r: float) -> np.ndarray:
    """Per-layer r-quantile [L] from hist [L, HIST_BINS+2], log-linear inside the bin."""
    hist = np.asarray(hist, np.float64)
    edges = _bin_edges()
    out = np.empty(hist.shape[0])
    for layer, h in enumerate(hist):
        total = h.sum()
        if total <= 0:
            raise ValueError(f"layer {layer}: empty histogram")
        target = r * total
        cum = np.cumsum(h)
        j = int(np.searchsorted(cum, target, side="left"))
        if j == 0:
            out[layer] = HIST_LO
            continue
        if j >= HIST_BINS + 1:
            out[layer] = HIST_HI
            continue
        before = cum[j - 1]
        frac = (target - before) / h[j] if h[j] > 0 else 0.0
        lo, hi = np.log(edges[j - 1]), np.log(edges[j])
        out[layer] = np.exp(lo + frac * (hi - lo))
    return out


def collect_stats(params, cfg, tokens, lengths, *, method: str, sparsities: Sequence[float],
                  forward: str = "ideal", batch_size: int = 8, progress: bool = True,
                  proxy=None) -> Stats:
    """Run the calibration passes over rows tokens [N, T] (lengths [N]).

    proxy: a [L]-stacked ``proxy.quantize_mlp`` of the model's MLP: the statistics are of
    its |s_hat| (D-COUNTDOWN's proxy mode; dense forward only)."""
    if method not in _NONNEGATIVE and method != "dejavu":
        raise ValueError(f"cannot calibrate thresholds for method {method!r}")
    if proxy is not None and (method != "d_countdown" or forward != "dense"):
        raise ValueError("a proxy is calibrated for d_countdown over a dense forward, got "
                         f"method {method!r}, forward {forward!r}")
    if forward not in FORWARDS:
        raise ValueError(f"unknown calibration forward {forward!r}; expected one of {FORWARDS}")
    rs = tuple(float(r) for r in sparsities)
    if not rs or any(not 0.0 < r < 1.0 for r in rs):
        raise ValueError(f"sparsities must lie in (0, 1), got {list(rs)}")
    tokens = np.asarray(tokens, np.int32)
    lengths = np.asarray(lengths, np.int32)
    n = tokens.shape[0]
    histogram = forward == "dense" and method in _NONNEGATIVE
    # dense: one pass for every r; ideal: one pass per r (the forward itself depends on r)
    passes = [(None, rs)] if forward == "dense" else [(r, (r,)) for r in rs]
    row_kth = np.zeros((len(rs), n, cfg.num_layers))
    hist = np.zeros((cfg.num_layers, HIST_BINS + 2)) if histogram else None
    row_tokens = np.zeros((n,))
    bar = tqdm(total=len(passes) * n, desc=f"calibrate {method} ({forward})", unit="row",
               disable=not progress)
    for fr, prs in passes:
        for s in range(0, n, batch_size):
            tb, lb = _pad_batch(tokens[s:s + batch_size], lengths[s:s + batch_size], batch_size)
            rows, cnt, h = _batch_stats(params, cfg, jnp.asarray(tb), jnp.asarray(lb),
                                        jnp.asarray(prs, jnp.float32),
                                        jnp.float32(fr if fr is not None else 0.0),
                                        proxy, method=method, ideal_forward=fr is not None,
                                        histogram=histogram)
            nb = min(batch_size, n - s)
            rows = np.asarray(rows)[:, :, :nb]                               # [R', L, nb]
            for j, r in enumerate(prs):
                row_kth[rs.index(r), s:s + nb] = rows[j].T
            row_tokens[s:s + nb] = np.asarray(cnt)[:nb]
            if histogram:
                hist += np.asarray(h, np.float64)
            bar.update(nb)
    bar.close()
    return Stats(method, forward, rs, row_kth, row_tokens, hist)


def _pad_batch(tokens, lengths, batch_size):
    """Pad a short last batch with zero-length rows so every batch has one shape."""
    b = tokens.shape[0]
    if b == batch_size:
        return tokens, lengths
    pad = batch_size - b
    return (np.concatenate([tokens, np.zeros((pad, tokens.shape[1]), np.int32)]),
            np.concatenate([lengths, np.zeros((pad,), np.int32)]))


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _kept(params, cfg, tokens, lengths, policy, *, spec):
    B, T = tokens.shape
    _, kept = model_lib.forward(params, cfg, tokens, lengths, spec=spec, policy=policy,
                                logits_at=jnp.zeros((B, 0), jnp.int32))
    return kept                                                          # [L, B, T]


def kept_per_token(params, cfg, tokens, lengths, spec: SparseSpec, policy,
                   batch_size: int = 8) -> np.ndarray:
    """Kept share of each valid token in each layer [L, N_tokens] (every token sparse),
    from the masks the forward applies."""
    tokens = np.asarray(tokens, np.int32)
    lengths = np.asarray(lengths, np.int32)
    out = []
    for s in range(0, tokens.shape[0], batch_size):
        tb, lb = _pad_batch(tokens[s:s + batch_size], lengths[s:s + batch_size], batch_size)
        k = np.asarray(_kept(params, cfg, jnp.asarray(tb), jnp.asarray(lb), policy,
                             spec=spec))
        valid = np.arange(tb.shape[1])[None, :] < lb[:, None]
        out.append(k[:, valid])
    return np.concatenate(out, axis=1)


def realised_sparsity(params, cfg, tokens, lengths, spec: SparseSpec, policy,
                      batch_size: int = 8) -> np.ndarray:
    """Per-layer fraction of neurons skipped [L] over all valid tokens (every token sparse)."""
    kept = kept_per_token(params, cfg, tokens, lengths, spec, policy, batch_size)
    return 1.0 - kept.astype(np.float64).mean(axis=1)


def threshold_policy(cfg, threshold):
    return make_policy(cfg.num_layers, threshold=np.asarray(threshold))


def save_thresholds(model_dir, method: str, r: float, threshold, *, kind: str = "thresholds",
                    meta: dict | None = None, extra: dict | None = None):
    """Per-layer thresholds (plus ``extra`` arrays) where ``api.sparsity_setup`` reads them."""
    from conversion.checkpoint import save_tree
    from countdown_jax.api import policy_name

    return save_tree(model_dir, policy_name(kind, method, r),
                     {"threshold": np.asarray(threshold, np.float32), **(extra or {})},
                     meta=meta or {})


def save_proxy_thresholds(model_dir, r: float, threshold, bits: int, group: int, *,
                          meta: dict | None = None):
    """D-COUNTDOWN's proxy mode: per-layer tau on |s_hat| and the proxy's format (the proxy
    itself is rebuilt from the weights, ``proxy.quantize_mlp``)."""
    return save_thresholds(model_dir, "d_countdown", r, threshold, kind="proxy", meta=meta,
                           extra={"bits": np.asarray(bits, np.int32),
                                  "group": np.asarray(group, np.int32)})


def calibration_rows(tokenizer, seq_len: int, rows: int, *, held_out: bool = False):
    """Packed calibration rows (or, held_out=True, rows of the evaluation-side text used to
    measure realised sparsity on text the thresholds never saw)."""
    from countdown_jax import data

    texts = data.perplexity_texts() if held_out else data.calibration_texts()
    return data.pack_tokens(tokenizer, texts, seq_len, max_rows=rows)


# -- calibrate a model directory --------------------------------------------------------------
PROXY_GROUPS = (128, 64, 32, 16, 8, 4, 2, 1)


def default_proxy_group(d: int) -> int:
    """The proxy's inputs per scale for model width d: the largest of 128, 64, 32, ... that
    divides d (2048 -> 128; SmolLM2's 576 -> 64)."""
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"model width must be a positive int, got {d!r}")
    return next(g for g in PROXY_GROUPS if d % g == 0)


def _positive(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class CalibrationText:
    """What a calibration reads: ``rows`` packed rows of ``seq_len`` tokens of the
    calibration text (``data.calibration_texts``, disjoint from every evaluation text),
    and ``held_out_rows`` rows of evaluation-side text where the realised sparsity of the
    fitted thresholds is measured."""

    rows: int = 16
    seq_len: int = 128
    held_out_rows: int = 16
    batch_size: int = 8

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _positive(f.name, getattr(self, f.name))
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")


@dataclasses.dataclass(frozen=True)
class Calibrated:
    """One fit saved in a model directory: the per-layer threshold [L] at sparsity r,
    where it was saved, and the metadata saved beside it (statistic, text size, realised
    sparsity on the calibration and the held-out text; the proxy's bits and group)."""

    method: str
    mode: str                      # threshold | proxy
    sparsity: float
    threshold: np.ndarray          # [L]
    path: Path
    meta: dict

    @property
    def realised_held_out(self) -> float:
        return self.meta["realised_held_out"]


def calibrate_thresholds(model, method: str, sparsities: Sequence[float], *,
                         stat: str = "mean_kth", agg: str = "mean", offset: float = 0.0,
                         forward: str | None = None, proxy_bits: int | None = None,
                         proxy_group: int | None = None,
                         text: CalibrationText = CalibrationText(),
                         progress: bool = True) -> list[Calibrated]:
    """Fit per-layer thresholds for a loaded model (``api.load``) at every r and save them
    in its directory, where ``generate`` / ``eval`` read them (threshold mode; with
    ``proxy_bits``, D-COUNTDOWN's proxy mode: thresholds on the |s_hat| of a low-bit copy of
    W_gate / W_up, group default ``default_proxy_group(d)``). ``forward`` None: dense for
    the quantile statistic and the proxy, else ideal (the release's)."""
    from countdown_jax.api import policy_name

    is_proxy = proxy_bits is not None
    if is_proxy and method != "d_countdown":
        raise ValueError(f"--proxy-bits calibrates D-COUNTDOWN's proxy mode: use --method "
                         f"d_countdown, not {method!r}")
    if not is_proxy and proxy_group is not None:
        raise ValueError("a proxy group without proxy bits: give proxy_bits (2, 4 or 8)")
    kind = "proxy" if is_proxy else "thresholds"
    for r in sparsities:
        policy_name(kind, method, float(r))            # on the 0.01 grid, before any work
    params, cfg = model.params, model.cfg
    proxy = group = None
    if is_proxy:
        group = default_proxy_group(cfg.d_model) if proxy_group is None else proxy_group
        proxy = quantize_mlp(params["layers"]["mlp"], proxy_bits, group)
    forward = forward or ("dense" if stat == "quantile" or is_proxy else "ideal")
    tokens, lengths = calibration_rows(model.tokenizer, text.seq_len, text.rows)
    stats = collect_stats(params, cfg, tokens, lengths, method=method, sparsities=sparsities,
                          forward=forward, batch_size=text.batch_size, progress=progress,
                          proxy=proxy)
    held_tokens, held_lengths = calibration_rows(model.tokenizer, text.seq_len,
                                                 text.held_out_rows, held_out=True)
    spec = SparseSpec(method=method, mode="proxy" if is_proxy else "threshold")
    out = []
    for r in stats.sparsities:
        tau = stats.thresholds(r, stat, agg, offset)
        pol = make_policy(cfg.num_layers, threshold=np.asarray(tau), proxy=proxy)
        on_calib = realised_sparsity(params, cfg, tokens, lengths, spec, pol, text.batch_size)
        held = realised_sparsity(params, cfg, held_tokens, held_lengths, spec, pol,
                                 text.batch_size)
        meta = dict(method=method, sparsity=r, stat=stat, agg=agg, offset=offset,
                    forward=forward, calib_tokens=int(lengths.sum()),
                    realised_calibration=float(on_calib.mean()),
                    realised_held_out=float(held.mean()))
        if is_proxy:
            meta.update(proxy_bits=proxy_bits, proxy_group=group)
            path = save_proxy_thresholds(model.path, r, tau, proxy_bits, group, meta=meta)
        else:
            path = save_thresholds(model.path, method, r, tau, meta=meta)
        out.append(Calibrated(method, spec.mode, r, np.asarray(tau), Path(path), meta))
    return out


def calibrate_proxy(model, sparsity: float = 0.7, bits: int = 4, group: int | None = None, *,
                    rows: int = CalibrationText.rows, seq_len: int = CalibrationText.seq_len,
                    held_out_rows: int = CalibrationText.held_out_rows,
                    progress: bool = True) -> Calibrated:
    """Calibrate D-COUNTDOWN's proxy mode at one sparsity and save it in the model's
    directory (what `countdown-jax calibrate --method d_countdown --proxy-bits` saves);
    afterwards ``generate_text(model, ..., method="d_countdown", mode="proxy",
    sparsity=r)`` needs no other step. group None: ``default_proxy_group(d)``."""
    text = CalibrationText(rows=rows, seq_len=seq_len, held_out_rows=held_out_rows)
    return calibrate_thresholds(model, "d_countdown", [sparsity], proxy_bits=bits,
                                proxy_group=group, text=text, progress=progress)[0]
