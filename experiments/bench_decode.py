"""End-to-end decode throughput at Llama-3.1-8B shapes (32 layers, random bf16 weights made
on the device): dense vs M-COUNTDOWN (calibrated thresholds) vs D-COUNTDOWN (rank-512
predictor), XLA gather vs Pallas, batch 1 and 4.

Every timed call is ONE compiled program running ``--steps`` decode steps in a
``lax.fori_loop`` (the next token is the argmax of the last, so nothing can be hoisted);
compile is excluded; the median of ``--repeats`` calls is reported.

Thresholds / predictor offsets are set per layer from the MLP inputs of a random prompt
so the realised sparsity is near the target; the realised value is measured from the
masks actually applied and written beside the speed.

    python experiments/bench_decode.py --out experiments/results     # on the GPU
    python experiments/bench_decode.py --tiny                          # CPU smoke run
"""

from __future__ import annotations

import argparse
import csv
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax import model as model_lib
from countdown_jax.config import ModelConfig
from countdown_jax.policy import SparseSpec, make_policy
from countdown_jax.sharding import random_params

LLAMA8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
               hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
               rope_theta=500000.0, hidden_act="silu", tie_word_embeddings=False,
               max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
TINY = dict(LLAMA8B, vocab_size=512, hidden_size=64, intermediate_size=256,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def random_predictor(key, cfg, rank, dtype=jnp.bfloat16):
    kv, ku = jax.random.split(key)
    L, d, m = cfg.num_layers, cfg.d_model, cfg.d_ff
    return {"V": (jax.random.normal(kv, (L, d, rank)) / np.sqrt(d)).astype(dtype),
            "U": (jax.random.normal(ku, (L, m, rank)) / np.sqrt(rank)).astype(dtype)}


def calibrate(params, cfg, predictor, r, key):
    """Per-layer tau (quantile of |u|) and theta (quantile of z) at sparsity r, from the
    MLP inputs of a random 64-token prompt."""
    tokens = jax.random.randint(key, (1, 64), 0, cfg.vocab_size)
    _, _, xs = jax.jit(functools.partial(model_lib.forward, cfg=cfg, collect=True,
                                         logits_at=jnp.zeros((1, 0), jnp.int32)))(params,
                                                                                   tokens=tokens)
    xs = xs.reshape(cfg.num_layers, -1, cfg.d_model).astype(jnp.float32)
    up = params["layers"]["mlp"]["up"].astype(jnp.float32)
    u = jnp.abs(jnp.einsum("ltd,lmd->ltm", xs, up))
    z = jnp.einsum("ltr,lmr->ltm", jnp.einsum("ltd,ldr->ltr", xs, predictor["V"].astype(jnp.float32)),
                   predictor["U"].astype(jnp.float32))
    tau = jnp.quantile(u.reshape(cfg.num_layers, -1), r, axis=1)
    theta = jnp.quantile(z.reshape(cfg.num_layers, -1), r, axis=1)
    return np.asarray(tau), np.asarray(theta)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "steps", "attention"),
                   donate_argnums=(2,))
def decode_loop(params, cfg, cache, token, pos, policy, *, spec, steps, attention="xla"):
    def body(_, c):
        tok, p, cache, kept = c
        logits, cache, k = model_lib.decode_step(params, cfg, tok, p, cache, spec=spec,
                                                 policy=policy, attention=attention)
        return jnp.argmax(logits, -1).astype(jnp.int32), p + 1, cache, kept + jnp.mean(k)

    tok, p, cache, kept = jax.lax.fori_loop(0, steps, body, (token, pos, cache, jnp.float32(0)))
    return tok, cache, kept / steps


def time_decode(params, cfg, spec, policy, batch, steps, repeats, prompt_len, key, *,
                profile=False, hlo_dir=None, attention="xla"):
    """(tokens/s, realised sparsity, s/step, profile rows or None, profile summary or None)."""
    cache = model_lib.init_cache(cfg, batch, prompt_len + steps + 1, jnp.bfloat16)
    tokens = jax.random.randint(key, (batch, prompt_len), 0, cfg.vocab_size)
    lengths = jnp.full((batch,), prompt_len, jnp.int32)
    prefill = jax.jit(functools.partial(model_lib.prefill, cfg=cfg))
    logits, cache0, _ = prefill(params, tokens=tokens, lengths=lengths, cache=cache)
    tok0 = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    pos0 = lengths
    run = functools.partial(decode_loop, params, cfg, spec=spec, steps=steps,
                            attention=attention)
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
                                spec=spec, steps=steps, attention=attention).compile().as_text()
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        layers = "unstacked" if isinstance(params["layers"], tuple) else "stacked"
        (Path(hlo_dir) / f"hlo_{spec.method}_{layers}.txt").write_text(txt)
    if profile:
        from gpu_profile import profile_call   # experiments/ is on sys.path as the script dir
        prof, summ = profile_call(run, jax.tree.map(jnp.copy, cache0), tok0, pos0, policy)
    print(f"  compile+first call {compile_s:.1f} s", flush=True)
    return batch * steps / t, 1.0 - float(kept), t / steps, prof, summ


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--name", default=None, help="output file stem (default bench_decode)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--sparsities", default="0.7,0.9")
    ap.add_argument("--methods", default="m_countdown,d_countdown")
    ap.add_argument("--implementations", default="gather,pallas")
    ap.add_argument("--layers", default="unstacked",
                    help="comma list: stacked (one scan over [L, ...] weights) and/or "
                         "unstacked (model.unstack_layers: one buffer per layer weight)")
    ap.add_argument("--capacity", default="1.5",
                    help="comma list: index-list capacity as a multiple of (1-r)*m, or "
                         "'none' (no cap: the exact rule; lets pallas use the fused kernel)")
    ap.add_argument("--profile", action="store_true",
                    help="also trace one call per setting: per-op GPU time, idle gaps")
    ap.add_argument("--dump-hlo", default=None, help="with --profile: write optimized HLO here")
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--attention", default="xla",
                    help="comma list of decode attention implementations: xla, pallas")
    ap.add_argument("--attention-config", default="",
                    help="bs,split,num_warps of the Pallas decode-attention kernel "
                         "(default: the kernel's DEFAULT_CONFIG)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new settings")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.attention_config:
        from countdown_jax.kernels.decode_attention import pallas_gpu as attn_kernel
        bs, split, warps = (int(v) for v in args.attention_config.split(","))
        attn_kernel.DEFAULT_CONFIG = attn_kernel.AttentionConfig(bs=bs, split=split,
                                                                 num_warps=warps)
        print("decode attention config:", attn_kernel.DEFAULT_CONFIG, flush=True)

    cfg = ModelConfig.from_hf(TINY if args.tiny else LLAMA8B)
    rank = min(args.rank, cfg.d_model)
    device = jax.devices()[0].device_kind
    shape = "tiny" if args.tiny else "llama3.1-8b"
    key = jax.random.PRNGKey(0)
    params = random_params(cfg, key, jnp.bfloat16)
    predictor = random_predictor(jax.random.PRNGKey(1), cfg, rank)
    rows, prof_rows = [], []
    name = args.name or ("bench_decode_tiny" if args.tiny else "bench_decode")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def record(method, impl, r, batch, layers, cap, res, note="", attention="xla"):
        tps, realised, step_s, prof, summ = res
        row = dict(device=device, shape=shape, method=method, implementation=impl,
                   sparsity=r, sparsity_realised=round(realised, 4), batch=batch,
                   layers=layers, capacity=cap, attention=attention, tokens_per_s=round(tps, 2),
                   ms_per_step=round(step_s * 1e3, 4), note=note)
        if summ:
            row.update(gpu_busy_ms_per_step=round(summ["busy_us"] / args.steps / 1e3, 4),
                       gpu_idle_ms_per_step=round(summ["idle_us"] / args.steps / 1e3, 4),
                       kernels_per_step=round(summ["kernels"] / args.steps, 1))
            for p in prof[:25]:
                prof_rows.append(dict(setting=f"{method}/{impl}/r{r}/b{batch}/{layers}/c{cap}"
                                              f"/attn-{attention}",
                                      op=p["op"][:120],
                                      us_per_step=round(p["us"] / args.steps, 2),
                                      launches_per_step=round(p["launches"] / args.steps, 2)))
        rows.append(row)
        print(json.dumps(row), flush=True)
        write(out, name, rows, prof_rows)

    batches = [int(b) for b in args.batches.split(",")]
    sparsities = [float(r) for r in args.sparsities.split(",")]
    layer_forms = args.layers.split(",")
    forms = {"stacked": params}
    if "unstacked" in layer_forms:     # one buffer per layer weight (a copy of the stack)
        forms["unstacked"] = jax.block_until_ready(model_lib.unstack_layers(params))
    caps = [None if c == "none" else float(c) for c in args.capacity.split(",")]
    m = cfg.d_ff
    attentions = args.attention.split(",")
    for batch in batches:
        for attn in attentions:
            for lf in layer_forms:
                res = time_decode(forms[lf], cfg, SparseSpec(), None, batch, args.steps,
                                  args.repeats, args.prompt_len, key, profile=args.profile,
                                  hlo_dir=args.dump_hlo, attention=attn)
                record("dense", "xla", 0.0, batch, lf, "", res, attention=attn)
        for r in sparsities:
            tau, theta = calibrate(params, cfg, predictor, r, jax.random.PRNGKey(2))
            setups = {
                "m_countdown": ("threshold", make_policy(cfg.num_layers, threshold=tau)),
                "d_countdown": ("predictor", make_policy(cfg.num_layers, theta=theta,
                                                         predictor=predictor)),
            }
            for method, impl, cf, attn, lf in itertools.product(
                    args.methods.split(","), args.implementations.split(","), caps,
                    attentions, layer_forms):
                mode, policy = setups[method]
                # capacity: cf x the expected kept count absorbs per-token variation; an
                # overflowing token keeps its highest-ranked neurons (counted in the
                # realised sparsity). None: the exact rule, no index list (pallas then
                # runs the fused kernel on GPU).
                cap = None if cf is None else int(np.ceil(cf * (1 - r) * m))
                spec = SparseSpec(method=method, mode=mode, implementation=impl, capacity=cap)
                if time.perf_counter() - t_start > args.budget_s:
                    print("budget spent: stop", flush=True)
                    return rows
                label = "none" if cf is None else f"{cf}x"
                try:
                    res = time_decode(forms[lf], cfg, spec, policy, batch, args.steps,
                                      args.repeats, args.prompt_len, key, profile=args.profile,
                                      hlo_dir=args.dump_hlo, attention=attn)
                    record(method, impl, r, batch, lf, label, res, attention=attn)
                except Exception as e:  # keep the other rows; say what failed
                    nan = float("nan")
                    record(method, impl, r, batch, lf, label, (nan, nan, nan, None, None),
                           note=f"{type(e).__name__}: {str(e)[:200]}", attention=attn)
    print(Path(out / f"{name}.md").read_text())
    return rows


def write(out: Path, name: str, rows, prof_rows):
    fields = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    if prof_rows:
        with open(out / f"{name}_profile.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(prof_rows[0]))
            w.writeheader()
            w.writerows(prof_rows)
    # the best dense decode of the same batch in this run is the baseline
    dense = {}
    for r in rows:
        if r["method"] == "dense":
            dense[r["batch"]] = max(dense.get(r["batch"], 0.0), r["tokens_per_s"])
    lines = [f"Decode throughput, {rows[0]['shape']}, {rows[0]['device']}, bf16.", "",
             "| method | impl | r | r realised | batch | layers | capacity | attention | "
             "tokens/s | ms/step | GPU busy ms | GPU idle ms | x best dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = dense.get(r["batch"])
        lines.append(f"| {r['method']} | {r['implementation']} | {r['sparsity']} | "
                     f"{r['sparsity_realised']} | {r['batch']} | {r['layers']} | "
                     f"{r['capacity']} | {r.get('attention', 'xla')} | {r['tokens_per_s']} | "
                     f"{r['ms_per_step']} | "
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
    rows = [r for r in csv.DictReader(open(csv_path))
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


if __name__ == "__main__":
    if sys.argv[1:2] == ["--plot"]:       # figure from the committed CSV
        res = Path(__file__).parent / "results"
        plot(res / "bench_decode.csv", res / "bench_decode.png")
    else:
        main()
