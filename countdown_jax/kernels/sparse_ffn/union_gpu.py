"""Pallas (Triton lowering) GPU kernels for a batch's union of kept neurons.

A decode batch of N tokens keeps a different set of neurons per token. Per-token index
lists (``pallas_gpu``) read a row shared by several tokens once per token; the fused
kernel reads the union once but unrolls every token's float32 accumulator [d] in
registers (N x d floats per program: spills at N = 4, 8). Here the union is read once
and nothing of size N x d is held, by splitting the FFN in two launches:

  1. coefficients: programs take tiles of ``bj`` union rows round-robin, read their gate
     (and/or up) rows once, dot them with every token and write s [N, C] (slot order of
     the union list), s = act(g) * u * w with w [N, m] the per-token weight of each
     neuron: the masked dense coefficient (M: u, CATS: act(g), 0 where the token did not
     keep it) or the mask itself (D: 1 / 0). Rows a token did not keep get s = 0.
  2. down: the grid is (column chunk of ``bd_down``, row group); each program walks its
     tiles of union rows, reads the W_down rows' chunk once and adds s[b] * row to N
     float32 accumulators of ``bd_down`` columns.

The union list is the XLA compaction of any(keep) ([C] slots, ``count`` valid). Without
a list (idx None) slot i is neuron i and a row is read only where some token's weight
(kernel 1) or coefficient (kernel 2) is nonzero, with predicated loads (masked-off rows
move no bytes): no XLA compaction, at the cost of tiles that carry fewer useful rows.
A row skipped because its s is 0 for every token would add 0: the result is the same.
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
class UnionConfig:
    bj: int = 8              # union rows per tile, coefficient kernel (power of two)
    bd: int = 1024           # column chunk of the coefficient kernel (power of two)
    programs: int = 264      # coefficient kernel's programs
    bj_down: int = 16        # union rows per tile, down kernel (power of two)
    bd_down: int = 512       # columns per down program (power of two)
    programs_down: int = 33  # down kernel's row groups per column chunk
    num_warps: int = 4
    x_regs: int = 8192       # coefficient kernel: keep x in registers while N*d <= this
    poison: bool = False     # checks: s and the partial sums start as NaN

    def __post_init__(self):
        for name in ("bj", "bd", "bj_down", "bd_down"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"UnionConfig.{name} must be a power of two, got {v}")


def default_config(dtype) -> UnionConfig:
    """Not yet timed (KERNEL_NOTES.md); float32 rows: half the column chunks."""
    if jnp.dtype(dtype).itemsize > 2:
        return UnionConfig(bd=512, bd_down=256)
    return UnionConfig()


def _slots(p, i, P, bj, cnt):
    slot = (p + i * P) * bj + jnp.arange(bj, dtype=jnp.int32)
    return slot, slot < cnt


def _rows(idx_ref, slot, live, m, weights):
    """(neuron ids, which to read) of a tile: from the union list, or (no list) slot i is
    neuron i, read where any token's ``weights`` [bj] is nonzero."""
    if idx_ref is None:
        ok = live & _any([w != 0 for w in weights(slot, live)])
        return slot, ok
    rows = plt.load(idx_ref.at[slot], mask=live, other=0)
    return rows, live & (rows >= 0) & (rows < m)     # never read outside the layer's rows


def _any(masks):
    out = masks[0]
    for k in masks[1:]:
        out = out | k
    return out


def _coef_kernel(x_ref, wg_ref, wu_ref, idx_ref, cnt_ref, cw_ref, off_ref, *rest, act, dense,
                 m, d, nb, cap, listed, cfg: UnionConfig):
    s_ref = rest[-1]
    idx_ref = idx_ref if listed else None
    p, P, bj, bd = pl.program_id(0), cfg.programs, cfg.bj, cfg.bd
    f = activation(act)
    cnt = jnp.clip(cnt_ref[0], 0, cap)
    iters = jnp.maximum((cnt + bj - 1) // bj - p + P - 1, 0) // P
    first = {"up": (wg_ref,), "gate": (wu_ref,)}.get(dense, (wg_ref, wu_ref))
    ch = tt.chunks(d, bd)
    # x held in registers only while small; else re-read per chunk (L1/L2 hits), so N
    # tokens x d floats never sit in registers (the fused kernel's spill at N = 4, 8)
    held = nb * d <= cfg.x_regs
    xs0 = [[tt.load_vec(x_ref, (b,), c0, bd, d) for c0, _ in ch] for b in range(nb)] \
        if held else None

    def body(i, carry):
        slot, live = _slots(p, i, P, bj, cnt)
        rows, ok = _rows(idx_ref, slot, live, m, lambda r, v: [
            plt.load(cw_ref.at[b, r], mask=v, other=0) for b in range(nb)])
        wrows = rows + off_ref[0]
        dots = [[jnp.zeros((bj,), jnp.float32) for _ in range(nb)] for _ in first]
        for ci, (c0, _) in enumerate(ch):          # one column chunk of the rows at a time
            xc = [xs0[b][ci] if held else tt.load_vec(x_ref, (b,), c0, bd, d)
                  for b in range(nb)]
            for k, w in enumerate(first):
                t = tt.load_tile(w, wrows, ok, c0, bd, d)
                dots[k] = [a + jnp.sum(t * xc[b][None, :], axis=1)
                           for b, a in enumerate(dots[k])]
        for b in range(nb):
            w = plt.load(cw_ref.at[b, rows], mask=ok, other=0).astype(jnp.float32)
            if dense == "up":
                s = f(dots[0][b]) * w
            elif dense == "gate":
                s = w * dots[0][b]
            else:
                s = f(dots[0][b]) * dots[1][b] * w
            plt.store(s_ref.at[b, slot], jnp.where(ok, s, 0.0), mask=live)
        return carry

    jax.lax.fori_loop(0, iters, body, jnp.int32(0))


def _down_kernel(idx_ref, cnt_ref, s_ref, wd_ref, off_ref, *rest, m, d, nb, cap, listed,
                 cfg: UnionConfig):
    out_ref = rest[-1]
    idx_ref = idx_ref if listed else None
    j, p, P, bj, bd = (pl.program_id(0), pl.program_id(1), cfg.programs_down, cfg.bj_down,
                       cfg.bd_down)
    cols = j * bd + jnp.arange(bd, dtype=jnp.int32)
    col_ok = cols < d
    cnt = jnp.clip(cnt_ref[0], 0, cap)
    iters = jnp.maximum((cnt + bj - 1) // bj - p + P - 1, 0) // P

    def body(i, acc):
        slot, live = _slots(p, i, P, bj, cnt)
        rows, ok = _rows(idx_ref, slot, live, m, lambda r, v: [
            plt.load(s_ref.at[b, r], mask=v, other=0.0) for b in range(nb)])
        t = plt.load(wd_ref.at[(rows + off_ref[0])[:, None], cols[None, :]],
                     mask=ok[:, None] & col_ok[None, :], other=0).astype(jnp.float32)
        out = []
        for b, a in enumerate(acc):
            s = plt.load(s_ref.at[b, slot], mask=ok, other=0.0)
            out.append(a + jnp.sum(jnp.where(ok, s, 0.0)[:, None] * t, axis=0))
        return out

    acc = jax.lax.fori_loop(0, iters, body, [jnp.zeros((bd,), jnp.float32) for _ in range(nb)])
    for b in range(nb):
        plt.store(out_ref.at[p, b, cols], acc[b], mask=col_ok)


def union_ffn_pallas_gpu(x, w_gate, w_up, w_down, idx, count, cw, *, act, dense=None,
                         config: UnionConfig | None = None, interpret: bool = False,
                         row_offset=0, m=None):
    """x [N, d]; weights [R, d] (neuron i is row ``row_offset + i``); idx [C] int32 (the
    union list, entries past count ignored) and count [] int32, or both None (no list:
    see the module docstring); cw [N, m] float32 (see the module docstring). Returns
    y [N, d] in x.dtype."""
    cfg = config or default_config(w_down.dtype)
    nb, d = x.shape
    m = w_down.shape[0] if m is None else m
    params = plt.CompilerParams(num_warps=cfg.num_warps, num_stages=1)
    off = jnp.reshape(jnp.asarray(row_offset, jnp.int32), (1,))
    listed = idx is not None
    if not listed:                       # slot i = neuron i; a placeholder list operand
        cap, cnt, idx = m, jnp.full((1,), m, jnp.int32), jnp.zeros((1,), jnp.int32)
    else:
        cap, cnt = idx.shape[0], jnp.reshape(count.astype(jnp.int32), (1,))
        idx = idx.astype(jnp.int32)

    def call(kern, grid, args, shape, name):
        init, aliases = [], {}
        if cfg.poison:        # outputs handed in as NaN: every read element must be written
            aliases[len(args)] = 0
            init.append(jnp.full(shape, jnp.nan, jnp.float32))
        return pl.pallas_call(kern, grid=grid, compiler_params=params, interpret=interpret,
                              out_shape=jax.ShapeDtypeStruct(shape, jnp.float32),
                              input_output_aliases=aliases, name=name)(*args, *init)

    s = call(functools.partial(_coef_kernel, act=act, dense=dense, m=m, d=d, nb=nb, cap=cap,
                               listed=listed, cfg=cfg), (cfg.programs,),
             (x, w_gate, w_up, idx, cnt, cw.astype(jnp.float32), off), (nb, cap),
             "union_ffn_coef")
    J = -(-d // cfg.bd_down)
    part = call(functools.partial(_down_kernel, m=m, d=d, nb=nb, cap=cap, listed=listed,
                                  cfg=cfg),
                (J, cfg.programs_down), (idx, cnt, s, w_down, off),
                (cfg.programs_down, nb, d), "union_ffn_down")
    return jnp.sum(part, axis=0).astype(x.dtype)
