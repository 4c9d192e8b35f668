"""Selection rules: which of the m neurons each token keeps. A rule is (ranked quantity,
mode); the quantities per token, computed in the MLP's dtype and ranked in float32:

    cats         |act(g_i)|
    m_countdown  |u_i|
    d_countdown  |s_i|                      s = act(g) * u
    dejavu       g_i (signed)
    s_countdown  1/2 s_i^2 ||W_down[i]||^2  (W_down stored [m, d], row i = neuron i)

Modes (``select``; ``refine`` is the cascade's second stage) and their tie rules:
docs/method.md ("Modes"). threshold and proxy take an optional per-token floor / ceiling
on the kept count (``clamp_kept``); ``threshold_for_kept`` sets tau for a total kept count
(calibration, budgets). Every ranking (topk, the capacity cut) is the one
``keep_largest``: larger q first, equal q -> lower index first; NaN in q is not handled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from countdown_jax.gated import HIGHEST, activation, project
from countdown_jax.policy import SparseSpec
from countdown_jax.proxy import proxy_scores

__all__ = ["clamp_kept", "count_kept", "ideal_mask", "keep_largest", "kept_fraction",
           "kth_smallest", "limit_to_capacity", "mask_to_indices", "num_dropped",
           "predictor_logits", "rank_quantity", "select", "spec_quantity",
           "threshold_for_kept", "topk_mask"]

# int(m r) for the r the user wrote, although the policy holds float32(r): m*r in float32
# is off by at most ~m*2^-23, so a tolerance of m*2^-21 lands exact products (m=10,
# r=0.7 -> 7) on the integer. (Python's float64 int() can itself round such a product
# down, e.g. int(100*0.29) = 28; we give 29, the floor of the decimal product.)
_K_TOL = 2.0 ** -21


def rank_quantity(method: str, mlp, x, act: str, *, g=None, u=None):
    """Per-token ranked quantity q [..., m] float32 for ``method`` (ideal/topk/threshold).

    Computes only the projections the rule needs; pass ``g`` / ``u`` if already computed.
    """
    if g is None and method in ("cats", "d_countdown", "dejavu", "s_countdown"):
        g = project(x, mlp["gate"])
    if u is None and method in ("m_countdown", "d_countdown", "s_countdown"):
        u = project(x, mlp["up"])
    if method == "cats":
        return jnp.abs(activation(act)(g)).astype(jnp.float32)
    if method == "m_countdown":
        return jnp.abs(u).astype(jnp.float32)
    if method == "d_countdown":
        return jnp.abs(activation(act)(g) * u).astype(jnp.float32)
    if method == "dejavu":
        return g.astype(jnp.float32)
    if method == "s_countdown":
        s = (activation(act)(g) * u).astype(jnp.float32)
        down_sq = jnp.sum(jnp.square(mlp["down"].astype(jnp.float32)), axis=-1)
        return 0.5 * jnp.square(s) * down_sq
    raise ValueError(f"no ranked quantity for sparsity method {method!r}")


def predictor_logits(predictor, x, h_dtype=None):
    """z [..., m] float32 = (x V) U^T for one layer's stored predictor {"Vt": [rank, d],
    "U": [m, rank]} (V transposed: both GEMVs read rows, see policy.py).

    h = x V is accumulated in float32, then rounded to ``h_dtype`` (None: U's dtype) for
    z = h U^T, accumulated in float32. Float32 U: h stays float32 (unchanged maths). bf16 U
    (a bf16 model's predictor): a bf16 x bf16 GEMM in place of a float32 one, several
    times faster at decode batches (results/bench_decode.md); z keeps ~3 significant
    digits, which left the masks and perplexity unchanged within noise
    (experiments/results/predictor_precision.md).
    h_dtype=float32 gives the all-float32 logits (the experiment's reference arm).
    """
    h = jnp.einsum("...d,rd->...r", x, predictor["Vt"], preferred_element_type=jnp.float32,
                   precision=HIGHEST)
    u = predictor["U"]
    h = h.astype(u.dtype if h_dtype is None else h_dtype)
    # HIGHEST only where an operand is float32 (else GPUs use TF32); bf16 x bf16 is exact
    # products with float32 accumulation either way.
    prec = HIGHEST if jnp.float32 in (h.dtype, u.dtype) else None
    return jnp.einsum("...r,mr->...m", h, u, preferred_element_type=jnp.float32,
                      precision=prec)


def spec_quantity(spec: SparseSpec, mlp, x, act: str, layer, *, g=None, u=None):
    """What ``select`` ranks for ``spec``: the predictor logits in predictor mode, the
    proxy's |s_hat| in proxy mode, else q."""
    if spec.mode in ("predictor", "cascade"):
        return predictor_logits(layer["predictor"], x)
    if spec.mode == "proxy":
        return proxy_scores(layer["proxy"], x, act)
    return rank_quantity(spec.method, mlp, x, act, g=g, u=u)


def num_dropped(r, m: int):
    """k = int(m r) as int32, robust to r being stored in float32; clipped to [0, m-1]."""
    k = jnp.floor(jnp.float32(m) * jnp.asarray(r, jnp.float32) + jnp.float32(m * _K_TOL))
    return jnp.clip(k, 0, m - 1).astype(jnp.int32)


def _order_key(q):
    """float32 -> int32 with the same order (negative floats: flip all but the sign bit)."""
    b = jax.lax.bitcast_convert_type(q.astype(jnp.float32), jnp.int32)
    return jnp.where(b < 0, b ^ jnp.int32(0x7FFFFFFF), b)


def _from_key(key):
    """The float32 of an order key (``_order_key``'s inverse)."""
    bits = jnp.where(key < 0, key ^ jnp.int32(0x7FFFFFFF), key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def kth_smallest(q, k):
    """Exact k-th smallest (1-indexed) of q [..., m] along the last axis -> [...] float32.

    k: int scalar or [...] in [1, m]. A 32-step bisection on the order-preserving int32 key
    of the float: only vectorised compares and sums, ~5x faster than a sort on CPU.
    """
    key = _order_key(q)
    k = jnp.asarray(k, jnp.int32)
    lo = jnp.full(q.shape[:-1], jnp.iinfo(jnp.int32).min, jnp.int32)
    hi = jnp.full(q.shape[:-1], jnp.iinfo(jnp.int32).max, jnp.int32)

    def step(_, bounds):  # invariant: the answer's key lies in [lo, hi]
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)                  # floor((lo+hi)/2)
        enough = jnp.sum(key <= mid[..., None], axis=-1, dtype=jnp.int32) >= k
        return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

    lo, _ = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return _from_key(lo)


def _share_count(share, m: int):
    """A kept share of m as a neuron count (nearest), int32."""
    return jnp.clip(jnp.round(jnp.float32(m) * share), 0, m).astype(jnp.int32)


def clamp_kept(q, mask, layer):
    """A threshold rule's mask with each token's kept count held within the layer's
    optional "floor" / "ceiling" (kept shares of m): too few -> its floor highest q, too
    many -> its ceiling highest (``keep_largest``). No bounds: ``mask`` unchanged."""
    m = q.shape[-1]
    if "floor" in layer:
        mask = mask | keep_largest(q, _share_count(layer["floor"], m))
    if "ceiling" in layer:
        mask = keep_largest(q, _share_count(layer["ceiling"], m), valid=mask)
    return mask


def threshold_for_kept(q, n_kept, valid=None, floor=None, ceiling=None):
    """tau for which ``q > tau`` (per token clamped to [floor, ceiling] x m when given, as
    ``clamp_kept``) keeps ``n_kept`` neurons in total over the tokens of q [..., m] that
    are ``valid`` [...]: the smallest tau keeping at most n_kept (exact but for ties at
    the cut). A 32-step bisection over the order keys of q's range; n_kept may be traced.
    """
    m = q.shape[-1]
    q = q.reshape(-1, m).astype(jnp.float32)
    ok = (jnp.ones(q.shape[:1], bool) if valid is None else jnp.asarray(valid).reshape(-1))
    lo_c = 0 if floor is None else _share_count(floor, m)
    hi_c = m if ceiling is None else _share_count(ceiling, m)
    span = jnp.where(ok[:, None], q, jnp.nan)
    lo = _order_key(jnp.nanmin(span)) - 1                 # q > tau(lo) keeps every neuron
    hi = _order_key(jnp.nanmax(span))                     # keeps none (floor aside)

    def total(key):
        per_token = jnp.clip(jnp.sum(q > _from_key(key), axis=-1, dtype=jnp.int32), lo_c, hi_c)
        return jnp.sum(jnp.where(ok, per_token, 0))

    def step(_, bounds):  # invariant: total(hi) <= n_kept, or hi is the top of the range
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
        fits = total(mid) <= n_kept
        return jnp.where(fits, lo, mid + 1), jnp.where(fits, mid, hi)

    _, hi = jax.lax.fori_loop(0, 32, step, (lo, hi))
    return _from_key(hi)


def ideal_mask(q, r):
    """Keep q > k-th smallest q (1-indexed, k = int(m r)); k = 0 keeps all. r: scalar or [...].
    Strictly greater, as the release's torch.kthvalue rule: ties at the k-th value are all
    dropped, so ties can keep fewer than m - k (all-equal q keeps none at r > 0)."""
    m = q.shape[-1]
    k = num_dropped(r, m)
    kth = kth_smallest(q, jnp.broadcast_to(jnp.maximum(k, 1), q.shape[:-1]))
    return (q > kth[..., None]) | (k == 0)[..., None]


def keep_largest(q, n_keep, valid=None):
    """Mask of the ``n_keep`` largest q (among ``valid``); equal q -> lower index first.

    n_keep: int scalar or [...] (may be traced). Fewer valid than n_keep keeps all valid.
    """
    m = q.shape[-1]
    n = jnp.clip(jnp.asarray(n_keep, jnp.int32), 0, m)[..., None]
    qv = q if valid is None else jnp.where(valid, q, -jnp.inf)
    # v = the n-th largest value; everything above it is kept, and the ties at v fill the
    # remaining room in index order.
    pos = jnp.broadcast_to(jnp.minimum(m - n, m - 1), q.shape[:-1] + (1,))
    v = jnp.take_along_axis(jnp.sort(qv, axis=-1), pos, axis=-1)
    above = qv > v
    tie = qv == v
    if valid is not None:
        tie = tie & valid
    room = n - jnp.sum(above, axis=-1, keepdims=True)
    return (above | (tie & (jnp.cumsum(tie, axis=-1) <= room))) & (n > 0)


def topk_mask(q, r):
    """Keep exactly m - int(m r) neurons (see ``keep_largest`` for ties)."""
    return keep_largest(q, q.shape[-1] - num_dropped(r, q.shape[-1]))


def select(spec: SparseSpec, q, layer):
    """bool mask [..., m] of kept neurons for one layer; q from ``spec_quantity``."""
    if spec.mode == "ideal":
        return ideal_mask(q, layer["sparsity"])
    if spec.mode == "topk":
        return topk_mask(q, layer["sparsity"])
    if spec.mode in ("threshold", "proxy"):
        return clamp_kept(q, q > layer["threshold"], layer)
    if spec.mode in ("predictor", "cascade"):     # cascade: the candidates
        return q > layer["theta"]
    raise ValueError(f"unknown sparsity mode {spec.mode!r}")


def refine(spec: SparseSpec, mask, s, layer):
    """The cascade's second stage: of the candidates in ``mask``, keep |s| > tau (s: the
    exact coefficients act(g) * u, compared in float32). Other modes: ``mask`` unchanged."""
    if spec.mode != "cascade":
        return mask
    return mask & (jnp.abs(s.astype(jnp.float32)) > layer["threshold"])


def limit_to_capacity(mask, q, capacity: int | None):
    """Cap each token at ``capacity`` kept neurons, keeping the highest-ranked q.

    A no-op (at run time too, via lax.cond) unless some token overflows.
    """
    m = mask.shape[-1]
    if capacity is None or capacity >= m:
        return mask
    over = jnp.any(jnp.sum(mask, axis=-1) > capacity)
    return jax.lax.cond(over, lambda mk, qq: keep_largest(qq, capacity, valid=mk),
                        lambda mk, qq: mk, mask, q)


def count_kept(mask):
    """int32 [...]: how many of the last axis are True (the kept count of each token).

    The barrier keeps XLA from fusing this row sum with the mask's other consumers (the
    select of s, the union's any): fused, the select ran inside a reduce fusion on one
    block per token, several microseconds per layer on GPU (results/bench_decode.md).
    """
    return jnp.sum(jax.lax.optimization_barrier(mask), axis=-1, dtype=jnp.int32)


def kept_fraction(count, m: int):
    """count / m as float32, and exactly 1.0 when all are kept (GPUs may divide via a
    reciprocal, giving 37/37 = 0.99999994)."""
    return jnp.where(count >= m, 1.0, count.astype(jnp.float32) / m).astype(jnp.float32)


def mask_to_indices(mask, capacity: int | None = None, q=None):
    """Capacity-padded index list: idx [..., C] int32 (ascending), count [...] int32.

    C = min(capacity, m) (None = m). With ``q`` an overflowing token keeps its C
    highest-ranked neurons (``limit_to_capacity``); without it the caller must have
    capped the mask already (the lowest C indices would be kept). Slots past ``count``
    repeat the first index, so a padded read stays in bounds and on a row already read.
    """
    m = mask.shape[-1]
    c = m if capacity is None else min(int(capacity), m)
    if q is not None:
        mask = limit_to_capacity(mask, q, c)

    def compact(row):                                    # cumsum + scatter: O(m), no sort
        pos = jnp.cumsum(row, dtype=jnp.int32) - 1
        target = jnp.where(row & (pos < c), pos, c)     # c is out of range: dropped
        idx = jnp.zeros((c,), jnp.int32).at[target].set(jnp.arange(m, dtype=jnp.int32),
                                                        mode="drop")
        count = jnp.minimum(jnp.sum(row, dtype=jnp.int32), c)
        return jnp.where(jnp.arange(c) < count, idx, idx[0]), count

    idx, count = jax.vmap(compact)(mask.reshape(-1, m))
    return idx.reshape(mask.shape[:-1] + (c,)), count.reshape(mask.shape[:-1])
