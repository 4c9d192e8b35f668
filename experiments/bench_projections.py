"""Decode-step projections outside the sparse FFN: which weight layout XLA streams fastest.

Run on a GPU (device tool), from the repository root:
    PYTHONPATH=. python3 experiments/bench_projections.py --out DIR

At batch 1 every projection is a GEMV: it should run at the HBM read ceiling. The decode
profile (bench_decode_profile.csv) showed the 4096x4096 q and o projections as Triton GEMM
fusions at ~2.4 TB/s while the MLP's reduction fusions read at ~3 TB/s, and the predictor's
h = x V (V [d, r]) at ~0.6 TB/s. This times, at Llama-3.1-8B shapes in bf16, each
projection written in the model's current form and in alternatives (2-D weight, weight
stored transposed so the contraction runs along its contiguous axis, q/k/v fused into one
matrix), from a profiler trace: per-kernel GPU time, compile excluded. Each program chains
16 calls over 8 weight copies (more bytes than the 50 MB L2) so no call hits cache.

Also measured: the HBM read ceiling (a reduction over 2 GiB; what a GEMV can reach) next
to the copy ceiling (read + write).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.harness import ceilings, gb_per_s, write_csv
from experiments.bench.profile import chained, profile_call
from experiments.bench.shapes import LLAMA_3_1_8B

D = LLAMA_3_1_8B["hidden_size"]
H = LLAMA_3_1_8B["num_attention_heads"]
K = LLAMA_3_1_8B["num_key_value_heads"]
HD = LLAMA_3_1_8B["head_dim"]
M = LLAMA_3_1_8B["intermediate_size"]
R = 512                                      # D-COUNTDOWN predictor rank
COPIES, CALLS = 8, 16
HI = jax.lax.Precision.HIGHEST


def forms():
    """name -> (weight shape, f(x [1, d] bf16, w) -> [1, >= d] ) for one projection."""
    def q_einsum(x, w):                      # model: wq [d, H, hd]
        return jnp.einsum("btd,dhk->bthk", x[:, None], w).reshape(1, -1)

    def o_einsum(x, w):                      # model: wo [H, hd, d]
        return jnp.einsum("bthk,hkd->btd", x.reshape(1, 1, H, HD), w)[:, 0]

    def row_major(x, w):                     # w [d, out]: contraction along the major axis
        return jnp.einsum("bd,dn->bn", x, w)

    def transposed(x, w):                    # w [out, d]: contraction along the minor axis
        return jnp.einsum("bd,nd->bn", x, w)

    def h_current(x, w):                     # predictor h = x V, V [d, r], float32
        return jnp.einsum("nd,dr->nr", x, w, preferred_element_type=jnp.float32, precision=HI)

    def h_transposed(x, w):                  # V stored [r, d]
        return jnp.einsum("nd,rd->nr", x, w, preferred_element_type=jnp.float32, precision=HI)

    def split_k(slabs, **kw):                # w [d, n] as slabs along d: more output tiles
        def f(x, w):
            part = jnp.einsum("nkc,kcr->nkr", x.reshape(1, slabs, D // slabs),
                              w.reshape(slabs, D // slabs, w.shape[-1]), **kw)
            return jnp.sum(part, axis=1)
        return f

    def kv_fused(x, w):                      # k and v as one [d, 2K*hd] column reduction
        return jnp.einsum("bd,dn->bn", x, w)

    def z_current(x, w):                     # z = h U^T, h float32, U [m, r] bf16
        h = x[:, :R].astype(jnp.float32)
        return jnp.einsum("nr,mr->nm", h, w.astype(jnp.float32), precision=HI)

    def z_hi_lo(x, w):                       # h = hi + lo (two bf16 rows): one bf16 GEMV
        h = x[:, :R].astype(jnp.float32)
        hi = h.astype(jnp.bfloat16)
        lo = (h - hi.astype(jnp.float32)).astype(jnp.bfloat16)
        z = jnp.einsum("kr,mr->km", jnp.concatenate([hi, lo]), w,
                       preferred_element_type=jnp.float32)
        return z[:1] + z[1:]

    qkv = (H + 2 * K) * HD
    f32 = dict(preferred_element_type=jnp.float32, precision=HI)
    return {
        "q einsum [d,H,hd] (model)": ((D, H, HD), q_einsum),
        "q 2-D [d,H*hd]": ((D, H * HD), row_major),
        "q transposed [H*hd,d]": ((H * HD, D), transposed),
        "o einsum [H,hd,d] (model)": ((H, HD, D), o_einsum),
        "o transposed [d,H*hd]": ((D, H * HD), transposed),
        "k 2-D [d,K*hd]": ((D, K * HD), row_major),
        "k transposed [K*hd,d]": ((K * HD, D), transposed),
        "qkv fused 2-D [d,(H+2K)hd]": ((D, qkv), row_major),
        "qkv fused transposed [(H+2K)hd,d]": ((qkv, D), transposed),
        "h=xV [d,r] f32 (model)": ((D, R), h_current),
        "h=xV transposed [r,d] f32": ((R, D), h_transposed),
        "h=xV split-K 8 slabs f32": ((D, R), split_k(8, **f32)),
        "h=xV split-K 16 slabs f32": ((D, R), split_k(16, **f32)),
        "h=xV split-K 32 slabs f32": ((D, R), split_k(32, **f32)),
        "kv fused 2-D [d,2K*hd]": ((D, 2 * K * HD), kv_fused),
        "kv split-K 16 slabs f32": ((D, 2 * K * HD), split_k(16, preferred_element_type=jnp.float32)),
        "kv split-K 32 slabs f32": ((D, 2 * K * HD), split_k(32, preferred_element_type=jnp.float32)),
        "z=hU^T [m,r] f32 h (model)": ((M, R), z_current),
        "z=hU^T hi+lo bf16 rows": ((M, R), z_hi_lo),
    }


def chain(f):
    """CALLS dependent calls over the weight copies (the output trimmed / padded to d)."""
    def step(x, i, ws):
        y = f(x, ws[i % COPIES]).reshape(1, -1)
        return jnp.pad(y, ((0, 0), (0, max(0, D - y.shape[1]))))[:, :D]
    return chained(step, CALLS)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "experiments/results"))
    ap.add_argument("--only", default="", help="comma list of form-name prefixes")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = jax.devices()[0].device_kind
    copy_bw, read_bw = ceilings()
    print(f"{dev}: copy {copy_bw:.0f} GB/s (read+write), read {read_bw:.0f} GB/s", flush=True)
    rows = [dict(device=dev, form="hbm copy 2 GiB", op="", us_per_call="", launches_per_call="",
                 bytes=2 * 4 << 29, gb_per_s=f"{copy_bw:.0f}"),
            dict(device=dev, form="hbm read 2 GiB", op="", us_per_call="", launches_per_call="",
                 bytes=4 << 29, gb_per_s=f"{read_bw:.0f}")]
    x = jax.random.normal(jax.random.key(0), (1, D), jnp.float32).astype(jnp.bfloat16)
    only = [t for t in args.only.split(",") if t]
    for name, (shape, f) in forms().items():
        if only and not any(name.startswith(t) for t in only):
            continue
        ws = [(jax.random.normal(jax.random.key(i + 1), shape, jnp.float32) * 0.02
               ).astype(jnp.bfloat16) for i in range(COPIES)]
        nbytes = int(np.prod(shape)) * 2
        g = chain(f)
        jax.block_until_ready(g(x, ws))                      # compile + warm-up
        prof, _ = profile_call(g, x, ws)
        top = prof[0]                                        # the projection's kernel(s)
        for r in prof[:4]:
            per = r["us"] / CALLS
            rows.append(dict(device=dev, form=name, op=r["op"], us_per_call=f"{per:.2f}",
                             launches_per_call=f"{r['launches'] / CALLS:g}", bytes=nbytes,
                             gb_per_s=f"{gb_per_s(nbytes, per):.0f}" if r is top else ""))
        print(f"{name:36s} {top['op'][:34]:34s} {top['us'] / CALLS:7.2f} us "
              f"{gb_per_s(nbytes, top['us'] / CALLS):6.0f} GB/s  (launches/call "
              f"{top['launches'] / CALLS:g}; next: "
              + ", ".join(f"{r['op'][:24]} {r['us'] / CALLS:.2f}" for r in prof[1:3]) + ")",
              flush=True)
        del ws
    path = os.path.join(args.out, "bench_projections.csv")
    write_csv(path, rows)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
