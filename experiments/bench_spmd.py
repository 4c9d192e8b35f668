"""Decode throughput with SPMD: one device vs tensor parallelism (and optionally data
parallelism), dense vs M-COUNTDOWN vs D-COUNTDOWN, at Llama-3.1-8B shapes.

Random bf16 weights are created on the devices already sharded (``sharding.random_params``
with a mesh), so no device ever holds the whole tensor-parallel model. Each timed call is
ONE compiled program of ``--steps`` greedy decode steps (``bench.decode.decode_loop``);
compile is excluded and the median of ``--repeats`` calls is reported. The one-device
rows are measured in the same run, on the same machine.

Sparse rows use the practical modes (M: per-layer thresholds on |u|; D: a rank-512
predictor), calibrated per layer from a random prompt (``bench.decode.calibrate``) and
the XLA-gather (and, if asked, Pallas) FFN with index lists of capacity 1.5 (1 - r) m.
Under tensor parallelism two capacity scopes are timed:
  global  the capacity caps a token's kept neurons across devices: masks equal the
          one-device run, at the price of an all_gather of |u| (or z) per layer, and
          each device's index list still holds up to the whole capacity;
  shard   ``SparseSpec.shard_capacity`` = capacity / model per device: no extra
          communication, each device gathers its share (a device holding more than its
          share of a token's winners keeps its highest-ranked ones; realised sparsity
          is measured from the masks applied).

    # 2 GPUs (NVLink multicast must stay off; the script also forces it off):
    NCCL_NVLS_ENABLE=0 python -m experiments.bench_spmd --out experiments/results
    # the Pallas FFN as well, into its own files:
    NCCL_NVLS_ENABLE=0 python -m experiments.bench_spmd --implementations pallas \
        --name bench_spmd_pallas --out experiments/results
    # CPU smoke run with 2 fake devices:
    python -m experiments.bench_spmd --tiny --cpu-devices 2 --out /tmp/spmd
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import time
from pathlib import Path

FIELDS = ["device", "n_devices", "mesh", "shape", "method", "mode", "implementation",
          "capacity_scope", "capacity_per_device", "sparsity", "sparsity_realised", "batch",
          "tokens_per_s", "ms_per_step", "x_dense_same_mesh", "x_one_device", "note"]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--cpu-devices", type=int, default=0,
                    help="run on N fake CPU devices (sets XLA_FLAGS before jax starts)")
    ap.add_argument("--out", default="experiments/results")
    ap.add_argument("--meshes", default="1x1,1x2",
                    help="comma list of DATAxMODEL meshes; 1x1 = one device")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--sparsities", default="0.9")
    ap.add_argument("--methods", default="dense,m_countdown,d_countdown")
    ap.add_argument("--implementations", default="gather",
                    help="sparse FFN implementations (gather, pallas), in priority order")
    ap.add_argument("--name", default=None,
                    help="output file stem (default bench_spmd, or bench_spmd_tiny)")
    ap.add_argument("--scopes", default="global,shard",
                    help="capacity scopes timed under tensor parallelism")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rank", type=int, default=512)
    ap.add_argument("--budget-s", type=float, default=500.0,
                    help="stop starting new rows after this many seconds (rows not run "
                         "are written with a note); results are written after every row")
    args = ap.parse_args(argv)
    args.meshes = [tuple(int(v) for v in s.lower().split("x")) for s in args.meshes.split(",")]
    for mesh in args.meshes:
        if len(mesh) != 2 or min(mesh) < 1:
            ap.error(f"--meshes entries are DATAxMODEL with positive sizes, got {mesh}")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.sparsities = [float(r) for r in args.sparsities.split(",")]
    args.methods = args.methods.split(",")
    args.implementations = args.implementations.split(",")
    args.scopes = args.scopes.split(",")
    bad = [s for s in args.scopes if s not in ("global", "shard")]
    if bad:
        ap.error(f"--scopes must be global and/or shard, got {bad}")
    bad = [m for m in args.methods if m not in ("dense", "m_countdown", "d_countdown")]
    if bad:
        ap.error(f"--methods must be among dense, m_countdown, d_countdown, got {bad}")
    return args


def main(argv=None):
    args = parse_args(argv)
    # Before jax initialises: NVLink multicast off (NCCL), fake CPU devices if asked.
    os.environ["NCCL_NVLS_ENABLE"] = "0"
    if args.cpu_devices:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count="
                                   f"{args.cpu_devices}").strip()
    import jax
    import jax.numpy as jnp

    from countdown_jax import model as model_lib
    from countdown_jax import sharding
    from countdown_jax.config import ModelConfig
    from countdown_jax.policy import SparseSpec, make_policy
    from experiments.bench.decode import calibrate, decode_loop, random_predictor
    from experiments.bench.harness import write_csv
    from experiments.bench.shapes import LLAMA_3_1_8B, TINY_DECODER

    # Same random weights whatever the sharding (the default since jax 0.5; made sure
    # where the option still exists).
    try:
        jax.config.update("jax_threefry_partitionable", True)
    except (AttributeError, KeyError, ValueError):
        pass
    t_start = time.perf_counter()
    cfg = ModelConfig.from_hf(TINY_DECODER if args.tiny else LLAMA_3_1_8B)
    shape = "tiny" if args.tiny else "llama3.1-8b"
    m, L = cfg.d_ff, cfg.num_layers
    rank = min(args.rank, cfg.d_model)
    devices = jax.devices()
    device_kind = devices[0].device_kind
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("bench_spmd_tiny" if args.tiny else "bench_spmd")
    rows: list[dict] = []
    print(f"{len(devices)} x {device_kind}, jax {jax.__version__}, shape {shape}", flush=True)

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    # -- models, one per mesh (same values), and the calibration they share ------------
    meshes = {}
    for n_data, n_model in args.meshes:
        label = f"{n_data}x{n_model}"
        if n_data * n_model > len(devices):
            rows.append(dict(mesh=label, n_devices=n_data * n_model, note=f"skipped: needs "
                             f"{n_data * n_model} devices, {len(devices)} present"))
            continue
        mesh = sharding.make_mesh(model=n_model, data=n_data)
        params = sharding.random_params(cfg, jax.random.key(0), jnp.bfloat16, mesh=mesh)
        meshes[label] = (mesh, params)
        log(f"params on mesh {label}")
    if not meshes:
        raise SystemExit("no mesh fits the devices present")
    predictor = random_predictor(jax.random.PRNGKey(1), cfg, rank)
    first_mesh, first_params = next(iter(meshes.values()))
    calib = {}
    if any(meth != "dense" for meth in args.methods):
        with jax.set_mesh(first_mesh):
            for r in args.sparsities:
                calib[r] = calibrate(first_params, cfg, predictor, r, jax.random.PRNGKey(2))
        log("calibrated thresholds / predictor offsets")

    # -- timing --------------------------------------------------------------------------
    def prefill_state(mesh, params, batch):
        sharding.check_batch(batch, mesh)
        cache_len = args.prompt_len + args.steps + 1
        cache = jax.jit(functools.partial(model_lib.init_cache, cfg, batch, cache_len,
                                          jnp.bfloat16),
                        out_shardings=jax.tree.map(
                            lambda s: jax.sharding.NamedSharding(mesh, s),
                            sharding.cache_specs(cfg, mesh)))()
        tokens = jax.random.randint(jax.random.PRNGKey(3), (batch, args.prompt_len), 0,
                                    cfg.vocab_size, jnp.int32)
        lengths = jnp.full((batch,), args.prompt_len, jnp.int32)
        tokens, lengths = sharding.shard_batch((tokens, lengths), mesh)
        prefill = jax.jit(functools.partial(model_lib.prefill, cfg=cfg))
        with jax.set_mesh(mesh):
            logits, cache, _ = prefill(params, tokens=tokens, lengths=lengths, cache=cache)
            tok0 = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
        return cache, sharding.shard_batch(tok0, mesh), lengths

    def time_decode(mesh, params, state, spec, policy):
        cache0, tok0, pos0 = state
        with jax.set_mesh(mesh):
            times, kept = [], None
            for i in range(args.repeats + 1):              # call 0: compile + warm-up
                cache = jax.tree.map(jnp.copy, cache0)
                jax.block_until_ready(cache)
                t0 = time.perf_counter()
                _, cache, kept = decode_loop(params, cfg, cache, tok0, pos0, policy,
                                             spec=spec, steps=args.steps)
                jax.block_until_ready(cache)
                if i:
                    times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        return tok0.shape[0] * args.steps / t, 1.0 - float(kept), t / args.steps

    def write():
        write_csv(out / f"{name}.csv", rows, FIELDS)
        (out / f"{name}.md").write_text(table(rows, device_kind, shape, args))

    # Most wanted first, so a --budget-s cut drops the least: every batch and mesh with
    # the first implementation (dense rows with it), then the other implementations.
    plan = []   # (batch, mesh label, method, mode, impl, scope, r)
    for i, impl in enumerate(args.implementations):
        for batch in args.batches:
            for label in meshes:
                if i == 0 and "dense" in args.methods:
                    plan.append((batch, label, "dense", "-", "xla", "-", 0.0))
                n_model = meshes[label][0].shape[sharding.MODEL]
                scopes = args.scopes if n_model > 1 else ["-"]
                for r in args.sparsities:
                    for method, mode in (("m_countdown", "threshold"),
                                         ("d_countdown", "predictor")):
                        if method in args.methods:
                            for scope in scopes:
                                plan.append((batch, label, method, mode, impl, scope, r))

    states = {}
    for batch, label, method, mode, impl, scope, r in plan:
        mesh, params = meshes[label]
        n_model = mesh.shape[sharding.MODEL]
        cap = int(math.ceil(1.5 * (1 - r) * m))
        cap_dev = min(cap, m // n_model) if method != "dense" else ""
        row = dict(device=device_kind, n_devices=mesh.size, mesh=label, shape=shape,
                   method=method, mode=mode, implementation=impl, capacity_scope=scope,
                   sparsity=r, batch=batch)
        if time.perf_counter() - t_start > args.budget_s:
            rows.append(dict(row, note="skipped: --budget-s reached"))
            write()
            continue
        try:
            if (label, batch) not in states:       # KV caches are small: keep them all
                states[(label, batch)] = prefill_state(mesh, params, batch)
                log(f"prefilled mesh {label} batch {batch}")
            if method == "dense":
                spec, policy = SparseSpec(), None
            else:
                tau, theta = calib[r]
                if method == "m_countdown":
                    policy = make_policy(L, threshold=tau)
                else:
                    policy = make_policy(L, theta=theta, predictor=predictor)
                policy = sharding.shard_policy(policy, mesh)
                shard_cap = None
                if scope == "shard":
                    shard_cap = int(math.ceil(1.5 * (1 - r) * m / n_model))
                    cap_dev = min(shard_cap, m // n_model)
                spec = SparseSpec(method=method, mode=mode, implementation=impl, capacity=cap,
                                  shard_capacity=shard_cap)
            tps, realised, step_s = time_decode(mesh, params, states[(label, batch)], spec,
                                                policy)
            row.update(capacity_per_device=cap_dev, sparsity_realised=round(realised, 4),
                       tokens_per_s=round(tps, 2), ms_per_step=round(step_s * 1e3, 4))
        except Exception as e:  # keep the other rows; say what failed
            row["note"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        add_ratios(rows)
        print(json.dumps(row), flush=True)
        write()
    add_ratios(rows)
    write()
    log(f"wrote {out / name}.csv and .md")
    print((out / f"{name}.md").read_text())


def add_ratios(rows):
    """x dense on the same mesh and batch; x the same configuration on one device."""
    def key(r, **kw):
        return tuple({**r, **kw}.get(k) for k in ("mesh", "batch", "method", "implementation",
                                                    "sparsity"))
    tps = {}
    for r in rows:
        if isinstance(r.get("tokens_per_s"), float):
            tps.setdefault(key(r), r["tokens_per_s"])
    for r in rows:
        v = r.get("tokens_per_s")
        if not isinstance(v, float):
            continue
        dense = tps.get(key(r, method="dense", implementation="xla", sparsity=0.0))
        one = tps.get(key(r, mesh="1x1"))
        r["x_dense_same_mesh"] = round(v / dense, 3) if dense else ""
        r["x_one_device"] = round(v / one, 3) if one and r["mesh"] != "1x1" else ""


def table(rows, device_kind, shape, args) -> str:
    lines = [f"Decode throughput with SPMD, {shape}, {device_kind}, bf16 weights, "
             f"{args.steps} greedy steps per compiled call after a {args.prompt_len}-token "
             f"prompt, median of {args.repeats}. mesh = data x model devices.", "",
             "| mesh | method | impl | capacity scope | cap/device | r | r realised | batch "
             "| tokens/s | x dense (same mesh) | x one device | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, "")) for k in (
            "mesh", "method", "implementation", "capacity_scope", "capacity_per_device",
            "sparsity", "sparsity_realised", "batch", "tokens_per_s", "x_dense_same_mesh",
            "x_one_device", "note")) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
