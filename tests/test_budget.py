"""Per-layer budgets (budget.py) and per-token bounds (selection.clamp_kept): thresholds that
keep an exact count, the allocation meeting its budget to the neuron, one compile for every
budget and every set of thresholds, an allocation beating uniform at equal bytes where one
layer matters more, `calibrate --budget` round-tripping through a model directory to
`generate --budget`, bad input refused. All on the tiny model (SmolLM2: RESULTS.md)."""

from __future__ import annotations

import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax import api, budget as B, calibrate as C, cli
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
    # 0.5: 15, 30, 22.5, 12.5 -> the tie goes to the lower layer
    np.testing.assert_array_equal(B.blend(counts, 0.5, m=64), [15, 30, 23, 12])


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


def test_allocation_beats_uniform_where_one_layer_matters(tiny):
    """With layer 1's FFN output scaled up, the curves must send it more neurons: the
    allocation moves off uniform and, at the same total of kept neurons (the same bytes),
    its KL to dense on the fitting text (measured again, apart from the search) is lower
    than the uniform allocation's. A wrong sign or order in the curves or the greedy
    leaves the line search at uniform and fails here."""
    params, cfg, tokens, lengths = tiny
    params = jax.tree.map(lambda a: a, params)
    params["layers"]["mlp"]["down"] = params["layers"]["mlp"]["down"] * np.array(
        [1.0, 4.0, 1.0], np.float32)[:, None, None]
    rule = B.Rule("d_countdown", "ideal", oracle=True)
    m = cfg.d_ff
    got = B.allocate_budgets(params, cfg, tokens, lengths, rule, [0.4],
                             deltas=(0.6, 0.0, -0.6), steps=(0.5, 1.0), batch_size=4,
                             progress=False)
    counts = np.round(got.kept[0] * m).astype(np.int32)
    uniform = np.asarray(B.blend(jnp.asarray(counts), 0.0, m=m))
    assert counts.sum() == uniform.sum() == round(3 * m * 0.4)
    assert got.chosen[0] > 0 and counts[1] == counts.max() > uniform.max()
    res = B.loss(params, cfg, tokens, lengths, rule,
                 {"sparsity": 1.0 - np.stack([counts, uniform]) / m}, batch_size=4)
    assert res["kl"][0] < 0.9 * res["kl"][1], res


def test_threshold_sweeps_compile_once(tiny):
    """Per-layer thresholds are traced: fitting them for other kept shares (every layer's
    pass included) and scoring other thresholds reuse one compile each."""
    params, cfg, tokens, lengths = tiny
    tokens, lengths = tokens[:3, :10], np.minimum(lengths[:3], 10)   # shapes of this test
    rule = B.Rule("m_countdown", "threshold")
    sizes = lambda: (B._fit_pass._cache_size(), B._loss_sums._cache_size())   # noqa: E731
    before = sizes()
    taus = []
    for kept in ([[0.3, 0.5, 0.4], [0.6, 0.2, 0.5]], [[0.5, 0.5, 0.5], [0.4, 0.3, 0.2]]):
        taus.append(B.fit_thresholds(params, cfg, tokens, lengths, rule, kept,
                                     progress=False))
        B.loss(params, cfg, tokens, lengths, rule, {"threshold": taus[-1]}, batch_size=3)
        if len(taus) == 1:
            first = sizes()
    assert not np.allclose(taus[0], taus[1])
    assert [b - a for a, b in zip(before, first)] == [1, 1] and sizes() == first


def test_calibrate_budget_round_trip_through_the_cli(tmp_path, capsys):
    """`calibrate --budget` saves what `api.load` + ``sparsity_setup(Budget)`` read back:
    the thresholds (threshold mode) or per-layer r (ideal mode) the library allocates on
    the same calibration rows, meeting the budget there; `generate` / `eval --budget`
    run them."""
    d = tiny_params.model_dir(tmp_path / "model", seed=3)
    rows, seq, deltas = 2, 16, (0.4, 0.0, -0.4)
    opts = ["--rows", str(rows), "--seq-len", str(seq), "--held-out-rows", "1",
            "--batch-size", "2", "--deltas", *map(str, deltas)]
    model = api.load(d)
    tokens, lengths = C.calibration_rows(model.tokenizer, seq, rows)
    for method, mode, budget in (("m_countdown", "threshold", 0.6),
                                 ("d_countdown", "ideal", 0.8)):
        assert cli.main(["calibrate", str(d), "--method", method, "--mode", mode,
                         "--budget", str(budget), *opts]) == 0
        (fit,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()
                  if x[:1] == "{"]
        rule = B.Rule(method, mode)
        want = B.allocate_budgets(model.params, model.cfg, tokens, lengths, rule, [budget],
                                  deltas=deltas, batch_size=2, progress=False)
        spec, pol = api.sparsity_setup(api.load(d), method, mode, Budget(budget))
        np.testing.assert_array_equal(np.asarray(pol[rule.key]),
                                      np.asarray(want.values[0], np.float32))
        assert fit["kept"] == [round(k, 4) for k in want.kept[0].tolist()]
        assert spec.target_sparsity == pytest.approx(1 - want.kept[0].mean(), abs=1e-6)
        a, b = rule.line(model.cfg.d_ff, model.cfg.d_model)
        assert abs(fit["bytes_calibration"] - budget) <= b / (3 * model.cfg.d_ff) + 1e-9
    assert cli.main(["generate", str(d), "--prompt", "Hi", "--method", "m_countdown",
                     "--mode", "threshold", "--budget", "0.6", "--max-new-tokens", "3",
                     "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["budget"] == 0.6 and 0.0 < out["sparsity_target"] < 1.0
    assert cli.main(["eval", str(d), "--tasks", "boolq_ppl", "--n", "2", "--method",
                     "m_countdown", "--mode", "practical", "--budget", "0.6", "--out",
                     str(tmp_path / "eval.csv")]) == 0
    (row,) = [r for r in csv.DictReader(open(tmp_path / "eval.csv"))
              if r["setting"] == "m_countdown/threshold/budget"]
    assert float(row["sparsity_target"]) == pytest.approx(out["sparsity_target"], abs=1e-6)
    with pytest.raises(FileNotFoundError, match="calibrate .* --budget 0.50"):
        api.check_setup(d, "cats", "threshold", Budget(0.5))
    with pytest.raises(ValueError, match="modes"):
        api.check_setup(d, "d_countdown", "predictor", Budget(0.5))


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
