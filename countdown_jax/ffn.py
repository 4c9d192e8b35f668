"""The gated MLP as a weighted sum of W_down rows: coefficients -> selection -> sum.

Interface used by the model (one layer, inside the scan over layers):

    y, kept = ffn(mlp, x, act=cfg.act, spec=spec, policy=layer_policy, sparse=sparse)

mlp: {"gate","up","down"} each [m, d] (row-per-neuron, see layout.py); x: [..., d];
policy: this layer's slice of the policy pytree (or None when dense); sparse: bool[...]
marking tokens that run sparse (None = all tokens follow ``spec``).
Returns y [..., d] in x.dtype and kept [...] float32: fraction of the m neurons used.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from countdown_jax.policy import SparseSpec, DENSE


def activation(name: str):
    if name == "silu":
        return jax.nn.silu
    if name == "gelu_tanh":
        return lambda g: jax.nn.gelu(g, approximate=True)
    raise ValueError(f"unsupported MLP activation {name!r}")


def dense_ffn(mlp, x, act: str):
    g = jnp.einsum("...d,md->...m", x, mlp["gate"])
    u = jnp.einsum("...d,md->...m", x, mlp["up"])
    s = activation(act)(g) * u
    return jnp.einsum("...m,md->...d", s, mlp["down"])


def ffn(mlp, x, *, act: str, spec: SparseSpec = DENSE, policy=None, sparse=None):
    if spec.is_dense:
        return dense_ffn(mlp, x, act), jnp.ones(x.shape[:-1], jnp.float32)
    raise NotImplementedError("sparse FFN lands with selection.py")
