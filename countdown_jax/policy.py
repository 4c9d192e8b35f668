"""Sparsity policy: a static spec (hashable, picks the code path) plus per-layer data.

The static part decides *which* computation is traced; the dynamic part (sparsity r,
thresholds tau, predictor offset theta, predictor weights) is a pytree of arrays with a
leading layer axis, so one compile serves every value and ``jax.vmap`` sweeps them.
"""

from __future__ import annotations

import dataclasses

METHODS = ("dense", "cats", "m_countdown", "d_countdown", "dejavu", "s_countdown")
MODES = ("ideal", "topk", "threshold", "predictor")
IMPLEMENTATIONS = ("masked", "gather", "pallas")


@dataclasses.dataclass(frozen=True)
class SparseSpec:
    """Static choice of FFN selection rule.

    method: which quantity is ranked (see ``selection.py``).
    mode: ideal (per-token oracle k-th value), topk (exactly m-k kept), threshold
        (per-layer tau), predictor (low-rank logits > theta).
    implementation: masked = float reference (dense cost, exact maths, used for quality
        sweeps); gather = XLA gather of a capacity-padded index list (skips the work);
        pallas = the Pallas kernels.
    capacity: static upper bound on kept neurons per token for gather/pallas.
    sparse_prefill: also sparsify prompt tokens (off by default, as in the paper).
    """

    method: str = "dense"
    mode: str = "ideal"
    implementation: str = "masked"
    capacity: int | None = None
    sparse_prefill: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown sparsity method {self.method!r}; expected one of {METHODS}")
        if self.mode not in MODES:
            raise ValueError(f"unknown sparsity mode {self.mode!r}; expected one of {MODES}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown implementation {self.implementation!r}; expected one of {IMPLEMENTATIONS}")

    @property
    def is_dense(self) -> bool:
        return self.method == "dense"


DENSE = SparseSpec()
