"""Decode batches (2 to ``MAX_TOKENS`` tokens): the union of the tokens' kept neurons read
once, by the GEMV kernel with row predicates (``kernels.gemv`` with ``live``).

Each token of a decode batch keeps its own neurons. Per-token index lists
(``kernels.sparse_ffn``, ``SparseSpec.batch_kernel="lists"``) read a row kept by several
tokens once per token; here (``batch_kernel="union"``) every row any token keeps is read
once: the gate / up rows as output columns of W [m, d], each token's s masked to its own
kept set, then W_down's rows as inputs of W [m, d]. Rows no token keeps move no bytes
(predicated loads), so the bytes are the union's. The result is the masked reference's
(``ffn._masked``) up to float rounding: a row a token did not keep gets s = 0.

Measured on an H200 (Llama-3.1-8B bf16, bench_decode.md S9-E, decode x dense): batch 4,
r = 0.9: M 1.03x, D 1.07x (index lists 0.96x / 1.05x); batch 8, r = 0.9: M 0.99x, D 1.00x
(lists 0.80x / 0.79x, masked 0.95x / 0.85x). Near a union of all m (r <= 0.7 at batch 8)
it reads what dense reads at the GEMV's speed, below XLA's GEMM: masked wins there.
``fast_path.PALLAS_WHERE`` says where "auto" takes it.
"""

from __future__ import annotations

import jax.numpy as jnp

from countdown_jax.gated import activation
from countdown_jax.kernels.gemv.api import gemv
from countdown_jax.kernels.gemv.pallas_gpu import GemvConfig

__all__ = ["GATE_CONFIG", "DOWN_CONFIG", "MAX_TOKENS", "union_ffn"]

# Decode batches only: a prefill's hundreds of tokens keep the per-token lists.
MAX_TOKENS = 16
# The fastest GEMV tiles of bench_kernels.py --plan union (H200, Llama-3.1-8B bf16,
# batches 2-8, r = 0.5-0.9; bench_kernels_union.md): the tensor-core dot (the FMA path
# unrolls the tokens: 0.24-0.80x dense) with 3 pipeline stages; W_down split 8 ways along
# its m input rows (its 4096 output columns alone give too few programs). float32
# weights: the FMA default (Triton's float32 dot rounds to TF32).
GATE_CONFIG = GemvConfig(block_n=64, block_d=128, split_d=4, num_stages=3, dot=True)
DOWN_CONFIG = GemvConfig(block_n=64, block_d=128, split_d=8, num_stages=3, dot=True)


def union_ffn(stack, xs, mask, *, act, dense=None, coef=None, configs=None, interpret=None):
    """stack: {"gate", "up", "down"} [m, d], or stacked [L, m, d] with "layer" (read in
    place); xs [N, d]; mask [N, m] bool, each token's kept neurons; dense / coef: the
    projection the rule's score already computed densely ("up" with u for M, "gate" with
    act(g) for CATS, None for D). configs: (gate / up, down) ``GemvConfig`` (None: the
    measured defaults above). Returns y [N, d] in xs.dtype."""
    n = xs.shape[0]
    if not 1 <= n <= MAX_TOKENS:
        raise ValueError(f"union_ffn: 1 to MAX_TOKENS = {MAX_TOKENS} tokens (decode), got {n}")
    if dense not in (None, "up", "gate"):
        raise ValueError(f"union_ffn: dense must be 'up', 'gate' or None, got {dense!r}")
    if configs is None:
        configs = ((GATE_CONFIG, DOWN_CONFIG) if jnp.dtype(xs.dtype).itemsize == 2
                   else (None, None))
    gate_cfg, down_cfg = configs
    kw = dict(layer=stack.get("layer"), implementation="pallas", interpret=interpret,
              live=jnp.any(mask, axis=0))

    def rows(name):          # [N, m] float32: the union's dot products, 0 elsewhere
        return gemv(xs, stack[name], transposed=True, config=gate_cfg,
                    out_dtype=jnp.float32, **kw)
    g = coef if dense == "gate" else rows("gate")
    u = coef if dense == "up" else rows("up")
    s = (g if dense == "gate" else activation(act)(g)) * u
    s = jnp.where(mask, s, 0).astype(xs.dtype)
    return gemv(s, stack["down"], config=down_cfg, **kw)
