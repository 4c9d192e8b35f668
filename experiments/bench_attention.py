"""Decode-attention kernel configs vs XLA's attention, per-kernel GPU time (profiler).

Run on a GPU (device tool):
    PYTHONPATH=. python3 experiments/bench_attention.py --out DIR [--pick FILE]
    (or python -m experiments.bench_attention from the repository root)

Llama-3.1-8B decode shapes: one token, 32 query / 8 kv heads of 128, a stacked bf16 cache
[32 layers, 1, S, 8, 128] read at layer l (as the model does). Each program chains 16
calls over 16 layers (q <- q + 1e-3 * out) and is traced once; GPU time of all its
kernels / 16 = us per call ("busy": union of kernel intervals, so the split-combine ops
and, for XLA, the copy of the layer's cache slice are included). Cache lengths: 161 (the
decode benchmark: prompt 128 + 32 steps + 1) and 2081 (prompt 2048). --pick writes the
config with the lowest summed time over both lengths as "bs,split,num_warps".
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax.kernels.decode_attention.api import decode_attention
from countdown_jax.kernels.decode_attention.pallas_gpu import AttentionConfig
from experiments.bench.harness import write_csv
from experiments.bench.profile import chained, profile_call
from experiments.bench.shapes import LLAMA_3_1_8B

L = LLAMA_3_1_8B["num_hidden_layers"]
HKV = LLAMA_3_1_8B["num_key_value_heads"]
G = LLAMA_3_1_8B["num_attention_heads"] // HKV      # query heads per kv head
HD = LLAMA_3_1_8B["head_dim"]
CALLS = 16


def chain(impl, cfg):
    """CALLS dependent calls, one per layer of the stacked cache."""
    return chained(lambda q, l, kc, vc, pos: decode_attention(
        q, kc, vc, pos, layer=l, scale=HD ** -0.5, implementation=impl, config=cfg), CALLS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    ap.add_argument("--pick", default="")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0].device_kind
    rows, total = [], {}
    configs = [None] + [AttentionConfig(bs=bs, split=sp, num_warps=w) for bs, sp, w in
                        itertools.product((32, 64), (64, 256, 1024), (1, 2, 4))]
    for S in (161, 2081):
        rng = np.random.default_rng(S)
        kc = jnp.asarray(rng.standard_normal((L, 1, S, HKV, HD)), jnp.bfloat16)
        vc = jnp.asarray(rng.standard_normal((L, 1, S, HKV, HD)), jnp.bfloat16)
        q = jnp.asarray(rng.standard_normal((1, HKV * G, HD)), jnp.bfloat16)
        pos = jnp.array([S - 1], jnp.int32)
        for cfg in configs:
            impl = "xla" if cfg is None else "pallas"
            label = "xla" if cfg is None else f"bs{cfg.bs}-split{cfg.split}-w{cfg.num_warps}"
            try:
                f = chain(impl, cfg)
                jax.block_until_ready(f(q, kc, vc, pos))
                prof, summ = profile_call(f, q, kc, vc, pos)
            except Exception as e:   # noqa: BLE001
                print(f"S={S} {label}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            us = summ["busy_us"] / CALLS
            kern = sum(r["us"] for r in prof if r["op"] == "decode_attention") / CALLS
            rows.append(dict(device=dev, cache_len=S, implementation=impl, config=label,
                             busy_us_per_call=f"{us:.2f}", kernel_us_per_call=f"{kern:.2f}",
                             kernels_per_call=f"{summ['kernels'] / CALLS:.2f}"))
            total[label] = total.get(label, 0.0) + us
            print(f"S={S:5d} {label:22s} busy {us:7.2f} us/call (kernel {kern:6.2f}, "
                  f"{summ['kernels'] / CALLS:.1f} kernels/call)", flush=True)
    write_csv(os.path.join(args.out, "bench_attention.csv"), rows)
    best = min((k for k in total if k != "xla"), key=total.get)
    print("best", best, f"{total[best]:.2f} us summed (xla {total.get('xla', float('nan')):.2f})")
    if args.pick:
        bs, sp, w = best.replace("bs", "").replace("split", "").replace("w", "").split("-")
        open(args.pick, "w").write(f"{bs},{sp},{w}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
