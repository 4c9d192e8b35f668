"""The gated MLP as a weighted sum of W_down rows: coefficients -> selection -> sum.

Interface used by the model (one layer, inside the scan over layers):

    y, kept = ffn(mlp, x, act=cfg.act, spec=spec, policy=layer_policy, sparse=sparse)

mlp: {"gate","up","down"} each [m, d] (row-per-neuron, see layout.py); x: [..., d];
policy: this layer's slice of the policy pytree (or None when dense); sparse: bool[...]
marking tokens that run sparse (None = all tokens follow ``spec``; the others run dense).
Returns y [..., d] in x.dtype and kept [...] float32: fraction of the m neurons used
(from the mask actually applied, capacity cut included; 1.0 for dense tokens).

Implementations (``spec.implementation``; "xla" and "pallas" are the kernels' vocabulary,
``kernels._platform``, and what the spec hands them):
  masked  the numerical reference: dense g, u, s for every neuron, mask applied to s.
          Dense cost - for quality sweeps and as the oracle of the other two, not speed.
  xla     (earlier name: "gather") capacity-padded index list -> ``kernels.sparse_ffn``
          with implementation="xla" (XLA gather). Only the
          work the method keeps dense is done densely:
            cats         gate GEMV dense (selects on act(g)); up/down rows gathered
            m_countdown  up GEMV dense (selects on u); gate/down rows gathered
            predictor    (d_countdown, dejavu) x V U^T only; gate/up/down all gathered
            proxy        (d_countdown) the low-bit gate/up GEMVs (kernels.proxy_scores);
                         gate/up/down rows of the kept gathered
            cascade      (d_countdown) x V U^T; gate/up rows of the candidates gathered,
                         down rows of those with |s| > tau
          Oracle modes of d_countdown / dejavu / s_countdown (ideal, topk, threshold)
          need the dense s (or g) to select: an upper bound on quality, not a speedup.
  pallas  as xla, with the Pallas kernels. On a GPU the threshold rules of m_countdown
          and cats and d_countdown's predictor and cascade (method "dc": W_down rows read
          only for |s| > tau), without a capacity and for at most
          ``_FUSED_MAX_TOKENS`` tokens (decode), run ``kernels.fused_sparse_ffn``
          instead: the threshold is applied inside the kernel (no index list), on the
          same scores ``select`` compares (XLA's dense u / act(g) / z), so the kept
          set is the same. Decode batches of those rules (except the cascade) on the
          same terms with ``spec.batch_kernel="union"`` go to ``batch_union``: the rows
          any token keeps read once; with ``batch_kernel="dense"`` a decode batch
          (any rule) runs the dense FFN, kept 1 (``fast_path`` picks it where no sparse
          path beats dense). Elsewhere the index list as above (CPU: XLA, with a
          warning).

Under a mesh whose "model" axis splits the neurons, ``ffn`` hands its single-device body
to ``ffn_parallel`` (the tensor parallel form); the body never looks at the mesh. The
body's Pallas kernels then run per device on its neurons (the fused kernel too: its
rules look at one neuron at a time), as they do under a data-parallel mesh, since XLA
cannot partition a kernel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from countdown_jax import batch_union, parallel_selection
from countdown_jax.ffn_parallel import tensor_parallel_ffn
from countdown_jax.gated import activation, coefficients, down_sum, layer_weights, project
from countdown_jax.kernels._platform import pallas_backend
# The kernel ops are called through their api modules (one attribute look-up at trace time).
from countdown_jax.kernels.fused_sparse_ffn import api as fused_sparse_ffn_api
from countdown_jax.kernels.proxy_scores import api as proxy_scores_api
from countdown_jax.kernels.sparse_ffn import api as sparse_ffn_api
from countdown_jax.policy import DENSE, SparseSpec, check_layer
from countdown_jax.selection import (count_kept, kept_fraction, limit_to_capacity,
                                     mask_to_indices, refine, select, spec_quantity)
from countdown_jax.sharding import multi_device_mesh, splits_neurons

__all__ = ["dense_ffn", "ffn"]

# The fused kernel unrolls its tokens (and reads the union of their rows). Measured in the
# Llama-8B decode (H100, experiments/results/bench_decode.md): 1.43-1.52x dense at one
# token, but 0.3-0.5x at four, so more than one token takes the index list (same rule).
_FUSED_MAX_TOKENS = 1
# (method, mode) -> the fused kernel's method, where its rule equals ``select``'s.
_FUSED_RULES = {("m_countdown", "threshold"): "m", ("cats", "threshold"): "cats",
                ("d_countdown", "predictor"): "d", ("d_countdown", "cascade"): "dc",
                ("d_countdown", "proxy"): "d"}


def dense_ffn(mlp, x, act: str):
    _, _, s = coefficients(mlp, x, act)
    return down_sum(s, mlp["down"])


def ffn(mlp, x, *, act: str, spec: SparseSpec = DENSE, policy=None, sparse=None,
        return_dropped: bool = False):
    """One layer's FFN under ``spec``; see the module docstring.

    return_dropped: also return dropped [...] int32, how many neurons that passed the rule
    were cut by ``spec.capacity`` (0 when the capacity is never exceeded).
    """
    if spec.is_dense or spec.implementation == "masked":
        mlp = layer_weights(mlp)        # only the xla/pallas paths read the stack in place
    kernels = not spec.is_dense and spec.implementation == "pallas"
    if splits_neurons() or (kernels and multi_device_mesh()):
        out = tensor_parallel_ffn(_one_device_ffn, layer_weights(mlp), x, act=act,
                                  spec=spec, policy=policy, sparse=sparse)
    else:
        out = _one_device_ffn(mlp, x, act=act, spec=spec, policy=policy, sparse=sparse)
    return out if return_dropped else out[:2]


def _one_device_ffn(mlp, x, *, act, spec, policy, sparse):
    """(y, kept, dropped) on this device's neurons (all of them, or a shard_map's slice)."""
    if spec.is_dense:
        return _all_kept(mlp, x, act)
    m, d = mlp["gate"].shape[-2:]
    if x.shape[-1] != d:
        raise ValueError(f"MLP input has width {x.shape[-1]}, weights expect d={d}")
    activation(act)                                  # unknown activation: fail early
    check_layer(spec, policy, d=d, m=m)
    if sparse is not None:
        sparse = jnp.asarray(sparse)
        if sparse.dtype != jnp.bool_ or sparse.shape != x.shape[:-1]:
            raise ValueError(f"sparse must be bool{list(x.shape[:-1])} (one flag per "
                             f"token), got {sparse.dtype}{list(sparse.shape)}")
    if _dense_batch(spec, math.prod(x.shape[:-1])):
        return _all_kept(layer_weights(mlp), x, act)
    run = _masked if spec.implementation == "masked" else _gathered
    return run(mlp, x, act, spec, policy, sparse)


def _all_kept(mlp, x, act):
    """The dense FFN as (y, kept = 1, dropped = 0)."""
    return (dense_ffn(mlp, x, act), jnp.ones(x.shape[:-1], jnp.float32),
            jnp.zeros(x.shape[:-1], jnp.int32))


def _dense_batch(spec, n_tokens):
    """batch_kernel "dense": a decode batch runs the dense FFN (every neuron kept, kept =
    1). ``fast_path`` picks it where no exact sparse path was measured faster than dense
    (masked reads dense's bytes plus the selection's, so it never is)."""
    return (spec.batch_kernel == "dense" and spec.implementation == "pallas"
            and _FUSED_MAX_TOKENS < n_tokens <= batch_union.MAX_TOKENS)


def _choose(spec, q, layer):
    """(rule mask, mask after the capacity cut); across devices when the neurons are split
    over a mesh axis (``parallel_selection``, set while the sharded FFN traces)."""
    shard = parallel_selection.current()
    if shard is not None:
        return parallel_selection.choose(spec, q, layer, shard)
    rule = select(spec, q, layer)
    return rule, limit_to_capacity(rule, q, spec.capacity)


def _masked(mlp, x, act, spec, layer, sparse):
    g, u, s = coefficients(mlp, x, act)
    q = spec_quantity(spec, mlp, x, act, layer, g=g, u=u)
    rule, mask = _choose(spec, q, layer)
    # (cascade: the capacity caps the candidates, so ``dropped`` counts candidates cut)
    dropped = (jnp.zeros(mask.shape[:-1], jnp.int32) if mask is rule
               else count_kept(rule) - count_kept(mask))
    mask = refine(spec, mask, s, layer)
    if sparse is not None:
        mask = mask | ~sparse[..., None]
        dropped = jnp.where(sparse, dropped, 0)
    y = down_sum(jnp.where(mask, s, jnp.zeros_like(s)), mlp["down"])
    kept = kept_fraction(count_kept(mask), mask.shape[-1])
    return y.astype(x.dtype), kept, dropped


def _fused_method(spec, n_tokens):
    """The fused kernel's method when it runs this spec's exact rule on this platform."""
    method = _FUSED_RULES.get((spec.method, spec.mode))
    if (method is None or spec.implementation != "pallas" or spec.capacity is not None
            or n_tokens > _FUSED_MAX_TOKENS):
        return None      # capacity cuts live in the index-list path
    # These rules look at one neuron at a time: on a shard of the neurons (tensor
    # parallel) the kernel keeps exactly that shard's part of the one-device set.
    return method if pallas_backend() == "pallas_gpu" else None


def _batched(spec, n_tokens):
    """Whether a batch runs ``batch_union`` (spec.batch_kernel "union" / "compact"; the
    fused kernel's rules bar the cascade, on the same terms as ``_fused_method``, for 2 to
    ``batch_union.MAX_TOKENS`` tokens: decode batches; a prefill keeps the lists)."""
    return (spec.batch_kernel in ("union", "compact")
            and _FUSED_MAX_TOKENS < n_tokens <= batch_union.MAX_TOKENS
            and _FUSED_RULES.get((spec.method, spec.mode)) in
            ("m", "cats", "d") and spec.implementation == "pallas" and spec.capacity is None
            and parallel_selection.current() is None and pallas_backend() == "pallas_gpu")


def _gathered(stack, x, act, spec, layer, sparse):
    mlp = layer_weights(stack)      # whole-matrix uses (dense GEMVs) slice the layer
    m, d = mlp["gate"].shape
    lead = x.shape[:-1]
    xs = x.reshape(-1, d)
    g = u = coef = dense = None
    if spec.mode != "predictor" and spec.method == "cats":
        g = project(xs, mlp["gate"])
        coef, dense = activation(act)(g), "gate"
    elif spec.mode != "predictor" and spec.method == "m_countdown":
        u = project(xs, mlp["up"])
        coef, dense = u, "up"
    if spec.mode == "proxy":
        # the low-bit copy's |s_hat| from the kernel that streams its packed bytes
        pr = layer["proxy"]
        q = proxy_scores_api.proxy_scores(xs, pr["packed"], pr["scale"], act=act,
                                          implementation=spec.implementation)
    else:
        q = spec_quantity(spec, mlp, xs, act, layer, g=g, u=u)
    fused = _fused_method(spec, xs.shape[0])
    if fused is not None:
        # Same scores and comparison as ``select``: |u| > tau, |act(g)| > tau, z > theta
        # (q is |coef| for m / cats). The kernel reads the stack in place; given scores,
        # it takes its measured default config with score="xla". Cascade: the candidates
        # z > theta, then |s| > tau inside the kernel (``refine``'s comparison).
        tau = layer["threshold"] if spec.mode in ("threshold", "proxy") else layer["theta"]
        y, count = fused_sparse_ffn_api.fused_sparse_ffn(
            xs, stack["gate"], stack["up"], stack["down"], tau, act=act, method=fused,
            implementation="pallas", layer=stack.get("layer"),
            scores=q if coef is None else coef,
            tau_s=layer["threshold"] if fused == "dc" else None)
        dropped = jnp.zeros(count.shape, jnp.int32)      # no capacity: nothing cut
    elif _batched(spec, xs.shape[0]):
        _, mask = _choose(spec, q, layer)                # no capacity: mask = rule
        y = batch_union.union_ffn(stack, xs, mask, act=act, dense=dense, coef=coef,
                                  form="compact" if spec.batch_kernel == "compact" else "live")
        count = count_kept(mask)
        dropped = jnp.zeros(count.shape, jnp.int32)
    else:
        rule, mask = _choose(spec, q, layer)
        idx, count = mask_to_indices(mask, spec.capacity)
        dropped = jnp.sum(rule, axis=-1, dtype=jnp.int32) - count
        # The kernel reads the kept rows straight from the model's stack when it has one.
        # Cascade: idx lists the candidates; the kernel keeps those with |s| > tau and
        # returns how many it kept.
        s_tau = None
        if spec.mode == "cascade":
            s_tau = jnp.broadcast_to(layer["threshold"], (xs.shape[0],))
        out = sparse_ffn_api.sparse_ffn(xs, stack["gate"], stack["up"], stack["down"], idx,
                                        count, act=act, dense=dense, coef=coef,
                                        layer=stack.get("layer"),
                                        implementation=spec.implementation, s_tau=s_tau)
        y, count = out if s_tau is not None else (out, count)
    kept = kept_fraction(count, m)
    if sparse is not None:
        sp = sparse.reshape(-1)
        # Dense tokens take the dense path; when every token is sparse (decode) the
        # dense FFN is never run.
        y = jax.lax.cond(
            jnp.all(sp), lambda y, sp, mlp, xs: y,
            lambda y, sp, mlp, xs: jnp.where(sp[:, None], y, dense_ffn(mlp, xs, act).astype(y.dtype)),
            y, sp, mlp, xs)
        kept = jnp.where(sp, kept, 1.0)
        dropped = jnp.where(sp, dropped, 0)
    return y.reshape(lead + (d,)), kept.reshape(lead), dropped.reshape(lead)
