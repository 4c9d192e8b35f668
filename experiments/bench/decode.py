"""End-to-end decode timing shared by bench_decode and bench_spmd: random predictor,
per-layer calibration, the compiled multi-step decode loop, its timing (median of
repeats, compile excluded; optionally a profiler trace and the optimized HLO), the
result table and the figure."""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax import model as model_lib
from countdown_jax import proxy as proxy_lib
from countdown_jax.cost import bytes_share
from countdown_jax.decode_path import PORTABLE
from countdown_jax.gated import activation
from countdown_jax.generate import decode_policy
from countdown_jax.policy import make_policy

from .harness import ceilings, gb_per_s, read_csv, write_csv

_MODE = {"dense": "ideal", "m_countdown": "threshold", "d_countdown": "predictor"}
PROXY = "proxy"                 # the benches' name for D-COUNTDOWN in proxy mode
PROXY_FORMAT = (4, 128)         # (bits, group) of the benches' proxy


def step_bytes(cfg, method: str, kept: float, *, batch: int, context: int, rank: int = 0,
               model_shards: int = 1, itemsize: int = 2, mode: str | None = None,
               proxy: tuple[int, int] | None = None):
    """Bytes one decode step must read per device: the q/k/v/o and LM-head weights, the FFN
    weights the rule reads (``cost.bytes_share``: batch 1 only, where the kept set is one
    token's; a batch reads the union of its tokens' sets, not measured here -> None) and
    the KV cache of ``context`` positions per sequence. Weights split evenly over
    ``model_shards`` (tensor parallel); norms and activations (O(d)) are left out."""
    if method != "dense" and batch != 1:
        return None
    d, m, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    attn = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
    share = bytes_share(method, mode or _MODE[method], kept, m=m, d=d, rank=rank, proxy=proxy)
    weights = cfg.num_layers * (attn + 3 * m * d * share) + cfg.vocab_size * d
    kv = cfg.num_layers * 2 * cfg.num_kv_heads * hd * context * batch
    return (weights + kv) * itemsize / model_shards


def read_ceiling(tiny: bool) -> float:
    """This run's HBM read ceiling in GB/s (2 GiB read; a small array for CPU smoke runs)."""
    return ceilings(n=1 << (16 if tiny else 29))[1]


def bandwidth(nbytes, step_s: float, read_bw: float) -> dict:
    """Columns for a step that must read ``nbytes`` (``step_bytes``) in ``step_s``: GB/s
    and its share of the read ceiling; {} when the bytes are not modelled or the step
    was not timed (nan)."""
    if not nbytes or step_s != step_s:
        return {}
    gbps = gb_per_s(nbytes, step_s * 1e6)
    return dict(gb_per_s=round(gbps), pct_of_read_ceiling=round(100 * gbps / read_bw, 1))


def random_predictor(key, cfg, rank, dtype=jnp.bfloat16):
    kv, ku = jax.random.split(key)
    L, d, m = cfg.num_layers, cfg.d_model, cfg.d_ff
    return {"V": (jax.random.normal(kv, (L, d, rank)) / np.sqrt(d)).astype(dtype),
            "U": (jax.random.normal(ku, (L, m, rank)) / np.sqrt(rank)).astype(dtype)}


def _mlp_inputs(params, cfg, key):
    """[L, 64, d] float32: each layer's MLP inputs on a random 64-token prompt."""
    tokens = jax.random.randint(key, (1, 64), 0, cfg.vocab_size)
    _, _, xs = jax.jit(functools.partial(model_lib.forward, cfg=cfg, collect=True,
                                         logits_at=jnp.zeros((1, 0), jnp.int32)))(params,
                                                                                   tokens=tokens)
    return xs.reshape(cfg.num_layers, -1, cfg.d_model).astype(jnp.float32)


def proxy_policy(params, cfg, r, key, fmt=PROXY_FORMAT):
    """D-COUNTDOWN's proxy rule at sparsity r: the proxy quantized from the model's own
    gate / up weights (``proxy.quantize_mlp``, a layer at a time) and per-layer tau = the
    r-quantile of |s_hat| on the calibration prompt's MLP inputs."""
    fmt = (fmt[0], math.gcd(fmt[1], cfg.d_model))       # tiny shapes: a group that fits
    mlp = params["layers"]["mlp"]
    quant = jax.jit(lambda g, u: proxy_lib.quantize_mlp({"gate": g, "up": u}, *fmt))
    pr = jax.lax.map(lambda gu: quant(*gu), (mlp["gate"], mlp["up"]))
    xs = _mlp_inputs(params, cfg, key)
    s = jax.jit(lambda pr, xs: jax.lax.map(
        lambda a: proxy_lib.proxy_scores(a[0], a[1], cfg.act), (pr, xs)))(pr, xs)
    tau = jnp.quantile(s.reshape(cfg.num_layers, -1), r, axis=1)
    return make_policy(cfg.num_layers, threshold=np.asarray(tau), proxy=pr)


def cats_policy(params, cfg, r, key):
    """CATS at sparsity r: per-layer tau = the r-quantile of |act(gate x)| on the
    calibration prompt's MLP inputs."""
    xs = _mlp_inputs(params, cfg, key)
    gate = params["layers"]["mlp"]["gate"].astype(jnp.float32)
    a = jnp.abs(activation(cfg.act)(jnp.einsum("ltd,lmd->ltm", xs, gate)))
    tau = jnp.quantile(a.reshape(cfg.num_layers, -1), r, axis=1)
    return make_policy(cfg.num_layers, threshold=np.asarray(tau))


def calibrate(params, cfg, predictor, r, key):
    """Per-layer tau (quantile of |u|) and theta (quantile of z) at sparsity r, from the
    MLP inputs of a random 64-token prompt."""
    xs = _mlp_inputs(params, cfg, key)
    up = params["layers"]["mlp"]["up"].astype(jnp.float32)
    u = jnp.abs(jnp.einsum("ltd,lmd->ltm", xs, up))
    z = jnp.einsum("ltr,lmr->ltm", jnp.einsum("ltd,ldr->ltr", xs, predictor["V"].astype(jnp.float32)),
                   predictor["U"].astype(jnp.float32))
    tau = jnp.quantile(u.reshape(cfg.num_layers, -1), r, axis=1)
    theta = jnp.quantile(z.reshape(cfg.num_layers, -1), r, axis=1)
    return np.asarray(tau), np.asarray(theta)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "steps", "attention",
                                             "projections"), donate_argnums=(2,))
def decode_loop(params, cfg, cache, token, pos, policy, *, spec, steps, attention="xla",
                projections="xla"):
    def body(_, c):
        tok, p, cache, kept = c
        path = dataclasses.replace(PORTABLE, attention=attention, projections=projections)
        logits, cache, k = model_lib.decode_step(params, cfg, tok, p, cache, spec=spec,
                                                 policy=policy, path=path)
        return jnp.argmax(logits, -1).astype(jnp.int32), p + 1, cache, kept + jnp.mean(k)

    tok, p, cache, kept = jax.lax.fori_loop(0, steps, body, (token, pos, cache, jnp.float32(0)))
    return tok, cache, kept / steps


def time_decode(params, cfg, spec, policy, batch, steps, repeats, prompt_len, key, *,
                profile=False, hlo_dir=None, attention="xla", projections="xla"):
    """(tokens/s, realised sparsity, s/step, profile rows or None, profile summary or None)."""
    policy = decode_policy(params, policy)          # as generate hands it to the layers
    cache = model_lib.init_cache(cfg, batch, prompt_len + steps + 1, jnp.bfloat16)
    tokens = jax.random.randint(key, (batch, prompt_len), 0, cfg.vocab_size)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    prefill = jax.jit(functools.partial(model_lib.prefill, cfg=cfg))
    logits, cache0, _ = prefill(params, tokens=tokens, lengths=lengths, cache=cache)
    tok0 = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    pos0 = lengths
    run = functools.partial(decode_loop, params, cfg, spec=spec, steps=steps,
                            attention=attention, projections=projections)
    t0 = time.perf_counter()
    _, cache, kept = run(jax.tree.map(jnp.copy, cache0), tok0, pos0, policy)
    jax.block_until_ready(cache)                      # compile + warm-up
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        cache = jax.tree.map(jnp.copy, cache0)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        _, cache, kept = run(cache, tok0, pos0, policy)
        jax.block_until_ready(cache)
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    prof = summ = None
    if profile and hlo_dir is not None:     # what the compiler made of one program
        txt = decode_loop.lower(params, cfg, jax.tree.map(jnp.copy, cache0), tok0, pos0, policy,
                                spec=spec, steps=steps, attention=attention,
                                projections=projections).compile().as_text()
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        layers = "unstacked" if isinstance(params["layers"], tuple) else "stacked"
        (Path(hlo_dir) / f"hlo_{spec.method}_{layers}.txt").write_text(txt)
    if profile:
        from .profile import profile_call
        prof, summ = profile_call(run, jax.tree.map(jnp.copy, cache0), tok0, pos0, policy)
    print(f"  compile+first call {compile_s:.1f} s", flush=True)
    return batch * steps / t, 1.0 - float(kept), t / steps, prof, summ


def write(out: Path, name: str, rows, prof_rows):
    """``name``.csv (+ ``name``_profile.csv) and ``name``.md: every row with its speedup
    over the best dense decode of the same batch in this run."""
    write_csv(out / f"{name}.csv", rows)
    if prof_rows:
        write_csv(out / f"{name}_profile.csv", prof_rows)
    # the best dense decode of the same batch in this run is the baseline
    dense = {}
    for r in rows:
        if r["method"] == "dense":
            dense[r["batch"]] = max(dense.get(r["batch"], 0.0), r["tokens_per_s"])
    lines = [f"Decode throughput, {rows[0]['shape']}, {rows[0]['device']}, bf16.", "",
             "| method | impl | r | r realised | batch | layers | capacity | attention | "
             "projections | tokens/s | ms/step | floor ms (bytes / read ceiling) | "
             "% of read ceiling | GPU busy ms | GPU idle ms | x best dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = dense.get(r["batch"])
        lines.append(f"| {r['method']} | {r['implementation']} | {r['sparsity']} | "
                     f"{r['sparsity_realised']} | {r['batch']} | {r['layers']} | "
                     f"{r['capacity']} | {r.get('attention', 'xla')} | "
                     f"{r.get('projections', 'xla')} | {r['tokens_per_s']} | "
                     f"{r['ms_per_step']} | {r.get('floor_ms_per_step', '')} | "
                     f"{r.get('pct_of_read_ceiling', '')} | "
                     f"{r.get('gpu_busy_ms_per_step', '')} | "
                     f"{r.get('gpu_idle_ms_per_step', '')} | "
                     f"{r['tokens_per_s'] / base:.2f} |" if base else "|")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def plot(csv_path: Path, png_path: Path):
    """ms/step of dense, M and D (batch 1, r = 0.9, unstacked, exact rule) per H100 / H200
    run (the card is in each run's name; compare bars within a run)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in read_csv(csv_path)
            if r["batch"] == "1" and r["layers"] == "unstacked"
            and ("H100" in r["run"] or "H200" in r["run"])
            and (r["method"] == "dense" or (r["sparsity"] == "0.9" and r["capacity"] == "none"))
            and r["ms_per_step"] not in ("", "nan")]
    runs = list(dict.fromkeys(r["run"] for r in rows))
    bars = [("dense", "xla"), ("dense", "pallas"), ("m_countdown", "xla"),
            ("m_countdown", "pallas"), ("d_countdown", "xla"), ("d_countdown", "pallas")]
    colors = {"dense": "gray", "m_countdown": "tab:blue", "d_countdown": "tab:green"}
    fig, ax = plt.subplots(figsize=(11, 4.5))
    w = 0.8 / len(bars)
    for i, (method, attn) in enumerate(bars):
        xs, ys = [], []
        for j, run in enumerate(runs):
            v = [float(r["ms_per_step"]) for r in rows if r["run"] == run
                 and r["method"] == method and r.get("attention", "xla") == attn]
            if v:
                xs.append(j + (i - len(bars) / 2 + 0.5) * w)
                ys.append(v[0])
        ax.bar(xs, ys, w, color=colors[method], alpha=1.0 if attn == "pallas" else 0.5,
               hatch="" if attn == "pallas" else "//", label=f"{method}, {attn} attention")
    ax.set_xticks(range(len(runs)))
    ax.set_xticklabels([r.split(" ")[0] + "\n" + r.split(" ")[1] +
                        ("\n(prompt 2048)" if "prompt 2048" in r else "") +
                        ("\n(V [d, r])" if "V [d r]" in r else "") for r in runs], fontsize=7)
    ax.set_ylabel("ms per decode step (lower is better)")
    ax.set_title("Llama-3.1-8B shapes, 32 layers, batch 1, r = 0.9 (H100 80GB HBM3 / H200)")
    ax.legend(fontsize=7, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
