"""Streaming predictor training (predictor_online) on a tiny model: it learns (validation
BCE falls below the SVD init), keeps each rank's best, stops early, and theta_for_share
keeps the asked share of neurons."""

import numpy as np
import pytest

from countdown_jax import predictor as P
from countdown_jax import predictor_online as PO
from tests.support import tiny_params


@pytest.fixture(scope="module")
def setup():
    params, cfg = tiny_params.tiny_model(0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, cfg.vocab_size, size=(48, 16)).astype(np.int32)
    val = P.record(params, cfg, tokens[:8], np.full((8,), 16, np.int32), method="d_countdown",
                   sparsities=(0.5, 0.8), progress=False)
    return params, cfg, tokens[8:], val


def test_online_training_learns_and_keeps_best(setup):
    params, cfg, tokens, val = setup
    oc = PO.OnlineConfig(ranks=(2, 4), batch_rows=8, lr=3e-2, warmup_steps=2,
                         max_epochs=6, eval_every=5, patience=100)
    preds, hist = PO.train_online(params, cfg, tokens, val, oc=oc, progress=False)
    assert set(preds) == {2, 4}
    L, m, d = cfg.num_layers, cfg.d_ff, cfg.d_model
    assert preds[4]["V"].shape == (2, L, d, 4) and preds[4]["U"].shape == (2, L, m, 4)
    for k in (2, 4):
        curve = hist["val_bce"][str(k)]
        assert curve[0][0] == 0 and len(curve) == 1 + hist["steps"] // 5
        best = hist["best_val_bce"][str(k)]
        assert best < curve[0][1] - 1e-3                  # learnt beyond the SVD init
        assert best == pytest.approx(min(b for _, b in curve))
        assert P.validation_bce(preds[k], val) == pytest.approx(best, rel=1e-5)
    assert hist["best_val_bce"]["4"] <= hist["best_val_bce"]["2"] + 0.02


def test_online_training_stops_when_validation_stalls(setup):
    params, cfg, tokens, val = setup
    oc = PO.OnlineConfig(ranks=(2,), batch_rows=8, lr=0.0, warmup_steps=1, max_epochs=50,
                         eval_every=2, patience=2)
    _, hist = PO.train_online(params, cfg, tokens, val, oc=oc, progress=False)
    assert hist["steps"] == 4                             # two checks without improvement


def test_theta_for_share_keeps_that_share(setup):
    params, cfg, _, val = setup
    pred = {k: np.broadcast_to(v, (2,) + v.shape).copy()
            for k, v in P.svd_init(np.asarray(params["layers"]["mlp"]["gate"]), 4).items()}
    shares = (0.2, 0.5, 0.9)
    theta = PO.theta_for_share(pred, val, shares)
    assert theta.shape == (2, cfg.num_layers, 3)
    z = np.asarray(P._logits(pred, val.x))                     # [R, L, N, m]
    kept = (z > theta[:, :, None, None, :].transpose(4, 0, 1, 2, 3)).mean(axis=(3, 4))
    np.testing.assert_allclose(kept, np.broadcast_to(np.asarray(shares)[:, None, None],
                                                     kept.shape), atol=0.02)
    assert (np.diff(theta, axis=-1) < 0).all()            # more share -> lower theta


def test_bad_input_is_refused(setup):
    params, cfg, tokens, val = setup
    with pytest.raises(ValueError, match="batch_rows"):
        PO.train_online(params, cfg, tokens[:2], val, progress=False)
    with pytest.raises(ValueError, match="predictors are trained"):
        PO.train_online(params, cfg, tokens, val, method="cats", progress=False)
