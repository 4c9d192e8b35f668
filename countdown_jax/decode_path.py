"""How a decode step runs: one frozen ``DecodePath``, resolved from "auto" in ``fast_path``.

Its fields are the decode step's choices (what is computed never depends on them, except
a decode call run ``batch_kernel="dense"``, which keeps every neuron and says so):

    layers        stacked | unstacked | fused_qkv | transposed   the weights' layer form
    ffn           masked | xla | pallas                          the FFN's implementation
    batch_kernel  lists | union | compact | dense                a decode batch's FFN kernel
    attention     xla | pallas                                   decode attention
    projections   xla | pallas                                   decode q/k/v/o projections

Each defaults to "auto"; ``fast_path.resolve`` replaces every "auto" once, at the entry
point, and the resolved path travels down whole and comes back as the result's ``path``.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ATTENTIONS", "AUTO", "BATCH_KERNELS", "DecodePath", "IMPLEMENTATIONS",
           "LAYER_FORMS", "PORTABLE", "PROJECTIONS"]

AUTO = "auto"
LAYER_FORMS = ("stacked", "unstacked", "fused_qkv", "transposed")
# "xla" / "pallas" are the kernels' vocabulary (``kernels._platform``); "masked" is the
# FFN's dense reference (no kernel).
IMPLEMENTATIONS = ("masked", "xla", "pallas")
BATCH_KERNELS = ("lists", "union", "compact", "dense")
ATTENTIONS = ("xla", "pallas")
PROJECTIONS = ("xla", "pallas")

_CHOICES = {"layers": LAYER_FORMS, "ffn": IMPLEMENTATIONS, "batch_kernel": BATCH_KERNELS,
            "attention": ATTENTIONS, "projections": PROJECTIONS}


@dataclasses.dataclass(frozen=True)
class DecodePath:
    """The decode step's layer form, FFN implementation and batch kernel, attention and
    projections; "auto" = ``fast_path``'s choice for the backend (see the module doc)."""

    layers: str = AUTO
    ffn: str = AUTO
    batch_kernel: str = AUTO
    attention: str = AUTO
    projections: str = AUTO

    def __post_init__(self):
        for name, allowed in _CHOICES.items():
            value = getattr(self, name)
            if value != AUTO and value not in allowed:
                raise ValueError(f"DecodePath.{name} must be {AUTO!r} or one of "
                                 f"{allowed}, got {value!r}")

    @property
    def resolved(self) -> bool:
        return AUTO not in dataclasses.astuple(self)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# What runs everywhere (CPU, TPU, a mesh, a vmapped sweep): stacked layers, the masked FFN,
# XLA attention and projections.
PORTABLE = DecodePath(layers="stacked", ffn="masked", batch_kernel="lists", attention="xla",
                      projections="xla")
