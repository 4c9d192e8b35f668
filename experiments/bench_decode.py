"""End-to-end decode throughput at Llama-3.1-8B shapes (32 layers, random bf16 weights made
on the device): dense vs M-COUNTDOWN (calibrated thresholds) vs D-COUNTDOWN (rank-512
predictor), XLA gather vs Pallas, batch 1 and 4.

Every timed call is ONE compiled program running ``--steps`` decode steps in a
``lax.fori_loop`` (the next token is the argmax of the last, so nothing can be hoisted);
compile is excluded; the median of ``--repeats`` calls is reported
(experiments/bench/decode.py).

Thresholds / predictor offsets are set per layer from the MLP inputs of a random prompt
so the realised sparsity is near the target; the realised value is measured from the
masks actually applied and written beside the speed.

From the repository root:
    PYTHONPATH=. python3 experiments/bench_decode.py --out DIR     # on the GPU
    python -m experiments.bench_decode --tiny --out /tmp/decode     # CPU smoke run
    python -m experiments.bench_decode --plot      # bench_decode.png from the committed CSV
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax import fast_path
from countdown_jax.config import ModelConfig
from countdown_jax.decode_path import AUTO, DecodePath
from countdown_jax.generate import decode_params
from countdown_jax.policy import SparseSpec, make_policy
from countdown_jax.sharding import random_params
from experiments.bench.decode import (bandwidth, calibrate, plot, random_predictor,
                                      read_ceiling, step_bytes, time_decode, write)
from experiments.bench.shapes import LLAMA_3_1_8B, TINY_DECODER


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--plot", action="store_true",
                    help="only rebuild bench_decode.png from bench_decode.csv in --out")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--name", default=None, help="output file stem (default bench_decode)")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--sparsities", default="0.7,0.9")
    ap.add_argument("--methods", default="m_countdown,d_countdown")
    ap.add_argument("--implementations", default="xla,pallas",
                    help="comma list: masked, xla (XLA index lists), pallas (batches: per-token index "
                         "lists), pallas-union / pallas-compact / pallas-dense (batches: "
                         "SparseSpec.batch_kernel 'union' / 'compact' / 'dense'), auto "
                         "(fast_path's choice, given the target r)")
    ap.add_argument("--layers", default="unstacked",
                    help="comma list: stacked (one scan over [L, ...] weights), unstacked "
                         "(model.unstack_layers: one buffer per layer weight), fused_qkv "
                         "(unstacked, q/k/v as one weight: model.fuse_qkv), transposed "
                         "(unstacked, q/k/v/o one row per output: "
                         "model.transpose_projections)")
    ap.add_argument("--capacity", default="1.5",
                    help="comma list: index-list capacity as a multiple of (1-r)*m, or "
                         "'none' (no cap: the exact rule; lets pallas use the fused kernel)")
    ap.add_argument("--profile", action="store_true",
                    help="also trace one call per setting: per-op GPU time, idle gaps")
    ap.add_argument("--dump-hlo", default=None, help="with --profile: write optimized HLO here")
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--attention", default="xla",
                    help="comma list of decode attention implementations: xla, pallas")
    ap.add_argument("--projections", default="xla",
                    help="comma list of decode q/k/v/o projections: xla, pallas (the GEMV, "
                         "countdown_jax/decode_projections.py)")
    ap.add_argument("--gemv-config", default="",
                    help="block_n,block_d,split_d,num_warps of the Pallas GEMV (default: "
                         "the kernel's DEFAULT_CONFIG)")
    ap.add_argument("--attention-config", default="",
                    help="bs,split,num_warps of the Pallas decode-attention kernel "
                         "(default: the kernel's DEFAULT_CONFIG)")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new settings")
    args = ap.parse_args(argv)
    if args.plot:
        plot(Path(args.out) / "bench_decode.csv", Path(args.out) / "bench_decode.png")
        return []
    t_start = time.perf_counter()
    if args.attention_config:
        # decode_step takes no attention config, so the kernel's default is what it uses
        from countdown_jax.kernels.decode_attention import pallas_gpu as attn_kernel
        bs, split, warps = (int(v) for v in args.attention_config.split(","))
        attn_kernel.DEFAULT_CONFIG = attn_kernel.AttentionConfig(bs=bs, split=split,
                                                                 num_warps=warps)
        print("decode attention config:", attn_kernel.DEFAULT_CONFIG, flush=True)
    if args.gemv_config:        # likewise for the projections' GEMV
        from countdown_jax.kernels.gemv import pallas_gpu as gemv_kernel
        bn, bd, split, warps = (int(v) for v in args.gemv_config.split(","))
        gemv_kernel.DEFAULT_CONFIG = gemv_kernel.GemvConfig(block_n=bn, block_d=bd,
                                                            split_d=split, num_warps=warps)
        print("GEMV config:", gemv_kernel.DEFAULT_CONFIG, flush=True)

    cfg = ModelConfig.from_hf(TINY_DECODER if args.tiny else LLAMA_3_1_8B)
    rank = min(args.rank, cfg.d_model)
    device = jax.devices()[0].device_kind
    shape = "tiny" if args.tiny else "llama3.1-8b"
    key = jax.random.PRNGKey(0)
    params = random_params(cfg, key, jnp.bfloat16)
    predictor = random_predictor(jax.random.PRNGKey(1), cfg, rank)
    rows, prof_rows = [], []
    read_bw = read_ceiling(args.tiny)
    print(f"{device}: HBM read ceiling {read_bw:.0f} GB/s", flush=True)
    name = args.name or ("bench_decode_tiny" if args.tiny else "bench_decode")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def record(method, impl, r, batch, layers, cap, res, note="", attention="xla",
               projections="xla"):
        tps, realised, step_s, prof, summ = res
        row = dict(device=device, shape=shape, method=method, implementation=impl,
                   sparsity=r, sparsity_realised=round(realised, 4), batch=batch,
                   layers=layers, capacity=cap, attention=attention, projections=projections,
                   tokens_per_s=round(tps, 2),
                   ms_per_step=round(step_s * 1e3, 4), note=note)
        nbytes = step_bytes(cfg, method, 1.0 - realised, batch=batch, rank=rank,
                            context=args.prompt_len + args.steps // 2)
        if nbytes:                            # batch 1 or dense
            row.update(floor_ms_per_step=round(nbytes / read_bw / 1e6, 4),
                       **bandwidth(nbytes, step_s, read_bw))
        if summ:
            row.update(gpu_busy_ms_per_step=round(summ["busy_us"] / args.steps / 1e3, 4),
                       gpu_idle_ms_per_step=round(summ["idle_us"] / args.steps / 1e3, 4),
                       kernels_per_step=round(summ["kernels"] / args.steps, 1))
            for p in prof[:25]:
                prof_rows.append(dict(setting=f"{method}/{impl}/r{r}/b{batch}/{layers}/c{cap}"
                                              f"/attn-{attention}/proj-{projections}",
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
    for lf in layer_forms:      # copies of the stack in the generate's layer forms
        if lf != "stacked":
            forms[lf] = decode_params(params, lf)
    caps = [None if c == "none" else float(c) for c in args.capacity.split(",")]
    m = cfg.d_ff
    paths = list(itertools.product(args.attention.split(","), args.projections.split(",")))
    for batch in batches:
        for (attn, proj), lf in itertools.product(paths, layer_forms):
            res = time_decode(forms[lf], cfg, SparseSpec(), None, batch, args.steps,
                              args.repeats, args.prompt_len, key, profile=args.profile,
                              hlo_dir=args.dump_hlo, attention=attn, projections=proj)
            record("dense", "xla", 0.0, batch, lf, "", res, attention=attn, projections=proj)
        for r in sparsities:
            tau, theta = calibrate(params, cfg, predictor, r, jax.random.PRNGKey(2))
            setups = {
                "m_countdown": ("threshold", make_policy(cfg.num_layers, threshold=tau)),
                "d_countdown": ("predictor", make_policy(cfg.num_layers, theta=theta,
                                                         predictor=predictor)),
            }
            for method, impl, cf, (attn, proj), lf in itertools.product(
                    args.methods.split(","), args.implementations.split(","), caps,
                    paths, layer_forms):
                mode, policy = setups[method]
                # capacity: cf x the expected kept count absorbs per-token variation; an
                # overflowing token keeps its highest-ranked neurons (counted in the
                # realised sparsity). None: the exact rule, no index list (pallas then
                # runs the fused kernel on GPU).
                cap = None if cf is None else int(np.ceil(cf * (1 - r) * m))
                spec = SparseSpec(method=method, mode=mode, capacity=cap, target_sparsity=r)
                ffn, _, kernel = impl.partition("-")
                path = fast_path.resolve(DecodePath(ffn=ffn, batch_kernel=kernel or AUTO),
                                         spec, batch)        # "auto": fast_path's choice
                spec = spec.with_path(path)
                if time.perf_counter() - t_start > args.budget_s:
                    print("budget spent: stop", flush=True)
                    return rows
                label = "none" if cf is None else f"{cf}x"
                try:
                    res = time_decode(forms[lf], cfg, spec, policy, batch, args.steps,
                                      args.repeats, args.prompt_len, key, profile=args.profile,
                                      hlo_dir=args.dump_hlo, attention=attn,
                                      projections=proj)
                    record(method, impl, r, batch, lf, label, res, attention=attn,
                           projections=proj)
                except Exception as e:  # keep the other rows; say what failed
                    nan = float("nan")
                    record(method, impl, r, batch, lf, label, (nan, nan, nan, None, None),
                           note=f"{type(e).__name__}: {str(e)[:200]}", attention=attn,
                           projections=proj)
    print(Path(out / f"{name}.md").read_text())
    return rows


if __name__ == "__main__":
    main()
