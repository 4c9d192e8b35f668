"""Sharded (SPMD) runs equal single-device runs, on 4 fake CPU devices.

The fake devices need XLA_FLAGS before jax initialises, and pytest has usually
initialised jax already, so the checks run in one subprocess (this file run as a script)
that prints JSON; the tests below read it. Meshes: (model=2), (model=4) - whose 2 kv heads
do not split 4 ways, the replicated-attention fallback - and (data=2, model=2).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.support import fake_devices

ROOT = Path(__file__).resolve().parents[1]
MESHES = {"model2": (1, 2), "model4": (1, 4), "data2_model2": (2, 2)}
# name -> (SparseSpec kwargs, policy kwargs)
SPECS = {
    "dense": (dict(), None),
    "cats_ideal": (dict(method="cats", mode="ideal"), dict(sparsity=0.7)),
    "cats_threshold": (dict(method="cats", mode="threshold", implementation="xla",
                            capacity=40), dict(threshold=0.3)),
    "m_ideal": (dict(method="m_countdown", mode="ideal"),
                dict(sparsity=0.8)),
    "m_threshold": (dict(method="m_countdown", mode="threshold", implementation="xla",
                         capacity=24), dict(threshold=0.8)),
    "d_ideal": (dict(method="d_countdown", mode="ideal"), dict(sparsity=0.7)),
    # r = 0.5 keeps 48 > capacity 40: the global capacity cut runs.
    "d_topk": (dict(method="d_countdown", mode="topk", implementation="xla",
                    capacity=40, sparse_prefill=True), dict(sparsity=0.5)),
    "d_threshold": (dict(method="d_countdown", mode="threshold"), dict(threshold=0.2)),
    "d_predictor": (dict(method="d_countdown", mode="predictor", implementation="xla",
                         capacity=48), dict(theta=0.5)),
}
MODES_SEL = ("ideal", "topk", "threshold_cap")
DECODE_STEPS = 3


# ------------------------------------------------------------------------------------------
# The subprocess: everything that touches jax.
# ------------------------------------------------------------------------------------------
def _worker():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    from countdown_jax import model as M
    from countdown_jax import parallel_selection, selection, sharding
    from countdown_jax.config import ModelConfig
    from tests.support import tiny_params
    from countdown_jax.generate import generate
    from countdown_jax.policy import SparseSpec, make_policy

    assert len(jax.devices()) == 4, jax.devices()
    cfg = ModelConfig.from_hf(tiny_params.MESH_HF)
    L, d, m = cfg.num_layers, cfg.d_model, cfg.d_ff
    params = sharding.random_params(cfg, jax.random.key(0))
    B, T = 4, 5
    prompt = jax.random.randint(jax.random.key(1), (B, T), 3, cfg.vocab_size, jnp.int32)
    lengths = jnp.array([5, 3, 4, 2], jnp.int32)
    pk = jax.random.split(jax.random.key(2), 2)
    predictor = {"V": jax.random.normal(pk[0], (L, d, 8)) / np.sqrt(d),
                 "U": jax.random.normal(pk[1], (L, m, 8)) / np.sqrt(8)}
    specs = {k: SparseSpec(**s) for k, (s, _) in SPECS.items()}
    policies = {}
    for k, (_, p) in SPECS.items():
        if p is None:
            policies[k] = None
        elif "theta" in p:
            policies[k] = make_policy(L, predictor=predictor, **p)
        else:
            policies[k] = make_policy(L, **p)

    def run_all(params, prompt, lengths, policies):
        """Prefill + greedy decode steps for every spec: logits and kept counts. The
        prompt runs dense (shared) unless the spec sparsifies it."""
        def prefill(spec, pol):
            cache = M.init_cache(cfg, B, T + DECODE_STEPS)
            return M.prefill(params, cfg, prompt, lengths, cache, spec=spec, policy=pol)

        shared = prefill(SparseSpec(), None)
        out = {}
        for name, spec in specs.items():
            pol = policies[name]
            logits, cache, kept_p = prefill(spec, pol) if spec.sparse_prefill else shared
            last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

            def step(carry, _):
                tok, pos, cache = carry
                lg, cache, kept = M.decode_step(params, cfg, tok, pos, cache, spec=spec,
                                                policy=pol)
                return (jnp.argmax(lg, -1).astype(jnp.int32), pos + 1, cache), (lg, kept)

            carry = (jnp.argmax(last, -1).astype(jnp.int32), lengths, cache)
            _, (lg, kept_d) = jax.lax.scan(step, carry, None, length=DECODE_STEPS)
            out[name] = dict(prefill_logits=logits, decode_logits=lg,
                             prefill_kept=jnp.round(kept_p * m).astype(jnp.int32),
                             decode_kept=jnp.round(kept_d * m).astype(jnp.int32))
        # The library's generate (its cache is made inside the jit), sparse decode.
        g = generate(params, cfg, prompt, lengths, jax.random.key(3), policies["m_threshold"],
                     max_new_tokens=DECODE_STEPS, spec=specs["m_threshold"])
        out["m_threshold"].update(generate_tokens=g.tokens, generate_kept_sum=g.kept_sum)
        return out

    import time
    t0 = time.perf_counter()

    def tick(what):
        print(f"[{time.perf_counter() - t0:6.1f}s] {what}", file=sys.stderr, flush=True)

    run = jax.jit(run_all)
    ref = jax.device_get(run(params, prompt, lengths, policies))
    tick("single device")
    # Selection on values with many ties (quarter steps), single device.
    q = jnp.round(jnp.abs(jax.random.normal(jax.random.key(4), (B, 3, m))) * 4) / 4
    layer = {"sparsity": jnp.float32(0.7), "threshold": jnp.float32(0.2)}
    sel_specs = {mode: SparseSpec(method="m_countdown", mode=mode.split("_")[0],
                                  capacity=20 if mode == "threshold_cap" else None)
                 for mode in MODES_SEL}

    @jax.jit
    def select_ref(q):
        out = {}
        for mode, spec in sel_specs.items():
            rule = selection.select(spec, q, layer)
            out[mode] = (rule, selection.limit_to_capacity(rule, q, spec.capacity))
        return out

    sel_ref = jax.device_get(select_ref(q))
    report = {"models": {}, "selection": {}, "collectives": {}, "shard_capacity": {}}

    for mesh_name, (n_data, n_model) in MESHES.items():
        mesh = sharding.make_mesh(model=n_model, data=n_data)
        sp = sharding.shard_params(params, cfg, mesh)
        spol = {k: sharding.shard_policy(v, mesh) for k, v in policies.items()}
        sprompt, slen = sharding.shard_batch((prompt, lengths), mesh)
        with jax.set_mesh(mesh):
            got = run(sp, sprompt, slen, spol)
        # The params really are split: a device holds 1/model of the FFN rows, and the
        # kv heads when they divide (2 kv heads on model=4: attention replicated).
        gate = sp["layers"]["mlp"]["gate"]
        rows = {s.data.shape[1] for s in gate.addressable_shards}
        assert rows == {m // n_model}, rows
        kv_heads = {s.data.shape[2] for s in sp["layers"]["wk"].addressable_shards}
        assert kv_heads == {2 // n_model if 2 % n_model == 0 else 2}, kv_heads
        got = jax.device_get(got)
        res = {}
        for name in specs:
            r, g = ref[name], got[name]
            res[name] = {
                "logits_max_abs": max(float(np.max(np.abs(g[k] - r[k])))
                                      for k in ("prefill_logits", "decode_logits")),
                "kept_equal": all(bool(np.array_equal(g[k], r[k]))
                                  for k in ("prefill_kept", "decode_kept")),
                "decode_kept_fraction": float(np.mean(r["decode_kept"]) / m),
            }
            if "generate_tokens" in r:
                res[name]["generate_equal"] = bool(
                    np.array_equal(g["generate_tokens"], r["generate_tokens"])
                    and np.allclose(g["generate_kept_sum"], r["generate_kept_sum"], atol=1e-5))
        report["models"][mesh_name] = res
        tick(f"model {mesh_name}")

        # The same selection with the neurons split over "model": bit for bit.
        shard = parallel_selection.Shard(sharding.MODEL, n_model)

        def body(q_local):
            return {k: parallel_selection.choose(s, q_local, layer, shard)
                    for k, s in sel_specs.items()}

        spec_q = P(sharding.DATA, None, sharding.MODEL)
        sharded = jax.device_get(jax.jit(jax.shard_map(
            body, mesh=mesh, in_specs=spec_q, out_specs=spec_q, check_vma=False))(q))
        sel = {}
        for mode, spec in sel_specs.items():
            rule_ref, mask_ref = sel_ref[mode]
            rule, mask = sharded[mode]
            sel[mode] = {"rule_equal": bool(np.array_equal(rule, rule_ref)),
                         "mask_equal": bool(np.array_equal(mask, mask_ref)),
                         "kept": int(np.sum(mask_ref)),
                         "capped": int(np.sum(rule_ref) - np.sum(mask_ref))}
        report["selection"][mesh_name] = sel
        tick(f"selection {mesh_name}")

    # Collectives of one compiled decode step, model=2: what crosses devices per layer.
    mesh = sharding.make_mesh(model=2)
    sp = sharding.shard_params(params, cfg, mesh)
    cache = sharding.shard_cache(M.init_cache(cfg, B, 16), cfg, mesh)
    tok = sharding.shard_batch(jnp.arange(B, dtype=jnp.int32) + 3, mesh)
    pos = sharding.shard_batch(jnp.full((B,), 5, jnp.int32), mesh)
    step = jax.jit(M.decode_step, static_argnames=("cfg", "spec"))
    for name, spec, pol in (
            ("dense", SparseSpec(), None),
            ("m_threshold_gather", SparseSpec("m_countdown", "threshold",
                                              implementation="xla", capacity=24,
                                              shard_capacity=16),
             make_policy(L, threshold=0.8)),
            ("d_ideal", SparseSpec("d_countdown", "ideal"), make_policy(L, sparsity=0.7))):
        with jax.set_mesh(mesh):
            text = step.lower(sp, cfg, tok, pos, cache, spec=spec,
                              policy=sharding.shard_policy(pol, mesh)).compile().as_text()
        report["collectives"][name] = _collectives(text)
    tick("collectives")

    # A sweep as evaluation runs it: vmap over stacked policies, inputs NOT placed by the
    # caller (replicated); the model's constrain_batch splits the batch over "data".
    from countdown_jax.policy import stack_policies
    mesh = sharding.make_mesh(model=2, data=2)
    sp = sharding.shard_params(params, cfg, mesh)
    pols = stack_policies([make_policy(L, sparsity=r) for r in (0.5, 0.8)])
    spec = SparseSpec("m_countdown", "ideal")
    sweep = jax.jit(lambda p, t, pol: jax.vmap(
        lambda q: M.forward(p, cfg, t, spec=spec, policy=q))(pol))
    ref_lg, ref_kept = sweep(params, prompt, pols)
    with jax.set_mesh(mesh):
        compiled = sweep.lower(sp, prompt, sharding.shard_policy(pols, mesh)).compile()
        lg, kept = compiled(sp, prompt, sharding.shard_policy(pols, mesh))
    report["sweep"] = {
        "logits_max_abs": float(jnp.max(jnp.abs(lg - ref_lg))),
        "kept_equal": bool(jnp.array_equal(jnp.round(kept * m), jnp.round(ref_kept * m))),
        "collectives": _collectives(compiled.as_text()),
        # FFN psum payload [R, B / data, T, d + 2]: the batch is split.
        "ffn_psum_batch_split": f"f32[2,{B // 2},{T},{d + 2}]" in compiled.as_text(),
    }
    tick("sweep")
    # shard_capacity: roomy = exact; tight = fewer kept, the cut reported as dropped.
    mesh = sharding.make_mesh(model=2)
    sp = sharding.shard_params(params, cfg, mesh)
    x = jax.random.normal(jax.random.key(5), (B, 2, d))
    mlp = jax.tree.map(lambda a: a[0], sp["layers"]["mlp"])
    pol = {"threshold": jnp.float32(0.5)}
    from countdown_jax.ffn import ffn
    fn = jax.jit(ffn, static_argnames=("act", "spec", "return_dropped"))
    base = SparseSpec("m_countdown", "threshold", implementation="xla")
    y0, k0, _ = fn(jax.tree.map(lambda a: a[0], params["layers"]["mlp"]), x, act="silu",
                   spec=base, policy=pol, return_dropped=True)
    for name, cap in (("roomy", m // 2), ("tight", 6)):
        with jax.set_mesh(mesh):
            y, k, dr = fn(mlp, x, act="silu", spec=SparseSpec(
                "m_countdown", "threshold", implementation="xla", shard_capacity=cap),
                policy=pol, return_dropped=True)
        report["shard_capacity"][name] = {
            "y_max_abs": float(jnp.max(jnp.abs(y - y0))),
            "kept_equal": bool(jnp.array_equal(jnp.round(k * m), jnp.round(k0 * m))),
            "kept_max": int(jnp.max(jnp.round(k * m))), "cap_total": 2 * cap,
            "dropped_sum": int(jnp.sum(dr)),
            "dropped_matches": bool(jnp.array_equal(jnp.round((k0 - k) * m).astype(int), dr)),
        }
    print("RESULT " + json.dumps(report))


def _collectives(hlo: str) -> dict:
    import re
    out = {"all-reduce": 0, "all-gather": 0, "other": 0, "all_gather_shapes": []}
    for line in hlo.splitlines():
        mt = re.search(r"= (\S+) (all-reduce|all-gather|all-to-all|collective-permute|"
                       r"reduce-scatter)(-start)?\(", line)
        if not mt:
            continue
        kind = mt.group(2) if mt.group(2) in ("all-reduce", "all-gather") else "other"
        out[kind] += 1
        if kind == "all-gather":
            out["all_gather_shapes"].append(mt.group(1).split("{")[0])   # drop the layout
    return out


# ------------------------------------------------------------------------------------------
# The tests (parent process).
# ------------------------------------------------------------------------------------------
def test_bad_setups_are_refused():
    from countdown_jax import sharding
    from countdown_jax.config import ModelConfig
    from countdown_jax.policy import SparseSpec

    with pytest.raises(ValueError, match="needs 64 devices"):
        sharding.make_mesh(model=64)
    with pytest.raises(ValueError, match="model.*positive int"):
        sharding.make_mesh(model=0)
    cfg = ModelConfig.from_hf(dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=10,
        hidden_size=8, intermediate_size=30, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    with pytest.raises(ValueError, match=r"m=30 .*divisible by 4"):
        sharding.check_tensor_parallel(cfg, 4)
    with pytest.raises(ValueError, match="shard_capacity"):
        SparseSpec("m_countdown", "threshold", shard_capacity=0)


@pytest.fixture(scope="module")
def report():
    return fake_devices.run_worker(__file__)


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("spec", list(SPECS))
def test_sharded_model_equals_single_device(report, mesh, spec):
    r = report["models"][mesh][spec]
    assert r["logits_max_abs"] < 2e-4, r
    assert r["kept_equal"], r                       # same neurons kept, token by token
    if spec != "dense":
        assert 0.0 < r["decode_kept_fraction"] < 1.0, r   # the rule really selects
    if "generate_equal" in r:
        assert r["generate_equal"], r


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("mode", MODES_SEL)
def test_sharded_masks_bit_for_bit(report, mesh, mode):
    r = report["selection"][mesh][mode]
    assert r["rule_equal"] and r["mask_equal"], r
    assert r["kept"] > 0
    if mode == "threshold_cap":
        assert r["capped"] > 0, r                   # the global capacity cut was exercised


def test_one_psum_per_ffn(report):
    c = report["collectives"]
    # Per layer (the scan body is compiled once): attention's output projection over the
    # split heads and the FFN's down projection: two all-reduces, nothing gathered.
    assert c["dense"] == {"all-reduce": 2, "all-gather": 0, "other": 0,
                          "all_gather_shapes": []}, c
    # Practical M with a per-shard capacity: the same two, the selection is local.
    assert c["m_threshold_gather"] == c["dense"], c
    # Ideal D ranks across shards: one extra all-gather of |s| [B, 1, m] float32.
    assert c["d_ideal"]["all-reduce"] == 2 and c["d_ideal"]["other"] == 0, c
    assert c["d_ideal"]["all_gather_shapes"] == ["f32[4,1,96]"], c


def test_sweep_is_data_parallel(report):
    r = report["sweep"]
    assert r["logits_max_abs"] < 2e-4 and r["kept_equal"], r
    assert r["ffn_psum_batch_split"], r


def test_shard_capacity(report):
    roomy, tight = report["shard_capacity"]["roomy"], report["shard_capacity"]["tight"]
    assert roomy["y_max_abs"] < 1e-5 and roomy["kept_equal"] and roomy["dropped_sum"] == 0
    assert tight["dropped_sum"] > 0 and tight["kept_max"] <= tight["cap_total"], tight
    assert tight["dropped_matches"], tight          # dropped = what the exact run kept more


if __name__ == "__main__":
    fake_devices.worker_main(_worker)
