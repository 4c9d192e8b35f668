"""Gated-MLP maths shared by the FFN and the selection rules.

    g = W_gate x,  u = W_up x,  s = act(g) * u,  y = sum_i s_i W_down[i]

Weights are row-per-neuron [m, d] (see layout.py). This module is the leaf the FFN
(ffn.py), the rules (selection.py) and every kernel build on: the activation, the one
projection and the one precision setting live here and nowhere else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["ACTIVATIONS", "HIGHEST", "activation", "coefficients", "down_sum",
           "layer_weights", "project"]

ACTIVATIONS = ("silu", "gelu_tanh")

# float32 GEMMs at full precision: on GPU the default lets XLA use TF32 (~1e-3 relative),
# which would move selection cuts and break the float32 reference. No effect on bf16.
HIGHEST = jax.lax.Precision.HIGHEST


def activation(name: str):
    if name == "silu":
        return jax.nn.silu
    if name == "gelu_tanh":
        return lambda g: jax.nn.gelu(g, approximate=True)
    raise ValueError(f"unsupported MLP activation {name!r}; expected one of {ACTIVATIONS}")


def layer_weights(mlp, layer=None):
    """This layer's {"gate", "up", "down"} as [m, d] matrices: ``mlp`` itself, or layer
    ``layer`` (a traced index) of the stacked [L, m, d] weights.

    The model hands the FFN the whole stack and the index: gather kernels then read the
    kept rows in place, whereas slicing a layer out for a custom call copies every row
    (the dense read the sparse path exists to avoid). Whole-matrix paths slice here.
    """
    if layer is None:
        return mlp
    return {k: jax.lax.dynamic_index_in_dim(mlp[k], layer, 0, keepdims=False)
            for k in ("gate", "up", "down")}


def project(x, w, *, float32: bool = False):
    """x [..., k] times row-per-neuron w [m, k] -> [..., m] (one GEMV per token).

    float32=False: in the promoted dtype of x and w (the model's path).
    float32=True: float32 accumulation and result without a float32 copy of w (the
    kernels' references). Mixed dtypes (float32 h against bf16 U) are then written as
    multiply + reduce, so XLA fuses the upcast into one pass over w.
    """
    if not float32:
        return jnp.einsum("...k,mk->...m", x, w, precision=HIGHEST)
    if x.dtype != w.dtype:
        return jnp.sum(x.astype(jnp.float32)[..., None, :] * w.astype(jnp.float32), axis=-1)
    return jnp.einsum("...k,mk->...m", x, w, preferred_element_type=jnp.float32,
                      precision=HIGHEST)


def down_sum(s, w_down):
    """y = sum_i s_i W_down[i]: s [..., m] times row-per-neuron w_down [m, d] -> [..., d]."""
    return jnp.einsum("...m,md->...d", s, w_down, precision=HIGHEST)


def coefficients(mlp, x, act: str):
    """Dense (g, u, s) for every neuron, in x's dtype."""
    g = project(x, mlp["gate"])
    u = project(x, mlp["up"])
    return g, u, activation(act)(g) * u
