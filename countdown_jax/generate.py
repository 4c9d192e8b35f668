"""On-device generation: dense prefill, then a ``lax.while_loop`` of (sparse) decode steps.

One call of ``generate`` is one compiled program: prompt in, tokens out, no host round
trip per token. Sparsity values live in ``policy`` (traced), so changing r or thresholds
does not recompile; ``spec`` (static) picks the rule, ``path`` (a ``DecodePath``) how the
decode step runs. Its two phases are also exposed (``start``: prefill + first token;
``decode``: the loop, optionally up to a traced step) for timing prefill and decode apart
and for streaming in chunks of steps; ``CACHES`` holds what decode keeps between calls.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax import fast_path
from countdown_jax import model as model_lib
from countdown_jax.decode_path import PORTABLE, DecodePath
from countdown_jax.policy import DENSE, SparseSpec, unstack_policy
from countdown_jax.sharding import (MODEL, axis_size, context_mesh, head_axis,
                                    multi_device_mesh)

__all__ = ["CACHES", "GREEDY", "Caches", "Generation", "Sampling", "compiled", "decode_params",
           "decode_policy", "generate", "layer_form", "sample"]


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 = off; top_p 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling()


def sample(key, logits, sampling: Sampling = GREEDY):
    """logits [B, V] float32 -> tokens [B] int32."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        # Keep the smallest prefix of the sorted distribution whose mass reaches top_p
        # (the most likely token always survives).
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        cutoff_idx = jnp.sum(mass_before < sampling.top_p, axis=-1, keepdims=True) - 1
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_idx, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


class Generation(NamedTuple):
    tokens: jax.Array          # [B, max_new_tokens] int32, pad_id after a row stops
    num_tokens: jax.Array      # [B] int32, generated tokens per row (stop token included)
    kept_sum: jax.Array        # [L] float32, sum over sparse decode tokens of kept fraction
    kept_count: jax.Array      # [] float32, number of (row, step) decode tokens summed

    @property
    def realised_sparsity(self):
        """Per layer: fraction of FFN neurons skipped, averaged over decode tokens.
        [L], or [R, L] for a ``jax.vmap`` over R stacked policies."""
        count = jnp.maximum(jnp.asarray(self.kept_count), 1.0)
        return 1.0 - self.kept_sum / count[..., None]


# Static arguments of the two phases below (keyword-only there, so an AOT-compiled phase
# is called with its array arguments alone).
_START_STATIC = ("cfg", "max_new_tokens", "spec", "sampling", "stop_tokens", "cache_dtype")
_DECODE_STATIC = ("cfg", "spec", "sampling", "stop_tokens", "path")


def _pad_id(cfg):
    return jnp.int32(cfg.pad_token_id if cfg.pad_token_id is not None else 0)


def _stops(stop_tokens):
    return jnp.asarray(stop_tokens if stop_tokens else (-1,), jnp.int32)


def start(params, prompt, lengths, key, policy=None, *, cfg, max_new_tokens: int,
          spec: SparseSpec = DENSE, sampling: Sampling = GREEDY,
          stop_tokens: tuple[int, ...] = (), cache_dtype=None) -> dict:
    """Phase 1: the prompt's prefill (dense unless ``spec.sparse_prefill``) and the first
    sampled token. Returns the decode state (a dict of arrays) that ``decode`` advances;
    ``finish`` turns it into a ``Generation``."""
    b, t = prompt.shape
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    dtype = cache_dtype or params["embed"].dtype
    cache = model_lib.init_cache(cfg, b, t + max_new_tokens, dtype)
    prefill_sparse = None
    if spec.sparse_prefill and not spec.is_dense:
        prefill_sparse = jnp.arange(t)[None, :] < lengths[:, None]
    else:                   # a dense prompt: the dense FFN, no selection to compute
        spec, policy = DENSE, None
    logits, cache, _ = model_lib.prefill(params, cfg, prompt, lengths, cache, spec=spec,
                                         policy=policy, sparse=prefill_sparse)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    key, sub = jax.random.split(key)
    first = sample(sub, last, sampling)
    out = jnp.full((b, max_new_tokens), _pad_id(cfg), jnp.int32).at[:, 0].set(first)
    return dict(step=jnp.int32(1), token=first, pos=lengths.astype(jnp.int32), cache=cache,
                out=out, done=jnp.isin(first, _stops(stop_tokens)),
                num=jnp.ones((b,), jnp.int32), key=key,
                kept_sum=jnp.zeros((cfg.num_layers,), jnp.float32), kept_count=jnp.float32(0))


def decode(params, state, policy=None, until=None, *, cfg, spec: SparseSpec = DENSE,
           sampling: Sampling = GREEDY, stop_tokens: tuple[int, ...] = (),
           path: DecodePath | None = None) -> dict:
    """Phase 2: (sparse) decode steps in one ``lax.while_loop`` until every row stopped,
    the output is full, or ``step == until`` (a traced int: decoding in chunks, e.g. to
    stream, reuses one compile). path: resolved (``fast_path.resolve``); its FFN runs the
    spec's rule. None: the spec as given on the portable path."""
    stops, pad = _stops(stop_tokens), _pad_id(cfg)
    if path is None:
        path = PORTABLE
    else:
        spec = spec.with_path(path)        # the FFN as the path runs it
    limit = state["out"].shape[1]
    if until is not None:
        limit = jnp.minimum(jnp.asarray(until, jnp.int32), limit)

    def cond(s):
        return (s["step"] < limit) & ~jnp.all(s["done"])

    def body(s):
        logits, cache, kept = model_lib.decode_step(params, cfg, s["token"], s["pos"],
                                                    s["cache"], spec=spec, policy=policy,
                                                    path=path)
        key, sub = jax.random.split(s["key"])
        nxt = sample(sub, logits, sampling)
        live = ~s["done"]
        nxt = jnp.where(live, nxt, pad)
        out = s["out"].at[:, s["step"]].set(nxt)
        livef = live.astype(jnp.float32)
        return dict(step=s["step"] + 1, token=nxt, pos=s["pos"] + 1, cache=cache, out=out,
                    done=s["done"] | jnp.isin(nxt, stops), num=s["num"] + live.astype(jnp.int32),
                    key=key, kept_sum=s["kept_sum"] + jnp.sum(kept * livef[None, :], axis=1),
                    kept_count=s["kept_count"] + jnp.sum(livef))

    return jax.lax.while_loop(cond, body, state)


def finish(state) -> Generation:
    return Generation(state["out"], state["num"], state["kept_sum"], state["kept_count"])


def is_finished(state) -> bool:
    """Host-side: every row stopped or the output buffer is full."""
    return bool(state["done"].all()) or int(state["step"]) >= state["out"].shape[1]


# The two phases compiled on their own: separate prefill / decode timing, chunked decode.
start_jit = jax.jit(start, static_argnames=_START_STATIC)
decode_jit = jax.jit(decode, static_argnames=_DECODE_STATIC)


@dataclasses.dataclass
class Caches:
    """What decode keeps between calls, in one visible place (``CACHES``; ``clear()``).

    layer_copy: the layer form last made for decode, [(form key, weak reference to the
        given params' first leaf, the converted params)]: one entry, kept while its source
        lives (an unstacked copy of an 8B model is 16 GB).
    programs: (phase, static args, argument avals) -> an ahead-of-time compiled phase
        (``compiled``), so a call's compile time is measured apart and runs once.
    policy_copy: the per-layer policy last made for decode (``decode_policy``), [(layer
        form and tree, weak references to every given leaf, the per-layer policy)]: the
        proxy's Mosaic tiles are made once per policy, not per call.
    """

    layer_copy: list = dataclasses.field(default_factory=list)
    programs: dict = dataclasses.field(default_factory=dict)
    policy_copy: list = dataclasses.field(default_factory=list)

    def clear(self):
        self.layer_copy.clear()
        self.programs.clear()
        self.policy_copy.clear()


CACHES = Caches()


def compiled(fn, static: dict, *args):
    """``fn`` (a jitted phase) compiled ahead for these static args and argument shapes,
    from ``CACHES.programs``."""
    leaves, tree = jax.tree.flatten(args)
    key = (fn, tuple(sorted(static.items())), tree,
           tuple((np.shape(x), str(getattr(x, "dtype", type(x).__name__))) for x in leaves))
    if key not in CACHES.programs:
        if len(CACHES.programs) > 64:
            CACHES.programs.clear()
        CACHES.programs[key] = fn.lower(*args, **static).compile()
    return CACHES.programs[key]


def layer_form(params) -> str:
    layers = params["layers"]
    if not isinstance(layers, (list, tuple)):
        return "stacked"
    if "wqkv" in layers[0]:
        return "fused_qkv"
    return "transposed" if "wq_t" in layers[0] else "unstacked"


def _head_groups(params) -> int:
    """q/k/v head groups for ``model.fuse_qkv``: the context mesh's "model" size when the
    heads split over it (one fused GEMV per device), else 1."""
    layers = params["layers"]
    layer = layers[0] if isinstance(layers, (list, tuple)) else layers
    hkv = layer["wk"].shape[-2] if "wk" in layer else layer["wk_t"].shape[-3]
    return axis_size(context_mesh(), MODEL) if head_axis(hkv) else 1


_CONVERT = {"stacked": model_lib.stack_layers, "unstacked": model_lib.unstack_layers,
            "fused_qkv": lambda p: model_lib.fuse_qkv(model_lib.unstack_layers(p),
                                                      _head_groups(p)),
            "transposed": lambda p: model_lib.transpose_projections(
                model_lib.unstack_layers(p))}


def decode_params(params, layers: str):
    """params in the layer form decode runs on (a resolved ``DecodePath.layers``):
    "stacked" | "unstacked" | "fused_qkv" (unstacked, ``model.fuse_qkv``: one head group
    per "model" device of the mesh in context) | "transposed" (unstacked,
    ``model.transpose_projections``: q/k/v/o one row per output). A conversion is a copy,
    made once per params and kept while they live (``CACHES.layer_copy``); traced params
    (inside a jit) are returned as given, and so are fused_qkv or transposed params asked
    for "unstacked" (they are)."""
    given = layer_form(params)
    first = jax.tree_util.tree_leaves(params["layers"])[0]
    if layers == given or (layers == "unstacked" and given in ("fused_qkv", "transposed")) \
            or isinstance(first, jax.core.Tracer):
        return params
    key = (layers, _head_groups(params) if layers == "fused_qkv" else 1)
    copy = CACHES.layer_copy
    if copy and copy[0][0] == key and copy[0][1]() is first:
        return copy[0][2]
    out = jax.block_until_ready(_CONVERT[layers](params))
    copy[:] = [(key, weakref.ref(first, _forget), out)]
    return out


def decode_policy(params, policy):
    """The policy as decode should read it for ``params`` (``decode_params``' result):
    per-layer buffers (``policy.unstack_policy``, a copy) for unstacked layers, so no
    kernel copies a layer's slice out of the stack; as given for stacked layers, and when
    traced (a ``vmap`` sweep: sliced inside the program)."""
    leaves = jax.tree_util.tree_leaves(policy)
    if layer_form(params) == "stacked" or not leaves or isinstance(leaves[0],
                                                                   jax.core.Tracer):
        return policy
    key = (layer_form(params), jax.tree_util.tree_structure(policy))
    copy = CACHES.policy_copy
    if copy and copy[0][0] == key and all(r() is x for r, x in zip(copy[0][1], leaves)):
        return copy[0][2]       # every leaf the same object: the same policy
    d = params["embed"].shape[-1]
    out = tuple(_with_proxy_tiles(p, d) for p in unstack_policy(policy))
    if all(isinstance(x, jax.Array) for x in leaves):    # immutable: safe to key on
        copy[:] = [(key, [weakref.ref(x, _forget_policy) for x in leaves], out)]
    return out


def _forget_policy(ref):
    """A leaf of the cached policy is gone: drop its per-layer copy."""
    if CACHES.policy_copy and any(r is ref for r in CACHES.policy_copy[0][1]):
        CACHES.policy_copy.clear()


def _with_proxy_tiles(layer, d: int):
    """On a GPU, a 4-bit proxy also as the Mosaic GPU scores kernel reads it
    ("proxy_tiles": ``proxy_scores.mosaic_gpu.prepare``, made once here, not per step):
    half the scores time of the Triton kernel on the packed codes (KERNEL_NOTES.md)."""
    pr = layer.get("proxy")
    if pr is None or "proxy_tiles" in layer or jax.default_backend() != "gpu" \
            or multi_device_mesh():                  # a shard's FFN reads its own rows
        return layer
    from countdown_jax.kernels.proxy_scores import mosaic_gpu    # GPU only: import here

    if not mosaic_gpu.supports(pr, d):
        return layer
    return {**layer, "proxy_tiles": mosaic_gpu.prepare(pr, d)}


def _forget(ref):
    """The source params are gone: drop their copy."""
    if CACHES.layer_copy and CACHES.layer_copy[0][1] is ref:
        CACHES.layer_copy.clear()


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "max_new_tokens", "sampling",
                                             "stop_tokens", "cache_dtype", "path"))
def _generate(params, cfg, prompt, lengths, key, policy=None, *, max_new_tokens: int,
              spec: SparseSpec = DENSE, sampling: Sampling = GREEDY,
              stop_tokens: tuple[int, ...] = (), cache_dtype=None, path: DecodePath = PORTABLE):
    state = start(params, prompt, lengths, key, policy, cfg=cfg,
                  max_new_tokens=max_new_tokens, spec=spec, sampling=sampling,
                  stop_tokens=stop_tokens, cache_dtype=cache_dtype)
    state = decode(params, state, policy, cfg=cfg, spec=spec, sampling=sampling,
                   stop_tokens=stop_tokens, path=path)
    return finish(state)


def generate(params, cfg, prompt, lengths, key, policy=None, *, max_new_tokens: int,
             spec: SparseSpec = DENSE, sampling: Sampling = GREEDY,
             stop_tokens: tuple[int, ...] = (), cache_dtype=None,
             path: DecodePath = DecodePath()) -> Generation:
    """prompt [B, T] int32 right-padded, lengths [B] int32 (>= 1). One compiled program
    (``start`` then ``decode``); ``jax.vmap`` over a stacked policy sweeps settings.

    path: how decode runs; each "auto" field is resolved for the backend and the batch
    (``fast_path.resolve``; on CPU the portable path), an explicit one is used as given.
    Unstacked layers take the policy per layer too (``decode_policy``)."""
    path = fast_path.resolve(path, spec, prompt.shape[0], held_layers=layer_form(params))
    params = decode_params(params, path.layers)
    return _generate(params, cfg, prompt, lengths, key, decode_policy(params, policy),
                     max_new_tokens=max_new_tokens, spec=spec, sampling=sampling,
                     stop_tokens=stop_tokens, cache_dtype=cache_dtype, path=path)
