"""Pallas (Triton lowering) GPU kernel: |act(x Gq^T) * (x Uq^T)| from the PACKED proxy codes.

The proxy (countdown_jax/proxy.py) is read as stored: uint8 codes, ``8 / bits`` per byte
(lowest bits first), and one bfloat16 scale per ``group`` inputs of a row. Nothing is
dequantized in memory, so a call reads 2 m d (bits + 16 / group) / 8 bytes.

Grid: (blocks of ``bm`` neurons, blocks of ``tokens`` tokens). A program walks its rows'
bytes in tiles of [bm, bc] for gate and up together, ``prefetch`` tiles ahead (their loads
are in flight while the current tile is computed), and keeps one float32 dot per row, token
and matrix. Ragged m re-reads row m-1 (never stored); ragged bytes are masked.

Unpacking without integer->float conversions (quarter rate on GPUs): code c, moved to the
top ``bits`` of a float32 mantissa and OR-ed into the bits of 1.0, is the float
v = 1 + c / 2^bits (a shift and a mask per code). With c - 2^(bits-1) = 2^bits (v - 1.5):

    sum_k (c_k - off) x_k = 2^bits (sum_k v_k x_k - 1.5 sum_k x_k)

per scale group, so a code costs a shift, a logic op and an FMA; the 1.5 sum x term is one
reduction of x per tile. A tile of bc bytes holds G = bc / gb whole groups (gb = bytes per
group; the dots are reduced per group, then scaled), or lies inside one group (bc divides
gb). A byte must not straddle two groups: group * bits a multiple of 8.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from countdown_jax.gated import activation

__all__ = ["ProxyConfig", "default_config", "proxy_scores_pallas_gpu", "tile_layout"]

ONE = 0x3F800000          # float32 1.0: sign 0, exponent 127, mantissa 0


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    bm: int = 32            # neurons (rows of gate and of up) per program (power of two)
    bc: int = 128           # packed bytes per row per tile (power of two)
    tokens: int = 8         # tokens per program (more tokens: a second grid axis)
    prefetch: int = 1       # tiles whose loads are issued ahead of the one computed
    num_warps: int = 4
    num_stages: int = 1
    poison: bool = False    # checks: the output starts as NaN (every element must be written)

    def __post_init__(self):
        for name in ("bm", "bc"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"ProxyConfig.{name} must be a power of two, got {v}")
        if self.tokens < 1 or self.prefetch < 0:
            raise ValueError(f"ProxyConfig needs tokens >= 1 and prefetch >= 0, got "
                             f"{self.tokens} and {self.prefetch}")


def default_config(m: int) -> ProxyConfig:
    """Enough programs to fill an H100/H200 (>= ~2 per SM: 14336 neurons -> 32 per
    program, 1536-2048 -> 8) and tiles of up to 128 bytes per row (16-byte vectors, 8 per
    row). Not yet tuned: experiments/bench ``--plan proxy`` times variants."""
    return ProxyConfig(bm=32 if m >= 32 * 264 else 16 if m >= 16 * 264 else 8)


def tile_layout(nb: int, bits: int, group: int, bc: int) -> tuple[int, int, int]:
    """(bc, G, gb): bytes per tile (at most the row's, rounded to a power of two), scale
    groups per tile (1: the tile lies inside one group) and bytes per group."""
    if group * bits % 8:
        raise ValueError(f"proxy_scores: the Pallas kernel needs whole bytes per scale group "
                         f"(group * bits a multiple of 8), got bits={bits} group={group}; "
                         "use implementation='xla'")
    gb = group * bits // 8
    bc = min(bc, pl.next_power_of_2(nb))
    if bc % gb == 0:
        return bc, bc // gb, gb
    bc = math.gcd(bc, gb)                 # a power of two dividing gb
    return bc, 1, gb


def _kernel(*refs, act, m, d, n_tok, tb, bits, bc, G, gb, ntile, cfg: ProxyConfig):
    x_ref, p_ref, s_ref, offp_ref, offs_ref = refs[:5]
    out_ref = refs[-1]        # (after the poisoned buffer handed in, when cfg.poison)
    bm, per = cfg.bm, 8 // bits
    nb, ng = d * bits // 8, d * bits // 8 // gb
    rows = pl.program_id(0) * bm + jnp.arange(bm, dtype=jnp.int32)
    rl = jnp.minimum(rows, m - 1)         # ragged last block: re-read row m-1, never stored
    prow = (offp_ref[0] + rl, offp_ref[0] + m + rl)          # gate, up rows of this layer
    srow = (offs_ref[0] + rl, offs_ref[0] + m + rl)
    ragged = nb % bc != 0
    toks = [jnp.minimum(pl.program_id(1) * tb + t, n_tok - 1) for t in range(tb)]
    ar = jnp.arange(bc, dtype=jnp.int32)
    f = activation(act)
    top = (2 ** bits - 1) << (23 - bits)      # the top ``bits`` of a float32 mantissa

    def rows_at(ref, rows, cols, limit):
        """ref[r, cols] for each row set r (gate, up); in a ragged last tile the columns
        at or past ``limit`` read 0."""
        if not ragged:
            return [ref[r[:, None], cols[None, :]] for r in rows]
        mask = jnp.broadcast_to((cols < limit)[None, :], (bm, cols.shape[0]))
        return [plt.load(ref.at[r[:, None], cols[None, :]], mask=mask, other=0) for r in rows]

    def load(k):
        """Tile k's codes [bm, bc] uint8 and scales ([bm] or [bm, G]) of gate and up; k
        past the end re-reads the last tile (in bounds, already cached)."""
        k = jnp.minimum(k, ntile - 1)
        codes = rows_at(p_ref, prow, k * bc + ar, nb)
        if G == 1:
            scales = [s_ref[r, (k * bc) // gb] for r in srow]
        else:
            scales = rows_at(s_ref, srow, k * G + jnp.arange(G, dtype=jnp.int32), ng)
        return (*codes, *scales)

    def compute(k, tile, accs):
        cols = k * bc + ar
        xs, xsum = [], []              # per token: x at inputs cols*per + j, sum per group
        for tok in toks:
            xt = []
            for j in range(per):
                xc = cols * per + j
                v = (plt.load(x_ref.at[tok, xc], mask=xc < d, other=0) if ragged
                     else x_ref[tok, xc])
                xt.append(v.astype(jnp.float32))
            tot = functools.reduce(jnp.add, xt)
            xs.append(xt)
            xsum.append(jnp.sum(tot) if G == 1 else jnp.sum(tot.reshape(G, gb), axis=1))
        out = []
        for mat in range(2):
            w = tile[mat].astype(jnp.uint32)
            sc = tile[2 + mat].astype(jnp.float32)

            def code(j):      # bits [j*bits, (j+1)*bits) -> mantissa top: 1 + c / 2^bits
                return jax.lax.bitcast_convert_type(
                    ((w << (23 - bits * (j + 1))) & top) | ONE, jnp.float32)

            # what stays live in registers: every code tile (reused by each token, whose
            # sum is reduced before the next token's), or every token's running sum
            # (each code tile used once) - the fewer
            if per <= tb:
                v = [code(j) for j in range(per)]
                ps = (functools.reduce(jnp.add, [v[j] * xs[t][j][None, :] for j in range(per)])
                      for t in range(tb))       # lazily: traced where it is reduced
            else:
                ps = [None] * tb
                for j in range(per):
                    v = code(j)
                    ps = [v * xs[t][j][None, :] if j == 0 else ps[t] + v * xs[t][j][None, :]
                          for t in range(tb)]
            new = []
            for t, p in enumerate(ps):
                if G == 1:
                    dot = (jnp.sum(p, axis=1) - 1.5 * xsum[t]) * sc
                else:
                    dot = jnp.sum((jnp.sum(p.reshape(bm, G, gb), axis=2)
                                   - 1.5 * xsum[t][None, :]) * sc, axis=1)
                new.append(accs[mat][t] + dot)
            out.append(new)
        return out

    depth = cfg.prefetch
    zero = [[jnp.zeros((bm,), jnp.float32) for _ in range(tb)] for _ in range(2)]

    def body(k, carry):
        accs, pending = carry
        if depth:
            tile, pending = pending[0], (*pending[1:], load(k + depth))
        else:
            tile = load(k)
        return compute(k, tile, accs), pending

    pending = tuple(load(jnp.int32(q)) for q in range(depth))
    accs, _ = jax.lax.fori_loop(0, ntile, body, (zero, pending))
    unit = float(2 ** bits)
    for t, tok in enumerate(toks):
        val = jnp.abs(f(accs[0][t] * unit) * (accs[1][t] * unit))
        ok = rows < m
        if n_tok % tb:
            ok = ok & (pl.program_id(1) * tb + t < n_tok)
        if m % bm or n_tok % tb:
            plt.store(out_ref.at[tok, rows], val, mask=ok)
        else:
            out_ref[tok, rows] = val


def proxy_scores_pallas_gpu(x, packed, scale, *, act, bits: int, group: int,
                            config: ProxyConfig | None = None, interpret: bool = False,
                            packed_offset=0, scale_offset=0, m=None):
    """x [T, d]; packed uint8 [R, d*bits/8] and scale [R', d/group]: gate row i of the layer
    is row ``offset + i``, up row ``offset + m + i`` (one layer: [2m, ...], offset 0; a
    flattened stack: offset 2ml). Returns float32 [T, m]."""
    n_tok, d = x.shape
    nb = packed.shape[1]
    m = packed.shape[0] // 2 if m is None else m
    cfg = config or default_config(m)
    bc, G, gb = tile_layout(nb, bits, group, cfg.bc)
    tb = min(cfg.tokens, n_tok)
    ntile = -(-nb // bc)
    kern = functools.partial(_kernel, act=act, m=m, d=d, n_tok=n_tok, tb=tb, bits=bits,
                             bc=bc, G=G, gb=gb, ntile=ntile, cfg=cfg)
    offs = [jnp.reshape(jnp.asarray(o, jnp.int32), (1,)) for o in (packed_offset, scale_offset)]
    args = (x, packed, scale, *offs)
    out_shape = jax.ShapeDtypeStruct((n_tok, m), jnp.float32)
    init, aliases = [], {}
    if cfg.poison:
        aliases[len(args)] = 0
        init.append(jnp.full((n_tok, m), jnp.nan, jnp.float32))
    return pl.pallas_call(
        kern, grid=(-(-m // cfg.bm), -(-n_tok // tb)), out_shape=out_shape,
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps,
                                           num_stages=cfg.num_stages),
        interpret=interpret, input_output_aliases=aliases,
        name=f"proxy_scores_b{bits}")(*args, *init)
