"""Tensor-parallel decode with q/k/v fused per head group (``model.fuse_qkv(params,
groups=model)``), on 2 fake CPU devices.

Why (KERNEL_NOTES.md, "Tensor parallel decode"): split over 2 GPUs, each device's q, k and
v projections fall under XLA's GEMM size cut and run as column reductions at a fraction of
the read bandwidth; fused per group, each device runs ONE projection over exactly its own
heads. Pinned here: the fused program equals one device, keeps exactly two all-reduces per
layer and gathers nothing, runs one q/k/v dot per layer instead of three, and each device
holds [its q heads, its k heads, its v heads]. Runs as a worker process
(``tests.support.fake_devices``), like test_sharding.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from tests.support import fake_devices

ROOT = Path(__file__).resolve().parents[1]
SPECS = {"dense": None, "d_predictor": dict(theta=0.5)}


def _worker():
    import dataclasses
    import jax
    import jax.numpy as jnp
    import numpy as np

    from countdown_jax import model as M
    from countdown_jax import sharding
    from countdown_jax.config import ModelConfig
    from countdown_jax.policy import SparseSpec, make_policy
    from countdown_jax.decode_path import PORTABLE

    def _path(attention):             # the portable decode path with this attention
        return dataclasses.replace(PORTABLE, attention=attention)
    from tests.support import tiny_params

    assert len(jax.devices()) == 2, jax.devices()
    cfg = ModelConfig.from_hf(tiny_params.MESH_HF)
    L, d, m = cfg.num_layers, cfg.d_model, cfg.d_ff
    params = M.unstack_layers(sharding.random_params(cfg, jax.random.key(0)))
    pk = jax.random.split(jax.random.key(2), 2)
    predictor = {"V": jax.random.normal(pk[0], (L, d, 8)) / np.sqrt(d),
                 "U": jax.random.normal(pk[1], (L, m, 8)) / np.sqrt(8)}
    specs = {"dense": (SparseSpec(), None),
             "d_predictor": (SparseSpec("d_countdown", "predictor", implementation="pallas"),
                             make_policy(L, predictor=predictor, **SPECS["d_predictor"]))}
    B, S = 2, 12
    cache = M.init_cache(cfg, B, S)
    # a prefilled-looking cache: random keys / values below the decode position
    ck = jax.random.normal(jax.random.key(3), cache["k"].shape)
    cache = {"k": ck, "v": ck[::-1]}
    tok, pos = jnp.array([5, 9], jnp.int32), jnp.array([6, 4], jnp.int32)
    step = jax.jit(M.decode_step, static_argnames=("cfg", "spec", "path"))
    refs = {n: jax.device_get(step(params, cfg, tok, pos, cache, spec=s, policy=p,
                                   path=_path("pallas")))
            for n, (s, p) in specs.items()}

    mesh = sharding.make_mesh(model=2)
    report = {"models": {}, "hlo": {}, "errors": {}}
    forms = {"unstacked": params, "fused_qkv": M.fuse_qkv(params, groups=2),
             "transposed": M.transpose_projections(params)}
    for form, p in forms.items():
        sp = sharding.shard_params(p, cfg, mesh)
        sc = sharding.shard_cache(cache, cfg, mesh)
        stok, spos = sharding.shard_batch((tok, pos), mesh)
        for name, (spec, pol) in specs.items():
            spol = sharding.shard_policy(pol, mesh)
            with jax.set_mesh(mesh):
                exe = step.lower(sp, cfg, stok, spos, sc, spec=spec, policy=spol,
                                 path=_path("pallas")).compile()
                logits, new, kept = jax.device_get(exe(sp, stok, spos, sc, policy=spol))
            r_logits, r_new, r_kept = refs[name]
            text = exe.as_text()
            report["models"][f"{form}/{name}"] = {
                "logits_max_abs": float(np.max(np.abs(logits - r_logits))),
                "cache_max_abs": float(max(np.max(np.abs(new[k] - r_new[k])) for k in "kv")),
                "kept_equal": bool(np.array_equal(np.round(kept * m), np.round(r_kept * m)))}
            report["hlo"][f"{form}/{name}"] = {
                "all-reduce": len(re.findall(r"= \S+ all-reduce(-start)?\(", text)),
                "all-gather": len(re.findall(r"= \S+ all-gather(-start)?\(", text)),
                "other": len(re.findall(r"= \S+ (all-to-all|collective-permute|"
                                        r"reduce-scatter)(-start)?\(", text)),
                "dots": len(re.findall(r"= \S+ dot\(", text)),
                "dot_widths": sorted(int(w) for w in re.findall(
                    r"= \w+\[\d+,(\d+)\]\{[\d,]*\} dot\(", text))}
        if form == "fused_qkv":           # device g holds its q heads, then k, then v
            H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
            w0 = params["layers"][0]
            ok = []
            for shard in sp["layers"][0]["wqkv"].addressable_shards:
                g = shard.index[1].start or 0
                want = np.concatenate([np.asarray(w0[n])[:, g * h // 2:(g + 1) * h // 2]
                                       for n, h in (("wq", H), ("wk", K), ("wv", K))], axis=1)
                ok.append(shard.data.shape == (d, 1, (H + 2 * K) // 2, hd)
                          and np.array_equal(np.asarray(shard.data)[:, 0], want))
            report["fused_shards_ok"] = ok
    for groups in (1, 3):
        try:
            sharding.shard_params(M.fuse_qkv(params, groups=groups), cfg, mesh)
            report["errors"][groups] = ""
        except ValueError as e:
            report["errors"][groups] = str(e)
    print("RESULT " + json.dumps(report))


@pytest.fixture(scope="module")
def report():
    return fake_devices.run_worker(__file__, devices=2)


@pytest.mark.parametrize("form", ["unstacked", "fused_qkv", "transposed"])
@pytest.mark.parametrize("spec", list(SPECS))
def test_sharded_decode_equals_one_device(report, form, spec):
    r = report["models"][f"{form}/{spec}"]
    assert r["logits_max_abs"] < 2e-4 and r["cache_max_abs"] < 2e-5, r
    assert r["kept_equal"], r


@pytest.mark.parametrize("spec", list(SPECS))
def test_fused_qkv_is_one_dot_per_layer_and_two_all_reduces(report, spec):
    layers = 2
    plain, fused = report["hlo"][f"unstacked/{spec}"], report["hlo"][f"fused_qkv/{spec}"]
    for r in (plain, fused):        # attention's o projection + the FFN's psum, per layer
        assert (r["all-reduce"], r["all-gather"], r["other"]) == (2 * layers, 0, 0), r
    assert fused["dots"] == plain["dots"] - 2 * layers, (plain, fused)
    # per device, head_dim 8: q (2 heads) 16 wide, k and v (1 head each) 8 wide, unfused;
    # fused, one dot 32 wide per layer instead (the o projection is 32 wide too: d = 32)
    width = lambda r, w: r["dot_widths"].count(w)
    assert (width(plain, 16), width(fused, 16)) == (layers, 0), (plain, fused)
    assert width(fused, 8) == width(plain, 8) - 2 * layers, (plain, fused)
    assert width(fused, 32) == width(plain, 32) + layers, (plain, fused)


@pytest.mark.parametrize("spec", list(SPECS))
def test_transposed_projections_keep_the_collectives_and_dots(report, spec):
    """q/k/v/o one row per output (model.transpose_projections): the same 2 all-reduces
    per layer and the same dots, each reading its device's heads."""
    plain, tr = report["hlo"][f"unstacked/{spec}"], report["hlo"][f"transposed/{spec}"]
    assert (tr["all-reduce"], tr["all-gather"], tr["other"]) == (4, 0, 0), tr
    assert tr["dots"] == plain["dots"], (plain, tr)


def test_each_device_holds_its_own_q_k_v_heads(report):
    assert report["fused_shards_ok"] == [True, True], report["fused_shards_ok"]


def test_groups_that_do_not_split_are_refused(report):
    assert "groups=2" in report["errors"]["1"], report["errors"]     # names the fix
    assert "dividing the 2 kv heads" in report["errors"]["3"], report["errors"]


if __name__ == "__main__":
    fake_devices.worker_main(_worker, devices=2)
