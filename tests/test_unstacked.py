"""Layers as a tuple (``model.unstack_layers``, an unrolled loop) compute exactly what the
stacked scan computes: prefill, cached decode and forward, dense and sparse."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax import model as M
from countdown_jax.policy import SparseSpec, make_policy, unstack_policy
from tests.support import tiny_params


@pytest.fixture(scope="module")
def tiny():
    params, cfg = tiny_params.tiny_model(seed=3)
    return jax.tree.map(jnp.asarray, params), cfg


def _policy(cfg):
    return make_policy(cfg.num_layers, threshold=np.full((cfg.num_layers,), 0.4, np.float32))


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _prefill_then_decode(params, cfg, tokens, lengths, policy, *, spec):
    cache = M.init_cache(cfg, tokens.shape[0], tokens.shape[1] + 3)
    logits, cache, kept_p = M.prefill(params, cfg, tokens, lengths, cache)
    tok = jnp.argmax(logits[jnp.arange(tokens.shape[0]), lengths - 1], -1)
    outs, kepts = [], []
    pos = lengths
    for _ in range(3):
        lg, cache, kept = M.decode_step(params, cfg, tok, pos, cache, spec=spec, policy=policy)
        outs.append(lg)
        kepts.append(kept)
        tok, pos = jnp.argmax(lg, -1), pos + 1
    return logits, jnp.stack(outs), jnp.stack(kepts), cache


@pytest.mark.parametrize("spec", [SparseSpec(),
                                  SparseSpec(method="m_countdown", mode="threshold",
                                             implementation="xla"),
                                  SparseSpec(method="cats", mode="threshold",
                                             implementation="masked")])
def test_unstacked_equals_stacked(tiny, spec):
    params, cfg = tiny
    flat = M.unstack_layers(params)
    assert isinstance(flat["layers"], tuple) and len(flat["layers"]) == cfg.num_layers
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 7)),
                         jnp.int32)
    lengths = jnp.array([7, 5], jnp.int32)
    pol = None if spec.is_dense else _policy(cfg)
    a = _prefill_then_decode(params, cfg, tokens, lengths, pol, spec=spec)
    b = _prefill_then_decode(flat, cfg, tokens, lengths, pol, spec=spec)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)
    if not spec.is_dense:       # the sparse rule really dropped neurons in both
        assert float(jnp.mean(a[2])) < 0.95
    fa, ka = M.forward(params, cfg, tokens, lengths, spec=spec, policy=pol)
    fb, kb = M.forward(flat, cfg, tokens, lengths, spec=spec, policy=pol)
    np.testing.assert_allclose(np.asarray(fa), np.asarray(fb), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(ka), np.asarray(kb))


@pytest.mark.parametrize("layers", ["stacked", "unstacked"])
def test_unstacked_policy_equals_stacked(tiny, layers):
    """A per-layer policy tuple (``unstack_policy``: one buffer per layer, what generate
    hands unstacked layers) decodes as the stacked policy does, on either layer form; a
    tuple of the wrong length is refused by name."""
    params, cfg = tiny
    if layers == "unstacked":
        params = M.unstack_layers(params)
    L = cfg.num_layers
    pol = make_policy(L, threshold=np.linspace(0.3, 0.5, L).astype(np.float32))
    per_layer = unstack_policy(pol)
    assert isinstance(per_layer, tuple) and len(per_layer) == L
    assert float(per_layer[1]["threshold"]) == float(pol["threshold"][1])
    assert unstack_policy(per_layer) is per_layer and unstack_policy(None) is None
    spec = SparseSpec(method="m_countdown", mode="threshold", implementation="masked")
    tokens = jnp.asarray(np.random.default_rng(1).integers(3, cfg.vocab_size, (2, 6)),
                         jnp.int32)
    lengths = jnp.array([6, 4], jnp.int32)
    a = _prefill_then_decode(params, cfg, tokens, lengths, pol, spec=spec)
    b = _prefill_then_decode(params, cfg, tokens, lengths, per_layer, spec=spec)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert float(jnp.mean(a[2])) < 0.95
    with pytest.raises(ValueError, match=f"needs {L} entries"):
        M.forward(params, cfg, tokens, lengths, spec=spec, policy=per_layer[:-1])


def test_decode_policy_follows_the_layer_form(tiny):
    """generate / generate_tokens hand the policy over per layer for unstacked layers,
    as given for stacked ones and when traced (a vmap sweep slices it in the program)."""
    from countdown_jax.generate import decode_policy

    params, cfg = tiny
    pol = make_policy(cfg.num_layers, threshold=0.4)
    assert decode_policy(params, pol) is pol and decode_policy(params, None) is None
    flat = decode_policy(M.unstack_layers(params), pol)
    assert isinstance(flat, tuple) and len(flat) == cfg.num_layers
    seen = []

    def sweep(t):               # a traced policy stays whole (sliced in the program)
        seen.append(type(decode_policy(M.unstack_layers(params), {**pol, "threshold": t})))
        return t

    jax.vmap(sweep)(jnp.zeros((2, cfg.num_layers)))
    assert seen == [dict]


def test_stack_round_trip_and_layer_count(tiny):
    params, cfg = tiny
    back = M.stack_layers(M.unstack_layers(params))
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert M.unstack_layers(M.unstack_layers(params))["layers"] is not None
    short = {**M.unstack_layers(params)}
    short["layers"] = short["layers"][:-1]
    with pytest.raises(ValueError, match="layers"):
        M.forward(short, cfg, jnp.zeros((1, 4), jnp.int32))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("layers", ["stacked", "unstacked"])
def test_pallas_decode_on_gpu_matches_xla_gather(tiny, layers):
    """Compiled: the model's pallas path (fused kernel for these rules: no capacity, decode
    batch) against the XLA gather of the same rule, stacked and unstacked layers."""
    params, cfg = tiny
    if layers == "unstacked":
        params = M.unstack_layers(params)
    L, d, m = cfg.num_layers, cfg.d_model, cfg.d_ff
    rng = np.random.default_rng(5)
    pred = {"V": jnp.asarray(rng.standard_normal((L, d, 8)) / np.sqrt(d), jnp.float32),
            "U": jnp.asarray(rng.standard_normal((L, m, 8)) / np.sqrt(8), jnp.float32)}
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (3, 6)), jnp.int32)
    lengths = jnp.array([6, 4, 5], jnp.int32)
    for method, mode, pol in (
            ("m_countdown", "threshold", _policy(cfg)),
            ("cats", "threshold", make_policy(L, threshold=np.full((L,), 0.1, np.float32))),
            ("d_countdown", "predictor", make_policy(L, theta=0.5, predictor=pred)),
            ("d_countdown", "cascade", make_policy(L, theta=0.0, threshold=0.05,
                                                   predictor=pred))):
        out = {}
        for impl in ("xla", "pallas"):
            spec = SparseSpec(method=method, mode=mode, implementation=impl)
            out[impl] = _prefill_then_decode(params, cfg, tokens, lengths, pol, spec=spec)
        kept = np.asarray(out["pallas"][2])
        np.testing.assert_array_equal(kept, np.asarray(out["xla"][2]))
        assert 0.0 < kept.mean() < 0.95, (method, kept.mean())
        np.testing.assert_allclose(np.asarray(out["pallas"][1]), np.asarray(out["xla"][1]),
                                   rtol=1e-4, atol=1e-4)
