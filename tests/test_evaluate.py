"""Evaluation harness: scores against an independent full-sequence forward, metrics against
hand-computed values, and the continuation-only sparsity contract."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax import evaluate as E
from countdown_jax import model as M
from countdown_jax.policy import SparseSpec, make_policy
from tests.support import tiny_params


@pytest.fixture(scope="module")
def tiny():
    return tiny_params.tiny_model(seed=1)


def _items(rng, n, vocab, task="t"):
    items = []
    for i in range(n):
        c = tuple(int(t) for t in rng.integers(3, vocab, rng.integers(1, 20)))
        y = tuple(int(t) for t in rng.integers(3, vocab, rng.integers(1, 12)))
        items.append(E.Item(task, i // 2, i % 2, c, y, 0, len(y)))
    return items


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _padded_forward(params, cfg, seq, sparse, policy, *, spec):
    logits, _ = M.forward(params, cfg, seq, spec=spec, policy=policy,
                          sparse=None if spec.is_dense else sparse)
    return logits


def _reference_lp(params, cfg, item, spec, policy, pad_to=32):
    """Independent path: one forward over context + continuation (right-padded to one
    length, so it compiles once), sparse on the continuation tokens only, log-softmax in
    NumPy float64."""
    toks = item.context + item.continuation
    seq = np.zeros((1, pad_to), np.int32)
    seq[0, :len(toks)] = toks
    sparse = np.zeros(seq.shape, bool)
    sparse[0, len(item.context):len(toks)] = True
    logits = _padded_forward(params, cfg, jnp.asarray(seq), jnp.asarray(sparse), policy,
                             spec=spec)
    lg = np.asarray(logits[0], np.float64)
    lg = lg - lg.max(-1, keepdims=True)
    lsm = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    c = len(item.context)
    return np.array([lsm[c - 1 + j, t] for j, t in enumerate(item.continuation)])


@pytest.mark.parametrize("method", ["m_countdown", "d_countdown"])
def test_scores_match_full_sequence_forward(tiny, method):
    params, cfg = tiny
    rng = np.random.default_rng(0)
    items = _items(rng, 9, cfg.vocab_size)
    rs = (0.5, 0.8)
    settings = [E.dense_setting(), E.ideal_setting(cfg.num_layers, method, rs)]
    sc = E.score(params, cfg, items, settings, progress=False)
    for s, st in enumerate(settings):
        for r in range(st.size):
            policy = None if st.spec.is_dense else make_policy(cfg.num_layers, sparsity=rs[r])
            for i, it in enumerate(items):
                ref = _reference_lp(params, cfg, it, st.spec, policy)
                np.testing.assert_allclose(sc.token_lp(s, r, i), ref, atol=2e-4, rtol=1e-4)
    # sparsity really changes the scores of multi-token continuations, and realised
    # sparsity is measured on the continuation tokens only
    multi = [i for i, it in enumerate(items) if len(it.continuation) > 1]
    assert any(abs(sc.token_lp(1, 1, i)[1:] - sc.token_lp(0, 0, i)[1:]).max() > 1e-3
               for i in multi)
    realised, per_layer = sc.realised_sparsity(1, 1, "t")
    assert 0.6 < realised <= 0.8 + 1e-6 and per_layer.shape == (cfg.num_layers,)


def test_first_continuation_token_is_dense(tiny):
    """log p(y_0 | context) comes from the dense context: identical for every setting
    (so a one-token continuation, e.g. BoolQ's answer, cannot be changed by sparsity)."""
    params, cfg = tiny
    items = _items(np.random.default_rng(1), 6, cfg.vocab_size)
    settings = [E.dense_setting(), E.ideal_setting(cfg.num_layers, "cats", (0.9,))]
    sc = E.score(params, cfg, items, settings, progress=False)
    for i in range(len(items)):
        assert sc.token_lp(0, 0, i)[0] == sc.token_lp(1, 0, i)[0]


def test_continuation_only_sparsity_leaves_context_logits_unchanged(tiny):
    params, cfg = tiny
    rng = np.random.default_rng(2)
    seq = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 14)), jnp.int32)
    sparse = jnp.zeros((2, 14), bool).at[:, 9:].set(True)
    spec = SparseSpec("m_countdown", "ideal")
    pol = make_policy(cfg.num_layers, sparsity=0.9)
    dense, _ = M.forward(params, cfg, seq)
    mixed, kept = M.forward(params, cfg, seq, spec=spec, policy=pol, sparse=sparse)
    np.testing.assert_array_equal(np.asarray(mixed[:, :9]), np.asarray(dense[:, :9]))
    assert np.abs(np.asarray(mixed[:, 9:]) - np.asarray(dense[:, 9:])).max() > 1e-3
    assert np.all(np.asarray(kept[:, :, :9]) == 1.0) and np.all(np.asarray(kept[:, :, 9:]) < 0.2)


def test_perplexity_is_exp_mean_nll(tiny):
    params, cfg = tiny
    rng = np.random.default_rng(3)
    items = [E.Item("ppl", i, 0, tuple(int(t) for t in rng.integers(3, cfg.vocab_size, 8)),
                    tuple(int(t) for t in rng.integers(3, cfg.vocab_size, 10)), 1)
             for i in range(5)]
    sc = E.score(params, cfg, items, [E.dense_setting()], progress=False)
    rows = E.summarize(sc, {}, model="tiny")
    ppl = [r for r in rows if r["metric"] == "ppl"][0]["score"]
    nll = np.concatenate([-_reference_lp(params, cfg, it, E.DENSE, None)[1:] for it in items])
    assert nll.size == 5 * 9
    assert ppl == pytest.approx(math.exp(nll.mean()), rel=1e-5)


def test_mc_accuracy_by_hand():
    # doc 0: ll -2 (3 bytes), -3 (10 bytes): acc picks 0; per byte -0.67 vs -0.3 picks 1
    # doc 1: ll -1 (5 bytes), -4 (2 bytes), -0.5 (1 byte): acc picks 2; per byte
    #        -0.2, -2, -0.5 picks 0
    ll = np.array([-2.0, -3.0, -1.0, -4.0, -0.5])
    nbytes = np.array([3, 10, 5, 2, 1])
    acc, accn = E.mc_accuracy(ll, nbytes, [[0, 1], [2, 3, 4]], gold=[0, 2])
    assert acc.tolist() == [True, True] and accn.tolist() == [False, False]
    acc, accn = E.mc_accuracy(ll, nbytes, [[0, 1], [2, 3, 4]], gold=[1, 0])
    assert acc.tolist() == [False, False] and accn.tolist() == [True, True]


def test_mean_stderr_by_hand():
    v, se = E.mean_stderr([1.0, 0.0, 1.0, 1.0])
    # sample variance = (3 * 0.25^2 + 0.75^2) / 3 = 0.25; stderr = sqrt(0.25 / 4)
    assert v == 0.75 and se == pytest.approx(0.25, rel=1e-12)


def test_summarize_mc_rows(tiny):
    params, cfg = tiny
    items = _items(np.random.default_rng(4), 8, cfg.vocab_size, task="mc")
    gold = {"mc": {d: d % 2 for d in range(4)}}
    settings = [E.dense_setting(), E.ideal_setting(cfg.num_layers, "m_countdown", (0.5, 0.9))]
    sc = E.score(params, cfg, items, settings, progress=False)
    rows = E.summarize(sc, gold, model="tiny")
    assert len(rows) == 3 * 2  # (dense + 2 r) x (acc, acc_norm)
    dense_acc = [r for r in rows if r["method"] == "dense" and r["metric"] == "acc"][0]
    ll = sc.item_ll(0, 0)
    by_hand = np.mean([int(np.argmax(ll[[2 * d, 2 * d + 1]])) == d % 2 for d in range(4)])
    assert dense_acc["score"] == by_hand and dense_acc["n_examples"] == 4
    assert all(r["dense_score"] == pytest.approx(
        [x for x in rows if x["method"] == "dense" and x["metric"] == r["metric"]][0]["score"])
        for r in rows)


def test_agreement_dense_matches_itself(tiny):
    params, cfg = tiny
    rng = np.random.default_rng(5)
    prompts = rng.integers(3, cfg.vocab_size, (3, 6)).astype(np.int32)
    lengths = np.array([6, 4, 5], np.int32)
    settings = [E.dense_setting(), E.ideal_setting(cfg.num_layers, "cats", (0.0, 0.9))]
    res = E.agreement(params, cfg, prompts, lengths, settings, max_new_tokens=6,
                      progress=False)
    assert res[(0, 0)][0].tolist() == [6, 6, 6]
    assert res[(1, 0)][0].tolist() == [6, 6, 6]        # r = 0 keeps every neuron
    assert res[(1, 1)][1].mean() > 0.85                # realised decode sparsity at r=0.9
