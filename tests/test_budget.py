"""Per-layer budgets (budget.py) and per-token bounds (selection.clamp_kept): thresholds that
keep an exact count, the allocation meeting its budget to the neuron, one compile for every
budget, allocations round-tripping through the model directory, bad input refused; and
(slow) on SmolLM2, `calibrate --budget` through `generate --budget`, the allocated policy
against the uniform one at equal bytes on the fitting text."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax import api, budget as B, calibrate as C, cli
from countdown_jax import model as M
from countdown_jax.ffn import ffn
from countdown_jax.policy import Budget, SparseSpec, make_policy
from countdown_jax.selection import clamp_kept, threshold_for_kept, topk_mask
from tests.support import tiny_params

RULES = [B.Rule("d_countdown", "ideal", oracle=True), B.Rule("m_countdown", "threshold"),
         B.Rule("d_countdown", "proxy", proxy=(4, 8))]


@pytest.fixture(scope="module")
def tiny():
    params, cfg = tiny_params.tiny_model(seed=3)
    rng = np.random.default_rng(1)
    tokens = rng.integers(3, cfg.vocab_size, (4, 12)).astype(np.int32)
    lengths = np.array([12, 12, 12, 9], np.int32)          # a short row: padding not counted
    return params, cfg, tokens, lengths


# -- per-token bounds and exact thresholds -------------------------------------------------
@pytest.mark.parametrize("bounds", [{}, {"floor": 0.1, "ceiling": 0.5}, {"floor": 0.3}])
def test_threshold_for_kept_keeps_the_count_exactly(bounds):
    rng = np.random.default_rng(0)
    q = jnp.asarray(np.abs(rng.standard_normal((6, 5, 40))), jnp.float32)
    valid = jnp.asarray(rng.random((6, 5)) > 0.3)
    layer = {k: jnp.float32(v) for k, v in bounds.items()}
    n_valid = int(valid.sum())
    lo = round(40 * bounds.get("floor", 0.0)) * n_valid
    hi = round(40 * bounds.get("ceiling", 1.0)) * n_valid
    for n in sorted({lo, lo + 1, (lo + hi) // 2, hi - 3, hi}):
        tau = threshold_for_kept(q, n, valid, bounds.get("floor"), bounds.get("ceiling"))
        mask = clamp_kept(q, q > tau, layer)
        assert int(jnp.sum(jnp.where(valid[..., None], mask, False))) == n


def test_floor_equal_ceiling_is_topk():
    q = jnp.asarray(np.random.default_rng(2).standard_normal((7, 48)), jnp.float32)
    got = clamp_kept(q, q > 0.3, {"floor": jnp.float32(0.25), "ceiling": jnp.float32(0.25)})
    np.testing.assert_array_equal(got, topk_mask(q, 0.75))


def test_bounds_are_a_masked_one_device_measurement():
    params, cfg = tiny_params.tiny_model()
    mlp = jax.tree.map(lambda a: a[0], params["layers"]["mlp"])
    x = jnp.ones((2, cfg.d_model))
    pol = {"threshold": jnp.float32(0.1), "floor": jnp.float32(0.2)}
    ffn(mlp, x, act="silu", spec=SparseSpec("m_countdown", "threshold"), policy=pol)
    with pytest.raises(ValueError, match="masked implementation only"):
        ffn(mlp, x, act="silu", spec=SparseSpec("m_countdown", "threshold",
                                                implementation="xla"), policy=pol)
    with pytest.raises(ValueError, match="bounds a threshold rule"):
        ffn(mlp, x, act="silu", spec=SparseSpec("m_countdown", "ideal"),
            policy={"sparsity": jnp.float32(0.5), "ceiling": jnp.float32(0.5)})
    with pytest.raises(ValueError, match="floor .* exceeds ceiling"):
        make_policy(3, threshold=0.1, floor=0.5, ceiling=0.2)


# -- the allocation ------------------------------------------------------------------------
def _curves(L=5, G=7, seed=0):
    """Convex-ish decreasing-in-k curves with one very sensitive layer."""
    rng = np.random.default_rng(seed)
    levels = np.sort(rng.uniform(0.1, 0.9, (L, G)), axis=1)[:, ::-1]
    scale = rng.uniform(0.5, 1.5, (L, 1))
    scale[0] = 20.0
    return levels, scale * (1.0 - levels) ** 2 + 0.01 * rng.standard_normal((L, G))


@pytest.mark.parametrize("K", [0.31, 0.4, 0.5537, 0.7])
def test_allocation_meets_its_budget_to_the_neuron(K):
    levels, loss = _curves()
    m = 96
    counts = np.asarray(B.allocate(levels, loss, K, m=m))
    assert counts.sum() == round(levels.shape[0] * m * K)
    assert counts.min() >= 1 and counts.max() <= m
    assert counts[0] == counts.max()                      # the sensitive layer keeps most


def test_allocation_is_optimal_for_separable_convex_curves():
    """Against brute force over the grid (two layers, same grid): the greedy's sum of
    curves is no larger than any pair of levels with the same mean."""
    x = np.linspace(0.9, 0.1, 9)
    loss = np.stack([3.0 * (1 - x) ** 2, (1 - x) ** 3])
    m = 1000
    for i in range(9):
        for j in range(9):
            K = (x[i] + x[j]) / 2
            counts = np.asarray(B.allocate(np.stack([x, x]), loss, K, m=m)) / m
            got = sum(np.interp(counts[layer], x[::-1], loss[layer][::-1])
                      for layer in range(2))
            assert got <= loss[0, i] + loss[1, j] + 1e-3


def test_vmap_over_budgets_compiles_once():
    levels, loss = _curves(seed=4)
    L = levels.shape[0]
    run = jax.jit(jax.vmap(lambda k: B.allocate(levels, loss, k, m=64)))
    compiles = []

    def count(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        outs = [np.asarray(run(jnp.asarray(ks, jnp.float32)))
                for ks in ([0.3, 0.45, 0.6], [0.35, 0.5, 0.65], [0.4, 0.55, 0.5])]
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert len(compiles) == 1 and run._cache_size() == 1
    for ks, counts in zip(([0.3, 0.45, 0.6], [0.35, 0.5, 0.65], [0.4, 0.55, 0.5]), outs):
        assert counts.sum(axis=1).tolist() == [round(L * 64 * k) for k in ks]


def test_blend_keeps_the_total():
    counts = jnp.asarray([10, 40, 25, 5], jnp.int32)
    for t in (0.0, 0.3, 1.0):
        got = np.asarray(B.blend(counts, t, m=64))
        assert got.sum() == 80
    np.testing.assert_array_equal(B.blend(counts, 1.0, m=64), counts)
    np.testing.assert_array_equal(B.blend(counts, 0.0, m=64), [20] * 4)
    np.testing.assert_array_equal(B.blend(counts, 0.5, m=64), [15, 30, 23, 12])   # a tie: lower layer


@pytest.mark.parametrize("rule", RULES, ids=lambda r: f"{r.method}-{r.mode}")
def test_allocation_meets_its_budget_on_the_fitting_text(tiny, rule):
    """Every layer keeps exactly its allocated count over the fitting text (ideal: every
    token; threshold / proxy: in total), so the bytes are the budget's to one neuron."""
    params, cfg, tokens, lengths = tiny
    m, d, L = cfg.d_ff, cfg.d_model, cfg.num_layers
    a, b = rule.line(m, d)
    budgets = [a + b * 0.3, a + b * 0.55]
    got = B.allocate_budgets(params, cfg, tokens, lengths, rule, budgets,
                             deltas=(0.5, 0.0, -0.5), steps=(0.5, 1.0), batch_size=2,
                             progress=False)
    assert got.kept.shape == (2, L) and got.path_kl.shape == (2, 3)
    assert np.all(got.path_kl[np.arange(2), got.chosen] <= got.path_kl[:, 0])
    proxy = rule.make_proxy(params)
    for i, budget in enumerate(budgets):
        pol = make_policy(L, **{rule.key: got.values[i]}, proxy=proxy)
        kept = C.kept_per_token(params, cfg, tokens, lengths, rule.spec, pol, batch_size=2)
        np.testing.assert_allclose(kept.mean(axis=1), got.kept[i], atol=1e-6)
        assert abs(a + b * kept.mean() - budget) <= b / (L * m) + 1e-9
        if rule.key == "sparsity":                 # per-token top-k: every token alike
            np.testing.assert_allclose(kept, np.repeat(got.kept[i][:, None], kept.shape[1],
                                                       axis=1), atol=1e-6)


class _CharTokenizer:
    """Enough of a tokenizer for calibration rows on the tiny model."""

    def encode(self, text, add_special_tokens=True):
        return [3 + ord(c) % 90 for c in text[:200]]


def test_allocations_round_trip_through_the_model_dir(tiny, tmp_path):
    params, cfg, _, _ = tiny
    (tmp_path / "config.json").write_text(json.dumps(tiny_params.HF))
    model = api.Model(params=params, cfg=cfg, path=tmp_path, tokenizer=_CharTokenizer())
    text = C.CalibrationText(rows=2, seq_len=16, held_out_rows=1, batch_size=2)
    for rule, budget in zip(RULES[:2], (0.3, 0.6)):
        fits = B.calibrate_budgets(model, rule, [budget], text=text,
                                   deltas=(0.4, 0.0, -0.4), progress=False)
        (fit,) = fits
        spec, pol = api.sparsity_setup(model, rule.method, rule.mode, Budget(fit.budget))
        assert spec.mode == rule.mode
        assert spec.target_sparsity == pytest.approx(1 - fit.kept.mean(), abs=1e-6)
        want = 1 - fit.kept if rule.key == "sparsity" else fit.values
        np.testing.assert_allclose(np.asarray(pol[rule.key]), want, rtol=1e-6, atol=1e-7)
        assert fit.meta["bytes_calibration"] == pytest.approx(fit.budget, abs=1 / (3 * 96))
        M.forward(params, cfg, jnp.ones((1, 4), jnp.int32), spec=spec, policy=pol)
    with pytest.raises(FileNotFoundError, match="calibrate .* --budget 0.50"):
        api.check_setup(tmp_path, "cats", "threshold", Budget(0.5))
    with pytest.raises(ValueError, match="modes"):
        api.check_setup(tmp_path, "d_countdown", "predictor", Budget(0.5))


@pytest.mark.parametrize("budget,match", [(0.0, r"\(0, 1\]"), (1.2, r"\(0, 1\]"),
                                          (0.1, "below what d_countdown/proxy can reach"),
                                          (1.0, "keep every neuron")])
def test_unreachable_budgets_refused(budget, match):
    rule = (B.Rule("cats", "threshold") if budget == 1.0      # CATS reads 1.0 keeping all
            else B.Rule("d_countdown", "proxy", proxy=(4, 64)))
    with pytest.raises(ValueError, match=match):
        B.check_budgets(rule, [budget], m=1536, d=576)


def test_bad_rules_and_budgets():
    with pytest.raises(ValueError, match="modes"):
        B.Rule("d_countdown", "predictor")
    with pytest.raises(ValueError, match="oracle bytes"):
        B.Rule("cats", "threshold", oracle=True)
    with pytest.raises(ValueError, match="0.01 grid"):
        Budget(0.405)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        Budget(0.0)
    with pytest.raises(ValueError, match="hold 0"):
        B.check_deltas((0.5, -0.5))


def test_cli_refuses_bad_budgets_before_loading(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(tiny_params.HF))   # no weights
    for args, want in ((["--budget", "0.2"], "below what cats/threshold can reach"),
                       (["--budget", "0.555"], "0.01 grid"),
                       (["--budget", "0.5", "--mode", "ideal", "--proxy-bits", "4"],
                        "--proxy-bits calibrates the proxy mode"),
                       (["--sparsity", "0.5", "--mode", "ideal"], "give --budget")):
        assert cli.main(["calibrate", str(tmp_path), "--method", "cats", *args]) == 2
        err = capsys.readouterr().err
        assert want in err and err.count("\n") == 1, err


# -- SmolLM2 -------------------------------------------------------------------------------
@pytest.mark.slow
def test_calibrate_budget_then_generate_and_beat_uniform(smollm2_dir, tmp_path, capsys):
    """`calibrate --budget` on SmolLM2 (D-ideal at 0.8 of dense bytes as run: kept 0.4),
    read back by `generate --budget`; on the fitting text the allocated policy's loss is
    at most the uniform policy's at the same bytes (KL to dense and cross-entropy)."""
    d = tmp_path / "model"
    d.mkdir()
    for part in ("params", "tokenizer"):
        (d / part).symlink_to(smollm2_dir / part)
    (d / "config.json").write_text((smollm2_dir / "config.json").read_text())
    rows, seq = 2, 16
    assert cli.main(["calibrate", str(d), "--method", "d_countdown", "--mode", "ideal",
                     "--budget", "0.8", "--rows", str(rows), "--seq-len", str(seq),
                     "--held-out-rows", "1", "--deltas", "0.3", "0", "-0.3"]) == 0
    (fit,) = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x[:1] == "{"]
    assert fit["bytes_calibration"] == pytest.approx(0.8, abs=1 / (3 * 30 * 1536))
    model = api.load(d)
    L, m = model.cfg.num_layers, model.cfg.d_ff
    spec, pol = api.sparsity_setup(model, "d_countdown", "ideal", Budget(0.8))
    kept = 1 - np.asarray(pol["sparsity"], np.float64)
    assert round(kept.sum() * m) == round(0.4 * L * m)
    tokens, lengths = C.calibration_rows(model.tokenizer, seq, rows)
    rule = B.Rule("d_countdown", "ideal")
    got = B.loss(model.params, model.cfg, tokens, lengths, rule,
                 {"sparsity": np.stack([1 - kept, np.full(L, 0.6)])})
    assert got["kl"][0] <= got["kl"][1] and got["ce"][0] <= got["ce"][1], got
    assert cli.main(["generate", str(d), "--prompt", "The capital of France is",
                     "--method", "d_countdown", "--budget", "0.8", "--max-new-tokens", "4",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["budget"] == 0.8 and out["realised_sparsity"] == pytest.approx(0.6, abs=2e-3)
