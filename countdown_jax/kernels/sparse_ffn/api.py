"""Gathered sparse FFN: one entry point, ``implementation=`` picks the backend."""

from __future__ import annotations

from countdown_jax.kernels.sparse_ffn.reference import sparse_ffn_reference


def sparse_ffn(x, w_gate, w_up, w_down, idx, count, *, act, dense=None, coef=None,
               implementation: str = "xla"):
    if implementation == "xla":
        return sparse_ffn_reference(x, w_gate, w_up, w_down, idx, count,
                                    act=act, dense=dense, coef=coef)
    raise ValueError(f"unknown sparse_ffn implementation {implementation!r}")
