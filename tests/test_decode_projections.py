"""The model's decode with projections="pallas" (q/k/v/o through the GEMV kernel,
countdown_jax/decode_projections.py) against projections="xla", in interpret mode.

One device: stacked (the weights read in place at the scan's layer), unstacked, fused
q/k/v, q/k/v biases with q/k norms, bfloat16 params; the kernel runs only for one token
per row and at most MAX_ROWS rows (prefill, chunks and big batches stay XLA). Two fake
devices (a worker process): model 2 and data 2 meshes equal one device, and the decode
step's all-reduces are the XLA path's (one per attention block on "model")."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax import layout
from countdown_jax import model as M
from countdown_jax.decode_path import PORTABLE, DecodePath
from countdown_jax.decode_projections import MAX_ROWS
from tests.support import fake_devices, tiny_params

STEPS = 2


def _path(**kw):
    """The portable decode path with some fields replaced."""
    return dataclasses.replace(PORTABLE, **kw)


def _decode(params, cfg, projections, batch=3, steps=STEPS):
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, 5)), jnp.int32)
    lengths = jnp.asarray(rng.integers(1, 6, batch), jnp.int32)
    cache = M.init_cache(cfg, batch, 5 + steps, params["embed"].dtype)
    logits, cache, _ = M.prefill(params, cfg, tokens, lengths, cache)
    tok = jnp.argmax(logits[jnp.arange(batch), lengths - 1], -1)
    pos, outs = lengths, []
    step = jax.jit(lambda p, t, ps, c: M.decode_step(p, cfg, t, ps, c,
                                                     path=_path(projections=projections)))
    for _ in range(steps):
        lg, cache, _ = step(params, tok, pos, cache)
        outs.append(lg)
        tok, pos = jnp.argmax(lg, -1), pos + 1
    return np.asarray(jnp.stack(outs), np.float32), cache


def _params(variant):
    params, cfg = tiny_params.tiny_model(seed=3)
    params = jax.tree.map(jnp.asarray, params)
    if variant == "bias+qk_norm":
        cfg = dataclasses.replace(cfg, qkv_bias=True, qk_norm=True)
        params = layout.random_params(cfg, jax.random.key(5))
    if variant == "unstacked":
        params = M.unstack_layers(params)
    if variant == "fused_qkv":
        params = M.fuse_qkv(params)
    if variant == "bf16":
        params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    return params, cfg


@pytest.fixture
def kernel_calls(monkeypatch):
    from countdown_jax.kernels.gemv import pallas_gpu
    calls = []
    real = pallas_gpu.gemv_pallas_gpu
    monkeypatch.setattr(pallas_gpu, "gemv_pallas_gpu",
                        lambda *a, **k: calls.append(k["d"]) or real(*a, **k))
    return calls


@pytest.mark.parametrize("variant", ["stacked", "unstacked", "fused_qkv", "bias+qk_norm",
                                     "bf16"])
def test_decode_logits_equal_the_xla_projections(variant, kernel_calls, pallas_interpret):
    params, cfg = _params(variant)
    ya, ca = _decode(params, cfg, "xla")
    assert not kernel_calls
    yb, cb = _decode(params, cfg, "pallas")
    per_layer = 2 if variant == "fused_qkv" else 4            # (q, k, v | qkv) and o
    traced_layers = cfg.num_layers if variant == "unstacked" else 1   # scan: one trace
    assert len(kernel_calls) == per_layer * traced_layers, kernel_calls
    tol = 1e-4 if variant != "bf16" else 5e-2          # bf16: roundings in another order
    scale = np.max(np.abs(ya))
    assert np.max(np.abs(yb - ya)) <= tol * scale, np.max(np.abs(yb - ya)) / scale
    for a, b in zip(jax.tree.leaves(ca), jax.tree.leaves(cb)):
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32),
                                   rtol=tol, atol=tol)


def test_kernel_only_for_one_token_per_row_and_small_batches(kernel_calls, pallas_interpret):
    params, cfg = _params("stacked")
    ya, _ = _decode(params, cfg, "xla", batch=MAX_ROWS + 1, steps=1)
    yb, _ = _decode(params, cfg, "pallas", batch=MAX_ROWS + 1, steps=1)
    assert not kernel_calls                          # past MAX_ROWS: XLA
    np.testing.assert_array_equal(yb, ya)
    cache = M.init_cache(cfg, 2, 8)
    toks = jnp.asarray([[5, 6], [7, 8]], jnp.int32)
    la, _, _ = M.extend(params, cfg, toks, jnp.array([0, 3]), cache,
                        path=_path(projections="xla"))
    lb, _, _ = M.extend(params, cfg, toks, jnp.array([0, 3]), cache,
                        path=_path(projections="pallas"))
    assert not kernel_calls                          # a 2-token chunk: XLA
    np.testing.assert_array_equal(np.asarray(lb), np.asarray(la))
    with pytest.raises(ValueError, match="projections must be"):
        M.decode_step(params, cfg, toks[:, 0], jnp.array([1, 1]), cache,
                      path=_path(projections="gemv"))


def test_auto_stays_xla_until_measured(monkeypatch):
    from countdown_jax import fast_path
    from countdown_jax.policy import DENSE
    for platform in ("cpu", "gpu"):
        monkeypatch.setattr(fast_path, "backend", lambda p=platform: p)
        assert fast_path.resolve(DecodePath(), DENSE, 1).projections == "xla"
        assert fast_path.resolve(DecodePath(projections="pallas"), DENSE, 1).projections \
            == "pallas"
    with pytest.raises(ValueError, match="projections must be"):
        DecodePath(projections="gemv")


def test_generate_threads_projections(kernel_calls, pallas_interpret):
    from countdown_jax.generate import generate
    params, cfg = _params("stacked")
    prompt = jnp.asarray([[5, 9, 14, 3], [7, 2, 0, 0]], jnp.int32)
    lengths = jnp.asarray([4, 2], jnp.int32)
    kw = dict(max_new_tokens=4)
    a = generate(params, cfg, prompt, lengths, jax.random.key(0),
                 path=DecodePath(layers="unstacked", attention="xla", projections="xla"), **kw)
    assert not kernel_calls
    b = generate(params, cfg, prompt, lengths, jax.random.key(0),
                 path=DecodePath(layers="unstacked", attention="xla", projections="pallas"),
                 **kw)
    assert len(kernel_calls) == 4 * cfg.num_layers
    np.testing.assert_array_equal(np.asarray(b.tokens), np.asarray(a.tokens))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_decode_compiled_on_gpu():
    for variant in ("stacked", "unstacked", "fused_qkv", "bf16"):
        params, cfg = _params(variant)
        with jax.default_matmul_precision("float32"):          # the XLA path without TF32
            ya, _ = _decode(params, cfg, "xla")
            yb, _ = _decode(params, cfg, "pallas")
        tol = 1e-4 if variant != "bf16" else 5e-2
        assert np.max(np.abs(yb - ya)) <= tol * np.max(np.abs(ya)), variant


# ------------------------------------------------------------------------ two fake devices
MESHES = {"model2": (1, 2), "data2": (2, 1)}


def _worker():
    from countdown_jax import sharding
    from countdown_jax.config import ModelConfig
    from countdown_jax.kernels._platform import interpret_mode

    assert len(jax.devices()) == 2, jax.devices()
    cfg = ModelConfig.from_hf(tiny_params.MESH_HF)
    base = sharding.random_params(cfg, jax.random.key(0))
    report = {}
    with interpret_mode(True):
        ref, _ = _decode(base, cfg, "xla", batch=2)
        for form in ("stacked", "unstacked", "fused_qkv2"):
            params = {"stacked": base, "unstacked": M.unstack_layers(base),
                      "fused_qkv2": M.fuse_qkv(M.unstack_layers(base), groups=2)}[form]
            for name, (n_data, n_model) in MESHES.items():
                if form == "fused_qkv2" and n_model != 2:
                    continue       # one q/k/v head group per "model" device
                mesh = sharding.make_mesh(model=n_model, data=n_data)
                sp = sharding.shard_params(params, cfg, mesh)
                with jax.set_mesh(mesh):
                    got, _ = _decode(sp, cfg, "pallas", batch=2)
                    cache = sharding.shard_cache(M.init_cache(cfg, 2, 8), cfg, mesh)
                    tok, pos = sharding.shard_batch((jnp.array([3, 4], jnp.int32),
                                                     jnp.array([1, 2], jnp.int32)), mesh)
                    reduces = {}
                    for proj in ("xla", "pallas"):
                        step = jax.jit(lambda p, t, ps, c, proj=proj: M.decode_step(
                            p, cfg, t, ps, c, path=_path(projections=proj)))
                        text = step.lower(sp, tok, pos, cache).compile().as_text()
                        reduces[proj] = len(re.findall(r"= \S+ all-reduce(-start)?\(", text))
                        reduces[proj + "_gathers"] = len(re.findall(
                            r"= \S+ all-gather(-start)?\(", text))
                report[f"{form}/{name}"] = dict(
                    max_abs=float(np.max(np.abs(got - ref))), scale=float(np.max(np.abs(ref))),
                    **reduces)
                print(form, name, report[f"{form}/{name}"], file=sys.stderr, flush=True)
    print("RESULT " + json.dumps(report))


@pytest.fixture(scope="module")
def mesh_report():
    return fake_devices.run_worker(__file__, devices=2)


@pytest.mark.parametrize("form,mesh", [(f, m) for f in ("stacked", "unstacked")
                                       for m in MESHES] + [("fused_qkv2", "model2")])
def test_sharded_decode_projections_equal_one_device(mesh_report, form, mesh):
    """Stacked, unstacked and q/k/v fused per head group (one group per device, the
    tensor-parallel form of ``fuse_qkv``) through the kernel equal one device's XLA."""
    r = mesh_report[f"{form}/{mesh}"]
    assert r["max_abs"] <= 1e-4 * r["scale"], r
    # the kernel's shard_map adds no collective: the same all-reduces as XLA's einsums
    assert r["pallas"] == r["xla"] and r["pallas_gathers"] == r["xla_gathers"], r


if __name__ == "__main__":
    fake_devices.worker_main(_worker, devices=2)
