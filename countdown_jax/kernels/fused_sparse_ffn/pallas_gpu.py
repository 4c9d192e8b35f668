"""Pallas (Triton lowering) GPU kernel: selection and sparse FFN in ONE kernel.

Per block of ``bn`` neurons a program thresholds the block's scores and reads only the kept
rows of gate / up / down, accumulating s * W_down[row] in float32 registers: no index list,
no host sync. The block walk, compaction, batches, the cascade and stacked weights:
experiments/KERNEL_NOTES.md ("Inside the fused kernel").
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
from countdown_jax.kernels.fused_sparse_ffn.reference import Rule, fused_method, predictor_hidden
from countdown_jax.policy import Method

M_COUNTDOWN, CATS, D_COUNTDOWN = Method.M_COUNTDOWN, Method.CATS, Method.D_COUNTDOWN


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    bn: int = 16                 # neurons per block (power of two)
    bd: int = 512                # column chunk of the gathered rows (power of two)
    bds: int | None = None       # column chunk of the scoring rows [bn, bds] (None: bd for
                                 # M/CATS, min(512, rank) for D); keep bn*bds <= ~8K
    blocks_per_program: int = 4  # consecutive blocks per program (y partial per program)
    num_warps: int = 4
    num_stages: int = 1
    reduce: str = "partial"      # "partial" | "atomic"
    atomic_groups: int = 1       # reduce="atomic": program p adds into slot p % groups of a
                                 # zeroed [groups, N, d] float32 buffer (fewer programs per
                                 # address than one slot; XLA sums the few slots), in place
                                 # of "partial"'s [programs, N, d] partial sums (4.3 MB at
                                 # Llama-8B, written by the kernel and read by the reduce)
    compact: int = 0             # 0 = predicated block loads; k = in-block compaction tile
    poison: bool = False         # checks: outputs start as NaN / INT_MIN (must be overwritten)
    score: str = "kernel"        # "kernel": stream the scoring rows here; "xla": XLA's dense
                                 # GEMV computes u / act(g) / z [N, m] first (the caller's
                                 # ``scores``), the kernel reads it
    programs: int = 0            # grid size (0: ceil(blocks / blocks_per_program)); blocks
                                 # are dealt round-robin, so a multiple of the SM count
                                 # avoids a partial last wave
    prefetch: bool = False       # issue the kept rows' W_down loads together with the
                                 # gate/up loads (one memory round trip per tile, not two;
                                 # holds every chunk of both tiles in registers)

    def __post_init__(self):
        for name in ("bn", "bd", "bds"):
            v = getattr(self, name)
            if v is None and name == "bds":
                continue
            if v < 1 or v & (v - 1):
                raise ValueError(f"FusedConfig.{name} must be a power of two, got {v}")
        if self.compact and self.compact & (self.compact - 1):
            raise ValueError(f"FusedConfig.compact must be 0 or a power of two, got {self.compact}")
        if self.atomic_groups < 1 or (self.atomic_groups > 1 and self.reduce != "atomic"):
            raise ValueError(f"FusedConfig.atomic_groups must be >= 1 and is for "
                             f"reduce='atomic' only, got {self.atomic_groups}")
        if self.reduce not in ("partial", "atomic"):
            raise ValueError(f"FusedConfig.reduce must be 'partial' or 'atomic', got {self.reduce!r}")
        if self.score not in ("kernel", "xla"):
            raise ValueError(f"FusedConfig.score must be 'kernel' or 'xla', got {self.score!r}")

    def grid(self, m: int) -> int:
        nblk = -(-m // self.bn)
        return min(self.programs or -(-nblk // self.blocks_per_program), nblk)


def default_config(dtype, method=M_COUNTDOWN, cascade: bool = False) -> FusedConfig:
    """Fastest variant at Llama-3.1-8B shapes (the H100 prefetch comparison in
    experiments/results/bench_kernels.csv; no knob beat it on the H200): scores from XLA's dense GEMV (u, act(g), or the
    predictor's z), blocks of neurons compacted into tiles of 4 kept rows whose W_down
    loads are issued with their gate/up loads. M and CATS: 64-neuron blocks on 264
    programs; D (three gathered matrices): 32-neuron blocks on 448 programs. The cascade
    (D with tau_s): D's, without prefetch (its W_down rows are known only after s; not
    measured).
    float32 rows: half the columns per 16-byte vector, so half the chunk width."""
    bd = 1024 if jnp.dtype(dtype).itemsize <= 2 else 512
    if fused_method(method) == D_COUNTDOWN:
        return FusedConfig(bn=32, bd=bd, num_warps=4, programs=448, compact=4,
                           score="xla", prefetch=not cascade)
    return FusedConfig(bn=64, bd=bd, num_warps=4, programs=264, compact=4, score="xla",
                       prefetch=True)


def _kernel(*refs, method, cascade, act, m, d, ds, nb, cfg: FusedConfig):
    x_ref, s_ref, ws_ref, wg_ref, wu_ref, wd_ref, tau_ref, off_ref, taus_ref = refs[:9]
    out_ref, cnt_ref = refs[-2:]
    p = pl.program_id(0)
    off = off_ref[0]          # first weight row of this layer (0, or l*m in a flat stack)
    pred = method == D_COUNTDOWN
    # U (D's predictor) is one layer's [m, r]: only the model's weights carry the offset.
    ws_off = 0 if pred else off
    bn, bd = cfg.bn, cfg.bd
    bds = cfg.bds or (min(512, pl.next_power_of_2(ds)) if pred else bd)
    ch = tt.chunks(d, bd)
    f = activation(act)
    nblk = -(-m // bn)
    P = cfg.grid(m)
    nmine = (nblk - p + P - 1) // P          # blocks p, p+P, p+2P, ... (round-robin)

    xs = [[tt.load_vec(x_ref, (b,), c0, bd, d) for c0, _ in ch] for b in range(nb)]
    ss = xs if (cfg.score == "xla" or (not pred and bds == bd)) else [
        [tt.load_vec(s_ref, (b,), c0, bds, ds) for c0, _ in tt.chunks(ds, bds)]
        for b in range(nb)]
    taus = [tau_ref[b] for b in range(nb)]
    tss = [taus_ref[b] for b in range(nb)]          # the cascade's |s| threshold

    def sparse_part(carry, rows, ok, keep, dense_vals):
        """Read kept rows only: coefficients s per token, then accumulate s * W_down.
        carry: (acc, cnts); the cascade counts its kept rows here (known only after s)."""
        acc, cnts = carry
        rows = rows + off
        first = (wg_ref, wu_ref) if pred else {M_COUNTDOWN: (wg_ref,), CATS: (wu_ref,)}[method]
        dots, down = tt.kept_row_dots(first, wd_ref, rows, ok, xs, bd, d, cfg.prefetch)
        if method == M_COUNTDOWN:
            s = [f(dots[0][b]) * dense_vals[b] for b in range(nb)]
        elif method == CATS:
            s = [dense_vals[b] * dots[0][b] for b in range(nb)]
        else:
            s = [f(dots[0][b]) * dots[1][b] for b in range(nb)]
        if cascade:             # second stage: W_down rows of |s| > tau_s only
            keep = [k & (jnp.abs(v) > t) for k, v, t in zip(keep, s, tss)]
            ok = _any(keep)
            cnts = [c + jnp.sum(k.astype(jnp.int32)) for c, k in zip(cnts, keep)]
        s = [jnp.where(k, v, 0.0) for k, v in zip(keep, s)]
        return tt.accumulate_kept(acc, wd_ref, down, rows, ok, s, bd, d), cnts

    def body(i, carry):
        acc, cnts = carry
        blk = p + i * P
        rows = blk * bn + jnp.arange(bn, dtype=jnp.int32)
        rv = rows < m if m % bn else None
        if cfg.score == "xla":     # s_ref holds u / act(g) / z [N, m] in float32
            sc = [plt.load(s_ref.at[b, rows], mask=rv, other=0.0) if rv is not None
                  else s_ref[b, rows] for b in range(nb)]
        else:
            sc = tt.row_dots(ws_ref, rows + ws_off, rv, ss, bds, ds)
        if method == M_COUNTDOWN:
            dense_vals = sc
            keep = [jnp.abs(sc[b]) > taus[b] for b in range(nb)]
        elif method == CATS:
            dense_vals = sc if cfg.score == "xla" else [f(v) for v in sc]
            keep = [jnp.abs(dense_vals[b]) > taus[b] for b in range(nb)]
        else:
            dense_vals = [None] * nb
            keep = [sc[b] > taus[b] for b in range(nb)]
        if rv is not None:
            keep = [k & rv for k in keep]
        anyk = _any(keep)
        if not cascade:
            cnts = [c + jnp.sum(k.astype(jnp.int32)) for c, k in zip(cnts, keep)]

        if not cfg.compact:
            return sparse_part((acc, cnts), rows, anyk, keep, dense_vals)

        # In-block compaction: slot j holds the block's j-th kept row.
        bj = cfg.compact
        ki = anyk.astype(jnp.int32)
        cs = jnp.cumsum(ki)
        nk = jnp.sum(ki)
        lane = jnp.arange(bn, dtype=jnp.int32)

        def tile(j, carry):
            slot = j * bj + jnp.arange(bj, dtype=jnp.int32)
            pos = jnp.sum((cs[None, :] <= slot[:, None]).astype(jnp.int32), axis=1)
            sv = slot < nk
            onehot = lane[None, :] == pos[:, None]                       # [bj, bn]

            def pick(v):
                return jnp.sum(jnp.where(onehot, v[None, :], 0.0), axis=1)

            kc = [(pick(k.astype(jnp.float32)) > 0) & sv for k in keep]
            vc = [None if v is None else pick(v) for v in dense_vals]
            return sparse_part(carry, blk * bn + pos, sv, kc, vc)

        return jax.lax.fori_loop(0, (nk + bj - 1) // bj, tile, (acc, cnts))

    acc0 = [[jnp.zeros((bd,), jnp.float32) for _ in ch] for _ in range(nb)]
    cnt0 = [jnp.int32(0) for _ in range(nb)]
    acc, cnts = jax.lax.fori_loop(0, nmine, body, (acc0, cnt0))
    for b in range(nb):
        cnt_ref[p, b] = cnts[b]
        for (c0, _), a in zip(ch, acc[b]):
            if cfg.reduce == "partial":
                tt.store_vec(out_ref, (p, b), c0, bd, d, a)
            else:  # output padded to a multiple of bd: no mask needed
                plt.atomic_add(out_ref, (p % cfg.atomic_groups, b, tt.col_index(c0, bd)), a)


def _any(masks):
    out = masks[0]
    for k in masks[1:]:
        out = out | k
    return out


def fused_sparse_ffn_pallas_gpu(x, mlp, rule: Rule, *, act, config: FusedConfig | None = None,
                                interpret: bool = False, row_offset=0, m=None):
    """x [N, d]; rule.tau [N] float32 (rule.tau_s too, the cascade).

    Weights [R, d]: neuron i is row ``row_offset + i`` (R = m = one layer, or a flattened
    [L*m, d] stack with ``m`` given). rule.scores [N, m] float32, read instead of a scoring
    stream when ``config.score == "xla"`` (required then): u, act(g) or z.
    """
    method, cascade = rule.method, rule.cascade
    cfg = config or default_config(mlp["down"].dtype, method, cascade)
    nb, d = x.shape
    if cascade and cfg.prefetch:
        raise ValueError("the cascade reads W_down rows only after s is known: "
                         "FusedConfig(prefetch=True) does not apply, use prefetch=False")
    m = mlp["down"].shape[0] if m is None else m
    if cfg.score == "xla":      # XLA's GEMV is the fastest dense stream; the kernel reads it
        if rule.scores is None or rule.scores.shape != (nb, m):
            raise ValueError(f"FusedConfig(score='xla') needs scores [N, m] = {(nb, m)}, got "
                             f"{None if rule.scores is None else rule.scores.shape}")
        sin, ws, ds = rule.scores.astype(jnp.float32), jnp.zeros((1, 1), x.dtype), 1
    else:
        if rule.scores is not None:
            raise ValueError("scores are read only with FusedConfig(score='xla')")
        if method == D_COUNTDOWN:       # U's rows dotted with h = x V [N, r] (h in XLA)
            ws, sin = rule.pred_u, predictor_hidden(x, rule.pred_vt)
        else:
            ws, sin = mlp["up"] if method == M_COUNTDOWN else mlp["gate"], x
        ds = ws.shape[1]
    P = cfg.grid(m)
    kern = functools.partial(_kernel, method=method, cascade=cascade, act=act, m=m, d=d,
                             ds=ds, nb=nb, cfg=cfg)
    params = plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    tau_s = jnp.zeros((nb,), jnp.float32) if rule.tau_s is None else rule.tau_s  # cascade only
    args = (x, sin, ws, mlp["gate"], mlp["up"], mlp["down"], rule.tau.astype(jnp.float32),
            jnp.reshape(jnp.asarray(row_offset, jnp.int32), (1,)), tau_s.astype(jnp.float32))
    dp = -(-d // cfg.bd) * cfg.bd
    y_shape = (jax.ShapeDtypeStruct((P, nb, d), jnp.float32) if cfg.reduce == "partial"
               else jax.ShapeDtypeStruct((cfg.atomic_groups, nb, dp), jnp.float32))
    cnt_shape = jax.ShapeDtypeStruct((P, nb), jnp.int32)
    # Output buffers handed in through aliases: zeros for atomics; poison for checks.
    init, aliases = [], {}
    if cfg.reduce == "atomic" or cfg.poison:
        fill = 0.0 if cfg.reduce == "atomic" else jnp.nan
        aliases[len(args) + len(init)] = 0
        init.append(jnp.full(y_shape.shape, fill, jnp.float32))
    if cfg.poison:
        aliases[len(args) + len(init)] = 1
        init.append(jnp.full(cnt_shape.shape, jnp.iinfo(jnp.int32).min, jnp.int32))
    rule_name = method.value + ("_cascade" if cascade else "")
    y, cnt = pl.pallas_call(
        kern, grid=(P,), compiler_params=params, interpret=interpret,
        out_shape=(y_shape, cnt_shape), input_output_aliases=aliases,
        name=f"fused_sparse_ffn_{rule_name}_{cfg.reduce}")(*args, *init)
    y = jnp.sum(y, axis=0) if cfg.reduce == "partial" else jnp.sum(y, axis=0)[:, :d]
    return y.astype(x.dtype), jnp.sum(cnt, axis=0)
