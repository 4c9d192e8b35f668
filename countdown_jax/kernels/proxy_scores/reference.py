"""Plain-JAX reference of the proxy scores: ``countdown_jax.proxy.proxy_scores`` (dequantize,
then float32 GEMVs) on the api's (x, packed, scale) arguments. The maths lives there only."""

from __future__ import annotations

from countdown_jax.proxy import proxy_scores

__all__ = ["proxy_scores_reference"]


def proxy_scores_reference(x, packed, scale, *, act):
    """x [..., d]; packed uint8 [2, m, d*bits/8]; scale [2, m, d/group] -> float32 [..., m]."""
    return proxy_scores({"packed": packed, "scale": scale}, x, act)
