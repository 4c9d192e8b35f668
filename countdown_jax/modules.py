"""Flax NNX modules over the functional code: drop the sparse MLP into your own model.

    mlp = SparseGatedMLP.from_linears(block.gate_proj, block.up_proj, block.down_proj,
                                      act="silu", spec=SparseSpec("m_countdown", "topk"),
                                      policy={"sparsity": 0.7})
    block.mlp = mlp                       # y = mlp(x): the same ``ffn.ffn`` the decoder runs

``SparseGatedMLP`` holds one layer's gate/up/down as ``nnx.Param`` in the row-per-neuron
layout of layout.py ([m, d] each, down transposed) and calls ``countdown_jax.ffn.ffn``.
The ``SparseSpec`` is static (fixed at construction: one compile per spec); the policy is
data - one layer's slice (scalars r / tau / theta, predictor {"Vt", "U"}) - either held by
the module as ``SparsePolicy`` variables (what a drop-in call ``mlp(x)`` uses; not
``nnx.Param``, so an optimizer over Params leaves it alone) or passed per call
(``mlp(x, policy)``), so ``nnx.jit`` compiles once and ``jax.vmap`` / ``nnx.vmap``
sweep policies. Realised sparsity comes from the ``kept`` the FFN returns: returned with
``return_kept=True``, and sown as ``nnx.Intermediate`` "kept" inside ``nnx.capture``.

``CountdownLM`` wraps a converted checkpoint (params pytree + ModelConfig): its Params are
the params pytree leaf for leaf (``nnx.to_pure_dict(nnx.state(lm, nnx.Param)) == params``)
and ``prefill`` / ``decode_step`` / ``forward`` / ``generate`` call model.py /
generate.py on it.

Sharding: every Param carries ``out_sharding`` metadata from ``_mesh_axes`` (the one
place the axes come from, see there); ``shard_module`` places a module on a mesh, and a
module built under ``jax.set_mesh`` of a mesh with a "model" axis is placed at once.
Run it under ``jax.set_mesh(mesh)`` and the FFN goes tensor parallel (sharding.py).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec as P

from countdown_jax import generate as generate_lib
from countdown_jax import model as model_lib
from countdown_jax import sharding
from countdown_jax.config import ModelConfig
from countdown_jax.ffn import ffn
from countdown_jax.gated import activation
from countdown_jax.layout import mlp_logical_axes
from countdown_jax.policy import DENSE, SparseSpec

__all__ = ["CountdownLM", "SparsePolicy", "SparseGatedMLP", "shard_module"]


_MLP_KEYS = tuple(mlp_logical_axes())      # ("gate", "up", "down")


class SparsePolicy(nnx.Variable):
    """One layer's sparsity policy values held by a module (data, not trained)."""


# -- sharding metadata: the one source of axes -------------------------------------------------
def _mesh_axes(cfg: ModelConfig | None = None, params=None, mesh=None):
    """Mesh axes per param, from the project's rules (``layout.PARAMS``' logical axes
    placed by ``sharding.param_specs`` / ``sharding.mesh_axes``).

    cfg None: one MLP layer's {"gate", "up", "down"} [m, d] (``layout.mlp_logical_axes``:
    m on "model", d replicated). Else the whole params pytree for ``mesh``, else for the
    mesh in context (``jax.set_mesh``), else for a nominal mesh whose "model" size divides
    every split (attention heads on "model" too).
    """
    nominal = AbstractMesh((1, 1), sharding.AXES)
    if mesh is None and _context_model_mesh():
        mesh = sharding.context_mesh()
    if cfg is None:   # the MLP's placement rule needs no sizes: m on "model"
        rules = {"mlp": sharding.MODEL}
        return {k: tuple(rules.get(a) for a in axes)
                for k, axes in mlp_logical_axes().items()}
    specs = sharding.param_specs(cfg, nominal if mesh is None else mesh, params)
    return jax.tree.map(tuple, specs, is_leaf=lambda s: isinstance(s, P))


def _context_model_mesh() -> bool:
    """A mesh with a "model" axis is in context (``sharding.context_mesh``: the
    version-tolerant getter)."""
    mesh = sharding.context_mesh()
    return not getattr(mesh, "empty", True) and sharding.MODEL in mesh.axis_names


def _param(value, axes):
    """An ``nnx.Param`` with sharding metadata, placed at once under a mesh with the
    "model" axis. (Not flax's eager sharding: it refuses annotated Variables without a
    mesh, and under ``jax.set_mesh`` it rejects single-device inputs.)"""
    value = jnp.asarray(value)
    if _context_model_mesh():
        value = jax.device_put(value, P(*axes))
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def shard_module(module, mesh):
    """Put a module's state on ``mesh`` following its ``out_sharding`` metadata."""
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, nnx.get_named_sharding(state, mesh)))
    return module


def _layer_policy(policy):
    """One layer's policy as ``ffn.ffn`` reads it: a predictor given as {"V": [d, rank],
    "U"} (the paper's form) becomes {"Vt": [rank, d], "U"} (policy.py)."""
    if not isinstance(policy, dict) or not isinstance(policy.get("predictor"), dict) \
            or "V" not in policy["predictor"]:
        return policy
    pred = policy["predictor"]
    return {**policy, "predictor": {"Vt": jnp.swapaxes(jnp.asarray(pred["V"]), -1, -2),
                                    "U": pred["U"]}}


def _values(tree):
    """Plain arrays from a (nested) container of Variables."""
    return jax.tree.map(lambda v: v[...], tree, is_leaf=lambda v: isinstance(v, nnx.Variable))


# -- one MLP layer --------------------------------------------------------------------------
class SparseGatedMLP(nnx.Module):
    """A gated MLP y = sum_i act(g_i) u_i W_down[i] with COUNTDOWN sparsity (``ffn.ffn``).

    gate, up, down: [m, d] row-per-neuron (down is the usual down-projection transposed).
    act: "silu" | "gelu_tanh". spec: static ``SparseSpec``. policy: this layer's values
    ({"sparsity": r} / {"threshold": tau} / {"theta": theta, "predictor": {"Vt"|"V", "U"}}),
    used when a call passes none; None for dense.
    """

    def __init__(self, gate, up, down, *, act: str = "silu", spec: SparseSpec = DENSE,
                 policy=None):
        shapes = {k: tuple(np.shape(w)) for k, w in zip(_MLP_KEYS, (gate, up, down))}
        if len(set(shapes.values())) != 1 or len(shapes["gate"]) != 2:
            raise ValueError(f"gate, up, down must all be [m, d] (row per neuron; down "
                             f"transposed), got {shapes}")
        if not isinstance(spec, SparseSpec):
            raise ValueError(f"spec must be a SparseSpec, got {type(spec).__name__}")
        activation(act)                                  # unknown activation: fail here
        axes = _mesh_axes()
        self.act, self.spec = act, spec
        self.gate, self.up, self.down = (_param(w, axes[k])
                                         for k, w in zip(_MLP_KEYS, (gate, up, down)))
        self.set_policy(policy)

    @property
    def weights(self) -> dict:
        """{"gate", "up", "down"} [m, d] arrays, the ``mlp`` argument of ``ffn.ffn``."""
        return {k: getattr(self, k)[...] for k in _MLP_KEYS}

    def set_policy(self, policy):
        """Hold ``policy`` (one layer's values) as ``SparsePolicy`` variables (a
        predictor {"V", "U"} is stored as {"Vt", "U"}, see ``_layer_policy``)."""
        policy = _layer_policy(policy)
        if policy is not None:
            policy = jax.tree.map(   # scalars in float32, as make_policy stores them
                lambda a: SparsePolicy(jnp.asarray(a, jnp.float32) if np.ndim(a) == 0
                                       else jnp.asarray(a)), policy)
        self.policy = nnx.data(policy)

    def __call__(self, x, policy=None, *, sparse=None, return_kept: bool = False):
        """y [..., d] for x [..., d]; with ``return_kept`` (y, kept [...]): the fraction of
        the m neurons each token used, from the mask the FFN applied.

        policy: this call's values (overrides the held policy); sparse: bool [...] tokens
        that follow the spec (others dense), None = all.
        """
        if policy is None and self.policy is not None:
            policy = _values(self.policy)
        policy = _layer_policy(policy)
        y, kept = ffn(self.weights, x, act=self.act, spec=self.spec, policy=policy,
                      sparse=sparse)
        # Sow only inside nnx.capture: flax >= 0.12 deprecates sow outside it, and the
        # mutation it makes there is refused inside a jax.vmap policy sweep.
        if not return_kept and getattr(self, "__captures__", None) is not None:
            self.sow(nnx.Intermediate, "kept", kept)
        return (y, kept) if return_kept else y

    @classmethod
    def from_linears(cls, gate: nnx.Linear, up: nnx.Linear, down: nnx.Linear, *,
                     act: str = "silu", spec: SparseSpec = DENSE, policy=None):
        """From an NNX MLP's ``nnx.Linear`` layers (kernels [in, out]: gate, up [d, m],
        down [m, d]). Biases: absent or all zero (dropped); a nonzero bias is refused,
        as the COUNTDOWN FFN has none (a gate/up bias shifts what the rules rank)."""
        for name, lin in (("gate", gate), ("up", up), ("down", down)):
            if not isinstance(lin, nnx.Linear):
                raise ValueError(f"{name} must be an nnx.Linear, got {type(lin).__name__}")
            bias = getattr(lin, "bias", None)
            if isinstance(bias, nnx.Variable) and isinstance(bias[...], jax.core.Tracer):
                raise ValueError("from_linears checks the biases' values: call it outside "
                                 "jit / grad transforms")
            if bias is not None and np.any(np.asarray(bias[...]) != 0):
                raise ValueError(f"{name} has a nonzero bias; SparseGatedMLP computes the "
                                 f"bias-free gated MLP (act(W_gate x) * W_up x) W_down, so "
                                 f"it cannot reproduce this layer")
        g, u, dn = gate.kernel[...], up.kernel[...], down.kernel[...]
        if g.shape != u.shape or dn.shape != g.shape[::-1]:
            raise ValueError(f"kernels do not form a gated MLP: gate {g.shape}, up "
                             f"{u.shape} (want [d, m]), down {dn.shape} (want [m, d])")
        return cls(g.T, u.T, dn, act=act, spec=spec, policy=policy)

    @classmethod
    def from_params(cls, params, cfg: ModelConfig, layer: int, *, spec: SparseSpec = DENSE,
                    policy=None):
        """Layer ``layer`` of a converted checkpoint (stacked or ``unstack_layers`` form);
        policy: a whole-model policy (leading axis L, as ``make_policy``), sliced here."""
        if not 0 <= layer < cfg.num_layers:
            raise ValueError(f"layer {layer} out of range for {cfg.num_layers} layers")
        layers = params["layers"]
        if isinstance(layers, (list, tuple)):
            mlp = {k: layers[layer]["mlp"][k] for k in _MLP_KEYS}
        else:
            mlp = {k: layers["mlp"][k][layer] for k in _MLP_KEYS}
        if policy is not None:
            policy = jax.tree.map(lambda a: a[layer], policy)
        return cls(mlp["gate"], mlp["up"], mlp["down"], act=cfg.act, spec=spec,
                   policy=policy)


# -- the whole decoder ---------------------------------------------------------------------
class CountdownLM(nnx.Module):
    """A converted checkpoint as an NNX module; every method runs the functional model.

    Attributes are the params' top-level keys ("embed", "final_norm", "layers",
    "lm_head"), each leaf an ``nnx.Param`` with ``out_sharding`` from
    ``sharding.param_specs`` (for ``mesh``, or a nominal mesh; see ``_mesh_axes``).
    spec: the default ``SparseSpec`` of the calls (a call may pass its own).
    """

    def __init__(self, params, cfg: ModelConfig, *, spec: SparseSpec = DENSE, mesh=None):
        if isinstance(params["layers"], (list, tuple)):
            raise ValueError("CountdownLM holds stacked layers (the stored layout); pass "
                             "stack_layers(params); unstack at call time if wanted")
        axes = _mesh_axes(cfg, params, mesh)
        self.cfg, self.spec = cfg, spec
        self._keys = tuple(params)
        for key in self._keys:
            if hasattr(type(self), key):
                raise ValueError(f"params key {key!r} clashes with a CountdownLM attribute")
            value = jax.tree.map(_param, params[key], axes[key])
            setattr(self, key, nnx.data(value) if isinstance(value, dict) else value)
        if mesh is not None:
            shard_module(self, mesh)

    def pytree(self) -> dict:
        """The params pytree (layout.py) of this module's current values."""
        return {k: _values(getattr(self, k)) for k in self._keys}

    def init_cache(self, batch: int, max_len: int, dtype=None):
        return model_lib.init_cache(self.cfg, batch, max_len,
                                    dtype or self.embed[...].dtype)

    def _spec(self, kwargs):
        kwargs.setdefault("spec", self.spec)
        return kwargs

    def prefill(self, tokens, lengths, cache, **kwargs):
        return model_lib.prefill(self.pytree(), self.cfg, tokens, lengths, cache,
                                 **self._spec(kwargs))

    def decode_step(self, token, pos, cache, **kwargs):
        return model_lib.decode_step(self.pytree(), self.cfg, token, pos, cache,
                                     **self._spec(kwargs))

    def forward(self, tokens, lengths=None, **kwargs):
        return model_lib.forward(self.pytree(), self.cfg, tokens, lengths,
                                 **self._spec(kwargs))

    def __call__(self, tokens, lengths=None, **kwargs):
        """Logits [B, T, V] (``forward`` without the kept fractions)."""
        return self.forward(tokens, lengths, **kwargs)[0]

    def generate(self, prompt, lengths, key, policy=None, **kwargs):
        return generate_lib.generate(self.pytree(), self.cfg, prompt, lengths, key, policy,
                                     **self._spec(kwargs))
