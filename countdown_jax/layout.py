"""The params pytree, declared once: every leaf as logical axes (its shape, in config
dimensions) plus its random init. Shapes, random params (``random_params``), the mesh
placement (``sharding.param_specs``) and the converter's shape checks
(``conversion/names.py``) all derive from ``PARAMS`` below; the tree leaf by leaf:
docs/code.md ("The params pytree").

Leaves under ``layers`` are stacked over the layer axis L (axis 0): the decoder is one
``lax.scan`` and a per-layer policy slices the same way. The MLP's gate, up and down are
all [L, m, d], one row per neuron (down transposed), so a kept neuron is one contiguous row
of each. Norm scales are stored as the multiplier applied (Gemma's ``1 + w`` folded in).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

from countdown_jax.config import ModelConfig

__all__ = ["AXIS_SIZES", "PARAMS", "Leaf", "declared", "logical_axes", "mlp_logical_axes",
           "param_shapes", "random_params"]

# Logical axis -> its size in the config. The embedding's vocabulary axis and the head's
# are distinct axes: they are placed differently (the head splits over V, the table not).
AXIS_SIZES: dict[str, Callable[[ModelConfig], int]] = {
    "layers": lambda c: c.num_layers,
    "vocab_in": lambda c: c.vocab_size,
    "vocab_out": lambda c: c.vocab_size,
    "embed": lambda c: c.d_model,
    "q_heads": lambda c: c.num_heads,
    "kv_heads": lambda c: c.num_kv_heads,
    "head_dim": lambda c: c.head_dim,
    "mlp": lambda c: c.d_ff,
    # model.fuse_qkv's head groups (1 as declared; G = the tensor-parallel size) and the
    # q, k and v heads of one group
    "qkv_groups": lambda c: 1,
    "qkv_heads": lambda c: c.num_heads + 2 * c.num_kv_heads,
}


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One weight: logical axes (per layer for leaves under ``layers``) and init.

    init: "fan_in" = normal * prod(fan_in axes) ** -0.5 (() -> unit normal); "norm" =
        1 + 0.1 normal (a norm scale, around 1); "bias" = 0.1 normal.
    when: the config holds this leaf (None = always).
    """

    axes: tuple[str, ...]
    init: str = "fan_in"
    fan_in: tuple[str, ...] = ()
    when: Callable[[ModelConfig], bool] | None = None

    def present(self, cfg: ModelConfig) -> bool:
        return self.when is None or bool(self.when(cfg))

    def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        return tuple(AXIS_SIZES[a](cfg) for a in self.axes)


_NORM = Leaf(("embed",), "norm")
_FROM_D = ("embed",)
_DERIVED = lambda c: False    # made by a params transform (model.fuse_qkv,
                              # model.transpose_projections), never loaded

PARAMS = {
    "embed": Leaf(("vocab_in", "embed")),
    "final_norm": _NORM,
    "lm_head": Leaf(("embed", "vocab_out"), fan_in=_FROM_D,
                    when=lambda c: not c.tie_embeddings),
    "layers": {
        "attn_norm": _NORM,
        "mlp_norm": _NORM,
        "wq": Leaf(("embed", "q_heads", "head_dim"), fan_in=_FROM_D),
        "wk": Leaf(("embed", "kv_heads", "head_dim"), fan_in=_FROM_D),
        "wv": Leaf(("embed", "kv_heads", "head_dim"), fan_in=_FROM_D),
        "wo": Leaf(("q_heads", "head_dim", "embed"), fan_in=("q_heads", "head_dim")),
        "bq": Leaf(("q_heads", "head_dim"), "bias", when=lambda c: c.qkv_bias),
        "bk": Leaf(("kv_heads", "head_dim"), "bias", when=lambda c: c.qkv_bias),
        "bv": Leaf(("kv_heads", "head_dim"), "bias", when=lambda c: c.qkv_bias),
        "wqkv": Leaf(("embed", "qkv_groups", "qkv_heads", "head_dim"), fan_in=_FROM_D,
                     when=_DERIVED),
        "bqkv": Leaf(("qkv_groups", "qkv_heads", "head_dim"), "bias", when=_DERIVED),
        "wq_t": Leaf(("q_heads", "head_dim", "embed"), fan_in=_FROM_D, when=_DERIVED),
        "wk_t": Leaf(("kv_heads", "head_dim", "embed"), fan_in=_FROM_D, when=_DERIVED),
        "wv_t": Leaf(("kv_heads", "head_dim", "embed"), fan_in=_FROM_D, when=_DERIVED),
        "wo_t": Leaf(("embed", "q_heads", "head_dim"), fan_in=("q_heads", "head_dim"),
                     when=_DERIVED),
        "q_norm": Leaf(("head_dim",), "norm", when=lambda c: c.qk_norm),
        "k_norm": Leaf(("head_dim",), "norm", when=lambda c: c.qk_norm),
        "post_attn_norm": Leaf(("embed",), "norm", when=lambda c: c.sandwich_norm),
        "post_mlp_norm": Leaf(("embed",), "norm", when=lambda c: c.sandwich_norm),
        "mlp": {
            "gate": Leaf(("mlp", "embed"), fan_in=_FROM_D),
            "up": Leaf(("mlp", "embed"), fan_in=_FROM_D),
            "down": Leaf(("mlp", "embed"), fan_in=("mlp",)),
        },
    },
}


def _is_leaf(x) -> bool:
    return isinstance(x, Leaf)


def _stacked(leaf: Leaf) -> Leaf:
    return dataclasses.replace(leaf, axes=("layers",) + leaf.axes)


def declared(cfg: ModelConfig | None = None) -> dict:
    """``PARAMS`` with the layer axis on every leaf under ``layers``; with ``cfg``, only
    the leaves that config holds."""
    out = {k: v for k, v in PARAMS.items() if k != "layers"}
    out["layers"] = jax.tree.map(_stacked, PARAMS["layers"], is_leaf=_is_leaf)
    if cfg is None:
        return out

    def keep(tree):
        return {k: keep(v) if isinstance(v, dict) else v for k, v in tree.items()
                if isinstance(v, dict) or v.present(cfg)}

    return keep(out)


def param_shapes(cfg: ModelConfig) -> dict:
    """The params pytree of ``cfg`` as shape tuples (layers stacked)."""
    return jax.tree.map(lambda leaf: leaf.shape(cfg), declared(cfg), is_leaf=_is_leaf)


def logical_axes(cfg: ModelConfig | None = None) -> dict:
    """The params pytree as logical-axis tuples (layers stacked); every declared leaf
    without ``cfg``, that config's leaves with it."""
    return jax.tree.map(lambda leaf: leaf.axes, declared(cfg), is_leaf=_is_leaf)


def mlp_logical_axes(stacked: bool = False) -> dict:
    """Logical axes of the MLP leaves {"gate", "up", "down"}: ("mlp", "embed") each (row
    per neuron), with "layers" in front when ``stacked`` (the params' [L, m, d])."""
    return {k: (("layers",) if stacked else ()) + leaf.axes
            for k, leaf in PARAMS["layers"]["mlp"].items()}


def _init(leaf: Leaf, cfg: ModelConfig, key, dtype):
    shape = leaf.shape(cfg)
    z = jax.random.normal(key, shape, jnp.float32)
    if leaf.init == "norm":
        return (1.0 + 0.1 * z).astype(dtype)
    if leaf.init == "bias":
        return (0.1 * z).astype(dtype)
    if leaf.init != "fan_in":
        raise ValueError(f"unknown init {leaf.init!r} (expected fan_in, norm or bias)")
    scale = math.prod(AXIS_SIZES[a](cfg) for a in leaf.fan_in) ** -0.5
    return (scale * z).astype(dtype)


def random_params(cfg: ModelConfig, key, dtype=jnp.float32, shardings=None) -> dict:
    """Random params of ``cfg`` from the declaration (one key per leaf, in pytree order).

    shardings: optional pytree of shardings matching the params (``sharding.random_params``
    passes the mesh's): every leaf is then created already in place (one jit with
    out_shardings), so a model larger than one device never materialises on one.
    """
    leaves, tree = jax.tree.flatten(declared(cfg), is_leaf=_is_leaf)

    def build(key):
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(tree, [_init(leaf, cfg, k, dtype)
                                         for leaf, k in zip(leaves, keys)])

    if shardings is None:
        return jax.jit(build)(key)
    return jax.jit(build, out_shardings=shardings)(key)
