"""The fastest correct decode path for the running backend: the one place "auto" is resolved.

Three choices make decode fast on a GPU (experiments/results/bench_decode.md):

    layers          "unstacked" (``model.unstack_layers``: one buffer per layer weight; a
                    stacked layer costs the GPU a copy of its q/o weights every step)
    implementation  "pallas" for a rule whose kernels skip work (the fused kernel at one
                    token; for a batch, by batch and the rule's target sparsity
                    (``PALLAS_WHERE``), the index lists or the union read once where
                    measured faster than dense, else the dense FFN:
                    ``SparseSpec.batch_kernel``), "masked" otherwise
    attention       "pallas" (the decode-attention kernel, one token per row)
    projections     "xla": the Pallas GEMV of the q/k/v/o projections
                    (``decode_projections``) stays opt-in, measured slower end to end
                    (H200, Llama-3.1-8B, batch 1: dense 0.65x, bench_decode.md S8-A)

Every choice but one is exact: the kept sets equal the masked reference's (no capacity
is added). The exception is a decode batch where the table says no sparse path beats
dense: it runs dense, every neuron kept, and says so (kept 1.0, so the realised sparsity
reads 0; ``path["batch_kernel"] == "dense"``). An explicit implementation keeps the rule
exact at every batch.
On CPU (and TPU, whose kernels are not tuned here) and under a multi-device mesh (XLA
cannot partition the kernels) every choice resolves to the portable path: stacked,
masked, xla. An explicit value is never changed; "auto" (the default of ``generate``,
``generate_text`` and the CLI) asks for this resolution.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax

from countdown_jax import batch_union
from countdown_jax.ffn import _FUSED_RULES
from countdown_jax.policy import ACCEPTED_IMPLEMENTATIONS, AUTO, SparseSpec
from countdown_jax.sharding import multi_device_mesh

__all__ = ["ATTENTIONS", "AUTO", "DenseBatchWarning", "LAYER_FORMS", "PALLAS_WHERE",
           "PALLAS_WHERE_CAPPED", "PROJECTIONS", "SKIPS_WORK", "backend", "pallas_choice",
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

# Where "auto" runs the Pallas path rather than masked (the same kept set at dense cost),
# and with which batch kernel, by tokens per call and the rule's target sparsity r:
# (max tokens, min target r, batch kernel: "lists", "union" or "compact", the union as a
# row predicate or an index list), the first entry that admits the call wins.
# One token: the fused kernel at any r. A decode batch (2 to batch_union.MAX_TOKENS
# tokens) that no entry admits runs dense (batch_kernel "dense") when its r is known:
# there no exact sparse path was measured faster than dense (mostly the union of the
# tokens' kept sets is 75-100% of m), and masked reads dense's bytes plus the
# selection's. An unknown r
# (``SparseSpec.target_sparsity`` None) admits only the entries with min r 0 and keeps a
# batch exact (masked). An r between two measured points takes the lower one's choice.
# Measured on an H200 (Llama-3.1-8B bf16, decode x dense of the same run;
# bench_decode.md, session 9):
#          batch 2                 batch 4                 batch 8
#          r .9   r .7   r .5      r .9   r .7   r .5      r .9   r .7   r .5
#   M lists 1.05  0.87  0.78      0.96  0.72  0.61      0.80  0.58  0.47
#   M union 1.03  0.99  0.93      1.03  0.94  0.90      0.99  0.90  0.89
#   M masked 0.95 0.95  0.95      0.94  0.95  0.94      0.95  0.95  0.95
#   D lists 1.35  1.02  0.79*     1.05  0.76  0.58*     0.79* 0.53* 0.41*
#   D union 1.05  1.03  0.93      1.07  0.94  0.88      1.00  0.88  0.86
#   D masked 0.91 0.91  0.84*     0.87  0.91  0.85*     0.85* 0.85* 0.85*
# (* before D's predictor rounded h to bf16, which sped D up at batches; CATS reads what
# M reads; Deja Vu's predictor path is D's, without the union kernel.) Session 10 (S10-F,
# bench_auto_batches.md; after ``count_kept``'s barrier), x dense of the same job, with
# "compact" (the union as an index list, ``batch_union`` form "compact") beside the union
# as a row predicate:
#          batch 2          batch 4          batch 8
#          r .9   r .7      r .9   r .7      r .9
#   M lists   1.07             -      -         -
#   M union      -  1.02      1.06  0.97      1.01
#   M compact 1.14     -      1.07     -      0.95
#   M masked     -  0.98         -  0.98         -
#   D lists   1.35             -      -         -
#   D union      -  1.03      1.08  0.94      1.00
#   D compact 1.27     -      1.15     -      0.96
#   D masked     -  0.91         -  0.91         -
# A capacity cut (a per-token top-k) ran batch 2 at r = 0.9 above masked (S8-H: M 0.98x,
# D 0.95x) and batch 4 below it.
PALLAS_WHERE = {
    "m": ((1, 0.0, "lists"), (2, 0.9, "compact"), (2, 0.7, "union"), (4, 0.9, "compact"),
          (8, 0.9, "union")),
    "d": ((1, 0.0, "lists"), (2, 0.9, "lists"), (2, 0.7, "union"), (4, 0.9, "compact")),
    "dejavu": ((1, 0.0, "lists"), (2, 0.7, "lists"), (4, 0.9, "lists")),
}
PALLAS_WHERE_CAPPED = ((1, 0.0, "lists"), (2, 0.9, "lists"))
_RULE_TABLE = {("m_countdown", "threshold"): "m", ("cats", "threshold"): "m",
               ("d_countdown", "predictor"): "d", ("dejavu", "predictor"): "dejavu"}


class DenseBatchWarning(UserWarning):
    """"auto" ran a sparse rule's decode batch dense (``resolve_spec``)."""


def backend() -> str:
    """The platform the choices are made for (tests fake a GPU by patching this)."""
    return jax.default_backend()


def _fast() -> bool:
    return backend() == "gpu" and not multi_device_mesh()


def _check(value: str, allowed, what: str):
    if value != AUTO and value not in allowed:
        raise ValueError(f"{what} must be {AUTO!r} or one of {tuple(allowed)}, got "
                         f"{value!r}")


def pallas_choice(spec: SparseSpec, n_tokens: int) -> str | None:
    """The batch kernel ("lists" / "union" / "compact") of the first ``PALLAS_WHERE``
    entry that admits this rule, capacity, target sparsity and tokens per call; None: no
    sparse kernel was measured faster there (``_auto_kernel`` then picks dense or
    masked)."""
    table = _RULE_TABLE.get((spec.method, spec.mode))
    if table is None:                # batches of this rule not measured: one token only
        entries = ((1, 0.0, "lists"),)
    else:
        entries = PALLAS_WHERE[table] if spec.capacity is None else PALLAS_WHERE_CAPPED
    r = spec.target_sparsity
    for most, r_min, kernel in entries:
        if n_tokens <= most and (r_min == 0.0 or (r is not None and r >= r_min - 1e-9)):
            return kernel
    return None


def _auto_kernel(spec: SparseSpec, n_tokens: int) -> str | None:
    """What "auto" runs: the Pallas path's batch kernel ("lists", "union", "compact", or
    "dense" for a decode batch whose rule's r is known and no sparse kernel was measured
    faster there), or None for masked."""
    if not _fast() or spec.is_dense or (spec.method, spec.mode) not in SKIPS_WORK:
        return None
    kernel = pallas_choice(spec, n_tokens)
    if (kernel is None and spec.target_sparsity is not None
            and 1 < n_tokens <= batch_union.MAX_TOKENS):
        return "dense"
    return kernel


def resolve_implementation(spec: SparseSpec, n_tokens: int) -> str:
    """spec.implementation, or for "auto" the fastest exact one for ``n_tokens`` tokens
    per call (decode: the batch; prefill: batch x length)."""
    impl = spec.implementation
    _check(impl, ACCEPTED_IMPLEMENTATIONS, "implementation")
    if impl != AUTO:
        return impl
    return "masked" if _auto_kernel(spec, n_tokens) is None else "pallas"


def resolve_spec(spec: SparseSpec, n_tokens: int) -> SparseSpec:
    """The spec with "auto" replaced, and the batch kernel of a Pallas batch (the spec
    itself when its implementation is explicit)."""
    if spec.implementation != AUTO:
        return spec
    kernel = _auto_kernel(spec, n_tokens)
    if kernel is None:
        return dataclasses.replace(spec, implementation="masked")
    if kernel == "dense":       # at trace time: once per compiled program
        warnings.warn(
            f"implementation='auto' runs this decode batch of {n_tokens} tokens dense: at "
            f"r = {spec.target_sparsity} no sparse path was measured faster than dense "
            "(fast_path.PALLAS_WHERE), so every neuron is kept and the realised sparsity "
            "reads 0; pass implementation='pallas' or 'masked' to keep the rule exact",
            DenseBatchWarning, stacklevel=2)
    return dataclasses.replace(spec, implementation="pallas", batch_kernel=kernel)


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
