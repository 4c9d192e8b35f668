"""The Mosaic GPU proxy-scores kernel: layout helpers on CPU, the kernel itself on a GPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax.kernels.proxy_scores import mosaic_gpu as M
from countdown_jax.proxy import dequantize, proxy_scores, quantize_mlp

GPU = any(dev.platform == "gpu" for dev in jax.devices())


def _proxy(m, d, seed=0, group=128):
    kg, ku = jax.random.split(jax.random.key(seed))
    mlp = {"gate": jax.random.normal(kg, (m, d)), "up": jax.random.normal(ku, (m, d))}
    return quantize_mlp(mlp, 4, group)


def test_prepare_matches_dequantize():
    d = 256
    prox = _proxy(40, d)
    prep = M.prepare(prox, d, tiled=False)
    assert prep["w"].dtype == jnp.int4 and prep["w"].shape == (2, 40, d)
    assert prep["scale"].shape == (2, d // 128, 40)
    w = M._perm(prep["w"].astype(jnp.float32)).reshape(2, 40, d // 128, 128)
    s = jnp.swapaxes(prep["scale"], -1, -2).astype(jnp.float32)[..., None]
    np.testing.assert_array_equal((w * s).reshape(2, 40, d), dequantize(prox, d))


def test_tiled_layout_is_a_transpose_of_the_plain_one():
    d = 512
    prox = _proxy(24, d)
    a, b = M.prepare(prox, d, tiled=False)["w"], M.prepare(prox, d, tiled=True)["w"]
    assert b.shape == (2, d // M.TK, 24, M.TK)
    np.testing.assert_array_equal(jnp.swapaxes(b, 1, 2).reshape(a.shape).astype(jnp.int8),
                                  a.astype(jnp.int8))


def test_perm_is_the_relabel_involution():
    x = jnp.arange(64)[None]
    p = M._perm(x)
    np.testing.assert_array_equal(M._perm(p), x)
    # position 8q + 2j + e of each block of 32 holds column 8j + 2q + e
    q, j, e = 1, 3, 1
    assert int(p[0, 8 * q + 2 * j + e]) == 8 * j + 2 * q + e
    assert int(p[0, 32 + 8 * q + 2 * j + e]) == 32 + 8 * j + 2 * q + e


def test_rejects_other_bits():
    kg, ku = jax.random.split(jax.random.key(0))
    prox = quantize_mlp({"gate": jax.random.normal(kg, (8, 128)),
                         "up": jax.random.normal(ku, (8, 128))}, 2, 64)
    with pytest.raises(NotImplementedError):
        M.prepare(prox, 128)


def test_lowers_for_cuda_on_any_host():
    d, m = 512, 200
    x = jnp.ones((3, d), jnp.bfloat16)
    for tiled in (False, True):
        prep = M.prepare(_proxy(m, d), d, tiled=tiled)
        for cfg in (M.MgpuConfig(), M.MgpuConfig(relabel=False, nsub=2)):
            f = lambda w, s, x, cfg=cfg: M._scores_prepared(w, s, x, act="silu", config=cfg)
            jax.jit(f).trace(prep["w"], prep["scale"], x).lower(lowering_platforms=("cuda",))


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a GPU (Mosaic GPU has no CPU interpreter here)")
@pytest.mark.parametrize("m,d,t,act", [(14336, 4096, 1, "silu"), (14336, 4096, 8, "silu"),
                                       (200, 640, 3, "silu"), (200, 640, 3, "gelu_tanh"),
                                       (192, 512, 12, "silu")])
@pytest.mark.parametrize("cfg,tiled", [(M.MgpuConfig(), True), (M.MgpuConfig(), False),
                                       (M.MgpuConfig(relabel=False), True),
                                       (M.MgpuConfig(nsub=2), True)], ids=str)
def test_matches_reference_on_gpu(m, d, t, act, cfg, tiled):
    if d % (cfg.tk * cfg.nsub):
        pytest.skip("tile does not divide d")
    prox = _proxy(m, d, seed=m + t)
    x = jax.random.normal(jax.random.key(1), (t, d)).astype(jnp.bfloat16)
    ref = np.asarray(proxy_scores(prox, x, act))
    out = np.asarray(M.proxy_scores_mgpu(prox, x, act=act, config=cfg, tiled=tiled))
    assert out.shape == (t, m)
    assert np.max(np.abs(out - ref)) <= 2e-3 * np.max(np.abs(ref))
    zero = np.asarray(M.proxy_scores_mgpu(prox, jnp.zeros_like(x), act=act, config=cfg,
                                          tiled=tiled))
    assert np.all(zero == 0)


def test_supports_and_the_decode_policy_on_cpu():
    """Tiles only for 4 bits with d and the group multiples of TK, and only on a GPU:
    decode_policy leaves a CPU policy as unstack_policy makes it."""
    from countdown_jax.generate import decode_policy
    from countdown_jax.policy import make_policy

    assert M.supports(_proxy(8, 256), 256)
    assert not M.supports(_proxy(8, 576, group=64), 576)           # SmolLM2's width
    kg, ku = jax.random.split(jax.random.key(0))
    two = quantize_mlp({"gate": jax.random.normal(kg, (8, 256)),
                        "up": jax.random.normal(ku, (8, 256))}, 2, 128)
    assert not M.supports(two, 256)
    pol = make_policy(2, threshold=0.1, proxy=jax.tree.map(lambda a: jnp.stack([a, a]),
                                                           _proxy(8, 256)))
    params = {"embed": jnp.zeros((5, 256)), "layers": [{}, {}]}
    got = decode_policy(params, pol)
    assert isinstance(got, tuple) and all("proxy_tiles" not in p for p in got)


@pytest.mark.gpu
@pytest.mark.skipif(not GPU, reason="needs a GPU (Mosaic GPU has no CPU interpreter here)")
@pytest.mark.parametrize("t", [1, 4])
def test_the_fast_path_reads_the_tiles_and_keeps_the_rule(t):
    """On a GPU, decode_policy adds the tiles and the FFN's Pallas path scores with them:
    the same output and kept share as the masked path on the packed proxy."""
    layer = _tiles_case(t)
    assert layer["proxy_tiles"]["w"].dtype == jnp.int4


def test_the_ffn_scores_with_the_tiles_when_the_policy_has_them(monkeypatch):
    """The wiring on CPU: decode_policy on a "gpu" backend adds the prepared tiles, and
    the FFN's Pallas path hands exactly those tiles to the Mosaic kernel (here a stand-in
    returning the float32 reference scores, since Mosaic GPU has no CPU interpreter)."""
    from countdown_jax import generate
    from countdown_jax.kernels._platform import interpret_mode

    seen = []

    def stand_in(tiles, xs, *, act):
        seen.append(tiles)
        return scores_of[0](xs)

    scores_of = []
    real_quantize = quantize_mlp

    def remember(mlp, bits, group):
        prox = real_quantize(mlp, bits, group)
        scores_of[:] = [lambda xs: proxy_scores(prox, xs, "silu")]
        return prox

    monkeypatch.setattr(generate.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(M, "proxy_scores_mgpu", stand_in)
    monkeypatch.setitem(globals(), "quantize_mlp", remember)
    with interpret_mode(True):                   # the other kernels in the interpreter
        layer = _tiles_case(3)
    assert seen and all(s is layer["proxy_tiles"] for s in seen)


def _tiles_case(t):
    """decode_policy's layer for a 4-bit proxy (m 512, d 256), and the FFN's Pallas path
    on it checked against the masked path on the packed proxy; returns the layer."""
    import dataclasses

    from countdown_jax import ffn
    from countdown_jax.generate import decode_policy
    from countdown_jax.policy import SparseSpec, make_policy

    m, d = 512, 256
    k = jax.random.split(jax.random.key(3), 4)
    mlp = {n: (jax.random.normal(kk, (m, d)) / 16).astype(jnp.bfloat16)
           for n, kk in zip(("gate", "up", "down"), k[:3])}   # down row-per-neuron too
    prox = quantize_mlp(mlp, 4, 128)
    x = jax.random.normal(k[3], (t, d)).astype(jnp.bfloat16)
    tau = float(np.quantile(np.asarray(proxy_scores(prox, x, "silu")), 0.7))
    pol = make_policy(1, threshold=tau, proxy=jax.tree.map(lambda a: a[None], prox))
    (layer,) = decode_policy({"embed": jnp.zeros((5, d)), "layers": [{}]}, pol)
    assert "proxy_tiles" in layer
    spec = SparseSpec("d_countdown", "proxy")
    ref, kept_ref = ffn.ffn(mlp, x, act="silu", spec=spec, policy=layer)
    fast, kept = ffn.ffn(mlp, x, act="silu", spec=dataclasses.replace(
        spec, implementation="pallas", batch_kernel="lists"), policy=layer)
    assert 0.2 < float(np.mean(np.asarray(kept_ref))) < 0.4       # the rule kept ~30%
    np.testing.assert_allclose(np.asarray(kept), np.asarray(kept_ref), atol=2 / m)
    np.testing.assert_allclose(np.asarray(fast, np.float32), np.asarray(ref, np.float32),
                               atol=0.05 * float(np.max(np.abs(np.asarray(ref, np.float32)))))
    return layer
