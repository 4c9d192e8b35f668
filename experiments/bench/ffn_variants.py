"""Kernel variants the FFN benchmark times (label -> config), the chosen defaults, and the
scale of a run (real shapes on a GPU, or toy shapes in Pallas interpret mode on a CPU).

Labels name the knobs (the `variant` column of bench_kernels.csv): bnN neurons per
block, bdN / bdsN column chunks, wN warps, bN blocks per program, pN programs, cN kept
rows compacted into tiles of N, sN pipeline stages, `xs-` scores from XLA's dense GEMV
(sparse part in the kernel), `-pf` W_down tiles loaded with the gate/up tiles, bjN listed
neurons per tile (index-list kernel).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from countdown_jax.kernels.fused_sparse_ffn.pallas_gpu import FusedConfig
from countdown_jax.kernels.fused_sparse_ffn.pallas_gpu import default_config as fused_default
from countdown_jax.kernels.sparse_ffn.pallas_gpu import GatherConfig

from .ffn_problem import CATS, D, M
from .shapes import MLP_SHAPES, MLPShape

F, G = FusedConfig, GatherConfig

# fused kernel, scores streamed inside the kernel (for fp32, bd / bds are halved)
TUNE_FUSED = (
    ("bn8-bd1024-w4-b8", F(bn=8, bd=1024, num_warps=4, blocks_per_program=8)),
    ("bn4-bd1024-w4-b16", F(bn=4, bd=1024, num_warps=4, blocks_per_program=16)),
    ("bn16-bd512-w4-b4", F(bn=16, bd=512, num_warps=4, blocks_per_program=4)),
    ("bn8-bd2048-w8-b8", F(bn=8, bd=2048, num_warps=8, blocks_per_program=8)),
    ("bn8-bd1024-w4-b4", F(bn=8, bd=1024, num_warps=4, blocks_per_program=4)),
    ("bn8-bd1024-w4-b8-atomic", F(bn=8, bd=1024, num_warps=4, blocks_per_program=8,
                                  reduce="atomic")),
    ("bn32-bds256-bd1024-w4-b2-c8", F(bn=32, bds=256, bd=1024, num_warps=4,
                                      blocks_per_program=2, compact=8)),
    ("bn64-bds128-bd1024-w4-b1-c8", F(bn=64, bds=128, bd=1024, num_warps=4,
                                      blocks_per_program=1, compact=8)),
    ("bn8-bd1024-w4-b8-s3", F(bn=8, bd=1024, num_warps=4, blocks_per_program=8,
                              num_stages=3)),
)
# sparse-only kernels: XLA's dense GEMV computes u / g / z first
TUNE_XLA_SCORE = (
    ("xs-bn16-bd1024-w4-p264", F(bn=16, bd=1024, num_warps=4, programs=264, score="xla")),
    ("xs-bn8-bd2048-w8-p264", F(bn=8, bd=2048, num_warps=8, programs=264, score="xla")),
    ("xs-bn64-bd1024-w4-p264-c8", F(bn=64, bd=1024, num_warps=4, programs=264, compact=8,
                                    score="xla")),
    ("xs-bn128-bd2048-w8-p132-c16", F(bn=128, bd=2048, num_warps=8, programs=132,
                                      compact=16, score="xla")),
)
# the kept rows' W_down tiles loaded with their gate/up tiles ("-pf")
TUNE_PREFETCH = (
    ("xs-bn64-bd1024-w8-p264-c8-pf", F(bn=64, bd=1024, num_warps=8, programs=264,
                                       compact=8, score="xla", prefetch=True)),
    ("xs-bn64-bd1024-w4-p264-c4-pf", F(bn=64, bd=1024, num_warps=4, programs=264,
                                       compact=4, score="xla", prefetch=True)),
    ("xs-bn32-bd1024-w4-p448-c4-pf", F(bn=32, bd=1024, num_warps=4, programs=448,
                                       compact=4, score="xla", prefetch=True)),
    ("xs-bn64-bd2048-w8-p264-c8-pf", F(bn=64, bd=2048, num_warps=8, programs=264,
                                       compact=8, score="xla", prefetch=True)),
    ("bn64-bds128-bd1024-w8-b1-c8-pf", F(bn=64, bds=128, bd=1024, num_warps=8,
                                         blocks_per_program=1, compact=8, prefetch=True)),
    ("bn64-bds128-bd1024-w4-b1-c4-pf", F(bn=64, bds=128, bd=1024, num_warps=4,
                                         blocks_per_program=1, compact=4, prefetch=True)),
)
# index-list kernel (one list per token)
TUNE_GATHER = (
    ("bj8-bd1024-w4-p132", G(bj=8, bd=1024, num_warps=4, programs=132)),
    ("bj16-bd512-w4-p132", G(bj=16, bd=512, num_warps=4, programs=132)),
    ("bj8-bd1024-w4-p264", G(bj=8, bd=1024, num_warps=4, programs=264)),
    ("bj4-bd1024-w4-p264-atomic", G(bj=4, bd=1024, num_warps=4, programs=264,
                                    reduce="atomic")),
    ("bj8-bd1024-w8-p264-pf", G(bj=8, bd=1024, num_warps=8, programs=264, prefetch=True)),
    ("bj4-bd1024-w4-p264-pf", G(bj=4, bd=1024, num_warps=4, programs=264, prefetch=True)),
)


@dataclasses.dataclass(frozen=True)
class Scale:
    """What one run uses: shapes, predictor rank, Pallas interpret mode, the HBM ceiling's
    array size, and the in-kernel-scoring and index-list variants it may sweep."""
    shapes: dict = dataclasses.field(default_factory=lambda: dict(MLP_SHAPES))
    rank: int = 512
    interpret: bool = False
    ceiling_elems: int = 1 << 29          # 2 GiB of float32
    tune_fused: tuple = TUNE_FUSED
    tune_gather: tuple = TUNE_GATHER

    @property
    def fused(self) -> dict:
        """Every fused-kernel variant by label."""
        return dict(self.tune_fused + TUNE_XLA_SCORE + TUNE_PREFETCH)

    @property
    def gather(self) -> dict:
        return dict(self.tune_gather)


GPU = Scale()
# --smoke: two toy shapes, rank 16, interpret mode, a few variants of each kind
SMOKE = Scale(shapes={k: MLPShape(64, 96, MLP_SHAPES[k].act)
                      for k in ("llama-3.1-8b", "gemma-2-9b")},
              rank=16, interpret=True, ceiling_elems=1 << 20,
              tune_fused=TUNE_FUSED[:2] + TUNE_FUSED[6:7],
              tune_gather=TUNE_GATHER[:1] + TUNE_GATHER[-1:])


def for_dtype(cfg, dtype):
    """fp32 rows hold half the elements per 16-byte vector: halve the column chunk."""
    if dtype == jnp.float32 and cfg.bd > 256:
        return dataclasses.replace(cfg, bd=cfg.bd // 2,
                                   **({"bds": cfg.bds // 2} if getattr(cfg, "bds", None) else {}))
    return cfg


def chosen() -> dict:
    """method -> label of the kernels' shipped default config (bf16), found in the tables."""
    labels = {cfg: label for label, cfg in TUNE_FUSED + TUNE_XLA_SCORE + TUNE_PREFETCH}
    return {method: labels[fused_default(jnp.bfloat16, method)] for method in (M, CATS, D)}


def probe_variants() -> dict:
    """method -> {label: config}: one knob of the chosen kernels changed at a time:
    software pipelining (num_stages), smaller compaction tiles (fewer registers held per
    round trip), several blocks per program (programs out of lock-step), narrower column
    chunks, larger blocks on fewer programs."""
    replace = dataclasses.replace
    m0 = fused_default(jnp.bfloat16, M)
    d0 = fused_default(jnp.bfloat16, D)
    return {
        M: {"xs-bn64-bd1024-w4-p264-c4-pf-s2": replace(m0, num_stages=2),
            "xs-bn64-bd1024-w4-p264-c4-pf-s3": replace(m0, num_stages=3),
            "xs-bn64-bd1024-w4-p264-c2-pf": replace(m0, compact=2),
            "xs-bn64-bd512-w4-p264-c4-pf": replace(m0, bd=512),
            "xs-bn16-bd1024-w4-p264-c4-pf": replace(m0, bn=16),
            "xs-bn128-bd1024-w8-p132-c8-pf": replace(m0, bn=128, num_warps=8, programs=132,
                                                     compact=8)},
        D: {"xs-bn32-bd1024-w4-p448-c4-pf-s2": replace(d0, num_stages=2),
            "xs-bn32-bd1024-w4-p448-c4-pf-s3": replace(d0, num_stages=3),
            "xs-bn32-bd1024-w4-p448-c2-pf": replace(d0, compact=2),
            "xs-bn16-bd1024-w4-p448-c4-pf": replace(d0, bn=16)},
    }


def floor_variants() -> dict:
    """method -> {label: config}, the shipped kernel first ("old"), then the fixed-overhead
    variants: the cross-program sum as float32 atomics (no [programs, N, d] partial sums
    written and re-read: 4.3 MB at Llama-8B, the reduce op in the stage profile) into one
    slot (-at) or four (-ag4, a quarter of the programs per address); for D also the
    predictor's z = hU^T computed inside the kernel from U's rows (no z GEMV launch, no
    [m] scores round trip; bds256: U rows in 256-column chunks) and 8 warps (half the
    registers per thread for D's three prefetched tiles)."""
    replace = dataclasses.replace
    out = {}
    for method in (M, CATS, D):
        c0 = fused_default(jnp.bfloat16, method)
        base = chosen()[method]
        out[method] = {base: c0,
                       base + "-at": replace(c0, reduce="atomic"),
                       base + "-ag4": replace(c0, reduce="atomic", atomic_groups=4)}
    d0 = fused_default(jnp.bfloat16, D)
    out[D].update({"bn32-bds256-bd1024-w4-p448-c4-pf": replace(d0, score="kernel", bds=256),
                     "xs-bn32-bd1024-w8-p448-c4-pf": replace(d0, num_warps=8)})
    return out
