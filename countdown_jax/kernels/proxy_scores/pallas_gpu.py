"""Pallas (Triton lowering) GPU kernel: |act(x Gq^T) * (x Uq^T)| from the PACKED proxy codes.

The proxy (countdown_jax/proxy.py) is read as stored: uint8 bytes holding P = 8 / bits
codes from P planes of the row (plane j of byte b: input j * d / P + b), and one bfloat16
scale per ``group`` inputs of a row. Nothing is dequantized in memory, so a call reads
2 m d (bits + 16 / group) / 8 bytes.

Grid: (blocks of ``bm`` neurons, blocks of ``tokens`` tokens). A program walks its rows'
bytes in tiles of [bm, bc] for gate and up together, ``prefetch`` tiles ahead. One byte
tile is P operand tiles (a shift and a mask each), plane j against the contiguous x slice
j * d / P + [k bc, (k + 1) bc). Tiles never straddle a scale group: bc divides the group
(one scale per row and plane) or holds G whole groups ("fma" only).

Two ways to take the dot of a code tile (``ProxyConfig.mode``):
  "fma"  CUDA cores, float32. Code c OR-ed into the top of the mantissa of 1.0 is
         v = 1 + c / 2^bits (no int->float conversion), and per group
         sum (c - 2^(bits-1)) x = 2^bits (sum v x - 1.5 sum x): a shift, a logic op and
         an FMA per code.
  "dot"  tensor cores. Code c OR-ed into the bfloat16 bits of 128 is v = 128 + c, exact;
         the [bm, bc] x [bc, tokens] product accumulates in float32 and per group
         sum (c - 2^(bits-1)) x = sum v x - (128 + 2^(bits-1)) sum x. 2 and 4 bits; tiles
         of >= 16 rows and bytes (tokens are padded to 16 columns). ``asm``: the codes are
         unpacked by inline PTX on 4 bytes at a time, two codes per logic op (prmt
         spreads two bytes over the halves of a word, one lop3 masks a plane and ORs in
         128 for both); compiled GPU only, the interpreter runs the same maths in jnp ops.
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

__all__ = ["MODES", "ProxyConfig", "default_config", "proxy_scores_pallas_gpu", "tile_layout"]

MODES = ("fma", "dot")
ONE = 0x3F800000          # float32 1.0: sign 0, exponent 127, mantissa 0
BF128 = 0x4300            # bfloat16 128.0: its 7 mantissa bits count units
DOT_MIN = 16              # Triton's smallest dot operand dimension


@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    bm: int = 64            # neurons (rows of gate and of up) per program (power of two)
    bc: int = 128           # packed bytes per row per tile (power of two)
    tokens: int = 8         # tokens per program (more tokens: a second grid axis)
    prefetch: int = 0       # tiles whose loads are issued ahead of the one computed
    num_warps: int = 4
    num_stages: int = 1
    mode: str = "dot"       # "fma" (CUDA cores) or "dot" (tensor cores); see module doc
    asm: bool = True        # "dot": unpack by inline PTX (compiled GPU only)
    poison: bool = False    # checks: the output starts as NaN (every element must be written)

    def __post_init__(self):
        for name in ("bm", "bc"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"ProxyConfig.{name} must be a power of two, got {v}")
        if self.tokens < 1 or self.prefetch < 0:
            raise ValueError(f"ProxyConfig needs tokens >= 1 and prefetch >= 0, got "
                             f"{self.tokens} and {self.prefetch}")
        if self.mode not in MODES:
            raise ValueError(f"ProxyConfig.mode must be one of {MODES}, got {self.mode!r}")


def default_config(m: int) -> ProxyConfig:
    """Enough programs to fill an H100/H200 (>= ~1.5 per SM: 14336 neurons -> 64 per
    program; small models 16)."""
    return ProxyConfig(bm=64 if m >= 64 * 200 else 32 if m >= 32 * 200 else 16)


def _pow2_divisor(n: int) -> int:
    return n & -n


def tile_layout(d: int, bits: int, group: int, bc: int, mode: str = "fma") -> tuple[int, int]:
    """(bc, G): bytes per tile and scale groups per tile and plane (1: the tile lies inside
    one group). bc divides the plane's d / P bytes, so no tile is ragged."""
    dp = d * bits // 8
    bc = min(bc, _pow2_divisor(dp))
    if mode == "fma" and bc % group == 0 and dp % group == 0:
        return bc, bc // group
    return min(bc, _pow2_divisor(math.gcd(group, dp))), 1


def _unpack_asm(bits: int, j: int) -> str:
    """PTX: one uint32 of 4 packed bytes -> plane j's 4 bfloat16 128 + code, in 2 words
    (one plane per asm: multi-result asm does not lower in Pallas)."""
    mask = (2 ** bits - 1) * 0x00010001
    lines = ["{", ".reg .b32 z, t0, t1;", "mov.b32 z, 0;",
             "prmt.b32 t0, $2, z, 0x4140;",           # bytes 0, 1 -> the two halves
             "prmt.b32 t1, $2, z, 0x4342;"]           # bytes 2, 3
    if j:
        lines += [f"shr.u32 t0, t0, {j * bits};", f"shr.u32 t1, t1, {j * bits};"]
    lines += [f"lop3.b32 $0, t0, {mask:#010x}, 0x43004300, 0xEA;",       # (a & m) | 128
              f"lop3.b32 $1, t1, {mask:#010x}, 0x43004300, 0xEA;"]
    return "\n".join(lines + ["}"])


def _kernel(*refs, act, m, d, n_tok, tb, bits, bc, G, group, ntile, cfg: ProxyConfig,
            interpret=False):
    x_ref, p_ref, s_ref, offp_ref, offs_ref = refs[:5]
    out_ref = refs[-1]        # (after the poisoned buffer handed in, when cfg.poison)
    bm, per = cfg.bm, 8 // bits
    dp = d // per
    dot_mode = cfg.mode == "dot"
    rows = pl.program_id(0) * bm + jnp.arange(bm, dtype=jnp.int32)
    rl = jnp.minimum(rows, m - 1)         # ragged last block: re-read row m-1, never stored
    prow = (offp_ref[0] + rl, offp_ref[0] + m + rl)          # gate, up rows of this layer
    srow = (offs_ref[0] + rl, offs_ref[0] + m + rl)
    ar = jnp.arange(bc, dtype=jnp.int32)
    f = activation(act)
    mask = 2 ** bits - 1
    tcols = max(DOT_MIN, pl.next_power_of_2(tb)) if dot_mode else tb
    tok_ids = jnp.minimum(pl.program_id(1) * tb + jnp.arange(tcols, dtype=jnp.int32),
                          n_tok - 1)
    toks = [jnp.minimum(pl.program_id(1) * tb + t, n_tok - 1) for t in range(tb)]

    def load(k):
        """Tile k's codes [bm, bc] uint8 of gate and up; k past the end re-reads the
        last tile (in bounds, already cached)."""
        k = jnp.minimum(k, ntile - 1)
        return tuple(p_ref[r[:, None], (k * bc + ar)[None, :]] for r in prow)

    def scales(k, j):
        """Scales of plane j in tile k: [bm] (G = 1) or [bm, G], gate and up."""
        first = (j * dp + k * bc) // group
        if G == 1:
            return [s_ref[r, first].astype(jnp.float32) for r in srow]
        cols = first + jnp.arange(G, dtype=jnp.int32)
        return [s_ref[r[:, None], cols[None, :]].astype(jnp.float32) for r in srow]

    def compute_dot(k, tile, accs):
        unit = float(128 + 2 ** (bits - 1))          # v - (c - offset)
        if cfg.asm and not interpret:
            shape = jax.ShapeDtypeStruct((bm, bc), jnp.bfloat16)
            vs = [[plt.elementwise_inline_asm(
                _unpack_asm(bits, j), args=[w], constraints="=r,=r,r", pack=4,
                result_shape_dtypes=[shape])[0] for j in range(per)] for w in tile]
        else:
            ws = [w.astype(jnp.uint16) for w in tile]
            vs = [[jax.lax.bitcast_convert_type(
                (((w >> (j * bits)) & mask) if j else w & mask) | BF128, jnp.bfloat16)
                for j in range(per)] for w in ws]
        out = list(accs)
        for j in range(per):
            cols = j * dp + k * bc + ar
            xj = x_ref[tok_ids[None, :], cols[:, None]]                # [bc, tcols]
            xsum = jnp.sum(xj.astype(jnp.float32), axis=0)             # [tcols]
            sc = scales(k, j)
            for mat in range(2):
                v = vs[mat][j]
                dot = jnp.dot(v, xj, preferred_element_type=jnp.float32)
                out[mat] = out[mat] + (dot - unit * xsum[None, :]) * sc[mat][:, None]
        return out

    def compute_fma(k, tile, accs):
        top = mask << (23 - bits)             # the top ``bits`` of a float32 mantissa
        ws = [w.astype(jnp.uint32) for w in tile]
        out = [list(a) for a in accs]
        for j in range(per):
            cols = j * dp + k * bc + ar
            xs = [x_ref[tok, cols].astype(jnp.float32) for tok in toks]
            xsum = [jnp.sum(x) if G == 1 else jnp.sum(x.reshape(G, group), axis=1) for x in xs]
            sc = scales(k, j)
            for mat in range(2):
                v = jax.lax.bitcast_convert_type(
                    ((ws[mat] << (23 - bits * (j + 1))) & top) | ONE, jnp.float32)
                for t in range(tb):
                    p = v * xs[t][None, :]
                    if G == 1:
                        dot = (jnp.sum(p, axis=1) - 1.5 * xsum[t]) * sc[mat]
                    else:
                        dot = jnp.sum((jnp.sum(p.reshape(bm, G, group), axis=2)
                                       - 1.5 * xsum[t][None, :]) * sc[mat], axis=1)
                    out[mat][t] = out[mat][t] + dot
        return out

    compute = compute_dot if dot_mode else compute_fma
    depth = cfg.prefetch
    if dot_mode:
        zero = [jnp.zeros((bm, tcols), jnp.float32) for _ in range(2)]
    else:
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
    if dot_mode:
        colid = jnp.arange(tcols, dtype=jnp.int32)[None, :]
        g_up = [[jnp.sum(jnp.where(colid == t, a, 0.0), axis=1) for t in range(tb)]
                for a in accs]
        unit = 1.0
    else:
        g_up, unit = accs, float(2 ** bits)
    for t, tok in enumerate(toks):
        val = jnp.abs(f(g_up[0][t] * unit) * (g_up[1][t] * unit))
        ok = rows < m
        if n_tok % tb:
            ok = ok & (pl.program_id(1) * tb + t < n_tok)
        if m % bm or n_tok % tb:
            plt.store(out_ref.at[tok, rows], val, mask=ok)
        else:
            out_ref[tok, rows] = val


def resolve_config(config: ProxyConfig | None, m: int, d: int, bits: int, group: int,
                   x_dtype=jnp.bfloat16) -> tuple[ProxyConfig, int, int]:
    """The config that runs and its (bc, G): "dot" needs bfloat16 x (its operand type),
    2 or 4 bits and tiles of >= 16 rows and bytes; where it cannot, "fma" runs (the same
    sums on CUDA cores)."""
    cfg = config or default_config(m)
    bc, G = tile_layout(d, bits, group, cfg.bc, cfg.mode)
    if cfg.mode == "dot" and (bits not in (2, 4) or bc < DOT_MIN or cfg.bm < DOT_MIN
                              or jnp.dtype(x_dtype) != jnp.bfloat16):
        cfg = dataclasses.replace(cfg, mode="fma")
        bc, G = tile_layout(d, bits, group, cfg.bc, "fma")
    return cfg, bc, G


def proxy_scores_pallas_gpu(x, packed, scale, *, act, bits: int, group: int,
                            config: ProxyConfig | None = None, interpret: bool = False,
                            packed_offset=0, scale_offset=0, m=None):
    """x [T, d]; packed uint8 [R, d*bits/8] and scale [R', d/group]: gate row i of the layer
    is row ``offset + i``, up row ``offset + m + i`` (one layer: [2m, ...], offset 0; a
    flattened stack: offset 2ml). Returns float32 [T, m]."""
    n_tok, d = x.shape
    nb = packed.shape[1]
    m = packed.shape[0] // 2 if m is None else m
    cfg, bc, G = resolve_config(config, m, d, bits, group, x.dtype)
    tb = min(cfg.tokens, n_tok)
    ntile = nb // bc
    kern = functools.partial(_kernel, act=act, m=m, d=d, n_tok=n_tok, tb=tb, bits=bits,
                             bc=bc, G=G, group=group, ntile=ntile, cfg=cfg,
                             interpret=interpret)
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
        name=f"proxy_scores_b{bits}_{cfg.mode}")(*args, *init)
