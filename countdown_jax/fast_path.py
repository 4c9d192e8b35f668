"""The fastest correct decode path for the running backend: the one place "auto" is resolved.

``resolve`` turns a requested ``DecodePath`` into a concrete one. On one GPU: unstacked
layers, the Pallas FFN where the rule's kernels skip work (the batch kernel from
``BATCH_KERNEL_TABLE``), Pallas decode attention, XLA projections. Everywhere else (CPU,
TPU, a multi-device mesh): the portable path. An explicit field is never changed. Why
each choice, with the measurements: docs/fast-path.md and experiments/KERNEL_NOTES.md.
"""

from __future__ import annotations

import warnings

import jax

from countdown_jax.batch_union import MAX_TOKENS as MAX_BATCH_TOKENS
from countdown_jax.decode_path import AUTO, PORTABLE, DecodePath
from countdown_jax.policy import SKIPS_WORK, SparseSpec
from countdown_jax.sharding import multi_device_mesh

__all__ = ["BATCH_KERNEL_TABLE", "CAPPED_TABLE", "DenseBatchWarning", "backend", "batch_kernel",
           "resolve"]

# The Pallas batch kernel by tokens per call and the rule's target sparsity r: entries
# (max tokens, min target r, kernel), the first that admits the call wins. A call no entry
# admits runs dense when its r is known (no exact sparse path measured faster there).
# Rules without an entry run the fused kernel ("lists") at one token only. Sources:
# experiments/results/bench_auto_batches.md (H200, Llama-3.1-8B bf16, x dense of the same
# job, 2026-11); CATS reads what M reads; the proxy (its Mosaic GPU scores kernel) from
# r = 0.5 at one token and r = 0.9 up to four (bench_auto_path_proxy.md, H100,
# 2026-12-06: one token 0.97x / 1.04x dense at r = 0.4 / 0.5; four tokens 1.08x at 0.9,
# 0.77x at 0.7).
BATCH_KERNEL_TABLE = {
    ("m_countdown", "threshold"): ((1, 0.0, "lists"), (2, 0.9, "compact"), (2, 0.7, "union"),
                                   (4, 0.9, "compact"), (8, 0.9, "union")),
    ("d_countdown", "predictor"): ((1, 0.0, "lists"), (2, 0.9, "lists"), (2, 0.7, "union"),
                                   (4, 0.9, "compact")),
    ("dejavu", "predictor"): ((1, 0.0, "lists"), (2, 0.7, "lists"), (4, 0.9, "lists")),
    ("d_countdown", "proxy"): ((1, 0.5, "lists"), (4, 0.9, "lists")),
}
BATCH_KERNEL_TABLE[("cats", "threshold")] = BATCH_KERNEL_TABLE[("m_countdown", "threshold")]
# With a capacity (a per-token top-k) only the index lists apply.
CAPPED_TABLE = ((1, 0.0, "lists"), (2, 0.9, "lists"))
_ONE_TOKEN = ((1, 0.0, "lists"),)


class DenseBatchWarning(UserWarning):
    """"auto" ran a sparse rule's decode batch dense (``resolve``)."""


def backend() -> str:
    """The platform the choices are made for (tests fake a GPU by patching this)."""
    return jax.default_backend()


def _fast() -> bool:
    return backend() == "gpu" and not multi_device_mesh()


def batch_kernel(spec: SparseSpec, n_tokens: int) -> str | None:
    """The Pallas kernel ("lists" / "union" / "compact") of the first table entry that
    admits this rule, capacity, target sparsity and tokens per call; None: none does."""
    if spec.capacity is not None:
        entries = CAPPED_TABLE
    else:
        entries = BATCH_KERNEL_TABLE.get((spec.method, spec.mode), _ONE_TOKEN)
    r = spec.target_sparsity
    for most, r_min, kernel in entries:
        if n_tokens <= most and (r_min == 0.0 or (r is not None and r >= r_min - 1e-9)):
            return kernel
    return None


def _auto_ffn(spec: SparseSpec, n_tokens: int) -> tuple[str, str]:
    """(ffn, batch kernel) "auto" picks for this rule and tokens per call."""
    if not _fast() or spec.is_dense or (spec.method, spec.mode) not in SKIPS_WORK:
        return "masked", "lists"
    kernel = batch_kernel(spec, n_tokens)
    if kernel is not None:
        return "pallas", kernel
    if spec.target_sparsity is not None and n_tokens <= MAX_BATCH_TOKENS:
        what = "one token per call" if n_tokens == 1 else f"this batch of {n_tokens} tokens"
        warnings.warn(      # Python shows it once per call site
            f"the auto decode path runs {what} dense: at r = "
            f"{spec.target_sparsity} no sparse path was measured faster than dense "
            "(fast_path.BATCH_KERNEL_TABLE), so every neuron is kept and the realised "
            "sparsity reads 0; pass DecodePath(ffn='pallas') or 'masked' to keep the rule "
            "exact", DenseBatchWarning, stacklevel=3)
        return "pallas", "dense"
    return "masked", "lists"


def resolve(path: DecodePath, spec: SparseSpec, n_tokens: int,
            held_layers: str = "stacked") -> DecodePath:
    """``path`` with every "auto" replaced for ``spec`` at ``n_tokens`` tokens per decode
    call (an "auto" FFN keeps an implementation the spec names other than its default,
    "masked"). held_layers: the layer form of the params at hand, which the portable path
    keeps (a conversion is a copy)."""
    if path.resolved:
        return path
    fast = _fast()
    ffn, kernel = path.ffn, path.batch_kernel
    if ffn == AUTO and spec.implementation != "masked":
        ffn = spec.implementation            # the rule's spec named one: an explicit choice
    if ffn == AUTO:
        ffn, auto_kernel = _auto_ffn(spec, n_tokens)
        kernel = auto_kernel if kernel == AUTO else kernel
    kernel = PORTABLE.batch_kernel if kernel == AUTO else kernel
    pick = lambda value, gpu, other: value if value != AUTO else (gpu if fast else other)
    return DecodePath(layers=pick(path.layers, "unstacked", held_layers), ffn=ffn,
                      batch_kernel=kernel, attention=pick(path.attention, "pallas", "xla"),
                      # the Pallas GEMV lost end to end (results/bench_decode.md, H200)
                      projections="xla" if path.projections == AUTO else path.projections)
