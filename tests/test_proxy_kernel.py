"""The proxy-scores kernel (countdown_jax/kernels/proxy_scores) against its reference,
countdown_jax.proxy.proxy_scores (itself checked against float64 NumPy in test_proxy.py).

CPU: the Triton kernel in the Pallas interpreter. Shapes are ragged on purpose (m not a
multiple of the block, row bytes not a multiple of the tile, tokens not a multiple of the
token block) and the configs cover every scale layout: several groups per tile, a tile
inside one group, a group that is not a power of two. GPU (marked ``gpu``): compiled.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax import proxy as X
from countdown_jax.kernels import _platform
from countdown_jax.kernels.proxy_scores.api import proxy_scores
from countdown_jax.kernels.proxy_scores.pallas_gpu import (ProxyConfig, resolve_config,
                                                            tile_layout)

P = ProxyConfig


def make(seed, m, d, bits, group, n_tok, layers=None, dtype=jnp.bfloat16):
    """(x [T, d], packed, scale) of random MLP weights ([L, 2, m, ...] when layers)."""
    k = jax.random.split(jax.random.key(seed), 3)
    shape = (m, d) if layers is None else (layers, m, d)
    mlp = {"gate": jax.random.normal(k[0], shape) * d ** -0.5,
           "up": jax.random.normal(k[1], shape) * d ** -0.5}
    pr = X.quantize_mlp(mlp, bits, group)
    x = jax.random.normal(k[2], (n_tok, d), jnp.float32).astype(dtype)
    return x, pr["packed"], pr["scale"]


def assert_close(got, ref, rtol=2e-5, atol=None):
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    assert np.all(np.isfinite(got)), "unwritten (poisoned) or non-finite scores"
    # float32 sums in another order; the offset split (1.5 sum x, or 128 + offset for the
    # tensor-core "dot") loses a few bits more
    atol = rtol / 10 if atol is None else atol
    np.testing.assert_allclose(got, ref, rtol=rtol, atol=atol * np.abs(ref).max())


CASES = [
    # m, d, bits, group, T, act, config        (tile_layout: bytes per tile, groups per tile)
    (37, 128, 4, 16, 1, "silu", P(bm=8, bc=64, mode="fma")),       # 4 groups per tile
    (37, 96, 2, 8, 3, "gelu_tanh", P(bm=16, bc=16, mode="fma", poison=True)),  # 2 groups
    (40, 48, 8, 48, 8, "silu", P(bm=8, bc=64, mode="fma")),        # group of 48: tiles of 16
    (21, 64, 4, 64, 3, "silu", P(bm=8, bc=8, tokens=2, prefetch=2, mode="fma")),  # in a group
    (100, 256, 2, 64, 8, "gelu_tanh", P(bm=16, prefetch=1, poison=True)),   # dot, 2 bits
    (70, 128, 4, 32, 1, "silu", None),                             # the default config (dot)
    (50, 576, 4, 64, 5, "silu", P(bm=32, tokens=2, poison=True)),  # SmolLM2 width: 32-byte tiles
    (33, 32, 8, 8, 3, "silu", P(bm=4, bc=32, tokens=1)),           # 8 bits: "dot" runs "fma"
    (33, 64, 4, 16, 3, "silu", P(bm=16, bc=16, num_stages=3)),     # dot, one group per tile
]


@pytest.mark.parametrize("m,d,bits,group,n_tok,act,cfg", CASES)
def test_kernel_matches_reference(m, d, bits, group, n_tok, act, cfg, pallas_interpret):
    x, packed, scale = make(m + d + bits, m, d, bits, group, n_tok)
    kern = jax.jit(lambda x: proxy_scores(x, packed, scale, act=act, implementation="pallas",
                                          config=cfg))
    ref = proxy_scores(x, packed, scale, act=act, implementation="xla")
    # "dot" sums (128 + code) x and subtracts (128 + offset) sum x: a score near zero keeps
    # float32's error of the large terms (seen up to 2e-4 of the largest score on CPU)
    dot = cfg is None or cfg.mode == "dot"
    assert_close(kern(x), ref, 1e-4 if dot else 2e-5, 5e-4 if dot else None)
    # the reference is the proxy module's maths, nothing else
    np.testing.assert_array_equal(
        np.asarray(ref), np.asarray(X.proxy_scores({"packed": packed, "scale": scale}, x, act)))


@pytest.mark.parametrize("bits,group,cfg", [(4, 16, P(bm=8, bc=16, mode="fma")),
                                            (2, 32, None),
                                            (8, 24, P(bm=16, bc=32, tokens=4))])
def test_stacked_proxy_read_in_place_at_a_traced_layer(bits, group, cfg, pallas_interpret):
    """[L, 2, m, ...] with a traced layer index gives that layer's scores (leading batch
    axes of x are kept)."""
    m, d, layers = 29, 96, 3
    x, packed, scale = make(bits, m, d, bits, group, 6, layers=layers)
    x = x.reshape(2, 3, d)
    kern = jax.jit(lambda layer: proxy_scores(x, packed, scale, act="silu", layer=layer,
                                              implementation="pallas_gpu", config=cfg))
    ref = jax.jit(lambda layer: proxy_scores(x, packed, scale, act="silu", layer=layer))
    for layer in range(layers):
        got = kern(jnp.int32(layer))
        assert got.shape == (2, 3, m)
        assert_close(got, ref(jnp.int32(layer)))
        assert_close(got, X.proxy_scores({"packed": packed[layer], "scale": scale[layer]},
                                         x, "silu"))


def test_tile_layout_keeps_each_scale_group_whole():
    assert tile_layout(4096, 4, 128, 128) == (128, 1)           # Llama, 4 bits, group 128
    assert tile_layout(4096, 4, 128, 256) == (256, 2)           # "fma": 2 groups per tile
    assert tile_layout(4096, 4, 128, 256, "dot") == (128, 1)    # "dot": one group per dot
    assert tile_layout(4096, 2, 64, 128) == (128, 2)
    assert tile_layout(4096, 2, 64, 128, "dot") == (64, 1)
    assert tile_layout(576, 4, 64, 128) == (32, 1)              # planes of 288 bytes
    assert tile_layout(576, 2, 64, 128) == (16, 1)              # planes of 144 bytes
    assert tile_layout(48, 8, 48, 64) == (16, 1)                # 48-input groups: 16 bytes
    assert tile_layout(64, 4, 64, 128) == (32, 1)               # tile capped by the plane


def test_config_resolution_falls_back_to_fma_where_dot_cannot_run():
    assert resolve_config(P(), 64, 64, 8, 16)[0].mode == "fma"          # 8 bits
    assert resolve_config(P(), 64, 64, 4, 16, jnp.float32)[0].mode == "fma"
    assert resolve_config(P(bm=8), 64, 64, 4, 16)[0].mode == "fma"     # rows < 16
    assert resolve_config(P(), 64, 576, 2, 64)[0].mode == "dot"         # 16-byte tiles


def test_bad_inputs_name_the_problem():
    x, packed, scale = make(0, 16, 32, 4, 16, 2)
    with pytest.raises(ValueError, match="unknown proxy_scores implementation"):
        proxy_scores(x, packed, scale, act="silu", implementation="cuda")
    with pytest.raises(ValueError, match="no 'pallas_tpu' backend"):
        proxy_scores(x, packed, scale, act="silu", implementation="pallas_tpu")
    with pytest.raises(ValueError, match="unsupported MLP activation"):
        proxy_scores(x, packed, scale, act="relu")
    with pytest.raises(ValueError, match="layer= given"):
        proxy_scores(x, packed, scale, act="silu", layer=0)
    with pytest.raises(ValueError, match="must be uint8"):
        proxy_scores(x, packed.astype(jnp.int32), scale, act="silu")
    with pytest.raises(ValueError, match="does not hold"):
        proxy_scores(x[:, :24], packed, scale, act="silu")             # d disagrees
    with pytest.raises(ValueError, match="power of two"):
        ProxyConfig(bc=48)
    with pytest.raises(ValueError, match="mode must be one of"):
        ProxyConfig(mode="wgmma")


def test_pallas_on_cpu_falls_back_to_the_reference_with_a_warning():
    if jax.default_backend() != "cpu":
        pytest.skip("CPU fallback only")
    x, packed, scale = make(3, 16, 32, 4, 16, 2)
    _platform.reset_fallback_warnings()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = proxy_scores(x, packed, scale, act="silu", implementation="pallas")
    assert any("proxy_scores falls back" in str(i.message) for i in w)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(
        proxy_scores(x, packed, scale, act="silu")))


# --------------------------------------------------------------------------- compiled GPU

@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits,group", [(4, 128), (2, 64), (8, 64), (4, 32)])
def test_kernel_compiled_on_gpu(bits, group):
    """Triton-compiled on ragged shapes (m = 1000 against every block; d = 640 gives row
    bytes that tiles of 128 (2, 4 bits) or 256 (8 bits) do not divide), poisoned outputs,
    1 / 3 / 8 / 11 tokens, both activations, a stacked proxy at a traced layer."""
    m, d = 1000, 640
    x, packed, scale = make(7 * bits + group, m, d, bits, group, 11, layers=2)
    configs = [ProxyConfig(poison=True), ProxyConfig(bm=16, bc=64, asm=False, poison=True),
               ProxyConfig(bm=32, bc=256, prefetch=2, num_warps=8, mode="fma", poison=True),
               ProxyConfig(bm=8, bc=32, prefetch=0, tokens=4, mode="fma", poison=True)]
    for n_tok, act in ((1, "silu"), (3, "gelu_tanh"), (8, "silu"), (11, "gelu_tanh")):
        xt = x[:n_tok]
        ref = jax.jit(lambda x, layer: proxy_scores(
            x, packed, scale, act=act, layer=layer))(xt, jnp.int32(1))
        for cfg in configs if n_tok < 11 else configs[::3]:
            got = jax.jit(lambda x, layer: proxy_scores(
                x, packed, scale, act=act, layer=layer, implementation="pallas",
                config=cfg))(xt, jnp.int32(1))
            assert_close(got, ref, 1e-4)
