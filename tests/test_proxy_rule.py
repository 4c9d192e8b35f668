"""The proxy rule (d_countdown, mode "proxy"): |s_hat| > tau, s_hat from a low-bit copy of
W_gate and W_up (countdown_jax/proxy.py); the kept rows then run in full precision.

Checked against the NumPy float64 reference (np_sparse_ffn.proxy_rule) for the masked and
index-list paths on ragged shapes, all-kept / none-kept, through the fused Pallas kernel
(interpret mode, as on a GPU), in the model and under a vmap sweep; bytes and checks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax import model as M
from countdown_jax import proxy as X
from countdown_jax import selection as sel
from countdown_jax.cost import bytes_share
from countdown_jax.ffn import dense_ffn, ffn
from countdown_jax.policy import SparseSpec, check_layer, check_policy, make_policy, \
    stack_policies
from tests.support import np_sparse_ffn as ref
from tests.support import tiny_params

INF = np.inf


def _bf16(a):
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)


def _problem(seed, m, d, tokens=(2, 5)):
    rng = np.random.default_rng(seed)
    mlp = {k: (rng.standard_normal((m, d)) / np.sqrt(d)).astype(np.float32)
           for k in ("gate", "up", "down")}
    x = rng.standard_normal(tokens + (d,)).astype(np.float32) * 2.0
    return mlp, x


def _layer(mlp, tau, bits, group):
    pol = make_policy(1, threshold=tau,
                      proxy=X.quantize_mlp({k: np.asarray(v)[None] for k, v in mlp.items()
                                            if k != "down"}, bits, group))
    return jax.tree.map(lambda a: a[0], pol)


def _spec(impl):
    return SparseSpec("d_countdown", "proxy", impl)


def _taus(scores):
    """Thresholds between neighbouring values (none sits on a value) + all / none kept."""
    a = np.sort(scores.ravel())
    mids = [(a[int(len(a) * f)] + a[int(len(a) * f) + 1]) / 2 for f in (0.3, 0.8)]
    return mids + [-INF, INF]


@pytest.mark.parametrize("impl", ["masked", "xla"])
@pytest.mark.parametrize("m,d,bits,group,act", [(37, 16, 4, 8, "silu"),
                                                (130, 32, 2, 16, "gelu_tanh"),
                                                (5, 8, 8, 8, "silu")])
def test_ffn_vs_numpy(impl, m, d, bits, group, act):
    mlp, x = _problem(m + d, m, d)
    mlp64, x64 = {k: v.astype(np.float64) for k, v in mlp.items()}, x.astype(np.float64)
    _, scores = ref.proxy_rule(mlp64, x64, bits, group, 0.0, act, round_scale=_bf16)
    f = functools.partial(ffn, act=act, spec=_spec(impl))
    for tau in _taus(scores):
        keep, _ = ref.proxy_rule(mlp64, x64, bits, group, tau, act, round_scale=_bf16)
        layer = _layer(mlp, tau, bits, group)
        q = sel.spec_quantity(_spec(impl), mlp, jnp.asarray(x), act, layer)
        np.testing.assert_allclose(q, scores, rtol=1e-5, atol=1e-6)
        y, kept = f({k: jnp.asarray(v) for k, v in mlp.items()}, jnp.asarray(x), policy=layer)
        np.testing.assert_array_equal(np.rint(np.asarray(kept) * m), keep.sum(-1),
                                      err_msg=f"tau={tau}")
        np.testing.assert_allclose(y, ref.sparse_ffn(mlp64, x64, keep, act), rtol=1e-4,
                                   atol=1e-5)
        if tau == INF:
            assert not np.asarray(y).any()
        if tau == -INF:
            np.testing.assert_allclose(y, dense_ffn(mlp, jnp.asarray(x), act), rtol=1e-4,
                                       atol=1e-5)


def test_skipped_rows_unread():
    """The proxy selects from its own copy: the index-list path never reads a skipped
    neuron's full-precision rows (NaN there changes nothing)."""
    m, d = 37, 16
    mlp, x = _problem(3, m, d, tokens=(3,))
    x = jnp.asarray(x)
    scores = np.asarray(X.proxy_scores(_layer(mlp, 0.0, 4, 8)["proxy"], x, "silu"))
    layer = _layer(mlp, float(np.quantile(scores, 0.8)), 4, 8)
    keep = np.asarray(sel.select(_spec("xla"), jnp.asarray(scores), layer))
    never = ~keep.any(0)
    assert never.sum() >= 2 and keep.any(-1).all()
    base, _ = ffn({k: jnp.asarray(v) for k, v in mlp.items()}, x, act="silu",
                  spec=_spec("masked"), policy=layer)
    poisoned = {k: jnp.asarray(v).at[never].set(jnp.nan) for k, v in mlp.items()}
    y, _ = ffn(poisoned, x, act="silu", spec=_spec("xla"), policy=layer)
    np.testing.assert_allclose(y, base, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n", [1, 3])
def test_fused_path_equals_masked(monkeypatch, pallas_interpret, n):
    """implementation="pallas" at decode: the proxy-scores kernel, then the fused kernel
    (method "d" on those scores; interpret mode, as on a GPU), reading the model's stack
    in place."""
    import countdown_jax.ffn as ffn_mod
    from countdown_jax.kernels import _platform
    from countdown_jax.kernels.fused_sparse_ffn import api as fused_api
    monkeypatch.setattr(ffn_mod, "_FUSED_MAX_TOKENS", 3)
    monkeypatch.setattr(ffn_mod, "pallas_backend", lambda: "pallas_gpu")
    from countdown_jax.kernels.proxy_scores import api as proxy_api
    calls, scored = [], []
    real = fused_api.fused_sparse_ffn
    monkeypatch.setattr(fused_api, "fused_sparse_ffn",
                        lambda *a, **kw: calls.append(kw["method"]) or real(*a, **kw))
    real_scores = proxy_api.proxy_scores
    monkeypatch.setattr(proxy_api, "proxy_scores", lambda *a, **kw: scored.append(
        kw["implementation"]) or real_scores(*a, **kw))
    m, d = 37, 16
    mlp, x = _problem(30, m, d, tokens=(4,))
    x = jnp.asarray(x[:n])
    mlp64 = {k: v.astype(np.float64) for k, v in mlp.items()}
    _, scores = ref.proxy_rule(mlp64, np.asarray(x, np.float64), 4, 8, 0.0, "silu",
                               round_scale=_bf16)
    tau = _taus(scores)[0]
    layer = _layer(mlp, tau, 4, 8)
    keep, _ = ref.proxy_rule(mlp64, np.asarray(x, np.float64), 4, 8, tau, "silu",
                             round_scale=_bf16)
    never = ~keep.any(0)
    own = {k: jnp.asarray(v).at[never].set(jnp.nan) for k, v in mlp.items()}
    stack = {k: jnp.stack([jnp.full_like(v, jnp.nan), v]) for k, v in own.items()}
    run = jax.jit(lambda w, l, pol, spec: ffn(w, x, act="silu", spec=spec, policy=pol,
                                              layer=l), static_argnums=3)
    y, kept = run(stack, jnp.int32(1), layer, _spec("pallas"))
    ym, km = run({k: jnp.asarray(v) for k, v in mlp.items()}, None, layer, _spec("masked"))
    assert calls == ["d"] and scored == ["pallas"]     # the proxy kernel, then the fused FFN
    np.testing.assert_array_equal(np.rint(np.asarray(kept) * m), keep.sum(-1))
    np.testing.assert_array_equal(np.rint(np.asarray(km) * m), keep.sum(-1))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ym), rtol=1e-5, atol=1e-6)
    del _platform


def test_model_sweep_and_realised_sparsity():
    """In the model: per-layer kept == the NumPy rule on that layer's MLP input; a vmap
    sweep over tau (one compile) equals separate runs."""
    params, cfg = tiny_params.tiny_model(seed=2)
    L = cfg.num_layers
    pr = X.quantize_mlp(params["layers"]["mlp"], 4, 8)
    tokens = jnp.asarray(np.random.default_rng(6).integers(3, cfg.vocab_size, (2, 6)))
    lengths = jnp.asarray([6, 4], jnp.int32)
    spec = SparseSpec("d_countdown", "proxy", sparse_prefill=True)
    pols = [make_policy(L, threshold=t, proxy=pr) for t in (0.0, 0.02, 0.2)]
    check_policy(spec, pols[0], num_layers=L, d=cfg.d_model, m=cfg.d_ff)
    run = jax.jit(lambda p: M.forward(params, cfg, tokens, lengths, spec=spec, policy=p,
                                      collect=True))
    outs = [run(p) for p in pols]
    swept = jax.jit(jax.vmap(lambda p: M.forward(params, cfg, tokens, lengths, spec=spec,
                                                 policy=p)[0]))(stack_policies(pols))
    for i, (logits, kept, xs) in enumerate(outs):
        np.testing.assert_allclose(swept[i], logits, rtol=1e-5, atol=1e-5)
        for l in range(L):
            mlp64 = {k: np.asarray(params["layers"]["mlp"][k][l], np.float64)
                     for k in ("gate", "up", "down")}
            keep, _ = ref.proxy_rule(mlp64, np.asarray(xs[l], np.float64), 4, 8,
                                     float(pols[i]["threshold"][l]), cfg.act,
                                     round_scale=_bf16)
            valid = np.arange(6)[None] < np.asarray(lengths)[:, None]
            got = np.rint(np.asarray(kept[l]) * cfg.d_ff)[valid]
            np.testing.assert_array_equal(got, keep.sum(-1)[valid], err_msg=f"{i} {l}")
    kept_means = [float(np.mean(o[1])) for o in outs]
    assert kept_means[0] > kept_means[1] > kept_means[2]


def test_bytes_and_checks():
    assert bytes_share("d_countdown", "proxy", 0.2, m=1536, d=576, proxy=(4, 128)) == \
        pytest.approx(X.proxy_share(4, 128) + 0.2)
    with pytest.raises(ValueError, match="bits, group"):
        bytes_share("d_countdown", "proxy", 0.2, m=1536, d=576)
    with pytest.raises(ValueError, match="does not support mode 'proxy'"):
        SparseSpec("m_countdown", "proxy")
    assert SparseSpec("d_countdown", "proxy").policy_keys == ("threshold", "proxy")
    mlp, _ = _problem(0, 37, 16)
    layer = _layer(mlp, 0.1, 4, 8)
    check_layer(_spec("masked"), layer, d=16, m=37)
    with pytest.raises(ValueError, match="needs a proxy"):
        check_layer(_spec("masked"), {"threshold": layer["threshold"]}, d=16, m=37)
    with pytest.raises(ValueError, match="does not hold"):
        check_layer(_spec("masked"), layer, d=24, m=37)
    with pytest.raises(ValueError, match=r"\[2, 36\]"):
        check_layer(_spec("masked"), layer, d=16, m=36)
    with pytest.raises(ValueError, match="keys 'packed' and 'scale'"):
        make_policy(1, threshold=0.1, proxy={"packed": layer["proxy"]["packed"]})


def test_calibration_quantile_and_saved_fit(tmp_path):
    """collect_stats on the proxy's |s_hat| (dense forward) gives the pooled r-quantile of
    the NumPy scores per layer; the saved fit loads back through api.sparsity_setup."""
    from countdown_jax import api
    from countdown_jax import calibrate as C

    params, cfg = tiny_params.tiny_model(seed=2)
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, cfg.vocab_size, (6, 12)).astype(np.int32)
    lengths = np.full((6,), 12, np.int32)
    lengths[-1] = 5
    pr = X.quantize_mlp(params["layers"]["mlp"], 4, 8)
    stats = C.collect_stats(params, cfg, tokens, lengths, method="d_countdown",
                            sparsities=(0.5, 0.8), forward="dense", batch_size=4,
                            progress=False, proxy=pr)
    _, _, xs = M.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(lengths), collect=True)
    valid = np.arange(12)[None] < lengths[:, None]
    for r in (0.5, 0.8):
        tau = stats.thresholds(r, "quantile")
        for layer in range(cfg.num_layers):
            mlp64 = {k: np.asarray(params["layers"]["mlp"][k][layer], np.float64)
                     for k in ("gate", "up")}
            _, sc = ref.proxy_rule(mlp64, np.asarray(xs[layer], np.float64), 4, 8, 0.0,
                                   cfg.act, round_scale=_bf16)
            want = np.quantile(sc[valid], r)
            assert abs(np.log(tau[layer] / want)) < 0.02          # histogram bin ~0.3%
    with pytest.raises(ValueError, match="dense forward"):
        C.collect_stats(params, cfg, tokens, lengths, method="d_countdown", sparsities=(0.5,),
                        forward="ideal", proxy=pr, progress=False)
    (tmp_path / "config.json").write_text("{}")     # a model directory (fits go beside)
    model = api.Model(params=params, cfg=cfg, path=tmp_path, tokenizer=None)
    with pytest.raises(FileNotFoundError, match="--proxy-bits 4"):
        api.sparsity_setup(model, "d_countdown", "proxy", 0.8)
    C.save_proxy_thresholds(tmp_path, 0.8, stats.thresholds(0.8, "quantile"), 4, 8)
    spec, pol = api.sparsity_setup(model, "d_countdown", "proxy", 0.8)
    assert spec.mode == "proxy"
    np.testing.assert_array_equal(pol["proxy"]["packed"], pr["packed"])
    kept = M.forward(params, cfg, jnp.asarray(tokens), jnp.asarray(lengths),
                     spec=SparseSpec("d_countdown", "proxy", sparse_prefill=True),
                     policy=pol)[1]
    realised = 1.0 - float(np.asarray(kept)[:, valid].mean())
    assert 0.6 < realised < 0.95          # near the target (MLP inputs now sparse-forward)
