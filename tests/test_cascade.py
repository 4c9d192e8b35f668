"""The cascade rule (d_countdown, mode "cascade"): the predictor's z > theta picks the
candidates, their exact s is computed, |s| > tau keeps the final set.

Checked against the NumPy float64 reference (np_sparse_ffn.cascade) for the masked and
index-list paths on ragged shapes, with capacity, for skipped-row influence, under vmap
sweeps, through the fused Pallas kernel (interpret mode, as on a GPU) and in the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support import np_sparse_ffn as ref
from countdown_jax import model as M
from countdown_jax import selection as sel
from countdown_jax.ffn import dense_ffn, ffn
from countdown_jax.gated import coefficients
from countdown_jax.policy import SparseSpec, check_layer, make_policy, stack_policies
from tests.test_ffn import _problem
from tests.support import tiny_params

SPEC = SparseSpec("d_countdown", "cascade")
INF = np.inf
# (theta, tau): both stages active, each stage alone, all kept, none kept (either stage)
CASES = [(-5.0, 0.3), (0.0, 1.0), (5.0, 0.05), (-INF, 0.5), (0.0, -INF),
         (-INF, -INF), (INF, -INF), (-INF, INF)]


def _layer(theta, tau, pred):
    """One layer's slice of a cascade policy (pred in the paper's {"V", "U"} form)."""
    pol = make_policy(1, theta=theta, threshold=tau,
                      predictor={k: np.asarray(v)[None] for k, v in pred.items()})
    return jax.tree.map(lambda a: a[0], pol)


def _spec(impl, **kw):
    return SparseSpec("d_countdown", "cascade", impl, **kw)


def _to64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _jnp(tree):
    return jax.tree.map(jnp.asarray, tree)


def _counts(kept, m):
    return np.rint(np.asarray(kept) * m).astype(int)


def _library_masks(mlp, x, layer, act="silu"):
    """(candidates, kept) as the library's selection computes them."""
    q = sel.spec_quantity(SPEC, mlp, x, act, layer)
    cand = sel.select(SPEC, q, layer)
    _, _, s = coefficients(mlp, x, act)
    return np.asarray(cand), np.asarray(sel.refine(SPEC, cand, s, layer))


# --------------------------------------------------------------------------- selection

def test_policy_and_spec():
    SparseSpec("d_countdown", "cascade", "pallas", capacity=8)
    with pytest.raises(ValueError, match="does not support mode 'cascade'"):
        SparseSpec("dejavu", "cascade")
    assert SPEC.policy_keys == ("theta", "predictor", "threshold")
    mlp, _, pred = _problem(0)
    layer = _layer(0.0, 0.1, pred)
    check_layer(SPEC, layer, d=19, m=37)
    with pytest.raises(ValueError, match="threshold"):
        check_layer(SPEC, {k: v for k, v in layer.items() if k != "threshold"}, d=19, m=37)
    # refine is the identity for every other mode
    q = jnp.asarray(np.random.default_rng(0).standard_normal((2, 37)), jnp.float32)
    mask = q > 0
    for mode in ("predictor", "threshold", "ideal"):
        spec = SparseSpec("d_countdown", mode)
        assert np.array_equal(sel.refine(spec, mask, q, {"threshold": jnp.float32(9)}), mask)


@pytest.mark.parametrize("m,d", [(37, 19), (130, 33), (5, 3)])
def test_selection_vs_numpy(m, d):
    mlp, x, pred = _problem(m + d, m=m, d=d)
    mlp64, x64, pred64 = _to64(mlp), _to64(x), _to64(pred)
    for theta, tau in CASES:
        cand, keep = _library_masks(_jnp(mlp), jnp.asarray(x), _layer(theta, tau, pred))
        rc, rk = ref.cascade(mlp64, x64, pred64, theta, tau, "silu")
        np.testing.assert_array_equal(cand, rc, err_msg=f"{theta}, {tau}")
        np.testing.assert_array_equal(keep, rk, err_msg=f"{theta}, {tau}")


# --------------------------------------------------------------------------- FFN

@pytest.mark.parametrize("impl", ["masked", "xla"])
@pytest.mark.parametrize("m,d", [(37, 19), (130, 33), (5, 3)])
def test_ffn_vs_numpy(impl, m, d):
    act = "gelu_tanh" if m == 130 else "silu"
    mlp, x, pred = _problem(7 * m + d, m=m, d=d)
    mlp64, x64, pred64 = _to64(mlp), _to64(x), _to64(pred)
    f = functools.partial(ffn, act=act, spec=_spec(impl), return_dropped=True)
    refined = False
    for theta, tau in CASES:
        cand, keep = ref.cascade(mlp64, x64, pred64, theta, tau, act)
        refined |= bool((keep.sum() < cand.sum()) and keep.any())
        y, kept, dropped = f(_jnp(mlp), jnp.asarray(x), policy=_layer(theta, tau, pred))
        msg = f"{impl} m={m} theta={theta} tau={tau}"
        np.testing.assert_array_equal(_counts(kept, m), keep.sum(-1), err_msg=msg)
        assert not np.asarray(dropped).any(), msg
        np.testing.assert_allclose(y, ref.sparse_ffn(mlp64, x64, keep, act), rtol=1e-4,
                                   atol=1e-5, err_msg=msg)
        if not keep.any():
            assert not np.asarray(y).any(), msg            # none kept -> exactly zero
        if theta == tau == -INF:                           # all kept -> the dense FFN
            assert (np.asarray(kept) == 1.0).all(), msg
            np.testing.assert_allclose(y, dense_ffn(_jnp(mlp), jnp.asarray(x), act),
                                       rtol=1e-4, atol=1e-5, err_msg=msg)
    assert refined                    # some case where the second stage dropped candidates


@pytest.mark.parametrize("impl", ["masked", "xla"])
def test_one_stage_open_equals_the_other_rule(impl):
    """theta = -inf: d_countdown's oracle threshold rule |s| > tau; tau = -inf: the
    predictor rule z > theta."""
    mlp, x, pred = _problem(3)
    mlp, x = _jnp(mlp), jnp.asarray(x)
    for (theta, tau), (mode, layer) in (
            ((-INF, 0.4), ("threshold", {"threshold": jnp.float32(0.4)})),
            ((1.0, -INF), ("predictor", _layer(1.0, 0.0, pred)))):
        y, kept = ffn(mlp, x, act="silu", spec=_spec(impl), policy=_layer(theta, tau, pred))
        y2, kept2 = ffn(mlp, x, act="silu", spec=SparseSpec("d_countdown", mode, impl),
                        policy=layer)
        np.testing.assert_array_equal(_counts(kept, 37), _counts(kept2, 37))
        np.testing.assert_allclose(y, y2, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("m,d", [(37, 19), (130, 33)])
def test_capacity_caps_candidates(monkeypatch, pallas_interpret, m, d):
    """The capacity cuts the candidates (highest z kept, counted in ``dropped``); the
    second stage then refines what is left. masked == gather == pallas (the index-list
    kernel with s_tau, interpret mode as on a GPU) == NumPy."""
    import countdown_jax.ffn as ffn_mod
    from countdown_jax.kernels.sparse_ffn import pallas_gpu
    calls = []
    real = pallas_gpu.sparse_ffn_pallas_gpu
    monkeypatch.setattr(pallas_gpu, "sparse_ffn_pallas_gpu",
                        lambda *a, **kw: calls.append(kw["s_tau"] is not None) or real(*a, **kw))
    mlp, x, pred = _problem(11 * m, m=m, d=d)
    mlp64, x64, pred64 = _to64(mlp), _to64(x), _to64(pred)
    cap, theta, tau = m // 4, -3.0, 0.3
    z = ref.predictor_logits(pred64, x64)
    rule = ref.select("predictor", z, theta)
    cand, keep = ref.cascade(mlp64, x64, pred64, theta, tau, "silu", capacity=cap)
    assert (rule.sum(-1) > cap).any() and (keep.sum(-1) < cand.sum(-1)).any()
    outs = []
    for impl in ("masked", "xla", "pallas"):
        run = jax.jit(functools.partial(ffn, act="silu", spec=_spec(impl, capacity=cap),
                                        return_dropped=True))
        y, kept, dropped = run(_jnp(mlp), jnp.asarray(x), policy=_layer(theta, tau, pred))
        np.testing.assert_array_equal(dropped, rule.sum(-1) - cand.sum(-1), err_msg=impl)
        np.testing.assert_array_equal(_counts(kept, m), keep.sum(-1), err_msg=impl)
        np.testing.assert_allclose(y, ref.sparse_ffn(mlp64, x64, keep, "silu"), rtol=1e-4,
                                   atol=1e-5, err_msg=impl)
        outs.append(y)
    assert calls == [True]
    for y in outs[1:]:
        np.testing.assert_allclose(y, outs[0], rtol=1e-5, atol=1e-5)


def _influence_problem():
    """Three tokens, thresholds at quantiles: some neurons are candidates of no token,
    some are candidates of a token but kept by none (refined out)."""
    mlp, x, pred = _problem(4, tokens=(3,))
    x[0] = np.random.default_rng(1).standard_normal(x.shape[1])          # no zero row
    z = ref.predictor_logits(_to64(pred), _to64(x))
    s = ref.coefficients(_to64(mlp), _to64(x), "silu")[2]
    layer = _layer(float(np.quantile(z, 0.5)), float(np.quantile(np.abs(s), 0.6)), pred)
    mlp, x = _jnp(mlp), jnp.asarray(x)
    cand, keep = _library_masks(mlp, x, layer)
    never = ~cand.any(0)                       # candidates of no token
    refined_out = cand.any(0) & ~keep.any(0)   # a candidate somewhere, kept nowhere
    assert never.sum() >= 3 and refined_out.sum() >= 2 and keep.any(-1).all()
    return mlp, x, layer, never, refined_out


def _set_rows(mlp, rows, which, value):
    return {k: (mlp[k].at[rows].set(value) if k in which else mlp[k]) for k in mlp}


@pytest.mark.parametrize("impl", ["masked", "xla"])
def test_skipped_neurons_have_no_influence(impl):
    mlp, x, layer, never, refined_out = _influence_problem()
    run = functools.partial(ffn, act="silu", spec=_spec(impl), policy=layer)
    base, kept = run(mlp, x)
    # non-candidates: no row of theirs matters; refined-out candidates: their W_down row
    for rows, which in ((never, ("gate", "up", "down")), (refined_out, ("down",))):
        y, k = run(_set_rows(mlp, rows, which, 1e3), x)
        np.testing.assert_array_equal(y, base, err_msg=f"{impl} perturbed {which}")
        np.testing.assert_array_equal(k, kept)
    # NaN in the non-candidates' rows (not row 0: index-list padding may read it with
    # weight 0). The index list never reads them; the masked reference reads every row.
    poison = never & (np.arange(len(never)) != 0)
    y, _ = run(_set_rows(mlp, poison, ("gate", "up", "down"), jnp.nan), x)
    if impl == "xla":
        np.testing.assert_array_equal(y, base, err_msg="gather read a non-candidate row")
    else:
        assert np.isnan(np.asarray(y)).any()
    # (The XLA index list gathers every candidate's W_down row, weighting the refined-out
    # ones by 0; the fused kernel does not read them: test_fused_path_* poisons them.)


@pytest.mark.parametrize("impl", ["masked", "xla"])
def test_vmap_sweep_compiles_once(impl):
    """theta and tau are traced: one compile sweeps them (vmap over stacked policies)."""
    mlp, x, pred = _problem(5)
    mlp, x = _jnp(mlp), jnp.asarray(x)
    mlp64, x64, pred64 = _to64(mlp), _to64(x), _to64(pred)
    traces = []

    def run(layer):
        traces.append(1)                                    # Python side effect: per trace
        return ffn(mlp, x, act="silu", spec=_spec(impl), policy=layer)

    grid = [(t, s) for t in (-INF, -4.0, 0.0, 4.0) for s in (-INF, 0.2, 1.0)] + [(INF, 0.0)]
    vrun = jax.jit(jax.vmap(run))
    ys, kept = vrun(stack_policies([_layer(t, s, pred) for t, s in grid]))
    assert ys.shape == (len(grid),) + x.shape and len(traces) == 1
    ys2, _ = vrun(stack_policies([_layer(t, s, pred) for t, s in grid[::-1]]))
    assert len(traces) == 1                                 # new values, no retrace
    np.testing.assert_allclose(ys2[::-1], ys, rtol=1e-6, atol=1e-6)
    one = jax.jit(run)
    for i, (t, s) in enumerate(grid):
        y, k = one(_layer(t, s, pred))
        _, keep = ref.cascade(mlp64, x64, pred64, t, s, "silu")
        np.testing.assert_array_equal(_counts(kept[i], 37), keep.sum(-1))
        np.testing.assert_array_equal(_counts(k, 37), keep.sum(-1))
        np.testing.assert_allclose(ys[i], y, rtol=1e-5, atol=1e-5)
    assert len(traces) == 2                                 # one more for the unbatched jit


@pytest.mark.parametrize("n", [1, 3])
def test_fused_path_equals_masked(monkeypatch, pallas_interpret, n):
    """implementation="pallas" routes decode tokens to the fused kernel's method "dc"
    (interpret mode forced, as on a GPU): the masked kept set, y within float32 rounding.
    It reads the model's stack in place (the other layer NaN) and none of the rows the
    cascade skips (NaN): the non-candidates' gate/up/down, the refined-out W_down rows."""
    import countdown_jax.ffn as ffn_mod
    from countdown_jax.kernels.fused_sparse_ffn import api as fused_api
    monkeypatch.setattr(ffn_mod, "_FUSED_MAX_TOKENS", 3)      # several tokens too
    calls = []
    real = fused_api.fused_sparse_ffn
    monkeypatch.setattr(fused_api, "fused_sparse_ffn",
                        lambda *a, **kw: calls.append(kw["method"]) or real(*a, **kw))
    mlp, x, pred = _problem(30, tokens=(4,))
    x = x[1:1 + n]                                   # token 0 of _problem is all zero
    z = np.sort(ref.predictor_logits(_to64(pred), _to64(x)).ravel())
    a = np.sort(np.abs(ref.coefficients(_to64(mlp), _to64(x), "silu")[2]).ravel())
    # thresholds halfway between neighbouring values: no value sits on them
    theta = (z[len(z) // 2] + z[len(z) // 2 + 1]) / 2
    tau = (a[len(a) * 2 // 3] + a[len(a) * 2 // 3 + 1]) / 2
    layer = _layer(theta, tau, pred)
    mlp, x = _jnp(mlp), jnp.asarray(x)
    cand, keep = _library_masks(mlp, x, layer)
    never, refined = ~cand.any(0), cand.any(0) & ~keep.any(0)
    assert never.any() and refined.any() and keep.any(-1).all()
    own = {"gate": mlp["gate"].at[never].set(jnp.nan), "up": mlp["up"].at[never].set(jnp.nan),
           "down": mlp["down"].at[never | refined].set(jnp.nan)}
    stack = {k: jnp.stack([jnp.full_like(v, jnp.nan), v]) for k, v in own.items()}
    run = jax.jit(lambda w, l, pol, spec: ffn(w, x, act="silu", spec=spec, policy=pol,
                                              layer=l, return_dropped=True),
                  static_argnums=3)
    y, kept, dropped = run(stack, jnp.int32(1), layer, _spec("pallas"))
    ym, km, _ = run(mlp, None, layer, _spec("masked"))
    assert calls == ["dc"]
    assert np.isfinite(np.asarray(y)).all()
    np.testing.assert_array_equal(_counts(kept, 37), keep.sum(-1))
    np.testing.assert_array_equal(_counts(km, 37), keep.sum(-1))
    np.testing.assert_array_equal(np.asarray(dropped), 0)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ym), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- model

def _model_and_policy(theta, tau, rank=4, seed=5):
    params, cfg = tiny_params.tiny_model(seed=seed)
    L, d, m = cfg.num_layers, cfg.d_model, cfg.d_ff
    rng = np.random.default_rng(seed)
    pred = {"V": (rng.standard_normal((L, d, rank)) / np.sqrt(d)).astype(np.float32),
            "U": rng.standard_normal((L, m, rank)).astype(np.float32)}
    policy = make_policy(L, theta=theta, threshold=tau, predictor=pred)
    return _jnp(params), cfg, policy, pred


def test_model_forward_kept_is_the_cascade_on_mlp_inputs():
    """Realised sparsity: kept of every layer == the NumPy cascade on that layer's MLP
    input (collected by the same forward)."""
    params, cfg, policy, pred = _model_and_policy([-0.5, 0.0, 0.5], [0.02, 0.05, 0.1])
    tokens = jnp.asarray(np.random.default_rng(6).integers(3, cfg.vocab_size, (2, 6)))
    for impl in ("masked", "xla"):
        _, kept, h = M.forward(params, cfg, tokens, spec=_spec(impl), policy=policy,
                               collect=True)
        fracs = []
        for l in range(cfg.num_layers):
            mlp = {k: np.asarray(params["layers"]["mlp"][k][l], np.float64)
                   for k in ("gate", "up", "down")}
            p = {k: np.asarray(v[l], np.float64) for k, v in pred.items()}
            cand, keep = ref.cascade(mlp, np.asarray(h[l], np.float64), p,
                                     float(policy["theta"][l]), float(policy["threshold"][l]),
                                     cfg.act)
            np.testing.assert_array_equal(_counts(kept[l], cfg.d_ff), keep.sum(-1),
                                          err_msg=f"{impl} layer {l}")
            assert (keep.sum(-1) < cand.sum(-1)).any()           # the second stage acts
            fracs.append(keep.mean())
        assert 0.05 < np.mean(fracs) < 0.7


def test_model_decode_and_extend_masked_equals_gather():
    params, cfg, policy, _ = _model_and_policy([-0.5, 0.0, 0.5], [0.02, 0.05, 0.1])
    rng = np.random.default_rng(7)
    prompt = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 5)), jnp.int32)
    steps = jnp.asarray(rng.integers(3, cfg.vocab_size, (3, 2)), jnp.int32)  # fixed tokens
    lengths = jnp.array([5, 3], jnp.int32)
    results = {}
    for impl in ("masked", "xla"):
        spec = _spec(impl)
        cache = M.init_cache(cfg, 2, 12)
        _, cache, _ = M.prefill(params, cfg, prompt, lengths, cache)
        step = jax.jit(lambda t, p, c, spec=spec: M.decode_step(params, cfg, t, p, c,
                                                                spec=spec, policy=policy))
        pos, logits, kepts = lengths, [], []
        for tok in steps:
            lg, cache, kept = step(tok, pos, cache)
            logits.append(lg)
            kepts.append(kept)
            pos = pos + 1
        chunk = jnp.asarray(rng.integers(3, cfg.vocab_size, (2, 3)), jnp.int32) \
            if impl == "masked" else results["masked"][2]
        lx, _, kx = M.extend(params, cfg, chunk, pos, cache, spec=spec, policy=policy)
        results[impl] = (jnp.stack(logits), jnp.stack(kepts), chunk, lx, kx)
    (la, ka, _, xa, kxa), (lb, kb, _, xb, kxb) = results["masked"], results["xla"]
    np.testing.assert_allclose(lb, la, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(xb, xa, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(_counts(kb, cfg.d_ff), _counts(ka, cfg.d_ff))
    np.testing.assert_array_equal(_counts(kxb, cfg.d_ff), _counts(kxa, cfg.d_ff))
    assert 0 < np.asarray(ka).mean() < 1 and 0 < np.asarray(kxa).mean() < 1
