"""The fastest correct decode path for the running backend: the one place "auto" is resolved.

Three choices make decode fast on a GPU (experiments/results/bench_decode.md):

    layers          "unstacked" (``model.unstack_layers``: one buffer per layer weight; a
                    stacked layer costs the GPU a copy of its q/o weights every step)
    implementation  "pallas" for a rule whose kernels skip work (the fused kernel at one
                    token, the index list otherwise; ``ffn``), "masked" for the others
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

__all__ = ["ATTENTIONS", "AUTO", "BATCH_MEASURED", "LAYER_FORMS", "PROJECTIONS",
           "SKIPS_WORK", "SPARSE_MAX_TOKENS", "SPARSE_MAX_TOKENS_CAPPED", "backend",
           "resolve_attention", "resolve_implementation", "resolve_layers",
           "resolve_projections", "resolve_spec"]

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

# Tokens per call up to which "auto" runs the Pallas path (the fused kernel at one token,
# index lists above) rather than masked (the same kept set at dense cost). Measured on an
# H200 (Llama-3.1-8B, bf16, r = 0.9; experiments/results/bench_decode.md, session 8):
# exact index lists at batch 4 (S8-L) run M 0.97x / D 1.01x dense against masked's 0.95x /
# 0.84x (S8-G); with a capacity cut (1.5x, S8-H) batch 2 runs 0.98x / 0.95x (masked 0.94x /
# 0.84x) but batch 4 0.91x / 0.82x (the cut's per-token top-k costs more than it saves);
# batch 8 lost to masked in every form (S8-C, S8-I). Batch 1: M 1.41x, D 1.66x (S8-J).
SPARSE_MAX_TOKENS = 4             # exact rules (no capacity)
SPARSE_MAX_TOKENS_CAPPED = 2      # a capacity cut (``SparseSpec.capacity``)
# Rules whose batches were not measured run "pallas" at one token only.
BATCH_MEASURED = frozenset({("m_countdown", "threshold"), ("cats", "threshold"),
                            ("d_countdown", "predictor"), ("dejavu", "predictor")})


def backend() -> str:
    """The platform the choices are made for (tests fake a GPU by patching this)."""
    return jax.default_backend()


def _fast() -> bool:
    return backend() == "gpu" and not multi_device_mesh()


def _check(value: str, allowed, what: str):
    if value != AUTO and value not in allowed:
        raise ValueError(f"{what} must be {AUTO!r} or one of {tuple(allowed)}, got "
                         f"{value!r}")


def resolve_implementation(spec: SparseSpec, n_tokens: int) -> str:
    """spec.implementation, or for "auto" the fastest exact one for ``n_tokens`` tokens
    per call (decode: the batch; prefill: batch x length)."""
    impl = spec.implementation
    _check(impl, ACCEPTED_IMPLEMENTATIONS, "implementation")
    if impl != AUTO:
        return impl
    rule = (spec.method, spec.mode)
    if not _fast() or spec.is_dense or rule not in SKIPS_WORK:
        return "masked"
    limit = 1
    if rule in BATCH_MEASURED:       # (CATS's path is M's with the gate as the score)
        limit = SPARSE_MAX_TOKENS if spec.capacity is None else SPARSE_MAX_TOKENS_CAPPED
    return "pallas" if n_tokens <= limit else "masked"


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
