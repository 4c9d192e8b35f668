"""Per-layer budgets: a total FFN bytes budget shared out over the layers. Per-layer KL
curves around the budget's uniform kept share (``measure``), a greedy on their convexified
sum (``allocate``, jitted with the budget traced), a line search from uniform on whole
policies (``allocate_budgets``), per-layer thresholds fit layer by layer
(``fit_thresholds``), and saving into a model directory (``calibrate_budgets``).
Design: docs/budgets.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from countdown_jax import model as model_lib
from countdown_jax.calibrate import (CalibrationText, _pad_batch, calibration_rows,
                                     default_proxy_group, realised_sparsity)
from countdown_jax.cost import bytes_share
from countdown_jax.policy import BUDGET_MODES, Budget, SparseSpec, make_policy
from countdown_jax.proxy import quantize_mlp
from countdown_jax.selection import spec_quantity, threshold_for_kept

__all__ = ["BUDGET_MODES", "DELTAS", "STEPS", "Allocated", "Allocation", "Curves", "Rule",
           "allocate", "allocate_budgets", "blend", "calibrate_budgets", "check_budgets",
           "check_deltas", "fit_thresholds", "kept_for_budget", "levels_around", "loss",
           "measure", "policies", "rule_for", "summary"]

# Where each layer's curve is measured around an operating share k: logit(k) + delta
# (0.25 -> 0.11 ... 0.48; 0.5 -> 0.27 ... 0.73), finer near k where most layers stay.
DELTAS = (1.0, 0.6, 0.3, 0.15, 0.0, -0.15, -0.3, -0.6, -1.0)
# The line search from the uniform share (t = 0) towards the greedy's allocation (t = 1).
STEPS = (0.25, 0.5, 0.75, 1.0)
_KEEP_ALL = -1.0     # a threshold every ranked quantity (all are >= 0) passes


@dataclasses.dataclass(frozen=True)
class Rule:
    """What is allocated: a method / mode (ideal, topk, threshold, proxy), the proxy's
    (bits, group) in proxy mode, and ``oracle``: count bytes as a free, perfect predictor
    would (the kept share; D-ideal drawn as the oracle bound) instead of as run."""

    method: str
    mode: str
    proxy: tuple[int, int] | None = None
    oracle: bool = False

    def __post_init__(self):
        if self.mode not in BUDGET_MODES:
            raise ValueError(f"budgets are allocated for modes {BUDGET_MODES}, got "
                             f"{self.mode!r}")
        SparseSpec(self.method, self.mode)               # the method supports the mode
        if self.method == "dense":
            raise ValueError("dense reads every byte: nothing to allocate")
        if (self.mode == "proxy") != (self.proxy is not None):
            raise ValueError("proxy mode needs the proxy's (bits, group), and only it")
        if self.oracle and self.mode not in ("ideal", "topk"):
            raise ValueError("oracle bytes are for the oracle modes (ideal, topk)")

    @property
    def spec(self) -> SparseSpec:
        return SparseSpec(self.method, self.mode)

    @property
    def key(self) -> str:
        """The policy entry allocated per layer."""
        return "sparsity" if self.mode in ("ideal", "topk") else "threshold"

    def line(self, m: int, d: int) -> tuple[float, float]:
        """(a, b): bytes share = a + b * kept share, the same in every layer."""
        def at(k):
            return bytes_share(self.method, self.mode, k, m=m, d=d, oracle=self.oracle,
                               proxy=self.proxy)
        a = at(0.0)
        return a, at(1.0) - a

    def make_proxy(self, params):
        """The [L]-stacked proxy the rule reads (None outside proxy mode)."""
        return None if self.proxy is None else quantize_mlp(params["layers"]["mlp"],
                                                            *self.proxy)


def kept_for_budget(rule: Rule, budget, *, m: int, d: int):
    """Mean kept share K of a bytes budget (traced or concrete): (B - a) / b."""
    a, b = rule.line(m, d)
    return (budget - a) / b


def check_budgets(rule: Rule, budgets, *, m: int, d: int) -> np.ndarray:
    """Budgets as an array, each in (0, 1] and within what the rule can read: at least
    one neuron per layer, fewer than all of them."""
    b = np.asarray(budgets, np.float64).reshape(-1)
    if b.size == 0:
        raise ValueError("give at least one budget")
    if not np.all((b > 0.0) & (b <= 1.0)):
        raise ValueError(f"a bytes budget is a share of the dense FFN's in (0, 1], got "
                         f"{b.tolist()}")
    a, slope = rule.line(m, d)
    low, high = a + slope / m, a + slope
    if np.any(b < low):
        raise ValueError(f"budget {b[b < low].min():.4g} is below what "
                         f"{rule.method}/{rule.mode} can reach: {low:.4g} of dense bytes "
                         f"(the rule alone reads {a:.4g}, plus one neuron per layer)")
    if np.any(b >= high):
        raise ValueError(f"budget {b[b >= high].max():.4g} lets {rule.method}/{rule.mode} "
                         f"keep every neuron ({high:.4g} of dense bytes): nothing to "
                         f"allocate")
    return b


# -- the loss of a policy on the fitting text ---------------------------------------------
def _scored(tokens, lengths):
    """Positions with a next token [B, T], and that token."""
    B, T = tokens.shape
    target = jnp.concatenate([tokens[:, 1:], jnp.zeros((B, 1), tokens.dtype)], axis=1)
    return jnp.arange(T)[None, :] < (lengths - 1)[:, None], target


def _ce_sum(lp, tokens, lengths):
    scored, target = _scored(tokens, lengths)
    ce = -jnp.take_along_axis(lp, target[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(scored, ce, 0.0))


@functools.partial(jax.jit, static_argnames=("cfg",))
def _dense_sums(params, cfg, tokens, lengths):
    """The dense model's log-probabilities [B, T, V], cross-entropy sum, position count."""
    lp = jax.nn.log_softmax(model_lib.forward(params, cfg, tokens, lengths)[0], axis=-1)
    return lp, _ce_sum(lp, tokens, lengths), jnp.sum(_scored(tokens, lengths)[0])


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _loss_sums(params, cfg, tokens, lengths, lp_d, shared, values, *, spec):
    """Per policy p (values: {key: [P, L]} over ``shared`` entries, e.g. the proxy): sums
    over scored positions of KL(dense || sparse) and of the next token's cross-entropy."""
    scored, _ = _scored(tokens, lengths)

    def one(v):
        logits, _ = model_lib.forward(params, cfg, tokens, lengths, spec=spec,
                                      policy={**shared, **v})
        lp = jax.nn.log_softmax(logits, axis=-1)
        kl = jnp.sum(jnp.exp(lp_d) * (lp_d - lp), axis=-1)
        return jnp.sum(jnp.where(scored, kl, 0.0)), _ce_sum(lp, tokens, lengths)

    return jax.lax.map(one, values)


def loss(params, cfg, tokens, lengths, rule: Rule, values, *, proxy=None,
         batch_size: int = 8, chunk: int | None = None, progress: str | None = None) -> dict:
    """Mean per-token KL to dense and cross-entropy of each policy {rule.key: [P, L]}
    (plus the proxy, proxy mode) on rows tokens [N, T]: {"kl": [P], "ce": [P],
    "ce_dense": float, "tokens": int}. The dense pass runs once per batch of rows, the
    policies in chunks of ``chunk`` (a progress bar named ``progress`` counts them)."""
    values = {k: np.asarray(v, np.float32) for k, v in values.items()}
    shared = {} if proxy is None else {"proxy": proxy}
    p = next(iter(values.values())).shape[0]
    chunk = chunk or p
    kl, ce, ce_d, n = np.zeros(p), np.zeros(p), 0.0, 0
    tokens, lengths = np.asarray(tokens, np.int32), np.asarray(lengths, np.int32)
    starts = range(0, len(tokens), batch_size)
    bar = tqdm(total=len(starts) * -(-p // chunk), desc=progress, unit="chunk",
               disable=progress is None)
    for s in starts:
        tb, lb = _pad_batch(tokens[s:s + batch_size], lengths[s:s + batch_size], batch_size)
        tb, lb = jnp.asarray(tb), jnp.asarray(lb)
        lp_d, ce_sum, count = _dense_sums(params, cfg, tb, lb)
        for c in range(0, p, chunk):
            part = {k: jnp.asarray(v[c:c + chunk]) for k, v in values.items()}
            out = _loss_sums(params, cfg, tb, lb, lp_d, shared, part, spec=rule.spec)
            kl[c:c + chunk] += np.asarray(out[0], np.float64)
            ce[c:c + chunk] += np.asarray(out[1], np.float64)
            bar.update(1)
        ce_d += float(ce_sum)
        n += int(count)
    bar.close()
    n = max(n, 1)
    return {"kl": kl / n, "ce": ce / n, "ce_dense": ce_d / n, "tokens": n}


# -- thresholds that keep a share ----------------------------------------------------------
def _neurons(tokens, lengths, m: int) -> int:
    """Valid (token, neuron) pairs of rows tokens [N, T]."""
    return int(np.minimum(np.asarray(lengths), np.shape(tokens)[1]).sum()) * m


def _layer_taus(params, cfg, spec, shared, x, valid, l, targets, floor, ceiling):
    """Layer l's taus keeping each of targets [K] neurons over the valid tokens of x."""
    mlp = jax.tree.map(lambda a: a[l], params["layers"]["mlp"])
    layer = jax.tree.map(lambda a: a[l], shared)
    q = spec_quantity(spec, mlp, x, cfg.act, layer)
    return jax.vmap(lambda t: threshold_for_kept(q, t, valid, floor, ceiling))(targets)


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _fit_pass(params, cfg, tokens, lengths, shared, taus, l, targets, bounds, *, spec):
    """Layer l's taus per policy p (taus [P, L], targets [P, K], bounds: {floor,
    ceiling} [P, L]) on the inputs that p's taus of layers < l produce: [P, K]."""
    B, T = tokens.shape
    valid = jnp.arange(T)[None, :] < lengths[:, None]

    def one(args):
        tau, target, bound = args
        _, _, xs = model_lib.forward(params, cfg, tokens, lengths, spec=spec,
                                     policy={**shared, **bound, "threshold": tau},
                                     collect=True, logits_at=jnp.zeros((B, 0), jnp.int32))
        return _layer_taus(params, cfg, spec, shared, xs[l], valid, l, target,
                           bound["floor"][l] if "floor" in bound else None,
                           bound["ceiling"][l] if "ceiling" in bound else None)

    return jax.lax.map(one, (taus, targets, bounds))


def _fit_layerwise(params, cfg, tokens, lengths, rule, kept, levels=None, *, proxy=None,
                   bounds=None, progress=True):
    """(taus [P, L], taus at levels [P, L, G] or None): see ``fit_thresholds``; a layer's
    taus at its levels keep those shares of the inputs the policy's taus give it."""
    if rule.mode not in ("threshold", "proxy"):
        raise ValueError(f"thresholds are fit for threshold / proxy modes, not {rule.mode!r}")
    kept = np.atleast_2d(np.asarray(kept, np.float64))
    shares = kept[..., None] if levels is None else np.concatenate(
        [kept[..., None], np.asarray(levels, np.float64)], axis=-1)          # [P, L, 1+G]
    targets = np.round(shares * _neurons(tokens, lengths, cfg.d_ff)).astype(np.int32)
    tokens, lengths = jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32)
    shared = {} if proxy is None else {"proxy": proxy}
    bounds = {k: jnp.asarray(np.broadcast_to(v, kept.shape), jnp.float32)
              for k, v in (bounds or {}).items()}
    out = np.full(targets.shape, _KEEP_ALL, np.float32)
    for l in tqdm(range(cfg.num_layers), desc=f"thresholds {rule.method}/{rule.mode}",
                  unit="layer", disable=not progress):
        out[:, l] = np.asarray(_fit_pass(params, cfg, tokens, lengths, shared,
                                         jnp.asarray(out[:, :, 0]), jnp.int32(l),
                                         jnp.asarray(targets[:, l]), bounds, spec=rule.spec))
    return out[:, :, 0], (None if levels is None else out[:, :, 1:])


def fit_thresholds(params, cfg, tokens, lengths, rule: Rule, kept, *, proxy=None,
                   bounds: dict | None = None, progress: bool = True) -> np.ndarray:
    """Per-layer tau [P, L] with which the threshold / proxy rule keeps the share kept
    [P, L] of each layer's neurons over the valid tokens of rows tokens [N, T], in total
    (per token it varies; ``bounds``: optional per-token {"floor", "ceiling"} [P, L]
    kept shares, ``selection.clamp_kept``). One pass per layer, in order, so layer l sees
    the inputs layers < l produce with their fitted taus: exact on this text but for ties.
    All rows form one batch (the cut is over every token)."""
    return _fit_layerwise(params, cfg, tokens, lengths, rule, kept, proxy=proxy,
                          bounds=bounds, progress=progress)[0]


# -- sensitivity curves and the allocation -------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Curves:
    """One rule's per-layer sensitivity around operating points kept [P, L]:
    ``loss[p, l, j]`` is the mean per-token KL to dense with layer l at the kept share
    ``levels[p, l, j]`` and every other layer at its share in kept[p]; ``base`` [P] the
    KL at the operating point itself."""

    rule: Rule
    kept: np.ndarray                   # [P, L]
    levels: np.ndarray                 # [P, L, G], decreasing in G
    loss: np.ndarray                   # [P, L, G]
    base: np.ndarray                   # [P]
    tokens: int

    def allocate(self, kept_mean, m: int) -> np.ndarray:
        """Kept counts [P, L] at mean kept shares kept_mean [P] (``allocate``, vmapped:
        one compile for every budget)."""
        return np.asarray(jax.vmap(functools.partial(allocate, m=m))(
            jnp.asarray(self.levels, jnp.float32), jnp.asarray(self.loss, jnp.float32),
            jnp.asarray(kept_mean, jnp.float32)))

    def tree(self) -> dict:
        return {k: np.asarray(getattr(self, k), np.float32)
                for k in ("kept", "levels", "loss", "base")}


def levels_around(kept, deltas=DELTAS, m: int | None = None) -> np.ndarray:
    """Kept shares [..., G] at logit(kept) + deltas (within (0, 1) whatever the kept;
    at least one neuron given m)."""
    k = np.clip(np.asarray(kept, np.float64), 1e-6, 1 - 1e-6)[..., None]
    out = 1.0 / (1.0 + np.exp(-(np.log(k / (1.0 - k)) + np.asarray(deltas))))
    return out if m is None else np.maximum(out, 1.0 / m)


def check_deltas(deltas):
    d = tuple(float(v) for v in deltas)
    if 0.0 not in d or any(x <= y for x, y in zip(d, d[1:])):
        raise ValueError(f"deltas must decrease and hold 0 (the operating point), got "
                         f"{list(deltas)}")
    return d


def _operating_values(rule: Rule, kept, taus):
    """{key: [P, L]} of the operating points: r = 1 - kept, or the fitted taus."""
    return {"sparsity": 1.0 - kept} if rule.key == "sparsity" else {"threshold": taus}


def measure(params, cfg, tokens, lengths, rule: Rule, kept, deltas: Sequence[float] = DELTAS,
            *, batch_size: int = 8, progress: bool = True) -> Curves:
    """The rule's curves (``Curves``) around operating points kept [P, L] (e.g. a budget's
    uniform share in every layer), on rows tokens [N, T]: one forward per operating point,
    then one per point, layer and nonzero delta. Threshold modes fit the taus layer by
    layer first; a layer's level taus keep exactly the level's share of its inputs."""
    deltas = check_deltas(deltas)
    kept = np.atleast_2d(np.asarray(kept, np.float64))
    P, L = kept.shape
    levels = levels_around(kept, deltas, cfg.d_ff)                       # [P, L, G]
    proxy = rule.make_proxy(params)
    taus = level_taus = None
    if rule.key == "threshold":
        taus, level_taus = _fit_layerwise(params, cfg, tokens, lengths, rule, kept, levels,
                                          proxy=proxy, progress=progress)
    op = _operating_values(rule, kept, taus)[rule.key]
    base = loss(params, cfg, tokens, lengths, rule, {rule.key: op}, proxy=proxy,
                batch_size=batch_size)
    j0 = deltas.index(0.0)
    moved = [j for j in range(len(deltas)) if j != j0]
    v = np.repeat(np.repeat(op[None, :, None, :], L, 0), len(moved), 2)   # [L, P, G', L]
    layer = np.arange(L)
    v[layer, :, :, layer] = (1.0 - levels[:, :, moved] if rule.key == "sparsity"
                             else level_taus[:, :, moved]).transpose(1, 0, 2)
    res = loss(params, cfg, tokens, lengths, rule, {rule.key: v.reshape(-1, L)}, proxy=proxy,
               batch_size=batch_size, chunk=P * len(moved),
               progress=f"sensitivity {rule.method}/{rule.mode}" if progress else None)
    out = np.empty(levels.shape)
    out[:, :, j0] = base["kl"][:, None]
    out[:, :, moved] = res["kl"].reshape(L, P, len(moved)).transpose(1, 0, 2)
    return Curves(rule, kept, levels, out, base["kl"], base["tokens"])


def _convex_lower(x, h):
    """The lower convex envelope of each row's points (x, h [L, n]) at its x: a point's
    value or the lowest chord over it between a point on each side."""
    n = x.shape[-1]
    i, j, k = jnp.meshgrid(jnp.arange(n), jnp.arange(n), jnp.arange(n), indexing="ij")
    span = x[:, k] - x[:, i]
    inside = (i < j) & (j < k) & (span != 0)
    w = jnp.where(inside, (x[:, j] - x[:, i]) / jnp.where(inside, span, 1.0), 0.0)
    chord = jnp.where(inside, h[:, i] + (h[:, k] - h[:, i]) * w, jnp.inf)   # [L, n, n, n]
    return jnp.minimum(h, jnp.min(chord, axis=(1, 3)))


def _whole_neurons(kept, total, m):
    """Counts [L] nearest kept * m with sum = total: floors, then the remainder to the
    largest fractions (taken from the smallest when float rounding overshot)."""
    c = kept * m
    base = jnp.floor(c)
    frac = c - base
    rem = total - jnp.sum(base)
    desc = jnp.argsort(jnp.argsort(-frac, stable=True), stable=True)
    asc = jnp.argsort(jnp.argsort(frac, stable=True), stable=True)
    counts = base + (desc < rem) - (asc < -rem)
    return jnp.clip(counts, 1, m).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("m",))
def allocate(levels, loss_lg, kept_mean, *, m: int):
    """Kept neurons per layer [L] int32, summing to round(L m kept_mean), from one
    operating point's curves (levels [L, G] decreasing, loss_lg [L, G]; ``Curves``).
    Greedy on the convexified curves: every layer at its top level, then the steps
    between levels, all layers together, in order of least loss per share saved (ties:
    layer, then level order), until the kept shares average ``kept_mean``; the last step
    partly. kept_mean may be traced (vmap over budgets: one compile); it is held within
    the levels' span."""
    x = jnp.asarray(levels, jnp.float32)
    L = x.shape[0]
    h = _convex_lower(x, jnp.asarray(loss_lg, jnp.float32))
    dx = x[:, :-1] - x[:, 1:]                                            # [L, G-1]
    ok = dx > 0
    slope = jnp.where(ok, (h[:, 1:] - h[:, :-1]) / jnp.where(ok, dx, 1.0), jnp.inf)
    order = jnp.argsort(slope.reshape(-1), stable=True)
    saving = jnp.where(ok, dx, 0.0).reshape(-1)[order]
    target = jnp.clip(jnp.asarray(kept_mean, jnp.float32), jnp.mean(x[:, -1]),
                      jnp.mean(x[:, 0]))
    need = jnp.sum(x[:, 0]) - L * target
    taken = jnp.clip(need - (jnp.cumsum(saving) - saving), 0.0, saving)
    kept = x[:, 0] - jnp.zeros_like(saving).at[order].set(taken).reshape(L, -1).sum(axis=1)
    return _whole_neurons(kept, jnp.round(jnp.float32(L * m) * target), m)


def policies(rule: Rule, kept, taus=None) -> dict:
    """{rule.key: [P, L]}: the per-layer r of kept shares (ideal / topk), or the fitted
    taus (threshold / proxy)."""
    if rule.key == "threshold" and taus is None:
        raise ValueError(f"{rule.mode} mode allocates thresholds: fit them (fit_thresholds)")
    kept = np.atleast_2d(np.asarray(kept, np.float64))
    return _operating_values(rule, kept, None if taus is None else np.atleast_2d(taus))


@functools.partial(jax.jit, static_argnames=("m",))
def blend(counts, t, *, m: int):
    """Whole-neuron counts [L] at uniform + t x (counts / m - uniform), with the total of
    counts (uniform: that total's share in every layer): the line from uniform (t = 0)
    to an allocation (t = 1)."""
    kept = counts.astype(jnp.float32) / m
    total = jnp.sum(counts).astype(jnp.float32)
    uniform = total / (kept.shape[0] * m)
    return _whole_neurons(uniform + t * (kept - uniform), total, m)


@dataclasses.dataclass(frozen=True)
class Allocation:
    """A rule's allocations at budgets [P] (bytes shares): the chosen kept shares [P, L]
    (whole neurons / m) and policy entry [P, L] (r or tau), the curves they came from,
    and the line search: KL to dense on the fitting text at each step t [P, S] (t = 0:
    the uniform share in every layer, t = 1: the greedy's allocation) and the step
    taken [P]."""

    rule: Rule
    budgets: np.ndarray
    kept: np.ndarray
    values: np.ndarray
    curves: Curves
    steps: tuple[float, ...]
    path_kl: np.ndarray
    chosen: np.ndarray


def allocate_budgets(params, cfg, tokens, lengths, rule: Rule, budgets, *,
                     deltas: Sequence[float] = DELTAS, steps: Sequence[float] = STEPS,
                     batch_size: int = 8, progress: bool = True) -> Allocation:
    """Allocate each bytes budget on fitting rows tokens [N, T]: the curves around its
    uniform share (``measure``), the greedy (``allocate``), then a line search from
    uniform towards it (``blend`` at t in 0 + steps) that keeps the step with the least
    KL to dense on the same text, so the result is never worse than uniform there
    (the curves' sum misses how the layers' errors interact). Threshold / proxy modes
    fit every candidate's taus (``fit_thresholds``)."""
    m, d, L = cfg.d_ff, cfg.d_model, cfg.num_layers
    budgets = check_budgets(rule, budgets, m=m, d=d)
    ts = (0.0,) + tuple(float(t) for t in steps)
    if any(not 0.0 < t <= 1.0 for t in ts[1:]) or any(x >= y for x, y in zip(ts, ts[1:])):
        raise ValueError(f"line search steps must increase within (0, 1], got {list(steps)}")
    kmean = np.asarray([kept_for_budget(rule, b, m=m, d=d) for b in budgets])
    curves = measure(params, cfg, tokens, lengths, rule, np.repeat(kmean[:, None], L, 1),
                     deltas, batch_size=batch_size, progress=progress)
    greedy = jnp.asarray(curves.allocate(kmean, m))                       # [P, L]
    line = jax.vmap(jax.vmap(functools.partial(blend, m=m), (None, 0)), (0, None))
    cand = np.asarray(line(greedy, jnp.asarray(ts, jnp.float32))).reshape(-1, L) / m
    proxy = rule.make_proxy(params)
    taus = (fit_thresholds(params, cfg, tokens, lengths, rule, cand, proxy=proxy,
                           progress=progress) if rule.key == "threshold" else None)
    values = policies(rule, cand, taus)[rule.key]
    kl = loss(params, cfg, tokens, lengths, rule, {rule.key: values}, proxy=proxy,
              batch_size=batch_size)["kl"].reshape(len(budgets), len(ts))
    best = np.argmin(kl, axis=1)                                   # ties: the uniform
    pick = np.arange(len(budgets)) * len(ts) + best
    return Allocation(rule, budgets, cand[pick], np.asarray(values)[pick], curves, ts, kl,
                      best)


# -- calibrate a model directory -----------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Allocated:
    """One allocation saved in a model directory: the rule, the budget, per-layer kept
    shares [L], the policy entry (per-layer r or tau) and the metadata saved beside it."""

    rule: Rule
    budget: float
    kept: np.ndarray
    values: np.ndarray
    path: Path
    meta: dict


def calibrate_budgets(model, rule: Rule, budgets: Sequence[float], *,
                      text: CalibrationText = CalibrationText(),
                      deltas: Sequence[float] = DELTAS,
                      progress: bool = True) -> list[Allocated]:
    """Allocate every budget on the calibration text (disjoint from evaluation;
    ``allocate_budgets``) and save each where ``api.sparsity_setup`` reads it
    (``Budget(B)``), with the realised kept share on the calibration and held-out text;
    the curves go to sensitivity/<method>/<mode>."""
    from conversion.checkpoint import save_tree
    from countdown_jax.api import policy_name

    cfg, params = model.cfg, model.params
    m, d, L = cfg.d_ff, cfg.d_model, cfg.num_layers
    budgets = check_budgets(rule, budgets, m=m, d=d)
    names = [policy_name(f"budget-{rule.mode}", rule.method, Budget(float(b)))
             for b in budgets]                                           # grid, before work
    t0 = time.perf_counter()
    tokens, lengths = calibration_rows(model.tokenizer, text.seq_len, text.rows)
    held = calibration_rows(model.tokenizer, text.seq_len, text.held_out_rows, held_out=True)
    got = allocate_budgets(params, cfg, tokens, lengths, rule, budgets, deltas=deltas,
                           batch_size=text.batch_size, progress=progress)
    save_tree(model.path, f"sensitivity/{rule.method}/{rule.mode}", got.curves.tree(),
              meta=dict(budgets=budgets.tolist(), tokens=got.curves.tokens,
                        deltas=list(deltas)))
    proxy = rule.make_proxy(params)
    a, slope = rule.line(m, d)
    out = []
    for i, b in enumerate(budgets):
        pol = make_policy(L, **{rule.key: got.values[i]}, proxy=proxy)
        real = {where: 1.0 - realised_sparsity(params, cfg, t, ln, rule.spec, pol,
                                               text.batch_size)
                for where, (t, ln) in (("calibration", (tokens, lengths)),
                                       ("held_out", held))}
        meta = dict(method=rule.method, mode=rule.mode, budget=float(b),
                    bytes_calibration=a + slope * float(real["calibration"].mean()),
                    bytes_held_out=a + slope * float(real["held_out"].mean()),
                    kl_uniform=float(got.path_kl[i, 0]),
                    kl=float(got.path_kl[i, got.chosen[i]]),
                    step=got.steps[got.chosen[i]], kept=got.kept[i].tolist(),
                    kept_calibration=real["calibration"].tolist(),
                    calib_tokens=int(lengths.sum()), deltas=list(deltas),
                    seconds=time.perf_counter() - t0)
        tree = {rule.key: np.asarray(got.values[i], np.float32),
                "kept": np.asarray(got.kept[i], np.float32)}
        if rule.proxy is not None:
            meta.update(proxy_bits=rule.proxy[0], proxy_group=rule.proxy[1])
            tree.update(bits=np.asarray(rule.proxy[0], np.int32),
                        group=np.asarray(rule.proxy[1], np.int32))
        path = save_tree(model.path, names[i], tree, meta=meta)
        out.append(Allocated(rule, float(b), got.kept[i], got.values[i], Path(path), meta))
    return out


def rule_for(method: str, mode: str, d: int, proxy_bits: int | None = None,
             proxy_group: int | None = None) -> Rule:
    """The command line's rule: proxy mode at ``proxy_bits`` (default 4) and group
    (default ``calibrate.default_proxy_group(d)``)."""
    if mode != "proxy":
        if proxy_bits is not None or proxy_group is not None:
            raise ValueError(f"--proxy-bits / --proxy-group set the proxy: use --mode proxy, "
                             f"not {mode!r}")
        return Rule(method, mode)
    return Rule(method, mode, proxy=(4 if proxy_bits is None else proxy_bits,
                                     default_proxy_group(d) if proxy_group is None
                                     else proxy_group))


def summary(fit: Allocated) -> str:
    """One JSON line per allocation (what `calibrate --budget` prints)."""
    keep = ("method", "mode", "budget", "bytes_calibration", "bytes_held_out", "kl_uniform",
            "kl", "step")
    return json.dumps({**{k: fit.meta[k] for k in keep}, "kept": [round(k, 4) for k in
                                                                  fit.kept.tolist()],
                       "saved": str(fit.path)})
