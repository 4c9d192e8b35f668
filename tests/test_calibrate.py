"""Threshold calibration: both statistics against NumPy, realised sparsity on the
calibration data, saving where api.sparsity_setup reads."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax import calibrate as C
from countdown_jax import model as M
from countdown_jax.policy import SparseSpec
from tests.support import tiny_params

RS = (0.5, 0.8)


@pytest.fixture(scope="module")
def setup():
    params, cfg = tiny_params.tiny_model(seed=2)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (10, 16)).astype(np.int32)
    lengths = np.full((10,), 16, np.int32)
    lengths[-1] = 7  # a short last row: its padding must not count
    return params, cfg, tokens, lengths


def _np_quantity(method, mlp, x):
    g = x @ mlp["gate"].T.astype(np.float64)
    u = x @ mlp["up"].T.astype(np.float64)
    act = g / (1 + np.exp(-g))  # silu
    return np.abs(act) if method == "cats" else np.abs(u)


def _np_inputs(params, cfg, tokens, lengths, method, r):
    """MLP inputs per layer from the model's forward (ideal rule at r, or dense)."""
    spec = SparseSpec(method, "ideal") if r is not None else SparseSpec()
    policy = {"sparsity": jnp.full((cfg.num_layers,), r, jnp.float32)} if r is not None else None
    _, _, xs = M.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(lengths), spec=spec,
                         policy=policy, collect=True)
    return np.asarray(xs, np.float64)


@pytest.mark.parametrize("method", ["cats", "m_countdown"])
def test_mean_kth_matches_numpy(setup, method):
    params, cfg, tokens, lengths = setup
    stats = C.collect_stats(params, cfg, tokens, lengths, method=method, sparsities=RS,
                            forward="ideal", batch_size=4, progress=False)
    m = cfg.d_ff
    for r in RS:
        xs = _np_inputs(params, cfg, tokens, lengths, method, r)
        k = int(np.floor(m * r + 1e-9))
        ref_mean, ref_median = [], []
        for layer in range(cfg.num_layers):
            mlp = {key: np.asarray(v[layer]) for key, v in params["layers"]["mlp"].items()}
            q = _np_quantity(method, mlp, xs[layer])                      # [N, T, m]
            kth = np.sort(q, axis=-1)[..., k - 1]                         # [N, T]
            rows = [kth[i, :lengths[i]].mean() for i in range(len(lengths))]
            ref_mean.append(np.mean(rows))
            ref_median.append(np.median(rows))
        np.testing.assert_allclose(stats.thresholds(r, "mean_kth"), ref_mean, rtol=2e-5)
        np.testing.assert_allclose(stats.thresholds(r, "mean_kth", agg="median"), ref_median,
                                   rtol=2e-5)
        np.testing.assert_allclose(stats.thresholds(r, "mean_kth", offset=0.1),
                                   np.array(ref_mean) + 0.1, rtol=2e-5)


@pytest.mark.parametrize("method", ["cats", "m_countdown"])
def test_quantile_matches_numpy_and_hits_target(setup, method):
    params, cfg, tokens, lengths = setup
    stats = C.collect_stats(params, cfg, tokens, lengths, method=method, sparsities=RS,
                            forward="dense", batch_size=4, progress=False)
    xs = _np_inputs(params, cfg, tokens, lengths, method, None)
    valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    for r in RS:
        ref = []
        for layer in range(cfg.num_layers):
            mlp = {key: np.asarray(v[layer]) for key, v in params["layers"]["mlp"].items()}
            ref.append(np.quantile(_np_quantity(method, mlp, xs[layer])[valid], r))
        tau = stats.thresholds(r, "quantile")
        np.testing.assert_allclose(tau, ref, rtol=5e-3)   # histogram bins are 0.34% wide
        # threshold mode with these thresholds drops a share r on the calibration text
        # (exactly at layer 0; later layers see sparse inputs, so approximately)
        realised = C.realised_sparsity(params, cfg, tokens, lengths,
                                       SparseSpec(method, "threshold"),
                                       C.threshold_policy(cfg, tau), batch_size=4)
        assert abs(realised[0] - r) < 0.01
        assert np.all(np.abs(realised - r) < 0.04)


def test_mean_kth_realised_sparsity_near_target(setup):
    params, cfg, tokens, lengths = setup
    stats = C.collect_stats(params, cfg, tokens, lengths, method="m_countdown",
                            sparsities=RS, forward="ideal", batch_size=4, progress=False)
    for r in RS:
        realised = C.realised_sparsity(params, cfg, tokens, lengths,
                                       SparseSpec("m_countdown", "threshold"),
                                       C.threshold_policy(cfg, stats.thresholds(r)),
                                       batch_size=4)
        assert np.all(np.abs(realised - r) < 0.05), realised


def test_saved_thresholds_are_what_sparsity_setup_reads(tmp_path, setup):
    params, cfg, _, _ = setup
    from countdown_jax import api

    (tmp_path / "config.json").write_text(json.dumps(tiny_params.HF))
    tau = np.linspace(0.1, 0.3, cfg.num_layers)
    C.save_thresholds(tmp_path, "cats", 0.7, tau, meta={"stat": "mean_kth"})
    model = api.Model(params=params, cfg=cfg, path=tmp_path)
    spec, pol = api.sparsity_setup(model, "cats", "threshold", 0.7)
    assert spec == SparseSpec("cats", "threshold", target_sparsity=0.7)
    np.testing.assert_allclose(np.asarray(pol["threshold"]), tau, rtol=1e-6)


def test_bad_requests_raise(setup):
    params, cfg, tokens, lengths = setup
    with pytest.raises(ValueError, match="sparsities"):
        C.collect_stats(params, cfg, tokens, lengths, method="cats", sparsities=[1.0])
    with pytest.raises(ValueError, match="forward"):
        C.collect_stats(params, cfg, tokens, lengths, method="cats", sparsities=[0.5],
                        forward="sparse")
    stats = C.collect_stats(params, cfg, tokens[:2], lengths[:2], method="cats",
                            sparsities=[0.5], forward="ideal", progress=False)
    with pytest.raises(ValueError, match="histogram"):
        stats.thresholds(0.5, "quantile")
    with pytest.raises(ValueError, match="not calibrated"):
        stats.thresholds(0.7)
