"""The library as users of transformers / JAX meet it (issue #14), on the tiny random
model with a character tokenizer: sweeps, the model as a pytree, prompt-length buckets,
one run per call, decode rate apart from prefill, streaming, context-length warning."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import countdown_jax as cj
from countdown_jax import api
from countdown_jax.generate import CACHES, Sampling, decode, finish, generate, start
from countdown_jax.policy import SparseSpec, make_policy, stack_policies
from tests.support import tiny_params


class CharTokenizer:
    """ids 3..96 from characters; 2 is EOS (the tiny config's). Enough for generate_text."""

    eos_token_id = 2
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        return [3 + (ord(c) % 94) for c in text]

    def decode(self, ids):
        return "".join(chr(ord(" ") + (i - 3) % 94) for i in ids)


@pytest.fixture(scope="module")
def model():
    params, cfg = tiny_params.tiny_model(seed=5)
    # no stop token: every row runs max_new_tokens (fixed counts below)
    cfg = dataclasses.replace(cfg, eos_token_ids=())
    tok = CharTokenizer()
    tok.eos_token_id = None
    return api.Model(params=jax.tree.map(jnp.asarray, params), cfg=cfg,
                     path=Path("/nonexistent"), tokenizer=tok)


def test_realised_sparsity_under_vmap(model):
    """The documented sweep: generate vmapped over stacked policies; realised sparsity per
    setting and layer ([R, L]) equals each setting run alone."""
    rs = [0.25, 0.5, 0.75]
    spec = SparseSpec(method="m_countdown")
    prompt, lengths = jnp.asarray([[5, 9, 13, 7]], jnp.int32), jnp.asarray([4], jnp.int32)
    pols = stack_policies([make_policy(model.cfg.num_layers, sparsity=r) for r in rs])
    run = jax.vmap(lambda p: generate(model.params, model.cfg, prompt, lengths,
                                      jax.random.PRNGKey(0), p, max_new_tokens=5, spec=spec))
    gen = run(pols)
    got = np.asarray(gen.realised_sparsity)
    assert got.shape == (3, model.cfg.num_layers)
    for i, r in enumerate(rs):
        one = generate(model.params, model.cfg, prompt, lengths, jax.random.PRNGKey(0),
                       make_policy(model.cfg.num_layers, sparsity=r), max_new_tokens=5,
                       spec=spec)
        np.testing.assert_allclose(got[i], np.asarray(one.realised_sparsity), atol=1e-6)
        np.testing.assert_array_equal(np.asarray(gen.tokens[i]), np.asarray(one.tokens))


def test_sweep_helper_matches_single_runs(model):
    outs = cj.sweep(model, ["abcdef", "xyz"], method="m_countdown", sparsities=[0.3, 0.6],
                    max_new_tokens=4)
    assert [o.sparsity for o in outs] == [0.3, 0.6]
    for o in outs:
        single = cj.generate_text(model, ["abcdef", "xyz"], method="m_countdown",
                                  sparsity=o.sparsity, max_new_tokens=4)
        assert o.token_ids == single.token_ids
        assert o.realised_sparsity == pytest.approx(single.realised_sparsity, abs=1e-6)
        # ideal mode drops int(m r) of m = 96 neurons per decode token
        assert o.realised_sparsity == pytest.approx(int(96 * o.sparsity) / 96, abs=1e-6)
    with pytest.raises(ValueError, match="sparse method"):
        cj.sweep(model, "abc", method="dense", sparsities=[0.5])


def test_chunked_decode_equals_one_program(model):
    """start + decode in chunks (what streaming runs) gives the one-program result."""
    prompt, lengths = jnp.asarray([[5, 9, 13, 7], [8, 3, 0, 0]], jnp.int32), \
        jnp.asarray([4, 2], jnp.int32)
    kw = dict(spec=SparseSpec(method="cats"), sampling=Sampling(0.7, 5, 0.9))
    pol = make_policy(model.cfg.num_layers, sparsity=0.5)
    whole = generate(model.params, model.cfg, prompt, lengths, jax.random.PRNGKey(1), pol,
                     max_new_tokens=7, **kw)
    s = start(model.params, prompt, lengths, jax.random.PRNGKey(1), pol, cfg=model.cfg,
              max_new_tokens=7, **kw)
    for until in (3, 4, 6, 7):
        s = decode(model.params, s, pol, until, cfg=model.cfg, **kw)
        assert int(s["step"]) == until
    got = finish(s)
    for a, b in zip(got, whole):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_model_is_a_pytree(model):
    assert len(jax.tree.leaves(model)) == len(jax.tree.leaves(model.params))
    bf = jax.tree.map(lambda x: x.astype(jnp.bfloat16), model)
    assert isinstance(bf, api.Model) and bf.cfg is model.cfg
    assert bf.params["embed"].dtype == jnp.bfloat16
    assert jax.jit(lambda m: m.params["embed"].sum())(model) == pytest.approx(
        float(model.params["embed"].sum()), rel=1e-5)


def test_bucket_length():
    assert [api.bucket_length(n) for n in (1, 5, 16, 17, 32, 33, 100)] == \
        [16, 16, 16, 32, 32, 64, 128]


def _counting(monkeypatch):
    """Wrap the compile cache's look-up: count compiles and executions per phase."""
    compiles, runs = [], []
    real = api.compiled

    def wrapped(fn, static, *args):
        before = len(CACHES.programs)
        exe = real(fn, static, *args)
        if len(CACHES.programs) != before:
            compiles.append(fn)

        def call(*a):
            runs.append(fn)
            return exe(*a)
        return call
    monkeypatch.setattr(api, "compiled", wrapped)
    return compiles, runs


def test_nearby_prompt_lengths_reuse_compiles_and_run_once(model, monkeypatch):
    CACHES.clear()
    compiles, runs = _counting(monkeypatch)
    out = cj.generate_text(model, "abcde", max_new_tokens=6)
    assert len(compiles) == 2                  # prefill and decode, once each
    assert len(runs) == 2                      # each runs once: no warm-up generation
    for prompt in ("abcdefghi", "abcdefghijklmn", "x"):
        cj.generate_text(model, prompt, max_new_tokens=6)
    assert len(compiles) == 2                  # all in the 16-token bucket
    # rates: decode apart from prefill, compile excluded
    assert len(out.token_ids[0]) == 6
    assert out.tokens_per_s > 0 and out.prefill_tokens_per_s > 0
    assert set(out.seconds) == {"compile", "prefill", "decode"}


def test_streaming_pieces_join_to_the_text(model):
    pieces = []
    out = cj.generate_text(model, "hello", max_new_tokens=9, stream_every=2,
                           stream=lambda new: pieces.append(new[0]))
    assert len(pieces) >= 5                    # first token, then every 2 steps
    assert "".join(pieces) == out.texts[0]
    plain = cj.generate_text(model, "hello", max_new_tokens=9)
    assert plain.token_ids == out.token_ids


def test_long_prompt_warns(model):
    with pytest.warns(UserWarning, match="max_position_embeddings"):
        cj.generate_text(model, "a" * 500, max_new_tokens=20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cj.generate_text(model, "a" * 10, max_new_tokens=2)


def test_sparse_method_needs_a_sparsity_and_grid(model):
    with pytest.raises(ValueError, match="needs a sparsity"):
        cj.generate_text(model, "abc", method="cats")
    with pytest.raises(ValueError, match="0.01 grid"):
        api.policy_name("thresholds", "cats", 0.704)
    assert api.policy_name("thresholds", "cats", 0.7) == "thresholds/cats/r0.70"


def test_chat_needs_a_template(model):
    with pytest.raises(ValueError, match="no chat template"):
        cj.generate_text(model, "abc", chat=True)


def test_package_exports():
    names = dir(cj)
    for name in ("load", "generate_text", "sweep", "stack_policies", "make_policy",
                 "SparseSpec", "Model", "TextOutput", "generate"):
        assert name in names and getattr(cj, name) is not None
    assert cj.generate_text.__doc__ and "sparsity" in cj.generate_text.__doc__
    assert cj.sweep.__doc__
