"""Pallas (Triton lowering) GPU kernel for the gathered sparse FFN with an index list.

One fused kernel per call: for each tile of ``bj`` listed neurons it gathers their gate /
up rows, forms s = act(g) * u, gathers their down rows and accumulates s * down into a
float32 accumulator held in registers, chunked along d. Programs take tiles round-robin
(tile t goes to program t mod P), so work is balanced for any ``count`` and one compile
serves every sparsity: only ``count`` (a traced scalar per token) changes.

Per-token lists (batch N > 1 = N independent lists, grid axis 0). Cross-program
reduction: ``reduce="partial"`` writes per-program partial sums [N, P, d] that one XLA
reduce sums, ``reduce="atomic"`` adds them into a zeroed float32 output with atomics.

The cascade (``s_tau``): the listed neurons are the candidates; once their s is formed
from the gate/up rows, W_down rows are read only where |s| > s_tau (a predicated load:
the others move no bytes), so no prefetch; per-program kept counts are a second output.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from countdown_jax.gated import activation
from countdown_jax.kernels import _triton_tiles as tt


@dataclasses.dataclass(frozen=True)
class GatherConfig:
    bj: int = 8             # listed neurons per tile (power of two)
    bd: int = 1024          # column chunk (power of two)
    programs: int = 264     # programs per token (tiles are dealt round-robin)
    num_warps: int = 4
    num_stages: int = 1
    reduce: str = "partial"  # "partial" | "atomic"
    poison: bool = False     # checks: partial sums start as NaN (must all be overwritten)
    prefetch: bool = False   # W_down loads issued with the gate/up loads (_triton_tiles)

    def __post_init__(self):
        for name in ("bj", "bd"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"GatherConfig.{name} must be a power of two, got {v}")
        if self.reduce not in ("partial", "atomic"):
            raise ValueError(f"GatherConfig.reduce must be 'partial' or 'atomic', got {self.reduce!r}")


def default_config(dtype) -> GatherConfig:
    """Fastest variant measured on an H100 (experiments/KERNEL_NOTES.md); float32 rows hold
    half the elements per 16-byte vector, so half the column chunk."""
    return GatherConfig(bd=1024 if jnp.dtype(dtype).itemsize <= 2 else 512)


def _kernel(*refs, act, dense, m, d, cap, cfg: GatherConfig, cascade: bool):
    # inputs, [output buffers handed in (aliased)], outputs (y, and kept counts: cascade)
    x_ref, wg_ref, wu_ref, wd_ref, idx_ref, cnt_ref, coef_ref, off_ref, stau_ref = refs[:9]
    out_ref, kept_ref = refs[-2:] if cascade else (refs[-1], None)
    n = pl.program_id(0)
    p = pl.program_id(1)
    P = cfg.programs
    bj, bd = cfg.bj, cfg.bd
    ch = tt.chunks(d, bd)
    f = activation(act)

    cnt = jnp.clip(cnt_ref[n], 0, cap)
    off = off_ref[0]          # first weight row of this layer (0, or l*m in a flat stack)
    ntiles = (cnt + bj - 1) // bj
    iters = jnp.maximum(ntiles - p + P - 1, 0) // P
    xs = [[tt.load_vec(x_ref, (n,), c0, bd, d) for c0, _ in ch]]

    def body(i, carry):
        acc, kept = carry
        slot = (p + i * P) * bj + jnp.arange(bj, dtype=jnp.int32)
        live = slot < cnt
        rows = plt.load(idx_ref.at[n, slot], mask=live, other=0)
        ok = live & (rows >= 0) & (rows < m)    # never read outside the layer's rows
        wrows = rows + off
        first = {"up": (wg_ref,), "gate": (wu_ref,)}.get(dense, (wg_ref, wu_ref))
        dots, down = tt.kept_row_dots(first, wd_ref, wrows, ok, xs, bd, d, cfg.prefetch)
        if dense == "up":
            s = f(dots[0][0]) * plt.load(coef_ref.at[n, rows], mask=ok, other=0).astype(jnp.float32)
        elif dense == "gate":
            s = plt.load(coef_ref.at[n, rows], mask=ok, other=0).astype(jnp.float32) * dots[0][0]
        else:
            s = f(dots[0][0]) * dots[1][0]
        if cascade:     # second stage: W_down rows of |s| > s_tau only
            ok = ok & (jnp.abs(s) > stau_ref[n])
            kept = kept + jnp.sum(ok.astype(jnp.int32))
        s = jnp.where(ok, s, 0.0)
        return tt.accumulate_kept([acc], wd_ref, down, wrows, ok, [s], bd, d)[0], kept

    acc0 = [jnp.zeros((bd,), jnp.float32) for _ in ch]
    acc, kept = jax.lax.fori_loop(0, iters, body, (acc0, jnp.int32(0)))
    if cascade:
        kept_ref[n, p] = kept
    for (c0, _), a in zip(ch, acc):
        if cfg.reduce == "partial":
            tt.store_vec(out_ref, (n, p), c0, bd, d, a)
        else:   # output padded to a multiple of bd: no mask needed
            plt.atomic_add(out_ref, (n, tt.col_index(c0, bd)), a)


def sparse_ffn_pallas_gpu(x, mlp, idx, count, *, act, dense=None, coef=None,
                          config: GatherConfig | None = None, interpret: bool = False,
                          row_offset=0, m=None, s_tau=None):
    """Weights {"gate", "up", "down"} [R, d]; neuron i is row ``row_offset + i`` (see the
    reference). s_tau [N] float32 (the cascade, dense=None): returns (y, kept [N] int32)."""
    cfg = config or default_config(mlp["down"].dtype)
    n, d = x.shape
    cascade = s_tau is not None
    if cascade and (dense is not None or cfg.prefetch):
        raise ValueError("s_tau (the cascade) needs dense=None and GatherConfig(prefetch="
                         "False): W_down rows are read only after s is known")
    m = mlp["down"].shape[0] if m is None else m
    cap = idx.shape[1]
    if coef is None:
        coef = jnp.zeros((n, 1), jnp.float32)      # unused placeholder operand
    kern = functools.partial(_kernel, act=act, dense=dense, m=m, d=d, cap=cap, cfg=cfg,
                             cascade=cascade)
    params = plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    args = (x, mlp["gate"], mlp["up"], mlp["down"], idx.astype(jnp.int32), count.astype(jnp.int32),
            coef.astype(jnp.float32), jnp.reshape(jnp.asarray(row_offset, jnp.int32), (1,)),
            (jnp.zeros((n,)) if s_tau is None else s_tau).astype(jnp.float32))
    dp = -(-d // cfg.bd) * cfg.bd
    shape = (n, cfg.programs, d) if cfg.reduce == "partial" else (n, dp)
    out_shape = [jax.ShapeDtypeStruct(shape, jnp.float32)]
    init, aliases = [], {}
    if cfg.reduce == "atomic" or cfg.poison:   # output handed in: zeros for atomics, or poison
        aliases[len(args)] = 0
        init.append(jnp.full(shape, 0.0 if cfg.reduce == "atomic" else jnp.nan, jnp.float32))
    if cascade:
        out_shape.append(jax.ShapeDtypeStruct((n, cfg.programs), jnp.int32))
        if cfg.poison:
            aliases[len(args) + len(init)] = 1
            init.append(jnp.full((n, cfg.programs), jnp.iinfo(jnp.int32).min, jnp.int32))
    out = pl.pallas_call(
        kern, grid=(n, cfg.programs), compiler_params=params, interpret=interpret,
        out_shape=tuple(out_shape), input_output_aliases=aliases,
        name=f"sparse_ffn_gather_{cfg.reduce}")(*args, *init)
    y = jnp.sum(out[0], axis=1) if cfg.reduce == "partial" else out[0][:, :d]
    if cascade:
        return y.astype(x.dtype), jnp.sum(out[1], axis=1)
    return y.astype(x.dtype)
