"""|s_hat| = |act(x Gq^T) * (x Uq^T)| of the low-bit proxy: ``implementation=`` picks the
backend.

implementation (the vocabulary of every kernel op, ``kernels._platform``):
  "xla"         the reference (``countdown_jax.proxy.proxy_scores``: dequantize, float32
                GEMVs); it materialises the float32 weights, so it is for checks and CPU
  "pallas"      the Pallas GPU kernel ("pallas_gpu"), which streams the packed bytes
                themselves. TPU and CPU: falls back to "xla" with a warning (CPU: unless
                in interpret mode). There is no "pallas_tpu" backend.
interpret: True / False, or None = the ``_platform.interpret_mode`` setting.

x [..., d]; packed uint8 [2, m, d*bits/8] and scale [2, m, d/group] ([0] = gate, [1] =
up; the storage of countdown_jax/proxy.py), or the policy's stacked [L, 2, m, ...] with
``layer`` (a traced index): the kernel then reads the stack in place as flat [L*2m, ...]
rows from 2ml on (a layer sliced out for a custom call is copied whole). bits and group
are read from the shapes. Returns float32 [..., m].
"""

from __future__ import annotations

from countdown_jax.gated import activation
from countdown_jax.kernels._platform import (IMPLEMENTATIONS, check_implementation,
                                             flat_stack, interpret_enabled, layer_slice,
                                             resolve)
from countdown_jax.kernels.proxy_scores.reference import proxy_scores_reference
from countdown_jax.proxy import check_proxy

__all__ = ["IMPLEMENTATIONS", "proxy_scores"]


def proxy_scores(x, packed, scale, *, act, implementation: str = "xla",
                 interpret: bool | None = None, config=None, layer=None):
    """See module docstring. ``config``: ``pallas_gpu.ProxyConfig`` (None: its default)."""
    check_implementation(implementation, "proxy_scores")
    activation(act)                                   # an unknown activation fails here
    stacked = layer is not None
    if packed.ndim != (4 if stacked else 3):
        raise ValueError(f"proxy_scores: packed must be [2, m, d*bits/8]"
                         f"{', stacked as [L, 2, m, d*bits/8] (layer= given)' if stacked else ''}"
                         f", got shape {packed.shape}")
    d, m = x.shape[-1], packed.shape[-2]
    bits, group = check_proxy({"packed": packed, "scale": scale}, m=m, d=d,
                              leading=packed.shape[:1] if stacked else ())
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d)
    interpret = interpret_enabled(interpret)
    impl = resolve(implementation, interpret, "proxy_scores", backends=("pallas_gpu",))
    if impl == "xla":
        if stacked:
            packed, scale = layer_slice((packed, scale), layer)
        out = proxy_scores_reference(x2, packed, scale, act=act)
    else:
        from countdown_jax.kernels.proxy_scores.pallas_gpu import proxy_scores_pallas_gpu

        def flat(a):      # [(L,) 2, m, k] -> [(L*) 2m, k] rows (a free reshape) + offset
            a = a.reshape(a.shape[:-3] + (2 * m, a.shape[-1]))
            (a,), off, _ = flat_stack((a,), layer, "proxy_scores")
            return a, off

        (fp, offp), (fs, offs) = flat(packed), flat(scale)
        out = proxy_scores_pallas_gpu(x2, fp, fs, act=act, bits=bits, group=group,
                                      config=config, interpret=interpret, packed_offset=offp,
                                      scale_offset=offs, m=m)
    return out.reshape(lead + (m,))
