"""Decode throughput with SPMD at Llama-3.1-8B shapes: one device, tensor parallelism
(1x2) and data parallelism (2x1), dense vs M-COUNTDOWN vs D-COUNTDOWN, on the fast path
(unstacked layers, Pallas decode attention over each device's heads, the Pallas FFN per
shard), with dense on XLA attention for comparison. What each row runs: bench/spmd.py.

One process measures everything, so every ratio is within one call: x_one_device against
the same row on mesh 1x1, x_dense_same_mesh against dense (same attention) on the same
mesh and batch. Random bf16 weights are made once on the first mesh and copied to the
others (same values everywhere); thresholds (M) and predictor offsets (D) are calibrated
per layer at sparsity r from a random prompt; every mesh decodes from the same prefilled
cache. Each timed call is ONE compiled program of --steps greedy decode steps
(bench.decode.decode_loop), compile excluded, median of --repeats calls. All programs are
compiled before any is timed: the first batch's dense ones alone first (GEMM autotuning
runs on the GPU), the others --compile-workers at a time. check_rel_err: the cache's last-layer keys
of the first decoded token against the same method on 1x1 (max |diff| / max |ref|; bf16
sums in another order: ~1e-2 expected). A failing row is recorded with its error in
`note` and the run goes on; rows not started within --budget-s are written as skipped.
The profile rows trace one call of the batch-1 programs on --profile-meshes: collective
vs compute time per GPU (bench/profile.py). --layers picks the layer forms: the first runs
every row, the others the batch-1 rows (fused_qkv: q/k/v as one weight per model device,
model.fuse_qkv; transposed: q/k/v/o one row per output, model.transpose_projections): see
KERNEL_NOTES.md, "Tensor parallel decode".

From the repository root (NVLink multicast stays off: the script sets
NCCL_NVLS_ENABLE=0 before jax starts):
    PYTHONPATH=. python experiments/bench_spmd.py --out experiments/results     # 2 GPUs
    PYTHONPATH=. python experiments/bench_spmd.py --tiny --cpu-devices 2 --out /tmp/spmd
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):                  # run as a file: the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from experiments.bench.spmd import FIELDS, PROFILE_FIELDS, add_ratios, plan, sparse_spec, table


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--cpu-devices", type=int, default=0,
                    help="run on N fake CPU devices (sets XLA_FLAGS before jax starts; "
                         "the Pallas kernels then run in interpret mode)")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--name", default=None,
                    help="output file stem (default bench_spmd, or bench_spmd_tiny)")
    ap.add_argument("--meshes", default="1x1,1x2,2x1",
                    help="comma list of DATAxMODEL meshes; 1x1 = one device")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--sparsities", default="0.9")
    ap.add_argument("--methods", default="dense,m_countdown,d_countdown")
    ap.add_argument("--xla-dense-batches", default="1",
                    help="batches with a dense XLA-attention row per mesh ('' for none)")
    ap.add_argument("--projections", default="xla",
                    help="comma list of decode q/k/v/o paths for the fast-path rows: xla, "
                         "pallas (the GEMV kernel per device, decode_projections.py)")
    ap.add_argument("--profile", default="dense,d_countdown",
                    help="methods whose batch-1 call is profiled on --profile-meshes "
                         "('' for none)")
    ap.add_argument("--profile-meshes", default="1x2",
                    help="meshes whose batch-1 calls are profiled (e.g. 1x1,1x2: the same "
                         "program on one GPU next to its tensor-parallel split)")
    ap.add_argument("--layers", default="unstacked",
                    help="layer forms, comma list: unstacked, fused_qkv "
                         "(model.fuse_qkv with one head group per model device: one q/k/v "
                         "GEMV per device), transposed (model.transpose_projections: q/k/v/o "
                         "one row per output); the first runs every row, the others the "
                         "first batch's fast-path rows")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--compile-workers", type=int, default=4,
                    help="programs compiled at once after the dense ones (1 = serial)")
    ap.add_argument("--budget-s", type=float, default=170.0,
                    help="no new compile after budget - --timing-reserve-s seconds and no "
                         "new row after budget; results are written after every row")
    ap.add_argument("--timing-reserve-s", type=float, default=35.0)
    ap.add_argument("--cache-dir", default="/tmp/cdj_jax_cache",
                    help="jax's persistent compilation cache: a second call (e.g. the rows "
                         "a budget cut skipped) compiles little ('' = off)")
    args = ap.parse_args(argv)
    try:
        args.meshes = [tuple(int(v) for v in s.lower().split("x"))
                       for s in args.meshes.split(",")]
        args.batches = [int(b) for b in args.batches.split(",")]
        args.sparsities = [float(r) for r in args.sparsities.split(",")]
        args.xla_dense_batches = [int(b) for b in args.xla_dense_batches.split(",") if b]
    except ValueError as e:
        ap.error(f"bad list: {e}")
    if any(len(mh) != 2 or min(mh) < 1 for mh in args.meshes):
        ap.error(f"--meshes entries are DATAxMODEL with positive sizes, got {args.meshes}")
    args.methods = args.methods.split(",")
    args.layers = args.layers.split(",")
    forms = ("unstacked", "fused_qkv", "transposed")
    if not args.layers or any(f not in forms for f in args.layers):
        ap.error(f"--layers entries are among {forms}, got {args.layers}")
    args.profile_meshes = [m for m in args.profile_meshes.split(",") if m]
    args.projections = tuple(args.projections.split(","))
    if any(p not in ("xla", "pallas") for p in args.projections):
        ap.error(f"--projections must be among xla, pallas, got {args.projections}")
    args.profile = [p for p in args.profile.split(",") if p]
    bad = [m for m in args.methods + args.profile
           if m not in ("dense", "m_countdown", "d_countdown")]
    if bad:
        ap.error(f"--methods / --profile must be among dense, m_countdown, d_countdown, "
                 f"got {bad}")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ["NCCL_NVLS_ENABLE"] = "0"        # before jax starts: NVLink multicast off
    if args.cpu_devices:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count="
                                   f"{args.cpu_devices}").strip()
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from countdown_jax import model as model_lib
    from countdown_jax import sharding
    from countdown_jax.config import ModelConfig
    from countdown_jax.kernels._platform import interpret_mode
    from countdown_jax.generate import decode_policy
    from countdown_jax.policy import SparseSpec, make_policy
    from experiments.bench.decode import (bandwidth, calibrate, decode_loop, random_predictor,
                                          read_ceiling, step_bytes)
    from experiments.bench.harness import write_csv
    from experiments.bench.profile import profile_devices
    from experiments.bench.shapes import LLAMA_3_1_8B, TINY_DECODER

    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    t_start = time.perf_counter()
    log = lambda msg: print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", flush=True)
    # On a CPU the kernels run as on a GPU, interpreted (read at trace time, in every thread).
    contextlib.ExitStack().enter_context(interpret_mode(jax.default_backend() == "cpu"))
    cfg = ModelConfig.from_hf(TINY_DECODER if args.tiny else LLAMA_3_1_8B)
    shape = "tiny" if args.tiny else "llama3.1-8b"
    m, L = cfg.d_ff, cfg.num_layers
    devices = jax.devices()
    card = devices[0].device_kind
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("bench_spmd_tiny" if args.tiny else "bench_spmd")
    log(f"{len(devices)} x {card}, jax {jax.__version__}, {shape}")
    # HBM read ceiling of one device (the cards are alike), this run: GB/s per device
    # below is the bytes a step must read on a device over its time
    read_bw = read_ceiling(args.tiny)
    log(f"HBM read ceiling {read_bw:.0f} GB/s")
    named = lambda mesh, specs: jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    meshes = {f"{d}x{mo}": sharding.make_mesh(model=mo, data=d)
              for d, mo in args.meshes if d * mo <= len(devices)}
    if not meshes:
        raise SystemExit(f"no mesh of {args.meshes} fits the {len(devices)} devices")
    rows_plan = [r for r in plan(args.meshes, args.batches, args.methods, args.sparsities,
                                 args.xla_dense_batches, args.layers, args.projections)
                 if r.label in meshes]

    # -- weights, calibration and prefill on the first mesh; copies for the others -------
    first = next(iter(meshes.values()))
    stacked = sharding.random_params(cfg, jax.random.key(0), jnp.bfloat16, mesh=first)
    predictor = random_predictor(jax.random.PRNGKey(1), cfg, min(args.rank, cfg.d_model))
    calib = {}
    with jax.set_mesh(first):
        for r in args.sparsities:
            calib[r] = calibrate(stacked, cfg, predictor, r, jax.random.PRNGKey(2))
    log("calibrated")
    cache_len = args.prompt_len + args.steps + 1
    states = {}
    prefill = jax.jit(functools.partial(model_lib.prefill, cfg=cfg))
    for batch in args.batches:
        tokens = jax.random.randint(jax.random.PRNGKey(3), (batch, args.prompt_len), 0,
                                    cfg.vocab_size, jnp.int32)
        lengths = jnp.full((batch,), args.prompt_len, jnp.int32)
        tokens, lengths = sharding.shard_batch((tokens, lengths), first)
        with jax.set_mesh(first):
            cache = model_lib.init_cache(cfg, batch, cache_len, jnp.bfloat16)
            logits, cache, _ = prefill(stacked, tokens=tokens, lengths=lengths, cache=cache)
        states[batch] = (jax.device_get(cache), np.asarray(jnp.argmax(logits[:, -1], -1),
                                                           np.int32), np.asarray(lengths))
    log("prefilled")
    shape_of = jax.eval_shape(model_lib.unstack_layers, stacked)
    params0 = jax.jit(model_lib.unstack_layers, out_shardings=named(
        first, sharding.param_specs(cfg, first, shape_of)))(stacked)
    del stacked
    place = lambda p, mesh: jax.device_put(p, named(mesh, sharding.param_specs(cfg, mesh, p)))
    params = {(lbl, "unstacked"): place(params0, mesh) for lbl, mesh in meshes.items()}
    for lbl, mesh in meshes.items():          # q/k/v fused per model device (same values)
        if "fused_qkv" in args.layers:
            n_model = sharding.axis_size(mesh, sharding.MODEL)
            groups = n_model if sharding.splits_heads(cfg, n_model) else 1
            params[lbl, "fused_qkv"] = place(
                model_lib.fuse_qkv(params[lbl, "unstacked"], groups), mesh)
        if "transposed" in args.layers:
            params[lbl, "transposed"] = place(
                model_lib.transpose_projections(params[lbl, "unstacked"]), mesh)
    jax.block_until_ready(params)
    log(f"weights on every mesh: {', '.join(args.layers)}")

    def inputs(row):
        mesh = meshes[row.label]
        cache, tok, pos = states[row.batch]
        cache = jax.device_put(cache, named(mesh, sharding.cache_specs(cfg, mesh)))
        tok, pos = sharding.shard_batch((tok, pos), mesh)
        spec, scope, cap = sparse_spec(row, m, SparseSpec)
        p, policy = params[row.label, row.layers], None
        if row.method != "dense":
            tau, theta = calib[row.sparsity]
            policy = make_policy(L, **({"threshold": tau} if row.method == "m_countdown"
                                       else {"theta": theta, "predictor": predictor}))
            # per-layer buffers, as generate hands them to unstacked layers
            policy = decode_policy(p, sharding.shard_policy(policy, mesh))
        return mesh, p, cache, tok, pos, policy, spec, scope, cap

    def compile_row(row):
        mesh, p, cache, tok, pos, policy, spec, *_ = inputs(row)
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            exe = decode_loop.lower(p, cfg, cache, tok, pos, policy, spec=spec,
                                    steps=args.steps, attention=row.attention,
                                    projections=row.projections).compile()
        return exe, time.perf_counter() - t0

    # -- compile everything (dense first, alone), then time -------------------------------
    compile_deadline = args.budget_s - args.timing_reserve_s
    compiled = {}
    pool = concurrent.futures.ThreadPoolExecutor(max(1, args.compile_workers))
    for row in [r for r in rows_plan if r.primer]:
        if time.perf_counter() - t_start < compile_deadline:
            compiled[row] = pool.submit(compile_row, row)
            concurrent.futures.wait([compiled[row]])
    log("compiled the dense programs")
    for row in rows_plan:
        if row not in compiled:
            compiled[row] = pool.submit(compile_row, row)
    for row in rows_plan:
        left = compile_deadline - (time.perf_counter() - t_start)
        concurrent.futures.wait([compiled[row]], timeout=max(left, 0.0))
    pool.shutdown(wait=False, cancel_futures=True)
    ready = lambda f: f.done() and not f.cancelled() and f.exception() is None
    log(f"compiled {sum(map(ready, compiled.values()))} of {len(rows_plan)} programs")

    rows, prof_rows, prof_summ, refs = [], [], [], {}
    # compiles past the deadline keep running (and autotuning GEMMs on the GPU): say so
    # in a row timed meanwhile, and let them finish before a profile (a dense 1x2 trace
    # taken during them held the autotuner's DelayKernel / MemcpyOther / redzone kernels)
    running = lambda: [f for f in compiled.values() if f.running()]

    def write():
        add_ratios(rows)
        write_csv(out / f"{name}.csv", rows, FIELDS)
        if prof_rows:
            write_csv(out / f"{name}_profile.csv", prof_summ, PROFILE_FIELDS)
            write_csv(out / f"{name}_profile_ops.csv", prof_rows)
        head = (f"Decode with SPMD, {shape}, {len(devices)} x {card}, jax {jax.__version__}, "
                f"bf16, {args.steps} greedy steps per compiled call after a "
                f"{args.prompt_len}-token prompt, median of {args.repeats}; mesh = data x "
                f"model devices; layers: unstacked, fused_qkv (q/k/v fused per model "
                f"device) or transposed (q/k/v/o one row per output); GB/s per device = the weight + KV-cache bytes a step must "
                f"read on one device (experiments/bench/decode.py step_bytes; batch 1 "
                f"per replica for the sparse rules) / its time, against the HBM read "
                f"ceiling measured in this run ({read_bw:.0f} GB/s); "
                f"experiments/bench_spmd.py.")
        (out / f"{name}.md").write_text(table(rows, prof_summ, head))

    for row in rows_plan:
        mesh, p, cache0, tok0, pos0, policy, spec, scope, cap = inputs(row)
        rec = dict(device=card, n_devices=mesh.size, mesh=row.label, shape=shape,
                   batch=row.batch, method=row.method, mode=spec.mode if row.method != "dense"
                   else "-", implementation="xla" if row.method == "dense" else "pallas",
                   attention=row.attention, projections=row.projections, layers=row.layers,
                   capacity_scope=scope,
                   capacity_per_device=cap, sparsity=row.sparsity)
        fut = compiled[row]
        if time.perf_counter() - t_start > args.budget_s or not fut.done() or fut.cancelled():
            rows.append(dict(rec, note="skipped: --budget-s reached"))
            write()
            continue
        if running():
            rec["note"] = f"timed while {len(running())} compiles ran"
        try:
            exe, rec["compile_s"] = fut.result()
            rec["compile_s"] = round(rec["compile_s"], 1)
            times = []
            for i in range(args.repeats + 1):               # call 0: warm-up
                cache = jax.block_until_ready(jax.tree.map(jnp.copy, cache0))
                t0 = time.perf_counter()
                _, cache, kept = exe(p, cache, tok0, pos0, policy)
                jax.block_until_ready(cache)
                times.append(time.perf_counter() - t0)
            t = statistics.median(times[1:])
            rec.update(tokens_per_s=round(row.batch * args.steps / t, 2),
                       ms_per_step=round(t / args.steps * 1e3, 4),
                       sparsity_realised=round(1.0 - float(kept), 4))
            data, n_model = (int(v) for v in row.label.split("x"))
            nbytes = step_bytes(cfg, row.method, float(kept), batch=row.batch // data,
                                context=args.prompt_len + args.steps // 2,
                                rank=min(args.rank, cfg.d_model), model_shards=n_model)
            bw = bandwidth(nbytes, t / args.steps, read_bw)
            rec.update(gb_per_s_per_device=bw.get("gb_per_s", ""),
                       pct_of_read_ceiling=bw.get("pct_of_read_ceiling", ""))
            keys = np.asarray(cache["k"][L - 1, :, args.prompt_len], np.float32)
            ref = refs.setdefault((row.batch, row.method, row.sparsity), keys)
            rec["check_rel_err"] = float(f"{np.max(np.abs(keys - ref)) / np.max(np.abs(ref)):.3g}")
            if row.label in args.profile_meshes and row.batch == 1 \
                    and row.attention == "pallas" and row.method in args.profile:
                left = args.budget_s - (time.perf_counter() - t_start)
                concurrent.futures.wait(running(), timeout=max(left, 0.0))
                fresh = jax.block_until_ready(jax.tree.map(jnp.copy, cache0))   # outside
                ops, summ = profile_devices(lambda: exe(p, fresh, tok0, pos0, policy))
                key = dict(mesh=row.label, batch=row.batch, method=row.method,
                           layers=row.layers, projections=row.projections, steps=args.steps)
                prof_summ += [dict(key, **s) for s in summ]
                prof_rows += [dict(key, **o) for o in ops]
                if not summ:
                    rec["note"] = "profiled: no GPU device plane in the trace"
                elif running():
                    rec["note"] = f"profiled while {len(running())} compiles ran"
        except Exception as e:                        # keep the other rows; say what failed
            rec["note"] = f"{type(e).__name__}: {str(e)[:300]}".replace("\n", " ")
        rows.append(rec)
        log(" ".join(f"{k}={rec.get(k)}" for k in ("mesh", "batch", "method", "layers",
                                                    "attention", "projections",
                                                    "tokens_per_s", "check_rel_err", "note")))
        write()
    write()
    log(f"wrote {out / name}.csv and .md")
    print((out / f"{name}.md").read_text(), flush=True)
    if any(not f.done() for f in compiled.values()):
        os._exit(0)        # a compile past the budget still runs: do not wait for it


if __name__ == "__main__":
    main()
