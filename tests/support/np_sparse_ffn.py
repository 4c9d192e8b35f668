"""Independent NumPy float64 reference of the COUNTDOWN selection rules and sparse FFN.

Written from method.md directly (no JAX, no code shared with countdown_jax) so the tests
compare two implementations, not one with itself.
"""

from __future__ import annotations

import math

import numpy as np


def act(name, g):
    if name == "silu":
        return g / (1.0 + np.exp(-g))
    if name == "gelu_tanh":
        return 0.5 * g * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (g + 0.044715 * g ** 3)))
    raise ValueError(name)


def coefficients(mlp, x, act_name):
    g = x @ mlp["gate"].T
    u = x @ mlp["up"].T
    return g, u, act(act_name, g) * u


def quantity(method, mlp, x, act_name):
    g, u, s = coefficients(mlp, x, act_name)
    return {
        "cats": lambda: np.abs(act(act_name, g)),
        "m_countdown": lambda: np.abs(u),
        "d_countdown": lambda: np.abs(s),
        "dejavu": lambda: g,
        "s_countdown": lambda: 0.5 * s ** 2 * np.sum(mlp["down"] ** 2, axis=1),
    }[method]()


def predictor_logits(pred, x):
    return (x @ pred["V"]) @ pred["U"].T


def select_row(mode, q, value):
    """One token's mask. value: r (ideal/topk), tau (threshold) or theta (predictor)."""
    m = q.shape[0]
    if mode == "ideal":
        k = int(m * value)
        if k == 0:
            return np.ones(m, bool)
        kth = np.sort(q)[k - 1]                      # k-th smallest, as torch.kthvalue
        return q > kth
    if mode == "topk":
        k = int(m * value)
        order = sorted(range(m), key=lambda i: (-q[i], i))   # larger first, then lower index
        mask = np.zeros(m, bool)
        mask[order[:m - k]] = True
        return mask
    if mode in ("threshold", "predictor"):
        return q > value
    raise ValueError(mode)


def select(mode, q, value):
    flat = q.reshape(-1, q.shape[-1])
    return np.stack([select_row(mode, row, value) for row in flat]).reshape(q.shape)


def cap_row(mask, q, capacity):
    """Keep the `capacity` highest q among the mask (ties -> lower index)."""
    on = [i for i in range(len(q)) if mask[i]]
    on.sort(key=lambda i: (-q[i], i))
    out = np.zeros_like(mask)
    out[on[:capacity]] = True
    return out


def sparse_ffn(mlp, x, mask, act_name):
    _, _, s = coefficients(mlp, x, act_name)
    return (s * mask) @ mlp["down"]


def cascade(mlp, x, pred, theta, tau, act_name, capacity=None):
    """The cascade rule: (candidates, kept) masks. Candidates z > theta (the ``capacity``
    highest z when more pass), kept = the candidates with |s| > tau."""
    z = predictor_logits(pred, x)
    cand = select("predictor", z, theta)
    if capacity is not None:
        flat = [cap_row(mr, zr, capacity) for mr, zr in
                zip(cand.reshape(-1, z.shape[-1]), z.reshape(-1, z.shape[-1]))]
        cand = np.stack(flat).reshape(z.shape)
    _, _, s = coefficients(mlp, x, act_name)
    return cand, cand & (np.abs(s) > tau)


def quantize(w, bits, group, round_scale=None):
    """Symmetric low-bit copy of w [..., d] (float64): one scale per ``group`` inputs.
    round_scale: the storage rounding of the scales (the library keeps bfloat16)."""
    qmax = 2 ** (bits - 1) - 1
    g = w.reshape(w.shape[:-1] + (w.shape[-1] // group, group))
    scale = np.abs(g).max(-1) / qmax
    if round_scale is not None:
        scale = round_scale(scale)
    q = np.clip(np.round(g / np.where(scale > 0, scale, 1.0)[..., None]), -qmax, qmax)
    return (q * scale[..., None]).reshape(w.shape)


def proxy_rule(mlp, x, bits, group, tau, act_name, round_scale=None):
    """The proxy rule's mask: |act(x Gq^T) * (x Uq^T)| > tau."""
    q = {k: quantize(mlp[k], bits, group, round_scale) for k in ("gate", "up")}
    _, _, s_hat = coefficients(q, x, act_name)
    return np.abs(s_hat) > tau, np.abs(s_hat)
