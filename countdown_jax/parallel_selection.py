"""Selection when the m neurons are split over the devices of a mesh axis (tensor parallel).

Inside ``ffn_parallel``'s shard_map each device sees q [..., m / S] for its slice of neurons.
Rules that look only at one neuron (threshold, predictor) stay local. Rules that rank
over all m (ideal: the k-th smallest q; topk: the m - k largest with index tie-breaks;
the capacity cut: the C highest-ranked) need the global order. We gather q over the
axis (one all_gather of [..., m] float32: the candidates are all values, since k is
traced and has no static bound), run the single-device rule from ``selection`` on it and
keep this device's slice. Every device runs the same deterministic rule on the same
gathered values, so the sharded masks equal the single-device masks bit for bit.

``ffn_parallel`` hands its shard_map body the ``Shard`` (how the neurons are split).
"""

from __future__ import annotations

import dataclasses

import jax

from countdown_jax import selection

__all__ = ["Shard", "choose", "gather_neurons", "local_slice", "needs_global_order"]


@dataclasses.dataclass(frozen=True)
class Shard:
    """How the neuron axis is split over a mesh axis (what a sharded FFN body is told).

    axis: mesh axis name over which m is split; size: number of shards S.
    capacity_scope: "global" = ``spec.capacity`` caps the kept neurons of a token over
        all shards (same masks as one device); "shard" = each shard caps its own kept
        neurons at the spec's capacity (``SparseSpec.shard_capacity``: no communication,
        but a shard holding more than its share of the winners drops some).
    """

    axis: str
    size: int
    capacity_scope: str = "global"

    def __post_init__(self):
        if self.capacity_scope not in ("global", "shard"):
            raise ValueError(f"capacity_scope must be 'global' or 'shard', got "
                             f"{self.capacity_scope!r}")


def gather_neurons(v, axis: str):
    """[..., m/S] per device -> [..., m] on every device (shard order = neuron order)."""
    return jax.lax.all_gather(v, axis, axis=v.ndim - 1, tiled=True)


def local_slice(full, axis: str, m_local: int):
    """This device's [..., m/S] slice of a gathered [..., m] array."""
    start = jax.lax.axis_index(axis) * m_local
    return jax.lax.dynamic_slice_in_dim(full, start, m_local, axis=full.ndim - 1)


def needs_global_order(spec, m: int, shard: Shard) -> bool:
    """Whether ``spec``'s selection ranks across neurons (so across shards)."""
    if spec.mode in ("ideal", "topk"):
        return True
    cap = spec.capacity
    return shard.capacity_scope == "global" and cap is not None and cap < m


def choose(spec, q, layer, shard: Shard):
    """(rule, mask) for one shard's q [..., m/S]: the rule's kept neurons, and after the
    capacity cut. Same contract as ``selection.select`` + ``selection.limit_to_capacity``
    on the full q, restricted to this shard's neurons.
    """
    m_local = q.shape[-1]
    m = m_local * shard.size
    if needs_global_order(spec, m, shard):
        q_full = gather_neurons(q, shard.axis)
        rule_full = selection.select(spec, q_full, layer)
        rule = local_slice(rule_full, shard.axis, m_local)
        if shard.capacity_scope == "global":
            mask_full = selection.limit_to_capacity(rule_full, q_full, spec.capacity)
            return rule, local_slice(mask_full, shard.axis, m_local)
    else:
        rule = selection.select(spec, q, layer)
    if shard.capacity_scope == "shard":
        # spec.capacity here is the per-shard capacity (ffn_parallel passes shard_capacity).
        return rule, selection.limit_to_capacity(rule, q, spec.capacity)
    return rule, rule
