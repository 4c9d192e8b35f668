"""Sparsity policy: a static spec (hashable, picks the code path) plus per-layer data.

The static part decides *which* computation is traced; the dynamic part (sparsity r,
thresholds tau, predictor offset theta, predictor weights) is a pytree of arrays with a
leading layer axis, so one compile serves every value and ``jax.vmap`` sweeps them.

    policy = {
      "sparsity":  float32 [L]   r in [0, 1): ideal / topk modes drop k = int(m r) neurons
      "threshold": float32 [L]   tau: threshold mode keeps q > tau
      "theta":     float32 [L]   predictor mode keeps z > theta (0 by default)
                                 cascade mode: z > theta picks candidates, then |s| > tau
      "predictor": {"Vt": [L, rank, d], "U": [L, m, rank]}   z = (x Vt^T) U^T
      "proxy":     {"packed": uint8 [L, 2, m, d bits/8], "scale": [L, 2, m, d/group]}
                                 proxy mode keeps |s_hat| > tau (``proxy.py``)
      "floor":     float32 [L]   optional (threshold, proxy): each token keeps at least
      "ceiling":   float32 [L]   / at most this share of m (its highest-ranked); a
                                 measurement rule, masked implementation only
    }

The predictor is given as {"V": [L, d, rank], "U": [L, m, rank]} (z = (x V) U^T, the
paper's form, what training saves) and stored with V transposed, so both of its GEMVs read
one contiguous row per output like every weight here (a column reduction is several
times slower on GPU: experiments/results/bench_projections.csv).

Only the keys a spec needs must be present (``make_policy`` builds and checks them).
Inside the scan over layers the FFN sees one layer's slice (leading axis dropped); a sweep
stacks policies on a new leading axis (``stack_policies``) and vmaps over it.
"""

from __future__ import annotations

import dataclasses
import enum

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax.decode_path import BATCH_KERNELS, IMPLEMENTATIONS, DecodePath
from countdown_jax.proxy import check_proxy

__all__ = ["BATCH_KERNELS", "BUDGET_MODES", "Budget", "CLAMP_KEYS", "CLAMP_MODES", "DENSE",
           "IMPLEMENTATIONS", "METHODS", "METHOD_MODES", "MODES", "MODE_KEYS", "Method",
           "SCALAR_KEYS", "SKIPS_WORK", "SparseSpec", "check_layer", "check_layer_axis",
           "check_policy", "make_policy", "stack_policies", "unstack_policy"]


class Method(str, enum.Enum):
    """The selection rules: the one vocabulary of the CLI, policies, kernels and results."""

    DENSE = "dense"
    CATS = "cats"                    # |act(g)|
    M_COUNTDOWN = "m_countdown"      # |u|
    D_COUNTDOWN = "d_countdown"      # |s|
    DEJAVU = "dejavu"                # signed g (predicted)
    S_COUNTDOWN = "s_countdown"      # s^2 |W_down[:, i]|^2 / 2 (oracle only)

    def __str__(self):
        return self.value


METHODS = tuple(m.value for m in Method)
MODES = ("ideal", "topk", "threshold", "predictor", "cascade", "proxy")

# Which modes each method supports. CATS and M rank a quantity the FFN computes densely
# anyway, so a predictor would add work, not save it; S-COUNTDOWN needs the dense s and
# W_down norms, so only the oracle modes make sense for it.
METHOD_MODES = {
    "dense": MODES,
    "cats": ("ideal", "topk", "threshold"),
    "m_countdown": ("ideal", "topk", "threshold"),
    "d_countdown": MODES,
    "dejavu": ("ideal", "topk", "threshold", "predictor"),
    "s_countdown": ("ideal", "topk"),
}

# The policy entries each mode reads.
MODE_KEYS = {
    "ideal": ("sparsity",),
    "topk": ("sparsity",),
    "threshold": ("threshold",),
    "predictor": ("theta", "predictor"),
    "cascade": ("theta", "predictor", "threshold"),
    "proxy": ("threshold", "proxy"),
}
# Per-token bounds on the kept count a threshold rule may carry (``selection.clamp_kept``).
CLAMP_KEYS = ("floor", "ceiling")
CLAMP_MODES = ("threshold", "proxy")
SCALAR_KEYS = ("sparsity", "threshold", "theta") + CLAMP_KEYS

# (method, mode) whose Pallas path reads only the kept rows (no dense s needed to select);
# the oracle modes of d_countdown / dejavu / s_countdown need the dense s.
SKIPS_WORK = frozenset({("m_countdown", "threshold"), ("cats", "threshold"),
                        ("d_countdown", "predictor"), ("d_countdown", "cascade"),
                        ("d_countdown", "proxy"), ("dejavu", "predictor")})


@dataclasses.dataclass(frozen=True)
class SparseSpec:
    """Static choice of FFN selection rule.

    method: which quantity is ranked (see ``selection.py``).
    mode: ideal (per-token oracle k-th value), topk (exactly m-k kept), threshold
        (per-layer tau), predictor (low-rank logits > theta), cascade (d_countdown only:
        the predictor's z > theta picks candidates, their exact s is computed, and
        |s| > tau keeps the final set; see selection.py), proxy (d_countdown only:
        |s_hat| > tau, s_hat from a low-bit copy of W_gate and W_up, ``proxy.py``).
    implementation: masked = float reference (dense cost, exact maths, used for quality
        sweeps); xla = XLA gather of a capacity-padded index list (skips the work);
        pallas = the Pallas kernels. Decode takes it from its ``DecodePath`` (``with_path``).
    capacity: static upper bound on kept neurons per token (None = m). When more pass,
        the ``capacity`` highest-ranked are kept (every implementation applies the same
        cut, so masked stays the reference of gather).
    sparse_prefill: also sparsify prompt tokens (off by default, as in the paper).
    shard_capacity: under tensor parallelism (``sharding``), cap each device's kept
        neurons per token at this many instead of applying ``capacity`` across devices:
        no extra communication, but a device holding more than this many of a token's
        winners keeps only its highest-ranked (counted in ``dropped``). None = exact
        (masks equal one device's). Ignored without a "model" mesh axis.
    batch_kernel: how implementation="pallas" runs a decode batch (2 to 16 tokens, no
        capacity; M / CATS thresholds, D's predictor): "lists" (per-token index lists,
        ``kernels.sparse_ffn``) or "union" / "compact" (the rows any token keeps read
        once, ``batch_union``, as a row predicate / an index list), all the rule's exact
        masks; or "dense": the decode call (1 to 16 tokens) runs the dense FFN (every
        neuron kept, reported as kept 1.0). Decode takes it from its ``DecodePath``.
    target_sparsity: the r the rule was set for (its thresholds / predictor were fit at
        r; ``api.sparsity_setup`` fills it). A static hint read only by ``fast_path`` to
        pick a decode batch's kernel; it changes no mask. None = unknown.
    """

    method: str = "dense"
    mode: str = "ideal"
    implementation: str = "masked"
    capacity: int | None = None
    sparse_prefill: bool = False
    shard_capacity: int | None = None
    batch_kernel: str = "lists"
    target_sparsity: float | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown sparsity method {self.method!r}; expected one of {METHODS}")
        object.__setattr__(self, "method", Method(self.method).value)   # a plain str
        if self.mode not in MODES:
            raise ValueError(f"unknown sparsity mode {self.mode!r}; expected one of {MODES}")
        if self.implementation not in IMPLEMENTATIONS:
            hint = {"auto": " (decode takes it from a DecodePath: DecodePath(ffn='auto'))"
                    }.get(self.implementation, "")
            raise ValueError(f"unknown implementation {self.implementation!r}; expected one "
                             f"of {IMPLEMENTATIONS}{hint}")
        if self.mode not in METHOD_MODES[self.method]:
            raise ValueError(
                f"sparsity method {self.method!r} does not support mode {self.mode!r}; "
                f"it supports {METHOD_MODES[self.method]}")
        if self.capacity is not None and (
                isinstance(self.capacity, bool) or not isinstance(self.capacity, (int, np.integer))
                or self.capacity < 1):
            raise ValueError(f"capacity must be a positive int or None, got {self.capacity!r}")
        if self.shard_capacity is not None and (
                isinstance(self.shard_capacity, bool)
                or not isinstance(self.shard_capacity, (int, np.integer))
                or self.shard_capacity < 1):
            raise ValueError(f"shard_capacity must be a positive int or None, got "
                             f"{self.shard_capacity!r}")

        if self.batch_kernel not in BATCH_KERNELS:
            raise ValueError(f"batch_kernel must be one of {BATCH_KERNELS}, got "
                             f"{self.batch_kernel!r}")
        if self.target_sparsity is not None and not 0.0 <= self.target_sparsity < 1.0:
            raise ValueError(f"target_sparsity must be in [0, 1) or None, got "
                             f"{self.target_sparsity!r}")

    @property
    def is_dense(self) -> bool:
        return self.method == "dense"

    @property
    def policy_keys(self) -> tuple[str, ...]:
        return () if self.is_dense else MODE_KEYS[self.mode]

    def with_path(self, path: DecodePath) -> "SparseSpec":
        """This rule as a resolved decode path's FFN runs it."""
        if self.is_dense:
            return self
        return dataclasses.replace(self, implementation=path.ffn,
                                   batch_kernel=path.batch_kernel)


DENSE = SparseSpec()


# The modes a per-layer allocation is made for (``budget.py``): r or tau per layer.
BUDGET_MODES = ("ideal", "topk", "threshold", "proxy")


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much a rule reads, given as a bytes budget instead of a uniform sparsity: the
    per-layer allocation calibrated for FFN weight bytes = ``share`` of the dense FFN's
    (``cost.bytes_share`` of the rule, mean over layers; `calibrate --budget`, ``budget.py``).
    Saved allocations exist on a 0.01 grid of shares."""

    share: float

    def __post_init__(self):
        if isinstance(self.share, bool) or not isinstance(self.share, (int, float, np.floating)) \
                or not 0.0 < self.share <= 1.0:
            raise ValueError(f"a bytes budget must be a share of the dense FFN's bytes in "
                             f"(0, 1], got {self.share!r}")
        if abs(round(self.share, 2) - self.share) > 1e-9:
            raise ValueError(f"budget {self.share} is not on the 0.01 grid that allocations "
                             f"are saved on; use e.g. {round(self.share, 2)}")
        object.__setattr__(self, "share", float(self.share))

    def __str__(self):
        return f"bytes {self.share:.2f}"


def _per_layer(name, value, num_layers):
    a = np.asarray(value, dtype=np.float64)
    if a.ndim == 0:
        a = np.full((num_layers,), a)
    if a.shape != (num_layers,):
        raise ValueError(f"policy {name!r} must be a scalar or have shape [L]=[{num_layers}], "
                         f"got shape {list(np.shape(value))}")
    if np.isnan(a).any():
        raise ValueError(f"policy {name!r} contains NaN")
    return a


def make_policy(num_layers: int, *, sparsity=None, threshold=None, theta=None,
                predictor=None, proxy=None, floor=None, ceiling=None) -> dict:
    """Build a validated policy pytree (float32 arrays with leading axis L).

    Scalars broadcast to every layer. ``sparsity`` must lie in [0, 1); ``floor`` /
    ``ceiling`` (kept shares in [0, 1], floor <= ceiling) bound a threshold rule's kept
    count per token (``selection.clamp_kept``); ``predictor`` is
    {"V": [L, d, rank], "U": [L, m, rank]} (its floating dtype is kept; stored as
    {"Vt": [L, rank, d], "U"}, see the module docstring; a policy's own {"Vt", "U"} is
    accepted as is). ``theta`` defaults to 0 when a predictor is given. ``proxy`` is
    ``proxy.quantize_mlp``'s {"packed": uint8 [L, 2, m, ...], "scale": [L, 2, m, ...]}.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)) \
            or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    policy = {}
    if sparsity is not None:
        r = _per_layer("sparsity", sparsity, num_layers)
        bad = ~((r >= 0.0) & (r < 1.0))
        if bad.any():
            raise ValueError(f"sparsity must lie in [0, 1), got {r[bad].tolist()} "
                             f"at layers {np.flatnonzero(bad).tolist()}")
        policy["sparsity"] = jnp.asarray(r, jnp.float32)
    if threshold is not None:
        policy["threshold"] = jnp.asarray(_per_layer("threshold", threshold, num_layers),
                                          jnp.float32)
    if predictor is not None:
        policy["predictor"] = _check_predictor(predictor, num_layers)
        if theta is None:
            theta = 0.0
    if theta is not None:
        policy["theta"] = jnp.asarray(_per_layer("theta", theta, num_layers), jnp.float32)
    if proxy is not None:
        if not isinstance(proxy, dict) or set(proxy) != {"packed", "scale"}:
            got = sorted(proxy) if isinstance(proxy, dict) else type(proxy).__name__
            raise ValueError(f"proxy must be a dict with keys 'packed' and 'scale' "
                             f"(proxy.quantize_mlp), got {got}")
        policy["proxy"] = {k: jnp.asarray(v) for k, v in proxy.items()}
        _check_proxy_dims(policy["proxy"], None, None, lead=1)
    bounds = {k: _per_layer(k, v, num_layers) for k, v in (("floor", floor),
                                                           ("ceiling", ceiling)) if v is not None}
    for key, a in bounds.items():
        if not ((a >= 0.0) & (a <= 1.0)).all():
            raise ValueError(f"{key} must be a kept share in [0, 1], got {a.tolist()}")
        policy[key] = jnp.asarray(a, jnp.float32)
    if len(bounds) == 2 and (bounds["floor"] > bounds["ceiling"]).any():
        raise ValueError(f"floor {bounds['floor'].tolist()} exceeds ceiling "
                         f"{bounds['ceiling'].tolist()}")
    return policy


def _check_predictor(predictor, num_layers):
    """{"V": [L, d, rank], "U": [L, m, rank]} (or a policy's {"Vt": [L, rank, d], "U"})
    -> the stored form {"Vt": [L, rank, d], "U": [L, m, rank]}."""
    keys = set(predictor) if isinstance(predictor, dict) else None
    if keys not in ({"V", "U"}, {"Vt", "U"}):
        got = sorted(predictor) if isinstance(predictor, dict) else type(predictor).__name__
        raise ValueError(f"predictor must be a dict with keys 'V' [L, d, rank] and "
                         f"'U' [L, m, rank], got {got}")
    vkey = "V" if "V" in keys else "Vt"
    dims = {"V": "d, rank", "Vt": "rank, d", "U": "m, rank"}
    out = {}
    for key in (vkey, "U"):
        a = jnp.asarray(predictor[key])
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"predictor {key!r} must be floating point, got {a.dtype}")
        if a.ndim != 3 or a.shape[0] != num_layers:
            raise ValueError(f"predictor {key!r} must have shape [L={num_layers}, "
                             f"{dims[key]}], got {list(a.shape)}")
        out[key] = a
    vt = out[vkey] if vkey == "Vt" else jnp.swapaxes(out[vkey], 1, 2)
    if vt.shape[1] != out["U"].shape[2]:
        raise ValueError(f"predictor ranks differ: {vkey} {list(out[vkey].shape)} vs "
                         f"U {list(out['U'].shape)}")
    return {"Vt": vt, "U": out["U"]}


def unstack_policy(policy):
    """A whole-model policy (leaves [L, ...]) as a tuple of L per-layer policies, one
    buffer per leaf (a copy), for unstacked layers (``model.unstack_layers``); None and a
    tuple pass through. Why: on GPU, XLA copies a layer's slice out of a stacked operand
    of a GEMM every step (the predictor of a decode batch; KERNEL_NOTES.md). ``model``
    takes either form."""
    if policy is None or isinstance(policy, tuple):
        return policy
    n = np.shape(jax.tree_util.tree_leaves(policy)[0])[0]
    return tuple(jax.tree.map(lambda a, l=l: a[l], policy) for l in range(n))


def check_layer_axis(policy, num_layers: int):
    """Every leaf of a whole-model policy has the leading layer axis L (what the model's
    scan / loop over layers slices; the FFN checks the slice's contents), or the policy is
    a tuple of L per-layer policies (``unstack_policy``)."""
    if isinstance(policy, tuple):
        if len(policy) != num_layers:
            raise ValueError(f"a per-layer policy tuple needs {num_layers} entries, got "
                             f"{len(policy)}")
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(policy):
        shape = tuple(np.shape(leaf))
        if not shape or shape[0] != num_layers:
            name = jax.tree_util.keystr(path)
            if name.strip("[]'") in SCALAR_KEYS:
                raise ValueError(f"policy {name.strip('[]')} must have shape [L]=[{num_layers}] "
                                 f"(a leading layer axis), got {list(shape)}")
            raise ValueError(f"policy leaves need a leading layer axis of {num_layers}; "
                             f"{name} has shape {shape}")


def check_policy(spec: SparseSpec, policy, *, num_layers: int, d: int | None = None,
                 m: int | None = None):
    """Check a whole-model policy: the leading layer axis L on every leaf
    (``check_layer_axis``), and that it carries what ``spec`` reads (shapes against d, m
    when given)."""
    check_layer_axis(policy, num_layers)
    if spec.is_dense:
        return
    _require_keys(spec, policy)
    for key in spec.policy_keys + _clamps(spec, policy):
        if key in SCALAR_KEYS and tuple(np.shape(policy[key])) != (num_layers,):
            raise ValueError(f"policy {key!r} must have shape [L]=[{num_layers}], "
                             f"got {list(np.shape(policy[key]))}")
    if "predictor" in spec.policy_keys:
        _check_predictor(policy["predictor"], num_layers)
        _check_predictor_dims(policy["predictor"], d, m, lead=1)
    if "proxy" in spec.policy_keys:
        _check_proxy_dims(policy["proxy"], d, m, lead=1)


def check_layer(spec: SparseSpec, layer, *, d: int, m: int):
    """Check one layer's slice (what the FFN sees inside the scan): scalars, shapes vs d, m.

    Runs at trace time on static shapes; values are checked only when concrete (under jit
    they are traced, so ranges are enforced where the policy is built: ``make_policy``).
    """
    _require_keys(spec, layer)
    for key in spec.policy_keys + _clamps(spec, layer):
        if key not in SCALAR_KEYS:
            continue
        shape = tuple(np.shape(layer[key]))
        if shape != ():
            raise ValueError(
                f"policy {key!r} for one layer must be a scalar, got shape {list(shape)}; "
                f"pass this layer's slice of the [L] policy (the scan over layers does this)")
    if "sparsity" in spec.policy_keys and not isinstance(layer["sparsity"], jax.core.Tracer):
        r = float(np.asarray(layer["sparsity"]))
        if not 0.0 <= r < 1.0:
            raise ValueError(f"sparsity must lie in [0, 1), got {r}")
    if "predictor" in spec.policy_keys:
        _check_predictor_dims(layer["predictor"], d, m, lead=0)
    if "proxy" in spec.policy_keys:
        _check_proxy_dims(layer["proxy"], d, m, lead=0)


def _clamps(spec, policy) -> tuple[str, ...]:
    """The per-token bounds ``policy`` carries; only threshold rules take them."""
    keys = tuple(k for k in CLAMP_KEYS if k in policy)
    if keys and spec.mode not in CLAMP_MODES:
        raise ValueError(f"a per-token {' / '.join(keys)} bounds a threshold rule "
                         f"(modes {CLAMP_MODES}); {spec.method}/{spec.mode} has none")
    return keys


def _require_keys(spec, policy):
    if policy is None:
        raise ValueError(f"sparsity spec {spec.method}/{spec.mode} needs a policy with "
                         f"{list(spec.policy_keys)}, got None (see make_policy)")
    missing = [k for k in spec.policy_keys if k not in policy]
    if missing:
        what = ("a trained predictor (D-/Deja Vu-practical mode)" if "predictor" in missing
                else "a proxy (proxy.quantize_mlp of the model's MLP)" if "proxy" in missing
                else f"{missing}")
        raise ValueError(f"sparsity spec {spec.method}/{spec.mode} needs {what} in the "
                         f"policy; it has {sorted(policy)}")


def _check_predictor_dims(pred, d, m, lead):
    """A policy's (lead=1) or one layer's (lead=0) stored predictor {"Vt", "U"}."""
    if not isinstance(pred, dict) or set(pred) != {"Vt", "U"}:
        got = sorted(pred) if isinstance(pred, dict) else type(pred).__name__
        raise ValueError(f"a policy's predictor must be a dict with keys 'Vt' and 'U' (as "
                         f"make_policy stores {{'V', 'U'}}), got {got}")
    v, u = np.shape(pred["Vt"]), np.shape(pred["U"])
    if len(v) != lead + 2 or len(u) != lead + 2 or v[-2] != u[-1]:
        pre = "[L, " if lead else "["
        raise ValueError(f"predictor shapes Vt {list(v)}, U {list(u)} do not match "
                         f"{pre}rank, d] and {pre}m, rank]")
    if d is not None and v[-1] != d:
        raise ValueError(f"predictor Vt {list(v)} expects model width d={v[-1]}, MLP input has d={d}")
    if m is not None and u[-2] != m:
        raise ValueError(f"predictor U {list(u)} expects m={u[-2]} neurons, the MLP has m={m}")


def _check_proxy_dims(proxy, d, m, lead):
    """A policy's (lead=1) or one layer's (lead=0) proxy: keys, dtypes, [(L,) 2, m, ...];
    the packed width against d when d is known (``proxy.check_proxy``)."""
    if not isinstance(proxy, dict) or set(proxy) != {"packed", "scale"}:
        got = sorted(proxy) if isinstance(proxy, dict) else type(proxy).__name__
        raise ValueError(f"a policy's proxy must be a dict with keys 'packed' and 'scale', "
                         f"got {got}")
    shape = np.shape(proxy["packed"])
    if len(shape) != lead + 3 or shape[lead] != 2 or len(np.shape(proxy["scale"])) != lead + 3:
        pre = "[L, " if lead else "["
        raise ValueError(f"proxy 'packed' and 'scale' must have shape {pre}2, m, ...] (gate "
                         f"and up rows), got {list(shape)} and "
                         f"{list(np.shape(proxy['scale']))}")
    check_proxy(proxy, m=shape[-2] if m is None else m, d=d, leading=tuple(shape[:lead]))


def stack_policies(policies) -> dict:
    """Stack same-structure policies on a new leading axis, for ``jax.vmap`` sweeps."""
    policies = list(policies)
    if not policies:
        raise ValueError("stack_policies needs at least one policy")
    return jax.tree.map(lambda *a: jnp.stack(a), *policies)
