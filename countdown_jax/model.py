"""The decoder as pure functions over the params pytree (layout.py).

embed -> [norm -> attention -> (norm) -> + -> norm -> ffn -> (norm) -> +] x L -> norm -> logits

Stacked layers (layout.py) run as one ``lax.scan``; what differs between layers (rope
frequencies, sliding window, the sparsity policy slice) rides in the scan's xs. Layers as
a tuple (``unstack_layers``) run as an unrolled loop: faster decode on GPU, slower
compiles. The MLP is reached only through ``countdown_jax.ffn.ffn`` so every sparsity rule
plugs in at one place.

``cfg`` and ``spec`` are static (hashable): jit with ``static_argnames=("cfg", "spec")``.
Compute dtype = params dtype; attention softmax and logits are float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax.attention import NO_WINDOW, attend, visibility
from countdown_jax.attention_parallel import pallas_decode_attention
from countdown_jax.config import ModelConfig
from countdown_jax.decode_path import PORTABLE, DecodePath
from countdown_jax.decode_projections import (STACKED_KEYS, project_heads, project_out,
                                              uses_kernel)
from countdown_jax.ffn import ffn
from countdown_jax.norms import rms_norm
from countdown_jax.policy import DENSE, SparseSpec, check_layer_axis
from countdown_jax.rope import apply_rope, layer_inv_frequencies
from countdown_jax.sharding import constrain_batch

__all__ = ["decode_step", "extend", "forward", "fuse_qkv", "init_cache", "prefill",
           "stack_layers", "transpose_projections", "unstack_layers"]


# -- cache ---------------------------------------------------------------------------------
def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> dict:
    """KV cache {"k", "v"}: [L, B, S, Hkv, hd], slot s holds position s."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


# -- pieces --------------------------------------------------------------------------------
@functools.lru_cache(maxsize=64)
def _layer_consts(cfg: ModelConfig):
    """Per-layer scan inputs: rope inverse frequencies [L, hd/2], window [L]."""
    windows = np.array([cfg.sliding_window if s and cfg.sliding_window else NO_WINDOW
                        for s in cfg.layer_sliding], np.int32)
    return layer_inv_frequencies(cfg), windows


def _embed(params, cfg: ModelConfig, tokens):
    x = jnp.take(params["embed"], tokens, axis=0)
    if cfg.embed_scale != 1.0:
        # HF casts the scale to the weight dtype first (Gemma: sqrt(d) in bf16).
        x = x * jnp.asarray(cfg.embed_scale, x.dtype)
    return constrain_batch(x)  # data parallel under a mesh with a "data" axis; else no-op


def _logits(params, cfg: ModelConfig, x):
    h = rms_norm(x, params["final_norm"], cfg.norm_eps)
    if cfg.tie_embeddings:
        logits = jnp.einsum("...d,vd->...v", h, params["embed"],
                            preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("...d,dv->...v", h, params["lm_head"],
                            preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32)
    if cfg.final_softcap is not None:
        logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
    return logits


_NO_GEMV_T = ("projections='pallas' reads the einsum layout (wq/wk/wv/wo); the transposed "
              "layer form runs XLA's projections: use DecodePath(projections='xla' or "
              "'auto')")


def _qkv(cfg: ModelConfig, layer, h, positions, inv_freq, gemv: bool = False, index=None):
    def heads(w):                  # h @ w [(L,) d, H, hd] -> [B, T, H, hd]
        if not gemv:
            return jnp.einsum("btd,dhk->bthk", h, w)
        B, T, d = h.shape          # T = 1 (decode): the Pallas GEMV, stacks read in place
        y = project_heads(h.reshape(B * T, d), w, index, kv_heads=cfg.num_kv_heads)
        return y.reshape((B, T) + y.shape[1:])

    if "wqkv" in layer:            # fuse_qkv: one projection per head group, split by heads
        w = layer["wqkv"]
        groups = w.shape[-3]
        if gemv:                   # [.., G, j, hd] -> [.., G * j, hd]: a free reshape
            qkv = heads(w.reshape(*w.shape[:-3], -1, w.shape[-1]))
            qkv = qkv.reshape(*qkv.shape[:2], groups, -1, w.shape[-1])
        else:
            qkv = jnp.einsum("btd,dgjk->btgjk", h, w)
        if cfg.qkv_bias:
            qkv = qkv + layer["bqkv"]
        hq, hkv = cfg.num_heads // groups, cfg.num_kv_heads // groups
        q, k, v = (a.reshape(*a.shape[:2], -1, a.shape[-1])      # [b, t, G * heads, hd]
                   for a in jnp.split(qkv, [hq, hq + hkv], axis=3))
    else:
        if "wq_t" in layer:        # transpose_projections: one row per output
            if gemv:
                raise ValueError(_NO_GEMV_T)
            q, k, v = (jnp.einsum("btd,hkd->bthk", h, layer[n])
                       for n in ("wq_t", "wk_t", "wv_t"))
        else:
            q, k, v = heads(layer["wq"]), heads(layer["wk"]), heads(layer["wv"])
        if cfg.qkv_bias:
            q, k, v = q + layer["bq"], k + layer["bk"], v + layer["bv"]
    if cfg.qk_norm:
        q = rms_norm(q, layer["q_norm"], cfg.norm_eps)
        k = rms_norm(k, layer["k_norm"], cfg.norm_eps)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def _attn_out_and_mlp(cfg: ModelConfig, spec, layer, x, attn, policy, sparse,
                      collect: bool = False, gemv: bool = False, index=None):
    if "wo_t" in layer:            # transpose_projections: one row per output
        if gemv:
            raise ValueError(_NO_GEMV_T)
        o = jnp.einsum("bthk,dhk->btd", attn, layer["wo_t"])
    elif gemv:                     # T = 1 (decode): the Pallas GEMV
        B, T, H, hd = attn.shape
        o = project_out(attn.reshape(B * T, H, hd), layer["wo"], index,
                        kv_heads=cfg.num_kv_heads).reshape(B, T, -1)
    else:
        o = jnp.einsum("bthk,hkd->btd", attn, layer["wo"])
    if cfg.sandwich_norm:
        o = rms_norm(o, layer["post_attn_norm"], cfg.norm_eps)
    x = x + o
    h = rms_norm(x, layer["mlp_norm"], cfg.norm_eps)
    y, kept = ffn(layer["mlp"], h, act=cfg.act, spec=spec, policy=policy, sparse=sparse,
                  layer=index)
    if cfg.sandwich_norm:
        y = rms_norm(y, layer["post_mlp_norm"], cfg.norm_eps)
    return x + y, ((kept, h) if collect else kept)


def unstack_layers(params):
    """params with ``layers`` as a tuple of L per-layer dicts (one buffer per weight).

    Every model function accepts both forms. Stacked layers run as one ``lax.scan`` (one
    compiled layer body: fast compiles, what training and evaluation want). A tuple runs
    as an unrolled Python loop over separate buffers: on GPU, XLA copies a layer's slice
    out of a stack whenever a matmul it lowers to a GEMM kernel reads it (the q/o
    projections: results/bench_decode.md), so decode runs faster unstacked. Makes a copy;
    drop the stacked params afterwards if memory is tight.
    """
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return params
    n = jax.tree_util.tree_leaves(layers)[0].shape[0]
    return {**params, "layers": tuple(jax.tree.map(lambda a, l=l: a[l], layers)
                                      for l in range(n))}


def _map_layers(params, one):
    """params with ``one`` applied to the stacked layer dict, or to each of a tuple."""
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        return {**params, "layers": tuple(one(l) for l in layers)}
    return {**params, "layers": one(layers)}


_QKV = (("wq", "wk", "wv"), ("bq", "bk", "bv"))


def fuse_qkv(params, groups: int = 1):
    """params with each layer's q/k/v projections as one weight "wqkv" [(L,) d, G,
    (Hq + 2 Hkv) / G, hd] (and "bqkv" [(L,) G, .., hd]), stacked or unstacked: a decode
    step then runs one GEMV for them instead of three (the small k/v GEMVs read well
    under the HBM ceiling: results/bench_decode.md). Group g holds its Hq / G query
    heads, then its Hkv / G kv heads of k, then of v, so with G = the tensor-parallel size
    (``sharding.param_specs`` splits the group axis over "model") each device holds one
    matrix for exactly its own heads: one GEMV per device, where three smaller ones fall
    under XLA's GEMM size cut on GPU and run as slow column reductions (KERNEL_NOTES.md,
    "Tensor parallel decode"). Each output is the same dot product over d. Makes a copy;
    the ``layers`` form ``"fused_qkv"`` of ``generate`` / ``bench_decode``."""
    def one(layer):
        if "wqkv" in layer:
            return layer
        if "wk_t" in layer:
            raise ValueError("fuse_qkv: the projections are transposed "
                             "(model.transpose_projections); fuse the einsum layout instead")
        hkv = layer["wk"].shape[-2]
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1 \
                or hkv % groups:
            raise ValueError(f"fuse_qkv: groups={groups!r} must be a positive int dividing "
                             f"the {hkv} kv heads")
        out = {k: v for k, v in layer.items() if k not in _QKV[0] + _QKV[1]}
        for names, fused in zip(_QKV, ("wqkv", "bqkv")):
            if names[0] in layer:      # [.., heads, hd] -> [.., G, heads / G, hd], joined
                parts = [layer[n].reshape(*layer[n].shape[:-2], groups, -1,
                                          layer[n].shape[-1]) for n in names]
                out[fused] = jnp.concatenate(parts, axis=-2)
        return out

    return _map_layers(params, one)


_TRANSPOSED = (("wq", "wq_t", (1, 2, 0)), ("wk", "wk_t", (1, 2, 0)),
               ("wv", "wv_t", (1, 2, 0)), ("wo", "wo_t", (2, 0, 1)))


def transpose_projections(params):
    """params with each layer's q/k/v/o projections stored one row per output: "wq_t",
    "wk_t", "wv_t" [(L,) H, hd, d] and "wo_t" [(L,) d, Hq, hd] in place of wq/wk/wv/wo,
    stacked or unstacked (the ``layers`` form ``"transposed"`` of ``generate`` /
    ``bench_decode``; makes a copy).

    Why: at decode a projection is a GEMV, and XLA on GPU reads x @ W [d, n] with a small
    n as a column reduction (strided reads, well under the HBM ceiling) while W^T [n, d]
    is a row reduction over contiguous rows (up to 3x faster for k/v and the
    tensor-parallel halves: experiments/results/bench_gemv.md). The same dot products:
    every output equals the einsum layout's. Not combined with ``fuse_qkv``.
    """
    def one(layer):
        if "wqkv" in layer:
            raise ValueError("transpose_projections: q/k/v are fused (model.fuse_qkv); "
                             "transpose the unfused params instead")
        out = dict(layer)
        for src, dst, perm in _TRANSPOSED:
            if src in out:
                w = out.pop(src)
                lead = tuple(range(w.ndim - 3))
                out[dst] = jnp.transpose(w, lead + tuple(len(lead) + i for i in perm))
        return out

    return _map_layers(params, one)


def stack_layers(params):
    """Inverse of ``unstack_layers``."""
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return params
    return {**params, "layers": jax.tree.map(lambda *a: jnp.stack(a), *layers)}


def _run_layers(params, cfg: ModelConfig, body, carry, policy, in_place=()):
    """Run ``body(carry, (layer, inv_freq, window, policy_l, l, index)) -> (carry, out)``
    over the layers: a scan over stacked layers, or a Python loop over a tuple of layers.
    Stacked, ``layer["mlp"]`` (and the weights named in ``in_place``) stay whole stacks and
    ``index`` is the traced layer index, so sparse kernels read the kept rows in place
    (``gated.layer_weights``); unstacked, ``index`` is None."""
    inv_freq, windows = _layer_consts(cfg)
    layers = params["layers"]
    if isinstance(layers, (list, tuple)):
        if len(layers) != cfg.num_layers:
            raise ValueError(f"params have {len(layers)} layers, the config "
                             f"{cfg.num_layers}")
        outs = []
        for l, layer in enumerate(layers):
            pol = policy[l] if isinstance(policy, tuple) else jax.tree.map(
                lambda a, l=l: a[l], policy)
            carry, out = body(carry, (layer, inv_freq[l], windows[l], pol, l, None))
            outs.append(out)
        return carry, jax.tree.map(lambda *a: jnp.stack(a), *outs)

    whole = {k: layers[k] for k in ("mlp",) + tuple(in_place) if k in layers}

    def scan_body(carry, xs):
        layer, inv_f, window, pol, l = xs
        return body(carry, ({**layer, **whole}, inv_f, window, pol, l, l))

    if isinstance(policy, tuple):                 # per-layer policies (unstack_policy)
        policy = jax.tree.map(lambda *a: jnp.stack(a), *policy)
    scanned = {k: v for k, v in layers.items() if k not in whole}
    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    return jax.lax.scan(scan_body, carry, (scanned, inv_freq, windows, policy, layer_ids))


def _decoder_layer(cfg: ModelConfig, spec, carry, xs, *, positions, kv, sparse,
                   collect: bool = False, gemv: bool = False):
    """One layer (the body of ``_run_layers``). ``kv(q, k, v, ck, cv, l, window)`` writes
    this layer's cache slots and returns (attention output, ck, cv): the only part that
    differs between a whole sequence and a chunk against the cache. ``gemv``: the q/k/v/o
    projections run the Pallas GEMV (decode, ``decode_projections``)."""
    x, ck, cv = carry
    layer, inv_f, window, pol, l, index = xs
    h = rms_norm(x, layer["attn_norm"], cfg.norm_eps)
    q, k, v = _qkv(cfg, layer, h, positions, inv_f, gemv, index)
    attn, ck, cv = kv(q, k, v, ck, cv, l, window)
    x, kept = _attn_out_and_mlp(cfg, spec, layer, x, attn, pol, sparse, collect, gemv, index)
    return (x, ck, cv), kept


# -- full sequences (prefill / forward) ------------------------------------------------------
def _head_at(params, cfg: ModelConfig, x, logits_at):
    """Logits only at positions logits_at [B, P] (None = all): the head can dominate."""
    if logits_at is not None:
        x = jnp.take_along_axis(x, jnp.asarray(logits_at, jnp.int32)[..., None], axis=1)
    return _logits(params, cfg, x)


def _sequence(params, cfg: ModelConfig, tokens, lengths, cache, spec, policy, sparse,
              collect: bool = False, logits_at=None):
    B, T = tokens.shape
    if lengths is None:
        lengths = jnp.full((B,), T, jnp.int32)
    check_layer_axis(policy, cfg.num_layers)      # contents: the FFN, per layer
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    kv_valid = jnp.arange(T, dtype=jnp.int32)[None, :] < lengths[:, None]
    x = _embed(params, cfg, tokens)

    def kv(q, k, v, ck, cv, l, window):
        if ck is not None:  # slots [0, T) of this layer
            ck = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype)[None], (l, 0, 0, 0, 0))
            cv = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype)[None], (l, 0, 0, 0, 0))
        mask = visibility(positions, positions[0], kv_valid, window)
        return attend(q, k, v, mask, scale=cfg.attn_scale, softcap=cfg.attn_softcap), ck, cv

    body = functools.partial(_decoder_layer, cfg, spec, positions=positions, kv=kv,
                             sparse=sparse, collect=collect)

    ck = cv = None
    if cache is not None:
        ck, cv = cache["k"], cache["v"]
    (x, ck, cv), kept = _run_layers(params, cfg, body, (x, ck, cv), policy)
    logits = _head_at(params, cfg, x, logits_at)
    new_cache = None if cache is None else {"k": ck, "v": cv}
    return logits, new_cache, kept


def prefill(params, cfg: ModelConfig, tokens, lengths, cache, *, spec: SparseSpec = DENSE,
            policy=None, sparse=None, logits_at=None):
    """Right-padded prompts tokens[B, T] (row b valid below lengths[b]) at positions 0..T-1.

    Writes k/v to cache slots [0, T) and returns (logits [B, T, V] float32, cache,
    kept [L, B, T]). Keys at/after a row's length are masked; logits there are junk.
    sparse: bool [B, T] tokens that run sparse; default: ``spec.sparse_prefill`` for all.
    logits_at: int [B, P] positions whose logits are returned ([B, P, V]); None = all.
    """
    B, T = tokens.shape
    S = cache["k"].shape[2]
    if T > S:
        raise ValueError(f"prompt length {T} exceeds the cache length {S}")
    if sparse is None and not spec.is_dense:
        sparse = jnp.full((B, T), spec.sparse_prefill)
    return _sequence(params, cfg, tokens, jnp.asarray(lengths, jnp.int32), cache, spec, policy,
                     sparse, logits_at=logits_at)


def forward(params, cfg: ModelConfig, tokens, lengths=None, *, spec: SparseSpec = DENSE,
            policy=None, sparse=None, collect: bool = False, logits_at=None):
    """No-cache forward for scoring: (logits [B, T, V] float32, kept [L, B, T]).

    sparse: bool [B, T] tokens that run sparse (e.g. the continuation in log-likelihood
    evaluation); None passes None to the FFN, i.e. every token follows ``spec``.
    collect: also return the MLP inputs (post-norm x) of every layer, [L, B, T, d]
    (calibration and predictor data): (logits, kept, mlp_inputs).
    logits_at: int [B, P] positions whose logits are returned ([B, P, V]); None = all,
    and a [B, 0] array skips the head.
    """
    if lengths is not None:
        lengths = jnp.asarray(lengths, jnp.int32)
    logits, _, out = _sequence(params, cfg, tokens, lengths, None, spec, policy, sparse,
                               collect=collect, logits_at=logits_at)
    if collect:
        kept, mlp_inputs = out
        return logits, kept, mlp_inputs
    return logits, out


# -- one token per row against the cache ----------------------------------------------------
def _check_positions(pos, S: int):
    """Out-of-range slots would be dropped silently by the scatter: refuse when concrete."""
    try:
        top = int(np.max(np.asarray(pos)))
    except jax.errors.TracerArrayConversionError:
        return
    if top >= S:
        raise ValueError(f"decode position {top} is outside the cache of length {S}")


def _write_slots(cache, l, positions, new):
    """cache [L, B, S, Hkv, hd] with new [B, T, Hkv, hd] at slots positions [B, T] of
    layer l. A scatter batched over the rows (vmap): under a mesh splitting the batch
    XLA writes each device's rows in place, where an explicit row index made it
    all-gather the indices and the new k/v every layer (seen in the compiled HLO)."""
    def row(c, p, u):                  # c [L, S, Hkv, hd], p [T], u [T, Hkv, hd]
        return c.at[l, p].set(u.astype(c.dtype))

    return jax.vmap(row, in_axes=(1, 0, 0), out_axes=1)(cache, positions, new)


def decode_step(params, cfg: ModelConfig, token, pos, cache, *, spec: SparseSpec = DENSE,
                policy=None, sparse=None, path: DecodePath = PORTABLE):
    """token[B] at position pos[B]: writes k/v at slot pos[b], attends to slots <= pos[b]
    (and inside the layer's sliding window). Returns (logits [B, V] float32, cache,
    kept [L, B]). sparse: bool [B], default all True for a sparse spec. path: a resolved
    ``DecodePath`` (``fast_path.resolve``), see ``extend``.
    """
    B = token.shape[0]
    if sparse is not None:
        sparse = jnp.asarray(sparse).reshape(B, 1)
    logits, cache, kept = extend(params, cfg, jnp.asarray(token)[:, None], pos, cache,
                                 spec=spec, policy=policy, sparse=sparse, path=path)
    return logits[:, 0], cache, kept[:, :, 0]


def extend(params, cfg: ModelConfig, tokens, start, cache, *, spec: SparseSpec = DENSE,
           policy=None, sparse=None, logits_at=None, path: DecodePath = PORTABLE):
    """A chunk tokens[B, T] continuing each row at positions start[b] + t (decode_step for
    T tokens at once, e.g. scoring continuations against a prefilled context).

    Writes k/v at those slots and attends to slots <= the query's position (slots below
    start[b] must hold the row's earlier tokens). Returns (logits [B, T, V] float32 or at
    logits_at [B, P], cache, kept [L, B, T]). sparse: bool [B, T], default all True for a
    sparse spec. Padding at the end of a row only produces junk after the row's tokens.
    path: a resolved ``DecodePath``; read here: attention "pallas" (the decode-attention
    kernel, per device on a mesh) and projections "pallas" (the GEMV,
    ``decode_projections``), which serve one token per row (T = 1; longer chunks take
    XLA's). The FFN runs ``spec`` as given (``generate`` hands it ``spec.with_path``) and
    the layer form is the params' own.
    """
    if not path.resolved:
        raise ValueError(f"extend / decode_step need a resolved DecodePath, got {path}; "
                         "resolve it with fast_path.resolve (generate does)")
    B, T = tokens.shape
    gemv = uses_kernel(path.projections, B, T)
    S = cache["k"].shape[2]
    start = jnp.asarray(start, jnp.int32)
    positions = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None, :]  # [B, T]
    _check_positions(positions, S)
    # sparse=None: every token follows spec (no per-token dense fallback to trace)
    check_layer_axis(policy, cfg.num_layers)      # contents: the FFN, per layer
    slots = jnp.arange(S, dtype=jnp.int32)
    all_valid = jnp.ones((B, S), bool)
    x = _embed(params, cfg, tokens)

    def kv(q, k, v, ck, cv, l, window):
        ck, cv = _write_slots(ck, l, positions, k), _write_slots(cv, l, positions, v)
        if path.attention == "pallas" and T == 1:   # reads layer l of the stack in place
            out = pallas_decode_attention(q[:, 0], ck, cv, positions[:, 0], layer=l,
                                          window=window, scale=cfg.attn_scale,
                                          softcap=cfg.attn_softcap)   # per device on a mesh
            return out[:, None].astype(q.dtype), ck, cv
        mask = visibility(positions, slots, all_valid, window)
        out = attend(q, ck[l], cv[l], mask, scale=cfg.attn_scale, softcap=cfg.attn_softcap)
        return out, ck, cv

    body = functools.partial(_decoder_layer, cfg, spec, positions=positions, kv=kv,
                             sparse=sparse, gemv=gemv)

    (x, ck, cv), kept = _run_layers(params, cfg, body, (x, cache["k"], cache["v"]), policy,
                                    in_place=STACKED_KEYS if gemv else ())
    return _head_at(params, cfg, x, logits_at), {"k": ck, "v": cv}, kept
