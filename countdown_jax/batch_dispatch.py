"""Decode batches (N > 1 tokens): per call, the cheapest exact way to run the sparse FFN,
chosen inside jit from the size of the union of the tokens' kept neurons.

  "union"  every row kept by any token read once (bytes ~ md for the dense score of
           M / CATS + 2 or 3 x union x d), masked per token: by the GEMV kernel with row
           predicates (``union_impl="gemv"``: ``kernels.gemv`` with ``live``) or by the
           union kernels (``"kernels"``: ``sparse_ffn.union_sparse_ffn``)
  "rows"   per-token index lists (``sparse_ffn``): bytes ~ the sum of the tokens' counts
  "dense"  the masked dense FFN: every row read (dense cost), the same mask applied, so
           the result is what the rule asks for (never slower than dense by construction)

All three give the masked reference's y (``ffn._masked``) up to float rounding; the
choice is a ``lax.switch`` on the realised shares, so one compiled program serves every
step. The crossover constants live in ``BatchDispatch`` (below) and nowhere else.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from countdown_jax.gated import activation, down_sum, layer_weights, project
from countdown_jax.kernels._platform import index_list
from countdown_jax.kernels.gemv.api import gemv
from countdown_jax.kernels.sparse_ffn import api as sparse_ffn_api
from countdown_jax.selection import count_kept

__all__ = ["BRANCHES", "BatchDispatch", "DEFAULT_DISPATCH", "MAX_TOKENS", "batch_sparse_ffn",
           "branch_index", "union_gemv"]

BRANCHES = ("union", "rows", "dense")
# Off by default: measured on an H200 (bench_kernels_floor.md, Llama-3.1-8B bf16, batches
# 2-8, r = 0.5-0.9) no branch beat XLA's dense FFN (best: per-token lists, M r = 0.9,
# batch 4, 0.94x; union kernel 0.72x; masked dense 0.77x), and the switch itself cost more
# than its forced branches. ``ffn`` keeps the per-token index lists until a branch wins.
ENABLED = False
# Decode batches only: the union kernels unroll their tokens at trace time, so a prefill
# of hundreds of tokens stays on the per-token index lists (``ffn``).
MAX_TOKENS = 16


@dataclasses.dataclass(frozen=True)
class BatchDispatch:
    """When each branch runs (shares are fractions of the layer's m neurons).

    Defaults: a bytes model, NOT yet a measurement (the union kernel is new). M / CATS
    read md + 2 x union x d against dense 3md, so the union can win up to a union share
    of 1 less its fixed costs (union list, two launches, ~10-15 us of the ~100 us dense
    call on the H200); D reads 3 x union x d. 0.75 leaves that margin. Per-token lists
    read at least the union's rows and were 0.70-1.01x dense at batch 4 / 8 on the H200
    (bench_kernels.csv, pallas-gather rows at batch 4 / 8), so they are off (rows_max = 0). Measure the crossovers
    with ``bench_kernels.py --plan batch`` (forced-branch rows per batch and r, union
    share next to each) and set them here, naming the run.
    """
    union_max: tuple = ((2, 0.75), (4, 0.75), (8, 0.75))   # (batch, max union share)
    union_max_other: float = 0.75        # batch sizes not listed
    rows_max: float = 0.0                # union too large: lists if mean kept share <= this
    force: str | None = None             # "union" | "rows" | "dense": always that branch
    union_list: bool = True              # union branch: XLA compacts the union into a list
                                         # (False: the kernels walk every neuron and skip,
                                         # with predicated loads, those no token keeps)
    union_impl: str = "kernels"          # "gemv": the GEMV kernel with row predicates
    gemv_configs: tuple = (None, None)   # its GemvConfig for gate / up and for down

    def __post_init__(self):
        if self.force is not None and self.force not in BRANCHES:
            raise ValueError(f"BatchDispatch.force must be one of {BRANCHES} or None, "
                             f"got {self.force!r}")
        if self.union_impl not in ("kernels", "gemv"):
            raise ValueError(f"BatchDispatch.union_impl must be 'kernels' or 'gemv', got "
                             f"{self.union_impl!r}")

    def union_limit(self, n: int) -> float:
        return dict(self.union_max).get(n, self.union_max_other)


DEFAULT_DISPATCH = BatchDispatch()


def branch_index(cfg: BatchDispatch, mask):
    """mask [N, m] bool -> int32 index into BRANCHES (a traced scalar)."""
    n, m = mask.shape
    union = jnp.sum(jnp.any(mask, axis=0), dtype=jnp.int32)
    rows = jnp.sum(mask, dtype=jnp.int32)
    # integer comparisons: share <= limit  <=>  count <= floor(limit * m)
    return jnp.where(union <= int(cfg.union_limit(n) * m), 0,
                     jnp.where(rows <= int(cfg.rows_max * n * m), 1, 2)).astype(jnp.int32)


def batch_sparse_ffn(stack, xs, mask, *, act, dense=None, coef=None,
                     implementation="pallas", cfg: BatchDispatch | None = None,
                     interpret=None):
    """stack: {"gate","up","down"} [m, d] or stacked [L, m, d] with "layer"; xs [N, d];
    mask [N, m] bool (each token's kept neurons); dense / coef as ``sparse_ffn`` (M: "up"
    with u, CATS: "gate" with act(g), D: None). cfg None: ``DEFAULT_DISPATCH`` (read at
    call time). Returns (y [N, d], kept count [N])."""
    cfg = DEFAULT_DISPATCH if cfg is None else cfg
    n, m = mask.shape
    if n > MAX_TOKENS:
        raise ValueError(f"batch_sparse_ffn: at most MAX_TOKENS = {MAX_TOKENS} tokens (the "
                         f"kernels unroll them), got {n}")
    layer = stack.get("layer")
    weights = (stack["gate"], stack["up"], stack["down"])
    kw = dict(act=act, dense=dense, implementation=implementation, interpret=interpret,
              layer=layer)

    def union(xs, mask, coef):
        if cfg.union_impl == "gemv":
            return union_gemv(stack, xs, mask, act=act, dense=dense, coef=coef,
                              configs=cfg.gemv_configs, interpret=interpret)
        cw = mask.astype(jnp.float32) if dense is None else jnp.where(mask, coef, 0)
        lst = (None, None)
        if cfg.union_list:
            idx, cnt = index_list(jnp.any(mask, axis=0)[None], m)
            lst = idx[0], cnt[0]
        return sparse_ffn_api.union_sparse_ffn(xs, *weights, *lst, cw, **kw)

    def rows(xs, mask, coef):
        idx, cnt = index_list(mask, m)
        return sparse_ffn_api.sparse_ffn(xs, *weights, idx, cnt, coef=coef, **kw)

    def dense_masked(xs, mask, coef):       # as ffn._masked: s in x's dtype, mask, down
        mlp = layer_weights(stack)
        g = coef if dense == "gate" else project(xs, mlp["gate"])
        u = coef if dense == "up" else project(xs, mlp["up"])
        s = (g if dense == "gate" else activation(act)(g)) * u
        return down_sum(jnp.where(mask, s, jnp.zeros_like(s)), mlp["down"]).astype(xs.dtype)

    fns = {"union": union, "rows": rows, "dense": dense_masked}
    coef = jnp.zeros((n, 1), xs.dtype) if coef is None else coef     # switch operands: arrays
    if cfg.force is not None:
        y = fns[cfg.force](xs, mask, coef if dense is not None else None)
    else:
        branches = [lambda xs, mask, c, f=f: f(xs, mask, c if dense is not None else None)
                    for f in (fns[b] for b in BRANCHES)]
        y = jax.lax.switch(branch_index(cfg, mask), branches, xs, mask, coef)
    return y, count_kept(mask)


def union_gemv(stack, xs, mask, *, act, dense=None, coef=None, configs=(None, None),
               interpret=None):
    """The union of the tokens' kept neurons read once by the GEMV kernel: the gate / up
    rows it holds as output columns of W [m, d] (transposed), each token's s masked to its
    own kept set, then the W_down rows it holds as inputs of W [m, d]; rows outside the
    union are predicated off (``gemv``'s ``live``). stack, mask, dense and coef as
    ``batch_sparse_ffn``. Returns y [N, d] in xs.dtype."""
    live = jnp.any(mask, axis=0)
    kw = dict(layer=stack.get("layer"), implementation="pallas", interpret=interpret,
              live=live)
    gate_cfg, down_cfg = configs

    def rows(name):          # [N, m] float32: the union's dot products, 0 elsewhere
        return gemv(xs, stack[name], transposed=True, config=gate_cfg,
                    out_dtype=jnp.float32, **kw)
    g = coef if dense == "gate" else rows("gate")
    u = coef if dense == "up" else rows("up")
    s = (g if dense == "gate" else activation(act)(g)) * u
    s = jnp.where(mask, s, 0).astype(xs.dtype)
    return gemv(s, stack["down"], config=down_cfg, **kw)
