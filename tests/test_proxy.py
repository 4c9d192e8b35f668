"""The low-bit |s| proxy (countdown_jax/proxy.py) against a NumPy float64 reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax import proxy as X


def np_quantize(w, bits, group):
    """Float64 reference: symmetric codes per group, scales rounded to bfloat16 as stored."""
    w = np.asarray(w, np.float64)
    qmax = 2 ** (bits - 1) - 1
    g = w.reshape(w.shape[:-1] + (w.shape[-1] // group, group))
    scale = np.asarray(jnp.asarray(np.abs(g).max(-1) / qmax, jnp.float32).astype(jnp.bfloat16),
                       np.float64)
    q = np.clip(np.round(g / np.where(scale > 0, scale, 1.0)[..., None]), -qmax, qmax)
    return (q * scale[..., None]).reshape(w.shape)


def np_gelu_tanh(g):
    return 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))


@pytest.mark.parametrize("bits,group", [(2, 8), (4, 16), (4, 48), (8, 96)])
def test_dequantize_matches_float64_reference(bits, group):
    rng = np.random.default_rng(bits + group)
    w = rng.normal(size=(3, 10, 96)).astype(np.float32)
    w[0, 0, :group] = 0.0                                  # an all-zero group: scale 0
    packed, scale = X.quantize(w, bits, group)
    assert packed.dtype == jnp.uint8 and packed.shape == (3, 10, 96 * bits // 8)
    assert scale.dtype == jnp.bfloat16 and scale.shape == (3, 10, 96 // group)
    got = np.asarray(X.dequantize({"packed": packed, "scale": scale}, 96))
    # the rounding of w / scale differs from float64's only where a value sits on a .5
    np.testing.assert_allclose(got, np_quantize(w, bits, group), rtol=0, atol=1e-6)
    assert np.all(got[0, 0, :group] == 0.0)


def test_codes_pack_in_planes():
    """Bits [j*bits, (j+1)*bits) of byte b hold input j * d / (8 / bits) + b."""
    w = np.zeros((1, 8), np.float32)
    w[0, 0], w[0, 4], w[0, 1] = 7.0, -7.0, 7.0             # codes 15, 1, 15 at 4 bits
    packed, scale = X.quantize(w, 4, 8)
    assert float(scale[0, 0]) == 1.0
    assert int(packed[0, 0]) == 15 | (1 << 4)              # inputs 0 (low) and 4 (high)
    assert int(packed[0, 1]) == 15 | (8 << 4)              # inputs 1 and 5 (zero: code 8)
    assert np.all(np.asarray(packed[0, 2:]) == 8 | (8 << 4))
    w2 = np.zeros((1, 8), np.float32)
    w2[0, 2], w2[0, 7] = 1.0, -1.0                         # 2 bits: codes 3 and 1
    p2, _ = X.quantize(w2, 2, 8)
    assert int(p2[0, 0]) == 2 | (3 << 2) | (2 << 4) | (2 << 6)   # inputs 0, 2, 4, 6
    assert int(p2[0, 1]) == 2 | (2 << 2) | (2 << 4) | (1 << 6)   # inputs 1, 3, 5, 7


@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_scores_match_float64_reference(act):
    rng = np.random.default_rng(0)
    m, d = 40, 64
    mlp = {"gate": rng.normal(size=(m, d)).astype(np.float32),
           "up": rng.normal(size=(m, d)).astype(np.float32)}
    x = rng.normal(size=(2, 3, d)).astype(np.float32)
    pr = X.quantize_mlp(mlp, 4, 32)
    got = np.asarray(X.proxy_scores(pr, jnp.asarray(x), act))
    gq, uq = np_quantize(mlp["gate"], 4, 32), np_quantize(mlp["up"], 4, 32)
    g, u = x.astype(np.float64) @ gq.T, x.astype(np.float64) @ uq.T
    a = g / (1 + np.exp(-g)) if act == "silu" else np_gelu_tanh(g)
    np.testing.assert_allclose(got, np.abs(a * u), rtol=1e-5, atol=1e-5)
    # and it ranks like the exact |s|: most of the top quarter agrees at 4 bits
    ge, ue = x.astype(np.float64) @ mlp["gate"].T, x.astype(np.float64) @ mlp["up"].T
    exact = np.abs((ge / (1 + np.exp(-ge)) if act == "silu" else np_gelu_tanh(ge)) * ue)
    top = m // 4
    agree = [len(set(np.argsort(-e)[:top]) & set(np.argsort(-p)[:top])) / top
             for e, p in zip(exact.reshape(-1, m), got.reshape(-1, m))]
    assert np.mean(agree) > 0.7


def test_stacked_layout_and_checks():
    rng = np.random.default_rng(1)
    mlp = {"gate": rng.normal(size=(3, 12, 32)), "up": rng.normal(size=(3, 12, 32))}
    pr = X.quantize_mlp(mlp, 2, 16)
    assert pr["packed"].shape == (3, 2, 12, 8) and pr["scale"].shape == (3, 2, 12, 2)
    assert X.check_proxy(pr, m=12, d=32, leading=(3,)) == (2, 16)
    one = jax.tree.map(lambda a: a[1], pr)
    np.testing.assert_allclose(np.asarray(X.dequantize(one, 32))[0],
                               np_quantize(mlp["gate"][1], 2, 16), atol=1e-6)
    with pytest.raises(ValueError, match="keys 'packed' and 'scale'"):
        X.check_proxy({"packed": pr["packed"]}, m=12, d=32, leading=(3,))
    with pytest.raises(ValueError, match="must be uint8"):
        X.check_proxy({**pr, "packed": pr["packed"].astype(jnp.int32)}, m=12, d=32,
                      leading=(3,))
    with pytest.raises(ValueError, match="shape"):
        X.check_proxy(pr, m=11, d=32, leading=(3,))
    with pytest.raises(ValueError, match="does not hold"):
        X.check_proxy(pr, m=12, d=40, leading=(3,))
    with pytest.raises(ValueError, match="bits must be one of"):
        X.quantize(mlp["gate"], 3, 16)
    with pytest.raises(ValueError, match="must divide"):
        X.quantize(mlp["gate"], 4, 12)


def test_share():
    assert X.proxy_share(4, 128) == pytest.approx(2 * 4.125 / 48)
    assert X.proxy_share(2, 64) == pytest.approx(2 * 2.25 / 48)
