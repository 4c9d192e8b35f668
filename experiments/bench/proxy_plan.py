"""Plan "proxy": the low-bit proxy rule at Llama-3.1-8B bf16, batch 1 (and 8).

In one run (the same card, the same ceilings):
  - HBM copy / read ceilings, the loop's own cost and XLA's dense FFN;
  - the proxy-scores kernel alone (kernels/proxy_scores), 4 bits / group 128 and 2 bits /
    group 64, its default config ("dot": tensor cores) with a poisoned full check against
    the reference, then a sweep of tiles and of both modes ("dot", "fma"); its floor is
    the packed codes + bf16 scales of gate and up at the read ceiling;
  - the same scores as plain XLA on the planar codes ("xla-planes": unpack, bf16 dot per
    scale group, scale, sum), the best alternative a kernel must beat;
  - the Mosaic GPU scores kernel (kernels/proxy_scores/mosaic_gpu.py, 4 bits, its int4
    tiles prepared once as the decode path does), alone and at batch 8, on a GPU;
  - the proxy D-COUNTDOWN FFN at r = 0.5 / 0.7 / 0.9: the scores kernel (the Mosaic one
    and the Triton one's fastest config), |s_hat| > tau, then the kept rows of gate / up /
    down in full precision by the fused kernel reading s_hat as its scores
    (D-COUNTDOWN's Rule with scores=);
  - D-COUNTDOWN with its rank-512 predictor (the shipped fused kernel), for comparison;
  - stage profiles (per-kernel GPU time per call, bench_kernels_stages.csv) of the Mosaic-
    scored proxy FFN at r = 0.7 / 0.9 and of D's predictor path at r = 0.9;
  - the fastest scores config at batch 8 beside dense at batch 8 (one read of the proxy).
Every row is one jitted loop (experiments/bench/harness.py) and its first call is checked
against the float32 reference (ffn_problem.RULES). Rows go to bench_kernels.csv; a
summary to bench_proxy.md and bench_proxy.csv (both in --out).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax import proxy as X
from countdown_jax.gated import activation
from countdown_jax.kernels.fused_sparse_ffn.api import Rule, fused_sparse_ffn
from countdown_jax.kernels.proxy_scores.api import proxy_scores
from countdown_jax.kernels.proxy_scores.pallas_gpu import ProxyConfig, default_config

from . import ffn_problem
from .ffn_problem import D, Problem, compare, mlp_of
from .ffn_runner import Runner, log
from .ffn_variants import chosen

LLAMA = "llama-3.1-8b"
FORMATS = ((4, 128), (2, 64))           # (bits, group)
RATIOS = (0.5, 0.7, 0.9)
P = ProxyConfig
SWEEP = (P(bm=64, bc=128, asm=False), P(bm=64, bc=128, num_stages=3),
         P(bm=64, bc=128, prefetch=1),
         P(bm=128, bc=128, num_warps=8), P(bm=32, bc=128), P(bm=64, bc=64),
         P(bm=128, bc=64), P(bm=64, bc=128, num_warps=8), P(bm=16, bc=128, num_warps=2),
         P(bm=32, bc=128, mode="fma"), P(bm=64, bc=256, mode="fma", num_warps=8),
         P(bm=16, bc=128, mode="fma"))
CSV_FIELDS = ["card", "kernel", "bits", "group", "r", "batch", "implementation", "variant",
              "us_per_call", "floor_us", "dense_us", "x_dense", "gb_per_s", "pct_of_ceiling",
              "rel_err", "note"]


def label(cfg: ProxyConfig) -> str:
    mode = cfg.mode + ("" if cfg.mode == "fma" or cfg.asm else "-ops")
    s = f"{mode}-bm{cfg.bm}-bc{cfg.bc}-t{cfg.tokens}-p{cfg.prefetch}-w{cfg.num_warps}"
    return s + (f"-s{cfg.num_stages}" if cfg.num_stages > 1 else "")


@functools.lru_cache(maxsize=None)
def _reference_scores(act):
    return jax.jit(lambda x, packed, scale: proxy_scores(x, packed, scale, act=act))


@functools.lru_cache(maxsize=None)
def _reference_ffn(act):
    """The rule in float32: keep |s_hat| > tau (s_hat given as D-COUNTDOWN's scores),
    exact s on the kept rows, y = s W_down."""
    return jax.jit(lambda x, wg, wu, wd, sc, tau: fused_sparse_ffn(
        x, mlp_of((wg, wu, wd)), Rule(D, tau, scores=sc), act=act,
        implementation="xla"))


def _fit(y, d):
    """[B, m] scores -> [B, d] (what the loop feeds back into x): the first d, zero-padded."""
    return jnp.pad(y, ((0, 0), (0, max(0, d - y.shape[1]))))[:, :d]


def xla_planes(x, packed, scale, *, act, bits, group):
    """The scores in plain XLA from the planar codes: per plane, unpack to bfloat16 (exact
    small integers), one dot per scale group, scaled and summed in float32."""
    per, (n, d), m2 = 8 // bits, x.shape, packed.shape[0]
    dp = d // per
    ng = dp // group
    acc = jnp.zeros((n, m2), jnp.float32)
    for j in range(per):
        c = ((packed >> (j * bits)) & (2 ** bits - 1)).astype(jnp.bfloat16) - 2 ** (bits - 1)
        xj = x[:, j * dp:(j + 1) * dp].reshape(n, ng, group).astype(jnp.bfloat16)
        part = jnp.einsum("tgk,mgk->tmg", xj, c.reshape(m2, ng, group),
                          preferred_element_type=jnp.float32)
        acc = acc + jnp.sum(part * scale[None, :, j * ng:(j + 1) * ng].astype(jnp.float32),
                            axis=-1)
    m = m2 // 2
    return jnp.abs(activation(act)(acc[:, :m]) * acc[:, m:])


@dataclasses.dataclass(frozen=True)
class ProxyRule:
    """ffn_problem.RULES entry. Weight sets are (wg, wu, wd, packed, scale). ``ffn``:
    keep |s_hat| > tau and run the FFN on the kept rows; else the scores alone (their
    first d as y, every neuron counted kept)."""
    ffn: bool

    def scores(self, p: Problem, s):
        return _reference_scores(p.act)(p.x0, *p.sets[s][3:5])

    def reference(self, p: Problem, tau):
        wg, wu, wd, packed, scale = p.sets[0][:5]
        sc = self.scores(p, 0)
        if not self.ffn:
            return np.asarray(_fit(sc, p.d), np.float64), np.full((p.batch,), p.m, np.int32)
        y, c = _reference_ffn(p.act)(p.x0, wg, wu, wd, sc, tau)
        return np.asarray(y, np.float64), np.asarray(c)

    def bytes(self, p: Problem, kept):
        packed, scale = p.sets[0][3:5]
        b = packed.size + scale.size * scale.dtype.itemsize
        return b + (3 * int(round(kept)) * p.d * jnp.dtype(p.dtype).itemsize if self.ffn else 0)


def scores_step(p: Problem, cfg):
    def f(x, w, tau):
        s = proxy_scores(x, w[3], w[4], act=p.act, implementation="pallas", config=cfg,
                         interpret=p.interpret)
        return _fit(s, p.d), jnp.full(x.shape[:1], p.m, jnp.int32)
    return f


def xla_step(p: Problem, bits, group):
    def f(x, w, tau):
        pk, sc = w[3], w[4]
        s = xla_planes(x, pk.reshape(-1, pk.shape[-1]), sc.reshape(-1, sc.shape[-1]),
                       act=p.act, bits=bits, group=group)
        return _fit(s, p.d), jnp.full(x.shape[:1], p.m, jnp.int32)
    return f


def ffn_step(p: Problem, cfg):
    """The proxy's scores, then the fused kernel reading them as its scores."""
    def f(x, w, tau):
        packed, scale = w[3:5]
        s = proxy_scores(x, packed, scale, act=p.act, implementation="pallas", config=cfg,
                         interpret=p.interpret)
        return fused_sparse_ffn(x, mlp_of(w), Rule(D, tau, scores=s), act=p.act,
                                implementation="pallas", interpret=p.interpret)
    return f


def mosaic_scores(p: Problem, x, w):
    from countdown_jax.kernels.proxy_scores import mosaic_gpu   # GPU only
    return mosaic_gpu.proxy_scores_mgpu({"w": w[5], "scale": w[6]}, x, act=p.act)


def mosaic_step(p: Problem):
    def f(x, w, tau):
        return _fit(mosaic_scores(p, x, w), p.d), jnp.full(x.shape[:1], p.m, jnp.int32)
    return f


def mosaic_ffn_step(p: Problem):
    """The Mosaic kernel's scores, then the fused kernel reading them (the decode path)."""
    def f(x, w, tau):
        return fused_sparse_ffn(x, mlp_of(w), Rule(D, tau, scores=mosaic_scores(p, x, w)),
                                act=p.act, implementation="pallas", interpret=p.interpret)
    return f


def with_tiles(p: Problem) -> Problem | None:
    """The problem with each set's Mosaic tiles appended (.., w, scale_t), or None where
    that kernel does not run (CPU, interpret mode, a format it does not take)."""
    from countdown_jax.kernels.proxy_scores import mosaic_gpu
    if p.interpret or jax.devices()[0].platform != "gpu":
        return None
    pr = {"packed": p.sets[0][3], "scale": p.sets[0][4]}
    if not mosaic_gpu.supports(pr, p.d):
        return None
    sets = []
    for w in p.sets:
        t = mosaic_gpu.prepare({"packed": w[3], "scale": w[4]}, p.d)
        sets.append((*w[:5], t["w"], t["scale"]))
    jax.block_until_ready(sets)
    return dataclasses.replace(p, sets=sets)


def with_proxy(p: Problem, bits: int, group: int) -> Problem:
    """The problem with each weight set's proxy appended (wg, wu, wd, packed, scale)."""
    q = jax.jit(X.quantize_mlp, static_argnums=(1, 2))
    sets = []
    for wg, wu, wd, *_ in p.sets:
        pr = q({"gate": wg, "up": wu}, bits, group)
        sets.append((wg, wu, wd, pr["packed"], pr["scale"]))
    jax.block_until_ready(sets)
    return dataclasses.replace(p, sets=sets)


def full_check(R: Runner, q: Problem, method, cfg):
    """Every score of set 0 (the timed rows compare the first d only), output poisoned."""
    cfg = dataclasses.replace(cfg, poison=True)
    try:
        got = jax.jit(lambda x, pk, sc: proxy_scores(
            x, pk, sc, act=q.act, implementation="pallas", config=cfg,
            interpret=q.interpret))(q.x0, *q.sets[0][3:])
        ref = np.asarray(_reference_scores(q.act)(q.x0, *q.sets[0][3:]), np.float64)
        rel, failed = compare(got, 0, ref, 0, jnp.float32)
        note = f"poison check FAILED: {failed}" if failed else \
            f"poison check passed, rel err {rel:.1e}"
    except Exception as e:   # noqa: BLE001
        note = f"poison check FAILED: {type(e).__name__}: {str(e)[:200]}"
    log(f"  {method} {label(cfg)}: {note}")
    R.add(shape=q.name, dtype=q.dtype.__name__, method=method, implementation="pallas",
          variant=label(cfg) + " [poison check]", batch=q.batch, note=note)


def formats(d):
    """FORMATS with each group cut to fit inside one plane of d / (8 / bits) inputs (the
    smoke shapes are narrow)."""
    return [(bits, math.gcd(group, d * bits // 8)) for bits, group in FORMATS]


def proxy(R: Runner, best=None):
    R.add_ceilings()
    p = R.problem(LLAMA, jnp.bfloat16, 1)
    R.baseline(p)
    probs, fastest = {}, {}
    for bits, group in formats(p.d):
        q = probs[bits, group] = with_proxy(p, bits, group)
        name = f"proxy-b{bits}g{group}"
        ffn_problem.RULES[name] = ProxyRule(ffn=False)
        ffn_problem.RULES[f"proxy-d-b{bits}g{group}"] = ProxyRule(ffn=True)
        cfg = default_config(p.m)
        t = R.time_variant(q, name, "pallas", label(cfg), scores_step(q, cfg), (0.0,))
        fastest[bits, group] = (t.get(0.0, math.inf), cfg)
        full_check(R, q, name, cfg)
        R.time_variant(q, name, "xla-planes", "einsum per group", xla_step(q, bits, group),
                       (0.0,))
    tiled = {}
    for (bits, group), q in probs.items():
        t = tiled[bits, group] = with_tiles(q)
        if t is not None:
            R.time_variant(t, f"proxy-b{bits}g{group}", "mosaic-gpu", "tiled int4",
                           mosaic_step(t), (0.0,))
            R.time_variant(t, f"proxy-d-b{bits}g{group}", "mosaic-fused",
                           "scores=mosaic tiled int4", mosaic_ffn_step(t), RATIOS)
            for r in (0.7, 0.9):    # where its time goes: scores, selection, gathers
                R.stage_profile(t, f"proxy-d-b{bits}g{group}", "mosaic-fused",
                                "scores=mosaic tiled int4", r)
    for (bits, group), q in probs.items():
        R.time_variant(q, f"proxy-d-b{bits}g{group}", "pallas-fused",
                       "scores=" + label(fastest[bits, group][1]),
                       ffn_step(q, fastest[bits, group][1]), RATIOS)
    # D's predictor path and batch 8 first: the Triton tile sweep takes what time is left
    d_label = chosen()[D]
    if R.left() > 60:
        R.pallas(p, D, d_label, R.scale.fused[d_label], RATIOS)
        R.stage_profile(p, D, "pallas-fused", d_label, 0.9)
    if R.left() > 90:
        p8 = R.problem(LLAMA, jnp.bfloat16, 8)
        R.baseline(p8)
        for bits, group in probs:
            cfg = default_config(p8.m)
            q8 = with_proxy(p8, bits, group)
            R.time_variant(q8, f"proxy-b{bits}g{group}", "pallas", label(cfg),
                           scores_step(q8, cfg), (0.0,))
            t8 = with_tiles(q8)
            if t8 is not None:
                R.time_variant(t8, f"proxy-b{bits}g{group}", "mosaic-gpu", "tiled int4",
                               mosaic_step(t8), (0.0,))
    for cfg in SWEEP[:2] if R.scale.interpret else SWEEP:
        for (bits, group), q in probs.items():
            if R.left() < 110:
                break
            t = R.time_variant(q, f"proxy-b{bits}g{group}", "pallas", label(cfg),
                               scores_step(q, cfg), (0.0,))
            if t.get(0.0, math.inf) < fastest[bits, group][0]:
                fastest[bits, group] = (t[0.0], cfg)
    for (bits, group), q in probs.items():
        cfg = fastest[bits, group][1]
        log(f"fastest proxy-b{bits}g{group}: {label(cfg)} {fastest[bits, group][0]:.2f} us")
        if cfg != default_config(p.m) and R.left() > 60:
            full_check(R, q, f"proxy-b{bits}g{group}", cfg)
            R.time_variant(q, f"proxy-d-b{bits}g{group}", "pallas-fused",
                           "scores=" + label(cfg), ffn_step(q, cfg), RATIOS)
    write_summary(R, os.path.join(R.args.out, "bench_proxy.md"),
                  os.path.join(R.args.out, "bench_proxy.csv"))


def summary_rows(R: Runner):
    """bench_proxy.csv rows: each timed proxy / dense row with its byte floor at the
    measured read ceiling and dense (same batch, same run)."""
    rows = R.rows
    read = next((float(x["gb_per_s"]) for x in rows if x["method"] == "hbm-read"), None)
    dense = {int(x["batch"]): float(x["us_per_call"]) for x in rows
             if x["method"] == "dense" and x["us_per_call"]}
    out = []
    for x in rows:
        if not x["us_per_call"] or x["method"] in ("loop-overhead", "hbm-read", "hbm-copy"):
            continue
        us, b = float(x["us_per_call"]), int(x["batch"])
        fmt = re.search(r"b(\d+)g(\d+)", x["method"])
        kernel = ("ffn" if x["method"].startswith("proxy-d") or x["method"] == D else
                  "scores" if fmt else x["method"])
        nb = float(x["bytes_needed"]) if x["bytes_needed"] not in ("", None) else 0.0
        out.append(dict(
            card=x["device"], kernel=kernel, bits=fmt.group(1) if fmt else "",
            group=fmt.group(2) if fmt else "", r=x["sparsity"], batch=b,
            implementation=x["implementation"], variant=x["variant"], us_per_call=f"{us:.2f}",
            floor_us=f"{nb / read / 1e3:.2f}" if read and nb else "",
            dense_us=f"{dense[b]:.2f}" if b in dense else "",
            x_dense=f"{dense[b] / us:.2f}" if b in dense else "", gb_per_s=x["gb_per_s"],
            pct_of_ceiling=(f"{100 * float(x['gb_per_s']) / read:.0f}"
                            if read and x["gb_per_s"] else ""),
            rel_err=x["rel_err"], note="FAILED" if "FAILED" in x["note"] else ""))
    return read, out


def write_summary(R: Runner, md_path, csv_path):
    read, rows = summary_rows(R)
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Proxy rule, {LLAMA} bf16 ({R.device})", "",
             f"HBM read ceiling {read:.0f} GB/s; floor = bytes needed at that ceiling; "
             "x dense = dense XLA at the same batch in the same run." if read
             else "HBM read ceiling not measured.", "",
             "| kernel | bits | group | r | batch | implementation | variant | us/call | floor us "
             "| us / floor | % of ceiling | x dense | check |", "|" + "---|" * 13]
    for x in rows:
        ratio = (f"{float(x['us_per_call']) / float(x['floor_us']):.2f}"
                 if x["floor_us"] else "")
        lines.append(f"| {x['kernel']} | {x['bits']} | {x['group']} | {x['r']} | {x['batch']} "
                     f"| {x['implementation']} | {x['variant']} | {x['us_per_call']} | "
                     f"{x['floor_us']} | {ratio} | {x['pct_of_ceiling']} | {x['x_dense']} | "
                     f"{x['note'] or x['rel_err']} |")
    notes = [x for x in R.rows if "poison check" in x["variant"]]
    lines += [""] + [f"- {x['method']} {x['variant']}: {x['note']}" for x in notes]
    with open(md_path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    log("\n".join(lines))
    log(f"wrote {md_path} and {csv_path}")
