"""One sparse-FFN benchmark problem: random weights of one MLP shape, the steps the
timing loop calls, thresholds that keep an exact fraction, the float32 reference and the
bytes each method must read.

Selection: per weight set and sparsity r, a threshold halfway between two neighbouring
scores of token 0 keeps exactly k = m(1-r) neurons (realised counts are reported).
Bytes needed (for GB/s): dense 3md; CATS and M md + 2kd; D (d+m)R + 3kd (x element size;
k = kept neurons, union over the batch; R = predictor rank).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax.batch_union import union_ffn
from countdown_jax.gated import activation, down_sum, project as project_xla
from countdown_jax.kernels.fused_sparse_ffn.api import Rule, fused_sparse_ffn
from countdown_jax.kernels.fused_sparse_ffn.reference import DENSE_PROJECTION, selection_scores
from countdown_jax.kernels.fused_sparse_ffn.reference import project_f32 as project
from countdown_jax.kernels.sparse_ffn.api import index_list, sparse_ffn
from countdown_jax.policy import Method

# The rules timed, by their policy.Method names (the `method` column of the CSVs).
CATS, M, D = METHODS = tuple(m.value for m in (Method.CATS, Method.M_COUNTDOWN,
                                               Method.D_COUNTDOWN))
# rows of the timing loop that are not a sparse method: no threshold, every neuron "kept"
UNSELECTED = ("dense", "loop-overhead")
# Selection rules defined by a plan's own module (proxy_plan.py): method -> an object with
# scores(p, s) -> [B, m] (what tau is compared with, weight set s), reference(p, tau) ->
# (y, counts) for set 0, and bytes(p, kept) -> bytes a call must read.
RULES = {}


@dataclasses.dataclass
class Problem:
    name: str
    d: int
    m: int
    act: str
    rank: int             # D's predictor rank
    dtype: object
    interpret: bool       # Pallas interpret mode (CPU smoke runs)
    sets: list            # [(wg, wu, wd, Vt, U)] * K
    x0: jax.Array         # [B, d]

    @property
    def batch(self) -> int:
        return self.x0.shape[0]

    @property
    def key(self):
        """(shape, dtype, batch): names the problem in rows and caches."""
        return self.name, self.dtype.__name__, self.batch


def make_problem(name, shape, dtype, batch, nsets, rank, interpret=False, seed=0):
    d, m, act = shape
    sets = []
    for s in range(nsets):
        k = jax.random.split(jax.random.key(seed * 100 + s), 5)
        f = lambda kk, shp, scale: (jax.random.normal(kk, shp, jnp.float32) * scale).astype(dtype)
        sets.append((f(k[0], (m, d), d ** -0.5), f(k[1], (m, d), d ** -0.5),
                     f(k[2], (m, d), m ** -0.5), f(k[3], (rank, d), d ** -0.5),
                     f(k[4], (m, rank), rank ** -0.5)))
    x0 = jax.random.normal(jax.random.key(seed + 7), (batch, d), jnp.float32).astype(dtype)
    jax.block_until_ready((sets, x0))
    return Problem(name, d, m, act, rank, dtype, interpret, sets, x0)


def mlp_of(w) -> dict:
    """A weight set's (wg, wu, wd, ...) as the kernels' {"gate", "up", "down"}."""
    return {"gate": w[0], "up": w[1], "down": w[2]}


_score_fn = {}    # compiled scoring per (problem, method): thresholds reuse it across r


def scores(p: Problem, method, s):
    if method in RULES:
        return np.asarray(RULES[method].scores(p, s), np.float64)
    key = (*p.key, method)
    if key not in _score_fn:
        _score_fn[key] = jax.jit(lambda x, w: selection_scores(
            x, mlp_of(w), act=p.act, method=method, pred_vt=w[3], pred_u=w[4])[0])
    return np.asarray(_score_fn[key](p.x0, p.sets[s]), np.float64)


def thresholds(p: Problem, method, r):
    """(tau per weight set, mean kept count): tau keeps k = m(1-r) of token 0's neurons,
    with a gap both sides; the kept count is the union over the batch."""
    if method in UNSELECTED:
        return jnp.zeros(len(p.sets), jnp.float32), p.m
    taus, kept = [], []
    for s in range(len(p.sets)):
        q = scores(p, method, s)
        qs = np.sort(q[0])
        kd = int(round(r * p.m))
        if kd == 0:
            tau = qs[0] - 1.0
        elif kd >= p.m:
            tau = qs[-1] + 1.0
        else:
            tau = (qs[kd - 1] + qs[kd]) / 2
        taus.append(tau)
        kept.append(np.sum(np.any(q > tau, axis=0)))
    return jnp.asarray(taus, jnp.float32), float(np.mean(kept))


# ----------------------------------------------------------------------------- steps
# step(x, weight set, tau) -> (y, kept counts), what harness.timed_loop calls

def dense_step(p: Problem):
    def f(x, w, tau):
        mlp = mlp_of(w)
        hi = jax.lax.Precision.HIGHEST           # float32 means float32 (no TF32)
        g = jnp.einsum("nd,md->nm", x, mlp["gate"], preferred_element_type=jnp.float32,
                       precision=hi)
        u = jnp.einsum("nd,md->nm", x, mlp["up"], preferred_element_type=jnp.float32,
                       precision=hi)
        s = (activation(p.act)(g) * u).astype(x.dtype)
        y = jnp.einsum("nm,md->nd", s, mlp["down"], preferred_element_type=jnp.float32,
                       precision=hi).astype(x.dtype)
        return y, jnp.full(x.shape[:1], p.m, jnp.int32)
    return f


def sparse_step(p: Problem, method, impl, config=None):
    """config: a FusedConfig, or IndexLists for the index-list route."""
    def f(x, w, tau):
        rule = Rule(method, tau, pred_vt=w[3], pred_u=w[4])
        return fused_sparse_ffn(x, mlp_of(w), rule, act=p.act,
                                implementation=impl, config=config, interpret=p.interpret)
    return f


BATCH_KERNELS = ("union", "compact", "lists", "masked")


def batch_step(p: Problem, method, kind, configs=None):
    """A decode batch the model's ways (XLA's scores and the rule's mask first): "union"
    (``batch_union.union_ffn``, the union as a row predicate, GEMV tiles ``configs``),
    "compact" (the same, the union as an index list: form="compact"), "lists" (per-token
    index lists, ``sparse_ffn``) or "masked" (the dense FFN with the mask applied to s)."""
    if kind not in BATCH_KERNELS:
        raise ValueError(f"batch kind must be one of {BATCH_KERNELS}, got {kind!r}")
    dense = DENSE_PROJECTION[Method(method)]

    def f(x, w, tau):
        mlp = mlp_of(w)
        q, coef = selection_scores(x, mlp, act=p.act, method=method, pred_vt=w[3],
                                   pred_u=w[4])
        mask = q > tau
        count = jnp.sum(mask, axis=-1, dtype=jnp.int32)
        if kind in ("union", "compact"):
            y = union_ffn(mlp, x, mask, act=p.act, dense=dense, coef=coef,
                          configs=configs, interpret=p.interpret,
                          form="live" if kind == "union" else "compact")
        elif kind == "lists":
            idx, cnt = index_list(mask, p.m)
            y = sparse_ffn(x, mlp, idx, cnt, act=p.act, dense=dense, coef=coef,
                           implementation="pallas", interpret=p.interpret)
        else:
            g = coef if dense == "gate" else project_xla(x, mlp["gate"])
            uu = coef if dense == "up" else project_xla(x, mlp["up"])
            sv = (g if dense == "gate" else activation(p.act)(g)) * uu
            y = down_sum(jnp.where(mask, sv, jnp.zeros_like(sv)), mlp["down"]).astype(x.dtype)
        return y, count
    return f


def overhead_step(p: Problem):
    """Only the loop's input update: its cost per call, measured as its own row."""
    return lambda x, w, tau: (x, jnp.zeros(x.shape[:1], jnp.int32))


# ----------------------------------------------------------------------------- checks

_ref_cache = {}
_ref_fn = {}


def reference(p: Problem, method, tau0):
    """float32 reference output and counts for set 0 at threshold tau0 (cached)."""
    key = (*p.key, method, float(tau0))
    if key not in _ref_cache:
        w = p.sets[0]
        mlp = mlp_of(w)
        if method == "dense":
            g, uu = project(p.x0, mlp["gate"]), project(p.x0, mlp["up"])
            y = jnp.einsum("nm,md->nd", activation(p.act)(g) * uu,
                           mlp["down"].astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
            c = jnp.full((p.batch,), p.m, jnp.int32)
        elif method in RULES:
            y, c = RULES[method].reference(p, tau0)
        else:
            fkey = key[:4]           # one compile per problem and method; tau is an argument
            if fkey not in _ref_fn:
                _ref_fn.clear()
                _ref_fn[fkey] = jax.jit(lambda x, w, t: fused_sparse_ffn(
                    x, mlp_of(w), Rule(method, t, pred_vt=w[3], pred_u=w[4]), act=p.act,
                    implementation="xla"))
            y, c = _ref_fn[fkey](p.x0, w, tau0)
        _ref_cache[key] = (np.asarray(y, np.float64), np.asarray(c))
    return _ref_cache[key]


def tolerance(dtype) -> float:
    return 1e-2 if dtype == jnp.bfloat16 else 1e-4


def compare(y, counts, ref, ref_counts, dtype):
    """(relative error or None, what failed or None) of an output against the reference:
    finite, the same kept counts, relative error within the dtype's tolerance."""
    y = np.asarray(y, np.float64)
    if not np.all(np.isfinite(y)):
        return None, "non-finite output"
    if not np.array_equal(np.asarray(counts), np.asarray(ref_counts)):
        return None, f"kept counts {np.asarray(counts)} != reference {np.asarray(ref_counts)}"
    nr = np.linalg.norm(ref)
    rel = float(np.linalg.norm(y - ref) / nr if nr > 0 else np.linalg.norm(y))
    if rel > tolerance(dtype):
        return rel, f"relative error {rel:.2e} > {tolerance(dtype)}"
    return rel, None


def check(p: Problem, method, impl, config, rs=(0.5, 0.9)):
    """Max relative error vs the float32 reference over rs (set 0); raises AssertionError
    naming the failure (outputs not finite, kept counts differ, error over tolerance)."""
    w = p.sets[0]
    mlp = mlp_of(w)
    worst = 0.0
    for r in rs:
        taus, _ = thresholds(p, method, r)
        rule = Rule(method, taus[0], pred_vt=w[3], pred_u=w[4])
        ref, rc = jax.jit(lambda x: fused_sparse_ffn(x, mlp, rule, act=p.act,
                                                     implementation="xla"))(p.x0)
        y, c = jax.jit(lambda x: fused_sparse_ffn(x, mlp, rule, act=p.act, implementation=impl,
                                                  config=config, interpret=p.interpret))(p.x0)
        rel, failed = compare(y, c, np.asarray(ref, np.float64), rc, p.dtype)
        if failed:
            raise AssertionError(f"{failed} ({method}, {impl}, r={r}, {config})")
        worst = max(worst, rel)
    return worst


def capacity(m: int, r: float) -> int:
    """Index-list capacity at sparsity r: 2% above the kept count (+8)."""
    return max(16, int(math.ceil(m * (1 - r) * 1.02)) + 8)


def bytes_needed(p: Problem, method, kept):
    if method in RULES:
        return RULES[method].bytes(p, kept)
    b = jnp.dtype(p.dtype).itemsize
    d, m = p.d, p.m
    if method == "dense":
        return 3 * m * d * b
    if method in (CATS, M):
        return (m * d + 2 * kept * d) * b
    if method == D:
        return ((d + m) * p.rank + 3 * kept * d) * b
    return 0
