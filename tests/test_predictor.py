"""Low-rank predictor: labels are the ideal rule's masks, SVD init, training lowers the
validation BCE and beats chance, saved predictors load through api.sparsity_setup."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax import model as M
from countdown_jax import predictor as P
from countdown_jax.selection import ideal_mask, rank_quantity
from tests.support import tiny_params

RS = (0.5, 0.8)


@pytest.fixture(scope="module")
def recorded():
    params, cfg = tiny_params.tiny_model(seed=3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (24, 32)).astype(np.int32)
    lengths = np.full((24,), 32, np.int32)
    lengths[3] = 20
    # rows 0..19 train, 20..23 validation: disjoint rows of different random text
    tr = P.record(params, cfg, tokens[:20], lengths[:20], method="d_countdown",
                  sparsities=RS, batch_size=8, progress=False)
    va = P.record(params, cfg, tokens[20:], lengths[20:], method="d_countdown",
                  sparsities=RS, batch_size=8, progress=False)
    return params, cfg, tokens, lengths, tr, va


def test_recorded_labels_are_the_ideal_masks(recorded):
    params, cfg, tokens, lengths, tr, _ = recorded
    assert tr.num_tokens == int(lengths[:20].sum())
    _, _, xs = M.forward(params, cfg, jnp.asarray(tokens[:8]), jnp.asarray(lengths[:8]),
                         collect=True)
    valid = np.arange(32)[None, :] < lengths[:8, None]
    n = int(valid.sum())
    for layer in range(cfg.num_layers):
        mlp = {k: v[layer] for k, v in params["layers"]["mlp"].items()}
        x = np.asarray(xs[layer])[valid]
        np.testing.assert_allclose(tr.x[layer, :n], x, rtol=1e-6)
        q = rank_quantity("d_countdown", mlp, jnp.asarray(x), cfg.act)
        for i, r in enumerate(RS):
            np.testing.assert_array_equal(tr.labels(i)[layer, :n], np.asarray(ideal_mask(q, r)))
    # nested masks: a larger r keeps a subset
    assert np.all(tr.labels(1) <= tr.labels(0))


def test_svd_init_full_rank_reproduces_gate(recorded):
    params, cfg, *_ = recorded
    gate = np.asarray(params["layers"]["mlp"]["gate"])
    init = P.svd_init(gate, min(cfg.d_model, cfg.d_ff))
    x = np.random.default_rng(1).standard_normal((5, cfg.d_model)).astype(np.float32)
    for layer in range(cfg.num_layers):
        z = x @ init["V"][layer] @ init["U"][layer].T
        np.testing.assert_allclose(z, x @ gate[layer].T, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="rank"):
        P.svd_init(gate, 0)


def test_training_lowers_bce_and_beats_chance(recorded):
    params, cfg, _, _, tr, va = recorded
    tc = P.TrainConfig(rank=8, epochs=30, batch_size=128, lr=3e-3)
    pred, hist = P.train(tr, params["layers"]["mlp"]["gate"], tc, progress=False, val=va)
    assert hist["val_bce_final"] < hist["val_bce_init"] - 0.01
    assert hist["loss"][-1][1] < hist["loss"][0][1]
    theta = P.matched_theta(pred, tr)
    met = P.metrics(pred, va, theta)
    for i, r in enumerate(RS):
        # matched theta lands near the target sparsity on held-out rows
        assert np.all(np.abs(met["realised_sparsity"][i] - r) < 0.08)
        # chance: keep a random share p of neurons -> precision = label rate pi,
        # recall = p, F1 = 2 pi p / (pi + p)
        pi = 1 - met["label_sparsity"][i]
        p = 1 - met["realised_sparsity"][i]
        chance = 2 * pi * p / (pi + p)
        assert np.all(met["f1"][i] > chance + 0.05), (met["f1"][i], chance)


def test_saved_predictor_loads_through_api(tmp_path, recorded):
    params, cfg, *_ = recorded
    from countdown_jax import api

    (tmp_path / "config.json").write_text(json.dumps(tiny_params.HF))
    init = P.svd_init(params["layers"]["mlp"]["gate"], 4)
    theta = np.full((cfg.num_layers,), -0.5, np.float32)
    P.save_predictor(tmp_path, "d_countdown", 0.8, init["V"], init["U"], theta)
    model = api.Model(params=params, cfg=cfg, path=tmp_path)
    spec, pol = api.sparsity_setup(model, "d_countdown", "predictor", 0.8, theta_offset=0.25)
    assert spec.mode == "predictor"
    np.testing.assert_allclose(np.asarray(pol["predictor"]["Vt"]), np.swapaxes(init["V"], 1, 2))
    np.testing.assert_allclose(np.asarray(pol["theta"]), theta + 0.25)
    logits, kept = M.forward(params, cfg, jnp.asarray([[5, 6, 7, 8]], jnp.int32), spec=spec,
                             policy=pol)
    assert np.isfinite(np.asarray(logits)).all() and np.asarray(kept).max() < 1.0


def test_train_and_save_reads_the_training_text_it_is_given(tmp_path, recorded, monkeypatch):
    """TrainingText's rows / seq_len / val_share decide the recorded tokens; one predictor
    per r is saved with them in its metadata."""
    from conversion.checkpoint import tree_meta
    from countdown_jax import data
    from countdown_jax.api import policy_name

    params, cfg, *_ = recorded
    (tmp_path / "config.json").write_text(json.dumps(tiny_params.HF))
    monkeypatch.setattr(data, "calibration_texts",
                        lambda: [f"document {i} " + "word " * (30 + i) for i in range(40)])

    class Tokenizer:             # one token per character, inside the tiny vocabulary
        def encode(self, text, add_special_tokens=True):
            return [3 + ord(c) % (cfg.vocab_size - 3) for c in text]

    text = P.TrainingText(rows=10, seq_len=16, val_share=0.2)
    tc = P.TrainConfig(rank=4, epochs=1, batch_size=64)
    rows = P.train_and_save(tmp_path, Tokenizer(), params, cfg, method="d_countdown",
                            sparsities=RS, tc=tc, text=text, progress=False)
    assert len(rows) == len(RS) * cfg.num_layers
    for r in RS:
        meta = tree_meta(tmp_path, policy_name("predictors", "d_countdown", r))
        assert meta["train_tokens"] == 8 * 16 and meta["val_tokens"] == 2 * 16, meta


def test_cost_relative_to_ffn(recorded):
    _, cfg, *_ = recorded
    c = P.cost(cfg, 8)
    assert c["predictor_params_per_layer"] == 8 * (cfg.d_model + cfg.d_ff)
    assert c["relative"] == pytest.approx(8 * (cfg.d_model + cfg.d_ff) / (3 * cfg.d_model
                                                                         * cfg.d_ff))


def test_bad_method_raises(recorded):
    params, cfg, tokens, lengths, *_ = recorded
    with pytest.raises(ValueError, match="predictors are trained"):
        P.record(params, cfg, tokens, lengths, method="cats", sparsities=RS)
