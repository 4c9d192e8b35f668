"""The fast decode path under a mesh equals one device, on fake CPU devices.

Fast path: unstacked layers, the Pallas FFN (the fused kernel per shard at one token per
device, the Pallas index-list kernel for more) and the Pallas decode attention over each
device's heads and rows, all in interpret mode. Meshes (data, model, batch): model 2 and 4
(2 kv heads do not split 4 ways: attention replicated there), data 2 (each device its own
token), data 2 x model 2, and model 2 at batch 2 (index lists, per-shard capacity). The
compiled decode step has exactly one all-reduce per attention block and one per FFN block
and gathers nothing; a data-parallel step has no collective at all. Runs as a worker
process (``tests.support.fake_devices``), like test_sharding.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.support import fake_devices

ROOT = Path(__file__).resolve().parents[1]
MESHES = {"model2": (1, 2, 1), "model4": (1, 4, 1), "data2": (2, 1, 2),
          "data2_model2": (2, 2, 2), "model2_batch2": (1, 2, 2)}
_PALLAS = dict(implementation="pallas")
# name -> (SparseSpec kwargs, policy kwargs). m = 96: a per-shard capacity of 40 of the
# 48 local neurons is roomy at r ~ 0.8 (exact), so it equals the one-device run.
SPECS = {
    "dense": (dict(), None),
    "m_threshold": (dict(method="m_countdown", mode="threshold", **_PALLAS),
                    dict(threshold=0.8)),
    "d_predictor": (dict(method="d_countdown", mode="predictor", **_PALLAS),
                    dict(theta=0.5)),
    "m_shard_capacity": (dict(method="m_countdown", mode="threshold", capacity=80,
                              shard_capacity=40, **_PALLAS), dict(threshold=0.8)),
}
# (mesh, spec) whose compiled decode step is read for its collectives and kernels.
HLO_CASES = (("model2", "dense"), ("model2", "m_threshold"), ("model2", "d_predictor"),
             ("model2_batch2", "m_shard_capacity"), ("data2_model2", "d_predictor"),
             ("data2", "m_threshold"))
DECODE_STEPS = 3


def _worker():
    import dataclasses
    import re

    import jax
    import jax.numpy as jnp
    import numpy as np

    from countdown_jax import model as M
    from countdown_jax import sharding
    from countdown_jax.config import ModelConfig
    from tests.support import tiny_params
    from countdown_jax.kernels._platform import interpret_mode
    from countdown_jax.policy import SparseSpec, make_policy
    from countdown_jax.decode_path import PORTABLE

    def _path(attention):             # the portable decode path with this attention
        return dataclasses.replace(PORTABLE, attention=attention)

    assert len(jax.devices()) == 4, jax.devices()
    cfg = ModelConfig.from_hf(tiny_params.MESH_HF)
    L, d, m = cfg.num_layers, cfg.d_model, cfg.d_ff
    params = M.unstack_layers(sharding.random_params(cfg, jax.random.key(0)))
    T = 5
    prompt = jax.random.randint(jax.random.key(1), (2, T), 3, cfg.vocab_size, jnp.int32)
    lengths = jnp.array([5, 3], jnp.int32)
    pk = jax.random.split(jax.random.key(2), 2)
    predictor = {"V": jax.random.normal(pk[0], (L, d, 8)) / np.sqrt(d),
                 "U": jax.random.normal(pk[1], (L, m, 8)) / np.sqrt(8)}
    specs = {k: SparseSpec(**s) for k, (s, _) in SPECS.items()}
    policies = {k: None if p is None else make_policy(
        L, **p, **({"predictor": predictor} if "theta" in p else {}))
        for k, (_, p) in SPECS.items()}
    xla = {k: s if s.is_dense else SparseSpec(s.method, s.mode, implementation="xla")
           for k, s in specs.items()}      # the reference: XLA gather, no capacity

    def run_all(params, prompt, lengths, policies, specs, attention):
        """Dense prefill, then greedy decode steps for every (name, spec) of ``specs``:
        logits and kept counts."""
        B = prompt.shape[0]
        cache = M.init_cache(cfg, B, T + DECODE_STEPS)
        logits, cache, _ = M.prefill(params, cfg, prompt, lengths, cache)
        last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
        out = {}
        for name, spec in specs:
            def step(carry, _, spec=spec, pol=policies[name]):
                tok, pos, cache = carry
                lg, cache, kept = M.decode_step(params, cfg, tok, pos, cache, spec=spec,
                                                policy=pol, path=_path(attention))
                return (jnp.argmax(lg, -1).astype(jnp.int32), pos + 1, cache), (lg, kept)

            carry = (jnp.argmax(last, -1).astype(jnp.int32), lengths, cache)
            _, (lg, kept) = jax.lax.scan(step, carry, None, length=DECODE_STEPS)
            out[name] = dict(logits=lg, kept=jnp.round(kept * m).astype(jnp.int32))
        return out

    jitted = jax.jit(run_all, static_argnames=("specs", "attention"))

    def run_specs(*args, specs, attention):         # specs as a hashable static argument
        return jax.device_get(jitted(*args, specs=tuple(specs.items()), attention=attention))

    report = {"reference": {}, "models": {}, "hlo": {}}
    with interpret_mode(True):
        refs = {}
        for B in (1, 2):
            args = (params, prompt[:B], lengths[:B], policies)
            refs[B] = run_specs(*args, specs=specs, attention="pallas")
            plain = run_specs(*args, specs=xla, attention="xla")
            report["reference"][B] = {n: {
                "logits_max_abs": float(np.max(np.abs(refs[B][n]["logits"]
                                                      - plain[n]["logits"]))),
                "kept_equal": bool(np.array_equal(refs[B][n]["kept"], plain[n]["kept"])),
                "kept_fraction": float(np.mean(plain[n]["kept"]) / m)} for n in specs}
            print(f"one device, batch {B}", file=sys.stderr, flush=True)

        meshes = {}
        for mesh_name, (n_data, n_model, B) in MESHES.items():
            mesh = sharding.make_mesh(model=n_model, data=n_data)
            sp = sharding.shard_params(params, cfg, mesh)
            spol = {k: sharding.shard_policy(v, mesh) for k, v in policies.items()}
            sprompt, slen = sharding.shard_batch((prompt[:B], lengths[:B]), mesh)
            meshes[mesh_name] = (mesh, sp, spol, B)
            with jax.set_mesh(mesh):
                got = run_specs(sp, sprompt, slen, spol, specs=specs, attention="pallas")
            gate = {s.data.shape[0] for s in sp["layers"][0]["mlp"]["gate"].addressable_shards}
            report["models"][mesh_name] = {"gate_rows": sorted(gate), **{n: {
                "logits_max_abs": float(np.max(np.abs(got[n]["logits"]
                                                      - refs[B][n]["logits"]))),
                "kept_equal": bool(np.array_equal(got[n]["kept"], refs[B][n]["kept"]))}
                for n in specs}}
            print(f"mesh {mesh_name}", file=sys.stderr, flush=True)

        step = jax.jit(M.decode_step, static_argnames=("cfg", "spec", "path"))
        for mesh_name, name in HLO_CASES:
            mesh, sp, spol, B = meshes[mesh_name]
            cache = sharding.shard_cache(M.init_cache(cfg, B, 16), cfg, mesh)
            tok, pos = sharding.shard_batch((jnp.arange(B, dtype=jnp.int32) + 3,
                                             jnp.full((B,), 5, jnp.int32)), mesh)
            args = (sp, cfg, tok, pos, cache)
            kw = dict(spec=specs[name], policy=spol[name], path=_path("pallas"))
            with jax.set_mesh(mesh):
                jaxpr = str(jax.make_jaxpr(lambda p, *a: M.decode_step(p, cfg, *a, **kw))(
                    sp, tok, pos, cache))
                text = step.lower(*args, **kw).compile().as_text()
            counts = {"all-reduce": 0, "all-gather": 0, "other": 0}
            for mt in re.finditer(r"= \S+ (all-reduce|all-gather|all-to-all|"
                                  r"collective-permute|reduce-scatter)(-start)?\(", text):
                kind = mt.group(1)
                counts[kind if kind in counts else "other"] += 1
            report["hlo"][f"{mesh_name}/{name}"] = {
                **counts, "pallas_calls": len(re.findall(r"\bpallas_call\b", jaxpr)),
                "kernel_names": sorted(set(re.findall(r"name=(\w+)", jaxpr)))}
    print("RESULT " + json.dumps(report))


# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report():
    return fake_devices.run_worker(__file__)


@pytest.mark.parametrize("batch", ["1", "2"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_fast_path_equals_the_xla_path_on_one_device(report, batch, spec):
    r = report["reference"][batch][spec]
    assert r["logits_max_abs"] < 2e-4 and r["kept_equal"], r
    if spec != "dense":
        assert 0.0 < r["kept_fraction"] < 0.5, r          # the rule really selects


@pytest.mark.parametrize("mesh", list(MESHES))
@pytest.mark.parametrize("spec", list(SPECS))
def test_sharded_fast_path_equals_one_device(report, mesh, spec):
    r = report["models"][mesh]
    n_model = MESHES[mesh][1]
    assert r["gate_rows"] == [96 // n_model], r           # the FFN really is split
    assert r[spec]["logits_max_abs"] < 2e-4, r[spec]
    assert r[spec]["kept_equal"], r[spec]                  # same neurons, token by token


@pytest.mark.parametrize("case", [f"{a}/{b}" for a, b in HLO_CASES])
def test_one_all_reduce_per_block_and_the_kernels_run(report, case):
    r = report["hlo"][case]
    mesh, spec = case.split("/")
    layers = 2
    tensor_parallel = MESHES[mesh][1] > 1
    # attention's output projection over the split heads + the FFN's one psum, per layer
    want = 2 * layers if tensor_parallel else 0
    assert (r["all-reduce"], r["all-gather"], r["other"]) == (want, 0, 0), r
    # attention + FFN kernels per layer (dense: the FFN is XLA's)
    assert r["pallas_calls"] == layers * (1 if spec == "dense" else 2), r
    assert "decode_attention" in r["kernel_names"], r


if __name__ == "__main__":
    fake_devices.worker_main(_worker)
