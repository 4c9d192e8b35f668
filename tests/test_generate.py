"""On-device generation: the while_loop decode equals a plain re-run of the full sequence,
row by row, with padding, stop tokens and each sampling option."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax import model as model_lib
from countdown_jax.generate import Sampling, _generate, generate, sample
from countdown_jax.policy import SparseSpec, make_policy
from tests.support import tiny_params


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _last_logits(params, cfg, toks, length, prompt_len, spec, policy):
    pos = jnp.arange(toks.shape[1])[None, :]
    sparse = None if spec.is_dense else (pos >= prompt_len) & (pos < length)
    logits, _ = model_lib.forward(params, cfg, toks, jnp.asarray([length]), spec=spec,
                                  policy=policy, sparse=sparse)
    return logits[0, length - 1]


def greedy_by_forward(params, cfg, prompt, n, spec=SparseSpec(), policy=None):
    """Reference: re-run the whole (fixed-size, padded) sequence for every new token, with
    only the generated tokens sparse."""
    seq = np.zeros((1, len(prompt) + n), np.int32)
    seq[0, :len(prompt)] = prompt
    for i in range(n):
        length = len(prompt) + i
        logits = _last_logits(params, cfg, jnp.asarray(seq), length, len(prompt), spec, policy)
        seq[0, length] = int(jnp.argmax(logits))
    return seq[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny():
    return tiny_params.tiny_model(seed=3)


def padded(prompts):
    t = max(map(len, prompts))
    arr = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        arr[i, :len(p)] = p
    return jnp.asarray(arr), jnp.asarray([len(p) for p in prompts], jnp.int32)


PROMPTS = [[5, 17, 33, 8, 60, 11], [40, 2 + 7, 71]]


def test_greedy_matches_forward_with_padding(tiny):
    params, cfg = tiny
    prompt, lengths = padded(PROMPTS)
    gen = generate(params, cfg, prompt, lengths, jax.random.PRNGKey(0), max_new_tokens=6)
    for i, p in enumerate(PROMPTS):
        ref = greedy_by_forward(params, cfg, p, 6)
        assert np.asarray(gen.tokens[i]).tolist() == ref
    assert np.asarray(gen.num_tokens).tolist() == [6, 6]
    np.testing.assert_allclose(np.asarray(gen.realised_sparsity), 0.0)


def test_sparse_decode_matches_forward_and_reports_sparsity(tiny):
    params, cfg = tiny
    spec = SparseSpec(method="m_countdown", mode="ideal")
    policy = make_policy(cfg.num_layers, sparsity=0.5)
    prompt, lengths = padded(PROMPTS)
    gen = generate(params, cfg, prompt, lengths, jax.random.PRNGKey(0), policy,
                   max_new_tokens=5, spec=spec)
    for i, p in enumerate(PROMPTS):
        assert np.asarray(gen.tokens[i]).tolist() == greedy_by_forward(
            params, cfg, p, 5, spec=spec, policy=policy)
    # ideal mode keeps m - int(m r) neurons (no ties in random data)
    m = cfg.d_ff
    expect = int(m * 0.5) / m
    np.testing.assert_allclose(np.asarray(gen.realised_sparsity), expect, atol=1e-6)
    # 4 decode steps per row (the first token comes from the dense prefill)
    assert float(gen.kept_count) == 2 * 4


def test_one_compile_serves_every_sparsity(tiny):
    params, cfg = tiny
    spec = SparseSpec(method="cats", mode="ideal")
    prompt, lengths = padded(PROMPTS)
    before = _generate._cache_size()   # the jitted program behind generate
    outs = [generate(params, cfg, prompt, lengths, jax.random.PRNGKey(0),
                     make_policy(cfg.num_layers, sparsity=r), max_new_tokens=4, spec=spec)
            for r in (0.1, 0.5, 0.9)]
    assert _generate._cache_size() - before == 1
    sp = [float(np.mean(np.asarray(o.realised_sparsity))) for o in outs]
    assert sp[0] < sp[1] < sp[2]


def test_stop_token_ends_row(tiny):
    params, cfg = tiny
    prompt, lengths = padded(PROMPTS)
    free = generate(params, cfg, prompt, lengths, jax.random.PRNGKey(0), max_new_tokens=6)
    stop = int(free.tokens[0, 2])
    gen = generate(params, cfg, prompt, lengths, jax.random.PRNGKey(0), max_new_tokens=6,
                   stop_tokens=(stop,))
    row = np.asarray(gen.tokens[0]).tolist()
    first = row.index(stop)
    assert int(gen.num_tokens[0]) == first + 1
    assert all(t == cfg.pad_token_id for t in row[first + 1:])


def test_sampling_options():
    logits = jax.random.normal(jax.random.PRNGKey(1), (4, 50)) * 3
    key = jax.random.PRNGKey(2)
    greedy = np.asarray(jnp.argmax(logits, -1))
    # top_k=1 and a tiny top_p both reduce to greedy at any temperature
    np.testing.assert_array_equal(np.asarray(sample(key, logits, Sampling(1.0, top_k=1))), greedy)
    np.testing.assert_array_equal(np.asarray(sample(key, logits, Sampling(2.0, top_p=1e-6))),
                                  greedy)
    # top_k=5 never leaves the 5 largest; the draw depends on the key
    top5 = np.asarray(jax.lax.top_k(logits, 5)[1])
    keys = jax.random.split(jax.random.PRNGKey(3), 40)
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample(k, logits, Sampling(1.0, top_k=5))))(keys))
    for b in range(4):
        assert set(draws[:, b]) <= set(top5[b])
        assert len(set(draws[:, b])) > 1
    # top_p=0.9 keeps the smallest prefix reaching 0.9 of the mass
    probs = np.asarray(jax.nn.softmax(logits, -1))
    draws = np.asarray(jax.jit(jax.vmap(lambda k: sample(k, logits, Sampling(1.0, top_p=0.9))))(keys))
    for b in range(4):
        order = np.argsort(-probs[b])
        csum = np.cumsum(probs[b, order])
        allowed = set(order[:int(np.searchsorted(csum, 0.9) + 1)])
        assert set(draws[:, b]) <= allowed


def test_bad_sampling_arguments():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(-1.0)
