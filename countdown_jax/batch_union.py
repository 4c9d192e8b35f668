"""Decode batches (2 to ``MAX_TOKENS`` tokens): the union of the tokens' kept neurons read
once, by the GEMV kernel with row predicates (``kernels.gemv`` with ``live``).

Each token of a decode batch keeps its own neurons. Per-token index lists
(``kernels.sparse_ffn``, ``SparseSpec.batch_kernel="lists"``) read a row kept by several
tokens once per token; here (``batch_kernel="union"``) every row any token keeps is read
once: the gate / up rows as output columns of W [m, d], each token's s masked to its own
kept set, then W_down's rows as inputs of W [m, d]. Rows no token keeps move no bytes
(predicated loads), so the bytes are the union's. The result is the masked reference's
(``ffn._masked``) up to float rounding: a row a token did not keep gets s = 0.

``form``: "live" (``batch_kernel="union"``) passes the union as a row predicate: a
random half of m live leaves nearly every 64-row tile with a live row, so every GEMV
program walks all of d on partly masked loads (dense instruction stream, scattered
bytes). "compact" (``batch_kernel="compact"``) passes it as an index list
(``selection.mask_to_indices``): the gate / up GEMV writes only the union's columns
[N, C] (programs past the union's count run no loop step), s is formed on those columns,
and W_down's GEMV walks only ceil(count / block_d) blocks of its rows.

Which form wins depends on the union's size (the index list while it is small, the
predicate from about half of m): ``fast_path.BATCH_KERNEL_TABLE`` says where "auto" takes
each, from experiments/results/bench_auto_batches.md.
"""

from __future__ import annotations

import jax.numpy as jnp

from countdown_jax.gated import activation
from countdown_jax.kernels.gemv.api import gemv
from countdown_jax.kernels.gemv.pallas_gpu import GemvConfig
from countdown_jax.selection import mask_to_indices

__all__ = ["FORMS", "GATE_CONFIG", "DOWN_CONFIG", "MAX_TOKENS", "union_ffn"]

# Decode batches only: a prefill's hundreds of tokens keep the per-token lists.
MAX_TOKENS = 16
# The fastest GEMV tiles of bench_kernels.py --plan union (results/bench_kernels_union.md):
# the tensor-core dot (the FMA path unrolls the tokens) with 3 pipeline stages; W_down
# split 8 ways along its m input rows (its d output columns alone give too few programs).
# float32 weights: the FMA default (Triton's float32 dot rounds to TF32).
GATE_CONFIG = GemvConfig(block_n=64, block_d=128, split_d=4, num_stages=3, dot=True)
DOWN_CONFIG = GemvConfig(block_n=64, block_d=128, split_d=8, num_stages=3, dot=True)
FORMS = ("live", "compact")      # how the GEMV is told the union (module docstring)


def union_ffn(stack, xs, mask, *, act, dense=None, coef=None, layer=None, configs=None,
              interpret=None, form: str = "live"):
    """stack: {"gate", "up", "down"} [m, d], or stacked [L, m, d] with ``layer`` the
    traced index (read in place); xs [N, d]; mask [N, m] bool, each token's kept neurons; dense / coef: the
    projection the rule's score already computed densely ("up" with u for M, "gate" with
    act(g) for CATS, None for D). configs: (gate / up, down) ``GemvConfig`` (None: the
    measured defaults above). form: one of ``FORMS``. Returns y [N, d] in xs.dtype."""
    n = xs.shape[0]
    if not 1 <= n <= MAX_TOKENS:
        raise ValueError(f"union_ffn: 1 to MAX_TOKENS = {MAX_TOKENS} tokens (decode), got {n}")
    if dense not in (None, "up", "gate"):
        raise ValueError(f"union_ffn: dense must be 'up', 'gate' or None, got {dense!r}")
    if form not in FORMS:
        raise ValueError(f"union_ffn: form must be one of {FORMS}, got {form!r}")
    if configs is None:
        configs = ((GATE_CONFIG, DOWN_CONFIG) if jnp.dtype(xs.dtype).itemsize == 2
                   else (None, None))
    gate_cfg, down_cfg = configs
    live = jnp.any(mask, axis=0)
    kw = dict(layer=layer, implementation="pallas", interpret=interpret)
    if form == "live":
        kw["live"] = live
    else:           # the union's C = m slots, the first count its rows (ascending)
        rows, count = mask_to_indices(live)
        kw.update(rows=rows, count=count)
        mask = jnp.take(mask, rows, axis=1) & (jnp.arange(rows.shape[0]) < count)
        coef = None if coef is None else jnp.take(coef, rows, axis=1)

    def proj(name):     # [N, m] float32 (compact: [N, C]): the union's dots, 0 elsewhere
        return gemv(xs, stack[name], transposed=True, config=gate_cfg,
                    out_dtype=jnp.float32, **kw)
    g = coef if dense == "gate" else proj("gate")
    u = coef if dense == "up" else proj("up")
    s = (g if dense == "gate" else activation(act)(g)) * u
    s = jnp.where(mask, s, 0).astype(xs.dtype)
    return gemv(s, stack["down"], config=down_cfg, **kw)
