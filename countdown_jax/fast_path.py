"""The fastest correct decode path for the running backend: the one place "auto" is resolved.

Three choices make decode fast on a GPU (experiments/results/bench_decode.md):

    layers          "unstacked" (``model.unstack_layers``: one buffer per layer weight; a
                    stacked layer costs the GPU a copy of its q/o weights every step)
    implementation  "pallas" for a rule whose kernels skip work (the fused kernel at one
                    token, the index lists for a batch where they were measured faster:
                    by batch and the rule's target sparsity, ``PALLAS_WHERE``), "masked"
                    otherwise
    attention       "pallas" (the decode-attention kernel, one token per row)
    projections     "xla": the Pallas GEMV of the q/k/v/o projections
                    (``decode_projections``) stays opt-in, measured slower end to end
                    (H200, Llama-3.1-8B, batch 1: dense 0.65x, bench_decode.md S8-A)

Every one is exact: the kept sets equal the masked reference's (no capacity is added).
On CPU (and TPU, whose kernels are not tuned here) and under a multi-device mesh (XLA
cannot partition the kernels) every choice resolves to the portable path: stacked,
masked, xla. An explicit value is never changed; "auto" (the default of ``generate``,
``generate_text`` and the CLI) asks for this resolution.
"""

from __future__ import annotations

import dataclasses

import jax

from countdown_jax.ffn import _FUSED_RULES
from countdown_jax.policy import ACCEPTED_IMPLEMENTATIONS, AUTO, SparseSpec
from countdown_jax.sharding import multi_device_mesh

__all__ = ["ATTENTIONS", "AUTO", "LAYER_FORMS", "PALLAS_WHERE", "PALLAS_WHERE_CAPPED",
           "PROJECTIONS", "SKIPS_WORK", "backend", "pallas_wins", "resolve_attention",
           "resolve_implementation", "resolve_layers", "resolve_projections",
           "resolve_spec"]

ATTENTIONS = ("xla", "pallas")
PROJECTIONS = ("xla", "pallas")
# fused_qkv: unstacked, q/k/v projections as one weight (``model.fuse_qkv``); transposed:
# unstacked, q/k/v/o one row per output (``model.transpose_projections``). Variants for
# the GPU comparison, not yet what "auto" picks.
LAYER_FORMS = ("stacked", "unstacked", "fused_qkv", "transposed")

# (method, mode) whose "pallas" path reads only the kept rows (no dense s needed to
# select): the fused kernel's rules plus Deja Vu's predictor (index list). The oracle modes
# of d_countdown / dejavu / s_countdown need the dense s to select, so masked is faster.
SKIPS_WORK = frozenset(_FUSED_RULES) | {("dejavu", "predictor")}

# Where "auto" runs the Pallas path rather than masked (the same kept set at dense cost),
# by tokens per call and the rule's target sparsity: (max tokens, min target r) pairs, the
# Pallas path wins when some pair admits the call. One token: the fused kernel, at any r.
# Batches: exact per-token index lists, measured against masked on an H200 (Llama-3.1-8B
# bf16, decode x dense of the same run, lists / masked; bench_decode.md S9-A):
#   M  batch 2  r 0.9 1.05 / 0.95, r 0.7 0.87 / 0.95    batch 4  r 0.9 0.96 / 0.94,
#      r 0.7 0.72 / 0.95    batch 8  r 0.9 0.80 / 0.95
#   D  batch 2  r 0.9 1.17 / 0.83, r 0.7 0.91 / 0.83, r 0.5 0.79 / 0.84    batch 4
#      r 0.9 0.99 / 0.84, r 0.7 0.70 / 0.84    batch 8  r 0.9 0.79 / 0.85
# (CATS reads what M reads; Deja Vu's predictor path is D's.) An r between two measured
# points takes the lower one's choice; an unknown r (``SparseSpec.target_sparsity`` None)
# admits only the pairs with min r 0. A capacity cut (its per-token top-k) moved the
# crossover down (S8-H, r = 0.9: batch 2 M 0.98x / D 0.95x, batch 4 below masked).
PALLAS_WHERE = {
    "m": ((1, 0.0), (4, 0.9)),
    "d": ((1, 0.0), (2, 0.7), (4, 0.9)),
}
PALLAS_WHERE_CAPPED = ((1, 0.0), (2, 0.9))
_RULE_TABLE = {("m_countdown", "threshold"): "m", ("cats", "threshold"): "m",
               ("d_countdown", "predictor"): "d", ("dejavu", "predictor"): "d"}


def backend() -> str:
    """The platform the choices are made for (tests fake a GPU by patching this)."""
    return jax.default_backend()


def _fast() -> bool:
    return backend() == "gpu" and not multi_device_mesh()


def _check(value: str, allowed, what: str):
    if value != AUTO and value not in allowed:
        raise ValueError(f"{what} must be {AUTO!r} or one of {tuple(allowed)}, got "
                         f"{value!r}")


def pallas_wins(spec: SparseSpec, n_tokens: int) -> bool:
    """Whether the measured table (``PALLAS_WHERE``) has the Pallas path faster than
    masked for this rule, capacity, target sparsity and tokens per call."""
    table = _RULE_TABLE.get((spec.method, spec.mode))
    if table is None:                # batches of this rule not measured: one token only
        pairs = ((1, 0.0),)
    else:
        pairs = PALLAS_WHERE[table] if spec.capacity is None else PALLAS_WHERE_CAPPED
    r = spec.target_sparsity
    return any(n_tokens <= most and (r_min == 0.0 or (r is not None and r >= r_min - 1e-9))
               for most, r_min in pairs)


def resolve_implementation(spec: SparseSpec, n_tokens: int) -> str:
    """spec.implementation, or for "auto" the fastest exact one for ``n_tokens`` tokens
    per call (decode: the batch; prefill: batch x length)."""
    impl = spec.implementation
    _check(impl, ACCEPTED_IMPLEMENTATIONS, "implementation")
    if impl != AUTO:
        return impl
    if not _fast() or spec.is_dense or (spec.method, spec.mode) not in SKIPS_WORK:
        return "masked"
    return "pallas" if pallas_wins(spec, n_tokens) else "masked"


def resolve_spec(spec: SparseSpec, n_tokens: int) -> SparseSpec:
    """The spec with "auto" replaced (the spec itself otherwise)."""
    if spec.implementation != AUTO:
        return spec
    return dataclasses.replace(spec, implementation=resolve_implementation(spec, n_tokens))


def resolve_attention(attention: str) -> str:
    _check(attention, ATTENTIONS, "attention")
    if attention != AUTO:
        return attention
    return "pallas" if _fast() else "xla"


def resolve_layers(layers: str) -> str:
    _check(layers, LAYER_FORMS, "layers")
    if layers != AUTO:
        return layers
    return "unstacked" if _fast() else "stacked"


def resolve_projections(projections: str) -> str:
    """"auto" -> "xla" everywhere: the GEMV lost end to end on an H200 (module doc)."""
    _check(projections, PROJECTIONS, "projections")
    return "xla" if projections == AUTO else projections
