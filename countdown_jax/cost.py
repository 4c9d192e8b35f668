"""What a selection rule reads at decode: FFN weight bytes per token and layer, as a share
of the dense FFN's 3 m d weights (the currency a rule's quality is compared in).

A decode token is memory-bound: the FFN's time is the weight bytes it streams. Per rule
(k = kept share of the m neurons, c = candidate share, rank = predictor rank):

    dense                              1
    cats, m_countdown (any mode)       (1 + 2k) / 3   one dense GEMV (act(g) or u) picks
                                                      the set; the other two matrices
                                                      are read for kept rows only
    d_countdown / dejavu, predictor    p + k          p = rank (d + m) / (3 m d): x V, then
                                                      U; gate, up, down rows of the kept
    d_countdown, cascade               p + (2c + k) / 3   predictor; gate and up rows of the
                                                      c candidates (their exact s); down
                                                      rows of the k kept
    d_countdown, proxy                 x + k          x = proxy_share(bits, group): the
                                                      low-bit gate and up (proxy.py);
                                                      gate, up, down rows of the kept
    d_countdown / dejavu / s_countdown (2 + k) / 3    the oracle modes need the dense
      ideal, topk, threshold                          g and u before they can select
    oracle bound (``oracle=True``)     k              what a rule with a free, perfect
                                                      predictor would read

Activations, norms and the predictor's float32 h are O(d + m) bytes: ignored.
"""

from __future__ import annotations

from countdown_jax.proxy import proxy_share

PREDICTOR_MODES = ("predictor", "cascade")


def predictor_share(rank: int, m: int, d: int) -> float:
    """x V (rank x d) then U (m x rank), over the dense FFN's 3 m d."""
    return rank * (d + m) / (3.0 * m * d)


def bytes_share(method: str, mode: str, kept: float, *, m: int, d: int, rank: int = 0,
                candidates: float | None = None, oracle: bool = False,
                proxy: tuple[int, int] | None = None) -> float:
    """FFN weight bytes read per decode token and layer / the dense FFN's, see module doc.

    kept: realised share of neurons kept (1 - realised sparsity); candidates: the cascade's
    candidate share (>= kept); rank: the predictor's (predictor and cascade modes);
    proxy: (bits, group) of the proxy (proxy mode).
    """
    if not 0.0 <= kept <= 1.0:
        raise ValueError(f"kept share must lie in [0, 1], got {kept}")
    if method == "dense":
        return 1.0
    if oracle:
        return float(kept)
    if method in ("cats", "m_countdown"):
        return (1.0 + 2.0 * kept) / 3.0
    if method not in ("d_countdown", "dejavu", "s_countdown"):
        raise ValueError(f"no byte model for sparsity method {method!r}")
    if mode == "proxy":
        if proxy is None:
            raise ValueError(f"{method}/proxy reads a low-bit proxy: give its (bits, group)")
        return proxy_share(*proxy) + kept
    if mode in PREDICTOR_MODES:
        if rank < 1:
            raise ValueError(f"{method}/{mode} reads a predictor: give its rank")
        p = predictor_share(rank, m, d)
        if mode == "predictor":
            return p + kept
        if candidates is None or not kept <= candidates + 1e-9 or candidates > 1.0:
            raise ValueError(f"cascade needs the candidate share in [kept, 1], got "
                             f"{candidates} (kept {kept})")
        return p + (2.0 * candidates + kept) / 3.0
    return (2.0 + kept) / 3.0
