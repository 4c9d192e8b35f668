"""SPMD over a ("data", "model") device mesh: data parallel batch, tensor parallel layers.

    mesh = sharding.make_mesh(model=2, data=1)
    params = sharding.shard_params(params, cfg, mesh)        # or random_params(.., mesh=)
    policy = sharding.shard_policy(policy, mesh)
    with jax.set_mesh(mesh):
        out = generate(params, cfg, prompt, lengths, key, policy, spec=spec, ...)

This module holds the mesh, the placement specs (``mesh_axes``: the FFN's m neurons,
attention heads when Hkv divides, the head's V on "model"; the batch on "data") and the
placing; it computes nothing. What runs per device and why: docs/multi-device.md.
Meshes built here use AxisType.Auto (``jax.make_mesh`` defaults to Explicit in jax 0.10).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from countdown_jax import layout
from countdown_jax.config import ModelConfig

__all__ = ["AXES", "DATA", "MODEL", "axis_size", "batch_spec", "cache_specs",
           "check_batch", "check_tensor_parallel", "constrain_batch", "context_mesh",
           "head_axis", "make_mesh", "mesh_axes", "multi_device_mesh", "param_specs",
           "policy_specs", "random_params", "shard_batch", "shard_cache", "shard_params",
           "shard_policy", "splits_heads", "splits_neurons", "token_axis"]

DATA = "data"
MODEL = "model"
AXES = (DATA, MODEL)


# -- mesh -----------------------------------------------------------------------------------
def make_mesh(model: int = 1, data: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over the first data * model devices (Auto axis types)."""
    for name, n in (("model", model), ("data", data)):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"mesh axis {name!r} size must be a positive int, got {n!r}")
    devices = list(jax.devices() if devices is None else devices)
    need = model * data
    if need > len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs {need} devices, only "
                         f"{len(devices)} available ({devices[0].platform})")
    grid = np.array(devices[:need], dtype=object).reshape(data, model)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def context_mesh():
    """The mesh set by ``jax.set_mesh`` (abstract; empty when none). Public in
    jax.sharding on 0.10; also exported at the top level in later releases."""
    get = getattr(jax.sharding, "get_abstract_mesh", None) or jax.get_abstract_mesh
    return get()


def axis_size(mesh, name) -> int:
    return int(dict(mesh.shape).get(name, 1))


def _named(mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


# -- placements -------------------------------------------------------------------------------
def splits_heads(cfg: ModelConfig, model: int) -> bool:
    """Attention heads split over a model axis of this size (else attention replicated);
    Hq is a multiple of Hkv, so Hkv % model == 0 splits both."""
    return cfg.num_kv_heads % model == 0


def check_tensor_parallel(cfg: ModelConfig, model: int):
    if cfg.d_ff % model:
        raise ValueError(f"tensor parallelism over {model} devices splits the FFN's "
                         f"m={cfg.d_ff} neurons evenly: m must be divisible by {model}")


def mesh_axes(cfg: ModelConfig, mesh) -> dict:
    """Logical axis (``layout.AXIS_SIZES``) -> mesh axis or None: the placement rules."""
    model = axis_size(mesh, MODEL)
    # Heads split only with the kv heads: replicating K/V while splitting q heads made XLA
    # all-gather the whole cache every step (seen in the compiled HLO).
    heads = MODEL if splits_heads(cfg, model) else None
    return {"mlp": MODEL, "q_heads": heads, "kv_heads": heads, "qkv_groups": heads,
            "vocab_out": None if cfg.vocab_size % model else MODEL}


def param_specs(cfg: ModelConfig, mesh, params=None) -> dict:
    """PartitionSpecs mirroring the params pytree (``layout.PARAMS``: keys from ``params``
    when given, else the config's declared leaves); layers stacked, or a tuple of
    per-layer dicts (``model.unstack_layers``: the same specs less the layer axis)."""
    check_tensor_parallel(cfg, axis_size(mesh, MODEL))
    rules = mesh_axes(cfg, mesh)
    every = layout.logical_axes()
    if params is None:
        params = layout.logical_axes(cfg)
    layers = params.get("layers", {})
    unstacked = isinstance(layers, (list, tuple))
    names = (layers[0] if layers else {}) if unstacked else layers
    unknown = [k for k in params if k not in every]
    unknown += [f"layers.{k}" for k in names if k not in every["layers"]]
    if unknown:
        raise ValueError(f"no placement for params {unknown}; see layout.py")
    groups = np.shape(names["wqkv"])[-3] if "wqkv" in names else None
    if groups is not None and rules["qkv_groups"] and groups % axis_size(mesh, MODEL):
        raise ValueError(f"q/k/v fused in {groups} head group(s) do not split over "
                         f"model={axis_size(mesh, MODEL)} devices; fuse with "
                         f"model.fuse_qkv(params, groups={axis_size(mesh, MODEL)})")
    keys = {k: (every[k] if k != "layers" else
                {n: every["layers"][n] for n in names}) for k in params}
    specs = jax.tree.map(lambda axes: P(*(rules.get(a) for a in axes)), keys,
                         is_leaf=lambda x: isinstance(x, tuple))
    if unstacked and "layers" in specs:       # the leading "layers" axis is never split
        one = jax.tree.map(lambda s: P(*s[1:]), specs["layers"],
                           is_leaf=lambda x: isinstance(x, P))
        specs["layers"] = tuple(one for _ in layers)
    return specs


def policy_specs(policy) -> dict | None:
    """Per-layer scalars replicated; predictor U [..., m, rank] and the proxy's packed /
    scale [..., 2, m, n] split on m (the leading axes may include a sweep axis)."""
    if policy is None:
        return None

    def spec(path, leaf):
        keys = [getattr(p, "key", None) for p in path]
        if keys[-2:] == ["predictor", "U"] or (len(keys) > 1 and keys[-2] == "proxy"):
            return P(*([None] * (leaf.ndim - 2)), MODEL, None)
        return P()

    return jax.tree_util.tree_map_with_path(spec, policy)


def cache_specs(cfg: ModelConfig, mesh) -> dict:
    """KV cache [L, B, S, Hkv, hd]: batch on "data", kv heads on "model" when divisible."""
    s = P(None, DATA, None, MODEL if splits_heads(cfg, axis_size(mesh, MODEL)) else None,
          None)
    return {"k": s, "v": s}


def batch_spec(ndim: int = 1) -> P:
    """Token / length arrays: leading batch axis on "data"."""
    return P(DATA, *([None] * (ndim - 1)))


def check_batch(batch: int, mesh):
    data = axis_size(mesh, DATA)
    if batch % data:
        raise ValueError(f"batch {batch} does not split over data={data} devices; pad the "
                         f"batch to a multiple of {data}")


# -- placing arrays ---------------------------------------------------------------------------
def shard_params(params, cfg: ModelConfig, mesh):
    return jax.device_put(params, _named(mesh, param_specs(cfg, mesh, params)))


def shard_policy(policy, mesh):
    if policy is None:
        return None
    for key, leaf in (("predictor U", ("predictor", "U")), ("proxy", ("proxy", "packed"))):
        if leaf[0] in policy:
            m = np.shape(policy[leaf[0]][leaf[1]])[-2]
            model = axis_size(mesh, MODEL)
            if m % model:
                raise ValueError(f"{key} has m={m} rows, not divisible by model={model}")
    return jax.device_put(policy, _named(mesh, policy_specs(policy)))


def shard_cache(cache, cfg: ModelConfig, mesh):
    check_batch(cache["k"].shape[1], mesh)
    return jax.device_put(cache, _named(mesh, cache_specs(cfg, mesh)))


def shard_batch(arrays, mesh):
    """Put arrays with a leading batch axis (tokens, lengths, masks) on "data"."""
    def put(a):
        a = jnp.asarray(a)
        check_batch(a.shape[0], mesh)
        return jax.device_put(a, NamedSharding(mesh, batch_spec(a.ndim)))

    return jax.tree.map(put, arrays)


def random_params(cfg: ModelConfig, key, dtype=jnp.float32, mesh=None):
    """``layout.random_params`` (1/sqrt(fan-in) scale, unit norms); with ``mesh`` every
    leaf is created already sharded, so a model larger than one device's memory never
    materialises on one device."""
    shardings = None if mesh is None else _named(mesh, param_specs(cfg, mesh))
    return layout.random_params(cfg, key, dtype, shardings=shardings)


# -- the mesh in context ------------------------------------------------------------------------
def _open_axis(name: str) -> int | None:
    """Size of the context mesh's ``name`` axis when it is still to be split here (Auto or
    Explicit, size > 1), else None (no mesh, no such axis, size 1, or already inside a
    shard_map over it)."""
    mesh = context_mesh()
    if mesh is None or getattr(mesh, "empty", False) or name not in mesh.axis_names:
        return None
    size = axis_size(mesh, name)
    kind = dict(zip(mesh.axis_names, mesh.axis_types))[name]
    return None if size == 1 or kind == AxisType.Manual else size


def constrain_batch(x):
    """Split x's leading (batch) axis over "data" when the context mesh has that axis
    (size > 1) and the batch divides; else x unchanged. Called on the embeddings by the
    model, so any caller - generate, evaluation, calibration - runs data parallel under
    ``jax.set_mesh`` even when its inputs arrive replicated."""
    n = _open_axis(DATA)
    if n is None or x.ndim == 0 or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, P(DATA))


def multi_device_mesh() -> bool:
    """True when the context mesh still splits work over more than one device here (an
    axis of size > 1 not yet taken by a shard_map). Custom kernels that XLA cannot
    partition (Pallas) then run per device inside a shard_map (``ffn_parallel``,
    ``attention_parallel``); False without a mesh and inside such a shard_map."""
    return any(_open_axis(a) is not None for a in AXES)


def token_axis(n_tokens: int):
    """"data" when a leading axis of ``n_tokens`` splits over the context mesh's open
    "data" axis, else None (replicated there): the batch rule of the shard_maps."""
    n = _open_axis(DATA)
    return DATA if n is not None and n_tokens % n == 0 else None


def head_axis(num_kv_heads: int):
    """"model" when attention heads split over the context mesh's open "model" axis
    (``splits_heads``' rule, so the shard_maps read the cache as ``cache_specs`` placed
    it), else None."""
    n = _open_axis(MODEL)
    return MODEL if n is not None and num_kv_heads % n == 0 else None


def splits_neurons() -> bool:
    """True when the FFN must run tensor parallel (called by ``ffn.ffn`` at trace time)."""
    return _open_axis(MODEL) is not None
