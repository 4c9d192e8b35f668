"""The gated MLP as a weighted sum of W_down rows: scores -> kept set -> the kept rows' sum.

    y, kept = ffn(mlp, x, act=cfg.act, spec=spec, policy=layer_policy, sparse=sparse)

mlp: {"gate", "up", "down"} [m, d] (row-per-neuron, layout.py), or the stacked [L, m, d]
with ``layer`` the traced index (kernels then read the kept rows of the stack in place).
Returns y [..., d] and kept [...] float32, the fraction of neurons the applied mask kept.
One function per path, picked by ``spec.implementation`` (and ``spec.batch_kernel`` for a
decode batch): ``_masked`` (the float reference: dense g, u, s, mask on s), ``_fused``
(one token, the fused kernel), ``_union`` (a decode batch reads the rows any token keeps
once), ``_lists`` (per-token index lists), ``_all_kept`` (dense). Under a mesh that splits
the neurons the body runs per device (``ffn_parallel``) and is told its ``Shard``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from countdown_jax import batch_union, parallel_selection
from countdown_jax.ffn_parallel import tensor_parallel_ffn
from countdown_jax.gated import activation, coefficients, down_sum, layer_weights, project
from countdown_jax.kernels._platform import pallas_backend
# The kernel ops are called through their api modules (tests patch them there).
from countdown_jax.kernels.fused_sparse_ffn import api as fused_sparse_ffn_api
from countdown_jax.kernels.proxy_scores import api as proxy_scores_api
from countdown_jax.kernels.sparse_ffn import api as sparse_ffn_api
from countdown_jax.policy import CLAMP_KEYS, DENSE, Method, SparseSpec, check_layer
from countdown_jax.selection import (count_kept, kept_fraction, limit_to_capacity,
                                     mask_to_indices, refine, select, spec_quantity)
from countdown_jax.sharding import multi_device_mesh, splits_neurons

__all__ = ["FUSED_RULES", "dense_ffn", "ffn"]

# The fused kernel unrolls its tokens and reads the union of their rows: one token only
# (slower than the index lists from a few tokens on: results/bench_decode.md).
_FUSED_MAX_TOKENS = 1
# (method, mode) the fused kernel runs exactly as ``select`` does: its Rule takes the
# method, the proxy's scores as D's z, and the cascade's |s| threshold as tau_s.
FUSED_RULES = frozenset({(Method.M_COUNTDOWN, "threshold"), (Method.CATS, "threshold"),
                         (Method.D_COUNTDOWN, "predictor"), (Method.D_COUNTDOWN, "cascade"),
                         (Method.D_COUNTDOWN, "proxy")})


def dense_ffn(mlp, x, act: str):
    _, _, s = coefficients(mlp, x, act)
    return down_sum(s, mlp["down"])


def ffn(mlp, x, *, act: str, spec: SparseSpec = DENSE, policy=None, sparse=None,
        layer=None, return_dropped: bool = False):
    """One layer's FFN under ``spec``; see the module docstring.

    layer: the traced layer index when ``mlp`` is the whole [L, m, d] stack.
    return_dropped: also return dropped [...] int32, how many neurons that passed the rule
    were cut by ``spec.capacity`` (0 when the capacity is never exceeded).
    """
    kernels = not spec.is_dense and spec.implementation == "pallas"
    if splits_neurons() or (kernels and multi_device_mesh()):
        out = tensor_parallel_ffn(_one_device_ffn, layer_weights(mlp, layer), x, act=act,
                                  spec=spec, policy=policy, sparse=sparse)
    else:
        if spec.is_dense or spec.implementation == "masked":
            mlp, layer = layer_weights(mlp, layer), None   # only kernels read a stack
        out = _one_device_ffn(mlp, x, act=act, spec=spec, policy=policy, sparse=sparse,
                              layer=layer)
    return out if return_dropped else out[:2]


def _one_device_ffn(mlp, x, *, act, spec, policy, sparse, layer=None, shard=None):
    """(y, kept, dropped) on this device's neurons: all of them, or a ``Shard``'s slice."""
    if spec.is_dense:
        return _all_kept(mlp, x, act)
    m, d = mlp["gate"].shape[-2:]
    if x.shape[-1] != d:
        raise ValueError(f"MLP input has width {x.shape[-1]}, weights expect d={d}")
    activation(act)                                  # unknown activation: fail early
    check_layer(spec, policy, d=d, m=m)
    if (spec.implementation != "masked" or shard is not None) and any(
            k in policy for k in CLAMP_KEYS):
        # the kernels apply the bare threshold; a per-token bound is a measurement rule
        raise ValueError("a per-token floor / ceiling runs on one device in the masked "
                         f"implementation only, not {spec.implementation!r}"
                         + (" across shards" if shard is not None else ""))
    if sparse is not None:
        sparse = jnp.asarray(sparse)
        if sparse.dtype != jnp.bool_ or sparse.shape != x.shape[:-1]:
            raise ValueError(f"sparse must be bool{list(x.shape[:-1])} (one flag per "
                             f"token), got {sparse.dtype}{list(sparse.shape)}")
    if spec.implementation == "masked":
        return _masked(mlp, x, act, spec, policy, sparse, shard)
    n_tokens = math.prod(x.shape[:-1])
    if _dense_batch(spec, n_tokens):
        return _all_kept(layer_weights(mlp, layer), x, act)
    lead = x.shape[:-1]
    xs = x.reshape(-1, d)
    scores = _scores(mlp, layer, xs, act, spec, policy)
    if _runs_fused(spec, n_tokens):
        run = _fused
    elif _union_batch(spec, n_tokens, shard):
        run = _union
    else:
        run = _lists
    y, count, dropped = run(mlp, layer, xs, act, spec, policy, scores, shard)
    kept = kept_fraction(count, m)
    if sparse is not None:
        y, kept, dropped = _dense_where_not_sparse(layer_weights(mlp, layer), xs, act, y,
                                                   kept, dropped, sparse.reshape(-1))
    return y.reshape(lead + (d,)), kept.reshape(lead), dropped.reshape(lead)


def _all_kept(mlp, x, act):
    """The dense FFN as (y, kept = 1, dropped = 0)."""
    return (dense_ffn(mlp, x, act), jnp.ones(x.shape[:-1], jnp.float32),
            jnp.zeros(x.shape[:-1], jnp.int32))


def _dense_batch(spec, n_tokens):
    """batch_kernel "dense": a decode call runs the dense FFN (every neuron kept, kept =
    1), where no exact sparse path was measured faster than dense (``fast_path``)."""
    return (spec.batch_kernel == "dense" and spec.implementation == "pallas"
            and n_tokens <= batch_union.MAX_TOKENS)


def _kept_masks(spec, q, layer_policy, shard):
    """(rule mask, mask after the capacity cut); across devices when ``shard`` says the
    neurons are split over a mesh axis."""
    if shard is not None:
        return parallel_selection.choose(spec, q, layer_policy, shard)
    rule = select(spec, q, layer_policy)
    return rule, limit_to_capacity(rule, q, spec.capacity)


def _masked(mlp, x, act, spec, layer_policy, sparse, shard):
    g, u, s = coefficients(mlp, x, act)
    q = spec_quantity(spec, mlp, x, act, layer_policy, g=g, u=u)
    rule, mask = _kept_masks(spec, q, layer_policy, shard)
    # (cascade: the capacity caps the candidates, so ``dropped`` counts candidates cut)
    dropped = (jnp.zeros(mask.shape[:-1], jnp.int32) if mask is rule
               else count_kept(rule) - count_kept(mask))
    mask = refine(spec, mask, s, layer_policy)
    if sparse is not None:
        mask = mask | ~sparse[..., None]
        dropped = jnp.where(sparse, dropped, 0)
    y = down_sum(jnp.where(mask, s, jnp.zeros_like(s)), mlp["down"])
    kept = kept_fraction(count_kept(mask), mask.shape[-1])
    return y.astype(x.dtype), kept, dropped


def _runs_fused(spec, n_tokens):
    """Whether the fused kernel runs this spec's exact rule on this platform."""
    if ((spec.method, spec.mode) not in FUSED_RULES or spec.capacity is not None
            or n_tokens > _FUSED_MAX_TOKENS):
        return False     # capacity cuts live in the index-list path
    # These rules look at one neuron at a time: on a shard of the neurons (tensor
    # parallel) the kernel keeps exactly that shard's part of the one-device set.
    return pallas_backend() == "pallas_gpu"


def _union_batch(spec, n_tokens, shard):
    """Whether a decode batch reads the union of its kept rows (``batch_union``): batch
    kernel "union" / "compact", the fused kernel's rules bar the cascade, no capacity."""
    return (spec.batch_kernel in ("union", "compact")
            and _FUSED_MAX_TOKENS < n_tokens <= batch_union.MAX_TOKENS
            and (spec.method, spec.mode) in FUSED_RULES and spec.mode != "cascade"
            and spec.capacity is None and shard is None
            and pallas_backend() == "pallas_gpu")


class _Scores(NamedTuple):
    q: jax.Array              # [N, m] the ranked quantity
    coef: jax.Array | None    # u (M) or act(g) (CATS): the projection computed densely
    dense: str | None         # which projection that is ("up" / "gate")


def _scores(mlp, layer, xs, act, spec, layer_policy):
    """The rule's scores from the work it keeps dense (M: u, CATS: act(g), D / Deja Vu:
    the predictor, proxy: the low-bit copy's |s_hat|)."""
    one_layer = layer_weights(mlp, layer)    # dense GEMVs slice the layer (XLA fuses it)
    if spec.mode == "proxy":
        pr = layer_policy["proxy"]
        if "proxy_tiles" in layer_policy:          # a GPU's decode policy (generate)
            from countdown_jax.kernels.proxy_scores import mosaic_gpu   # GPU only

            q = mosaic_gpu.proxy_scores_mgpu(layer_policy["proxy_tiles"], xs, act=act)
        else:
            q = proxy_scores_api.proxy_scores(xs, pr["packed"], pr["scale"], act=act,
                                              implementation=spec.implementation)
        return _Scores(q, None, None)
    if spec.mode != "predictor" and spec.method == "cats":
        g = project(xs, one_layer["gate"])
        coef = activation(act)(g)
        return _Scores(spec_quantity(spec, one_layer, xs, act, layer_policy, g=g), coef, "gate")
    if spec.mode != "predictor" and spec.method == "m_countdown":
        u = project(xs, one_layer["up"])
        return _Scores(spec_quantity(spec, one_layer, xs, act, layer_policy, u=u), u, "up")
    return _Scores(spec_quantity(spec, one_layer, xs, act, layer_policy), None, None)


def _fused(mlp, layer, xs, act, spec, layer_policy, scores, shard):
    """One token: the fused kernel applies the threshold itself on the same scores
    ``select`` compares (|u| > tau, |act(g)| > tau, z > theta; the cascade's |s| > tau
    inside)."""
    tau = (layer_policy["threshold"] if spec.mode in ("threshold", "proxy")
           else layer_policy["theta"])
    rule = fused_sparse_ffn_api.Rule(
        spec.method, tau, scores=scores.q if scores.coef is None else scores.coef,
        tau_s=layer_policy["threshold"] if spec.mode == "cascade" else None)
    y, count = fused_sparse_ffn_api.fused_sparse_ffn(xs, mlp, rule, act=act,
                                                     implementation="pallas", layer=layer)
    return y, count, jnp.zeros(count.shape, jnp.int32)       # no capacity: nothing cut


def _union(mlp, layer, xs, act, spec, layer_policy, scores, shard):
    """A decode batch: the rows any token keeps, read once (``batch_union``)."""
    _, mask = _kept_masks(spec, scores.q, layer_policy, shard)   # no capacity: mask = rule
    y = batch_union.union_ffn(mlp, xs, mask, act=act, dense=scores.dense, coef=scores.coef,
                              layer=layer,
                              form="compact" if spec.batch_kernel == "compact" else "live")
    count = count_kept(mask)
    return y, count, jnp.zeros(count.shape, jnp.int32)


def _lists(mlp, layer, xs, act, spec, layer_policy, scores, shard):
    """Per-token index lists (``kernels.sparse_ffn``), capacity-padded; the cascade lists
    its candidates and the kernel keeps those with |s| > tau."""
    rule, mask = _kept_masks(spec, scores.q, layer_policy, shard)
    idx, count = mask_to_indices(mask, spec.capacity)
    dropped = jnp.sum(rule, axis=-1, dtype=jnp.int32) - count
    s_tau = None
    if spec.mode == "cascade":
        s_tau = jnp.broadcast_to(layer_policy["threshold"], (xs.shape[0],))
    out = sparse_ffn_api.sparse_ffn(xs, mlp, idx, count, act=act, dense=scores.dense,
                                    coef=scores.coef, layer=layer,
                                    implementation=spec.implementation, s_tau=s_tau)
    y, count = out if s_tau is not None else (out, count)
    return y, count, dropped


def _dense_where_not_sparse(mlp, xs, act, y, kept, dropped, sparse):
    """Tokens flagged dense take the dense FFN; when every token is sparse (decode) the
    dense FFN is never run."""
    y = jax.lax.cond(
        jnp.all(sparse), lambda y, sp, mlp, xs: y,
        lambda y, sp, mlp, xs: jnp.where(sp[:, None], y,
                                         dense_ffn(mlp, xs, act).astype(y.dtype)),
        y, sparse, mlp, xs)
    return y, jnp.where(sparse, kept, 1.0), jnp.where(sparse, dropped, 0)
