"""Decode-attention kernel (kernels/decode_attention) against the float32 reference, and
the model's decode with attention="pallas" against attention="xla".

Kernel cases: ragged cache lengths against the slot block, rows at position 0 and at the
last slot, grouped and ungrouped heads, a head size that is not a power of two, sliding
windows, softcapping, and a stacked cache whose other layers are NaN (read in place:
only this layer's visible slots may be touched)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax import model as M
from countdown_jax.decode_path import PORTABLE, DecodePath
from countdown_jax.kernels.decode_attention.api import decode_attention
from countdown_jax.kernels.decode_attention.pallas_gpu import AttentionConfig
from tests.support import tiny_params

CASES = [  # L, B, S, Hkv, G, hd, window, softcap, (bs, split), dtype
    (3, 3, 37, 2, 4, 16, None, None, (8, 64), jnp.float32),      # one split
    (3, 3, 37, 2, 4, 16, 5, 3.0, (8, 16), jnp.bfloat16),        # 3 splits, some empty
    (1, 2, 64, 4, 1, 24, None, None, (16, 16), jnp.float32),    # hd 24: masked columns
    (2, 1, 9, 1, 8, 8, 3, None, (4, 8), jnp.float32),
    (2, 2, 130, 2, 2, 32, 100, 20.0, (32, 64), jnp.bfloat16),
]


def _reference(q, k, v, pos, kw):
    """float32 inputs, float32 matmuls (no TF32 on GPU)."""
    f32 = lambda a: a.astype(jnp.float32)
    with jax.default_matmul_precision("float32"):
        return np.asarray(decode_attention(f32(q), f32(k), f32(v), pos, **kw))


def _case(L, B, S, Hkv, G, hd, dtype, seed):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((L, B, S, Hkv, hd)).astype(np.float32)
    v = rng.standard_normal((L, B, S, Hkv, hd)).astype(np.float32)
    layer = L // 2
    for other in range(L):
        if other != layer:
            k[other] = np.nan
            v[other] = np.nan
    q = rng.standard_normal((B, Hkv * G, hd)).astype(np.float32)
    pos = np.array([0, S - 1, S // 2][:B], np.int32)
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype),
            jnp.asarray(pos), layer)


@pytest.mark.parametrize("L,B,S,Hkv,G,hd,window,softcap,bs,dtype", CASES)
def test_kernel_matches_float32_reference(L, B, S, Hkv, G, hd, window, softcap, bs, dtype):
    bs, split = bs
    q, k, v, pos, layer = _case(L, B, S, Hkv, G, hd, dtype, seed=S + hd)
    kw = dict(scale=hd ** -0.5, softcap=softcap, window=window)
    y = decode_attention(q, k, v, pos, layer=layer, implementation="pallas", interpret=True,
                         config=AttentionConfig(bs=bs, split=split), **kw)
    ref = _reference(q, k[layer], v[layer], pos, kw)
    y = np.asarray(y, np.float32)
    assert y.dtype == np.float32 and np.all(np.isfinite(y))
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    assert np.max(np.abs(y - ref)) / np.max(np.abs(ref)) < tol
    # the unstacked form of the same cache gives the same answer
    y1 = decode_attention(q, k[layer], v[layer], pos, implementation="pallas", interpret=True,
                          config=AttentionConfig(bs=bs, split=split), **kw)
    np.testing.assert_array_equal(np.asarray(y1, np.float32), y)


def test_only_visible_slots_count():
    """Changing a slot outside [pos - window + 1, pos] does not change the output."""
    q, k, v, pos, layer = _case(1, 3, 37, 2, 2, 16, jnp.float32, seed=3)
    kw = dict(scale=0.25, window=6, layer=0, implementation="pallas", interpret=True,
              config=AttentionConfig(bs=8, split=16))
    y = decode_attention(q, k, v, pos, **kw)
    p = np.asarray(pos)
    k2, v2 = np.array(k), np.array(v)
    for b in range(3):
        lo = max(0, p[b] - 6 + 1)
        k2[0, b, :lo] = np.nan
        v2[0, b, :lo] = np.nan
        k2[0, b, p[b] + 1:] = np.nan
        v2[0, b, p[b] + 1:] = np.nan
    y2 = decode_attention(q, jnp.asarray(k2), jnp.asarray(v2), pos, **kw)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y2))


def test_api_errors():
    q, k, v, pos, layer = _case(2, 2, 10, 2, 2, 8, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="implementation"):
        decode_attention(q, k[0], v[0], pos, scale=1.0, implementation="cuda")
    with pytest.raises(ValueError, match="stacked"):
        decode_attention(q, k[0], v[0], pos, scale=1.0, layer=0)
    with pytest.raises(ValueError, match="q must be"):
        decode_attention(q[:, :3], k[0], v[0], pos, scale=1.0)
    with pytest.raises(ValueError, match="attention must be"):
        tiny_p, cfg = tiny_params.tiny_model()
        M.decode_step(tiny_p, cfg, jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32),
                      M.init_cache(cfg, 1, 4), path=DecodePath(attention="flash"))


def _decode(params, cfg, attention, steps=3):
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (3, 7)),
                         jnp.int32)
    lengths = jnp.array([7, 2, 5], jnp.int32)
    cache = M.init_cache(cfg, 3, 7 + steps)
    logits, cache, _ = M.prefill(params, cfg, tokens, lengths, cache)
    tok = jnp.argmax(logits[jnp.arange(3), lengths - 1], -1)
    pos, outs = lengths, []
    path = dataclasses.replace(PORTABLE, attention=attention)
    step = jax.jit(lambda p, t, ps, c: M.decode_step(p, cfg, t, ps, c, path=path))
    for _ in range(steps):
        lg, cache, _ = step(params, tok, pos, cache)
        outs.append(lg)
        tok, pos = jnp.argmax(lg, -1), pos + 1
    return jnp.stack(outs), cache


@pytest.mark.parametrize("variant", ["llama", "window+softcap", "unstacked"])
def test_model_decode_pallas_attention_equals_xla(monkeypatch, pallas_interpret, variant):
    if variant == "window+softcap":     # sliding-window layers (Mistral rule) + a softcap
        params, cfg = tiny_params.tiny_model(seed=4, model_type="mistral",
                                             architectures=["MistralForCausalLM"],
                                             sliding_window=3)
        cfg = dataclasses.replace(cfg, attn_softcap=2.0)
        assert cfg.layer_sliding[0] and cfg.sliding_window == 3
    else:
        params, cfg = tiny_params.tiny_model(seed=4)
    params = jax.tree.map(jnp.asarray, params)
    if variant == "unstacked":
        params = M.unstack_layers(params)
    from countdown_jax.kernels.decode_attention import pallas_gpu
    calls = []
    real = pallas_gpu.decode_attention_pallas_gpu
    monkeypatch.setattr(pallas_gpu, "decode_attention_pallas_gpu",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    ya, ca = _decode(params, cfg, "xla")
    assert not calls
    yb, cb = _decode(params, cfg, "pallas")
    assert len(calls) == (cfg.num_layers if variant == "unstacked" else 1)  # scan: one trace
    np.testing.assert_allclose(np.asarray(yb), np.asarray(ya), rtol=1e-4, atol=1e-4)
    for a, b in zip(jax.tree.leaves(ca), jax.tree.leaves(cb)):   # later layers' k/v see
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)  # rounding


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
def test_kernel_and_model_compiled_on_gpu():
    for L, B, S, Hkv, G, hd, window, softcap, (bs, split), dtype in CASES + [
            (32, 1, 161, 8, 4, 128, None, None, (64, 512), jnp.bfloat16),
            (4, 2, 2100, 8, 4, 128, 1000, None, (64, 512), jnp.bfloat16)]:
        q, k, v, pos, layer = _case(L, B, S, Hkv, G, hd, dtype, seed=S)
        kw = dict(scale=hd ** -0.5, softcap=softcap, window=window)
        y = jax.jit(lambda q, k, v, p: decode_attention(
            q, k, v, p, layer=layer, implementation="pallas",
            config=AttentionConfig(bs=bs, split=split), **kw))(q, k, v, pos)
        ref = _reference(q, k[layer], v[layer], pos, kw)
        y = np.asarray(y, np.float32)
        tol = 1e-5 if dtype == jnp.float32 else 1e-2
        err = np.max(np.abs(y - ref)) / np.max(np.abs(ref))
        assert np.all(np.isfinite(y)) and err < tol, (S, hd, dtype, err)
    params, cfg = tiny_params.tiny_model(seed=4)
    params = jax.tree.map(jnp.asarray, params)
    for form in (params, M.unstack_layers(params)):
        with jax.default_matmul_precision("float32"):        # the XLA path without TF32
            ya, _ = _decode(form, cfg, "xla")
            yb, _ = _decode(form, cfg, "pallas")
        np.testing.assert_allclose(np.asarray(yb), np.asarray(ya), rtol=1e-4, atol=1e-4)


def test_cache_past_int32_offsets(monkeypatch):
    """A stacked cache past int32 element offsets (shrunk here) is read as this layer's
    slice; a single layer past them is refused with a clear error."""
    from countdown_jax.kernels import _platform
    q, k, v, pos, layer = _case(3, 2, 20, 2, 2, 8, jnp.float32, seed=9)
    kw = dict(scale=0.3, implementation="pallas", interpret=True,
              config=AttentionConfig(bs=8, split=8))
    ref = decode_attention(q, k, v, pos, layer=layer, **kw)
    monkeypatch.setattr(_platform, "MAX_FLAT_ELEMENTS", k[0].size)  # one layer fits exactly
    np.testing.assert_array_equal(np.asarray(decode_attention(q, k, v, pos, layer=layer, **kw)),
                                  np.asarray(ref))
    monkeypatch.setattr(_platform, "MAX_FLAT_ELEMENTS", k[0].size - 1)
    with pytest.raises(ValueError, match="int32 offsets"):
        decode_attention(q, k, v, pos, layer=layer, **kw)
