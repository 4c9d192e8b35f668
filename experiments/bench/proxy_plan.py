"""Plan "proxy": the low-bit proxy rule (issue #12) at Llama-3.1-8B bf16, batch 1.

In one run (the same card, the same ceilings):
  - HBM copy / read ceilings, the loop's own cost and XLA's dense FFN;
  - the proxy-scores kernel alone (kernels/proxy_scores, "pallas"), 4 bits / group 128 and
    2 bits / group 64: its bytes are the packed codes + bf16 scales of gate and up, so
    its floor is those bytes at the read ceiling; a poisoned full check against the
    reference per format;
  - the proxy D-COUNTDOWN FFN at r = 0.5 / 0.9: proxy kernel, |s_hat| > tau, then the kept
    rows of gate / up / down in full precision, by the index list (kernels.sparse_ffn
    "pallas", ``pallas-gather``) and by the fused kernel reading s_hat as its scores
    (D-COUNTDOWN's rule with scores=, ``pallas-fused``);
  - D-COUNTDOWN with its rank-512 predictor (the shipped fused kernel), for comparison;
  - then, while the budget lasts, other ProxyConfig tiles of the kernel alone.
Every row is one jitted loop (experiments/bench/harness.py) and its first call is checked
against the float32 reference (ffn_problem.RULES: the proxy rules' scores, reference and
bytes). Rows go to bench_kernels.csv, a summary to bench_proxy.md (both in --out).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax import proxy as X
from countdown_jax.kernels.fused_sparse_ffn.api import Rule, fused_sparse_ffn
from countdown_jax.kernels.proxy_scores.api import proxy_scores
from countdown_jax.kernels.proxy_scores.pallas_gpu import ProxyConfig, default_config
from countdown_jax.kernels.sparse_ffn.api import index_list, sparse_ffn

from . import ffn_problem
from .ffn_problem import Problem, capacity, compare, mlp_of
from .ffn_runner import Runner, log
from .ffn_variants import chosen

LLAMA = "llama-3.1-8b"
FORMATS = ((4, 128), (2, 64))           # (bits, group)
RATIOS = (0.5, 0.9)
SWEEP = (ProxyConfig(bm=32, bc=256, num_warps=8), ProxyConfig(bm=16, bc=128),
         ProxyConfig(bm=32, bc=128, prefetch=2), ProxyConfig(bm=64, bc=128, num_warps=8),
         ProxyConfig(bm=32, bc=64, prefetch=2), ProxyConfig(bm=32, bc=128, num_stages=2),
         ProxyConfig(bm=32, bc=128, prefetch=0))


def label(cfg: ProxyConfig) -> str:
    s = f"bm{cfg.bm}-bc{cfg.bc}-p{cfg.prefetch}-w{cfg.num_warps}"
    return s + (f"-s{cfg.num_stages}" if cfg.num_stages > 1 else "")


@functools.lru_cache(maxsize=None)
def _reference_scores(act):
    return jax.jit(lambda x, packed, scale: proxy_scores(x, packed, scale, act=act))


@functools.lru_cache(maxsize=None)
def _reference_ffn(act):
    """The rule in float32: keep |s_hat| > tau (s_hat given as D-COUNTDOWN's scores),
    exact s on the kept rows, y = s W_down."""
    return jax.jit(lambda x, wg, wu, wd, sc, tau: fused_sparse_ffn(
        x, mlp_of((wg, wu, wd)), Rule("d_countdown", tau, scores=sc), act=act,
        implementation="xla"))


def _fit(y, d):
    """[B, m] scores -> [B, d] (what the loop feeds back into x): the first d, zero-padded."""
    return jnp.pad(y, ((0, 0), (0, max(0, d - y.shape[1]))))[:, :d]


@dataclasses.dataclass(frozen=True)
class ProxyRule:
    """ffn_problem.RULES entry. Weight sets are (wg, wu, wd, packed, scale). ``ffn``:
    keep |s_hat| > tau and run the FFN on the kept rows; else the scores alone (their
    first d as y, every neuron counted kept)."""
    ffn: bool

    def scores(self, p: Problem, s):
        return _reference_scores(p.act)(p.x0, *p.sets[s][3:])

    def reference(self, p: Problem, tau):
        wg, wu, wd, packed, scale = p.sets[0]
        sc = self.scores(p, 0)
        if not self.ffn:
            return np.asarray(_fit(sc, p.d), np.float64), np.full((p.batch,), p.m, np.int32)
        y, c = _reference_ffn(p.act)(p.x0, wg, wu, wd, sc, tau)
        return np.asarray(y, np.float64), np.asarray(c)

    def bytes(self, p: Problem, kept):
        packed, scale = p.sets[0][3:]
        b = packed.size + scale.size * scale.dtype.itemsize
        return b + (3 * int(round(kept)) * p.d * jnp.dtype(p.dtype).itemsize if self.ffn else 0)


def scores_step(p: Problem, cfg):
    def f(x, w, tau):
        s = proxy_scores(x, w[3], w[4], act=p.act, implementation="pallas", config=cfg,
                         interpret=p.interpret)
        return _fit(s, p.d), jnp.full(x.shape[:1], p.m, jnp.int32)
    return f


def ffn_step(p: Problem, cfg, cap=None):
    """cap None: the fused kernel reads s_hat as its scores; else the index list."""
    def f(x, w, tau):
        packed, scale = w[3:]
        s = proxy_scores(x, packed, scale, act=p.act, implementation="pallas", config=cfg,
                         interpret=p.interpret)
        if cap is None:
            return fused_sparse_ffn(x, mlp_of(w), Rule("d_countdown", tau, scores=s),
                                    act=p.act, implementation="pallas", interpret=p.interpret)
        idx, cnt = index_list(s > tau, cap)
        y = sparse_ffn(x, mlp_of(w), idx, jnp.minimum(cnt, cap), act=p.act,
                       implementation="pallas", interpret=p.interpret)
        return y, cnt
    return f


def with_proxy(p: Problem, bits: int, group: int) -> Problem:
    """The problem with each weight set's proxy appended (wg, wu, wd, packed, scale)."""
    q = jax.jit(X.quantize_mlp, static_argnums=(1, 2))
    sets = []
    for wg, wu, wd, _, _ in p.sets:
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


def proxy(R: Runner, best=None):
    R.add_ceilings()
    p = R.problem(LLAMA, jnp.bfloat16, 1)
    R.baseline(p)
    probs = {}
    for bits, group in FORMATS:
        group = group if p.d % group == 0 else math.gcd(group, p.d)   # smoke shapes
        q = probs[bits, group] = with_proxy(p, bits, group)
        ffn_problem.RULES[f"proxy-b{bits}g{group}"] = ProxyRule(ffn=False)
        ffn_problem.RULES[f"proxy-d-b{bits}g{group}"] = ProxyRule(ffn=True)
        cfg = default_config(p.m)
        R.time_variant(q, f"proxy-b{bits}g{group}", "pallas", label(cfg),
                       scores_step(q, cfg), (0.0,))
        full_check(R, q, f"proxy-b{bits}g{group}", cfg)
    for (bits, group), q in probs.items():
        method = f"proxy-d-b{bits}g{group}"
        R.time_variant(q, method, "pallas-fused", "scores=proxy", ffn_step(q, None), RATIOS)
        for r in RATIOS:
            cap = capacity(p.m, r)
            R.time_variant(q, method, "pallas-gather", f"cap={cap}", ffn_step(q, None, cap),
                           (r,))
    d_label = chosen()["d_countdown"]
    R.pallas(p, "d_countdown", d_label, R.scale.fused[d_label], RATIOS)
    for cfg in SWEEP[:1] if R.scale.interpret else SWEEP:
        for (bits, group), q in probs.items():
            if R.left() < 30:
                break
            R.time_variant(q, f"proxy-b{bits}g{group}", "pallas", label(cfg),
                           scores_step(q, cfg), (0.0,))
    write_markdown(R, os.path.join(R.args.out, "bench_proxy.md"))


def write_markdown(R: Runner, path):
    """This run's timed rows: time, GB/s, share of the read ceiling, byte floor, x dense."""
    rows = R.rows
    read = next((float(x["gb_per_s"]) for x in rows if x["method"] == "hbm-read"), None)
    dense = next((float(x["us_per_call"]) for x in rows
                  if x["method"] == "dense" and x["us_per_call"]), None)
    lines = [f"# Proxy rule, {LLAMA} bf16 batch 1 ({R.device})", "",
             f"HBM read ceiling {read:.0f} GB/s; floor = bytes needed at that ceiling." if read
             else "HBM read ceiling not measured.", "",
             "| method | implementation | variant | r | kept | us/call | GB/s | % of ceiling "
             "| floor us | x dense | check |", "|" + "---|" * 11]
    for x in rows:
        if not x["us_per_call"] or x["method"].startswith("hbm"):
            continue
        us = float(x["us_per_call"])
        nb = float(x["bytes_needed"]) if x["bytes_needed"] not in ("", None) else 0.0
        pct = f"{100 * float(x['gb_per_s']) / read:.0f}" if read and x["gb_per_s"] else ""
        floor = f"{nb / read / 1e3:.1f}" if read and nb else ""
        xd = f"{dense / us:.2f}" if dense and x["method"] != "loop-overhead" else ""
        check = "FAILED" if "FAILED" in x["note"] else (x["rel_err"] or "")
        lines.append(f"| {x['method']} | {x['implementation']} | {x['variant']} | "
                     f"{x['sparsity']} | {x['kept_frac']} | {us:.2f} | {x['gb_per_s']} | "
                     f"{pct} | {floor} | {xd} | {check} |")
    notes = [x for x in rows if "poison check" in x["variant"]]
    lines += [""] + [f"- {x['method']} {x['variant']}: {x['note']}" for x in notes]
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    log(f"wrote {path}")
