"""Sparse FFN: every rule x mode x implementation against the NumPy float64 reference,
masked == gather, skipped neurons have no influence, one compile per vmap sweep."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.support import np_sparse_ffn as ref
from countdown_jax import selection as sel
from countdown_jax.ffn import dense_ffn, ffn
from countdown_jax.gated import activation
from countdown_jax.policy import DENSE, SparseSpec, make_policy, stack_policies
from countdown_jax.kernels.gemv.pallas_gpu import GemvConfig

M, D, RANK = 37, 19, 5

# (method, mode) pairs SparseSpec accepts, with the policy values each is checked at.
RULES = [
    ("cats", "ideal"), ("cats", "topk"), ("cats", "threshold"),
    ("m_countdown", "ideal"), ("m_countdown", "topk"), ("m_countdown", "threshold"),
    ("d_countdown", "ideal"), ("d_countdown", "topk"), ("d_countdown", "threshold"),
    ("d_countdown", "predictor"),
    ("dejavu", "ideal"), ("dejavu", "topk"), ("dejavu", "threshold"), ("dejavu", "predictor"),
    ("s_countdown", "ideal"), ("s_countdown", "topk"),
]
VALUES = {
    "ideal": (0.0, 0.3, 0.7, 0.999),
    "topk": (0.0, 0.3, 0.7, 0.999),
    "threshold": (-np.inf, 0.3, 1.5, np.inf),       # all kept ... none kept
    "predictor": (-np.inf, -1.0, 0.0, np.inf),
}


def _problem(seed, m=M, d=D, tokens=(2, 6)):
    rng = np.random.default_rng(seed)
    mlp = {k: (rng.standard_normal((m, d)) / np.sqrt(d)).astype(np.float32)
           for k in ("gate", "up", "down")}
    if m > 7:
        for k in mlp:                                # neuron 5 duplicates neuron 3: exact ties
            mlp[k][5] = mlp[k][3]
        mlp["up"][7] = -mlp["up"][3]                 # |u| tie with a sign flip
    x = rng.standard_normal(tokens + (d,)).astype(np.float32) * 2.0
    x.reshape(-1, d)[0] = 0.0                        # an all-zero MLP input
    pred = {"V": rng.standard_normal((d, RANK)).astype(np.float32),
            "U": rng.standard_normal((m, RANK)).astype(np.float32)}
    return mlp, x, pred


def _layer(mode, value, pred=None):
    key = {"ideal": "sparsity", "topk": "sparsity", "threshold": "threshold",
           "predictor": "theta"}[mode]
    pol = make_policy(1, **{key: value}, predictor=None if pred is None else
                      {k: v[None] for k, v in pred.items()})
    return jax.tree.map(lambda a: a[0], pol)


def _jitted(spec, act):
    # Eager op-by-op (primitives compile once per shape and are shared by every case) is
    # several times cheaper on CPU than one jit compile per spec; jit is covered by the
    # capacity, vmap and scan tests below.
    return functools.partial(ffn, act=act, spec=spec, return_dropped=True)


def _run(spec, mlp, x, layer=None, act="silu", sparse=None):
    y, kept, _ = _jitted(spec, act)(mlp, x, policy=layer, sparse=sparse)
    return y, kept


def _counts(kept, m=M):
    """kept fractions -> neuron counts (kept = count / m; the float division may round
    differently per backend and fusion, the counts may not)."""
    return np.rint(np.asarray(kept) * m).astype(int)


def _to64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.mark.parametrize("impl", ["masked", "xla"])
@pytest.mark.parametrize("method,mode", RULES)
def test_rule_vs_numpy(method, mode, impl):
    act = "silu" if (RULES.index((method, mode)) % 2 == 0) else "gelu_tanh"
    mlp, x, pred = _problem(10 + RULES.index((method, mode)))
    spec = SparseSpec(method, mode, impl)
    f = _jitted(spec, act)
    mlp64, x64 = _to64(mlp), _to64(x)
    q64 = (ref.predictor_logits(_to64(pred), x64) if mode == "predictor"
           else ref.quantity(method, mlp64, x64, act))
    for value in VALUES[mode]:
        layer = _layer(mode, value, pred if mode == "predictor" else None)
        y, kept, dropped = f(jax.tree.map(jnp.asarray, mlp), jnp.asarray(x), policy=layer)
        mask = ref.select(mode, q64, value)
        msg = f"{method}/{mode}/{impl} value={value}"
        np.testing.assert_array_equal(np.rint(np.asarray(kept) * M), mask.sum(-1), err_msg=msg)
        assert not np.asarray(dropped).any()
        want = ref.sparse_ffn(mlp64, x64, mask, act)
        np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5, err_msg=msg)
        if value in (np.inf,):
            assert not np.asarray(y).any(), msg             # none kept -> exactly zero
        assert not np.asarray(y).reshape(-1, D)[0].any(), msg  # zero input -> zero output


def test_dense_spec_and_all_kept_equal_dense_ffn():
    mlp, x, _ = _problem(1)
    mlp, x = jax.tree.map(jnp.asarray, mlp), jnp.asarray(x)
    want = dense_ffn(mlp, x, "silu")
    y, kept = _run(DENSE, mlp, x)
    np.testing.assert_array_equal(y, want)
    assert (np.asarray(kept) == 1.0).all()
    for spec, layer in [(SparseSpec("d_countdown", "ideal"), _layer("ideal", 0.0)),
                        (SparseSpec("m_countdown", "topk"), _layer("topk", 0.0)),
                        (SparseSpec("cats", "threshold"), _layer("threshold", -np.inf))]:
        y, kept = _run(spec, mlp, x, layer)
        np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-7)   # masked reference
        assert (np.asarray(kept) == 1.0).all()
        g = dataclass_replace(spec, implementation="xla")
        y, kept = _run(g, mlp, x, layer)
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)
        assert (np.asarray(kept) == 1.0).all()


def dataclass_replace(spec, **kw):
    import dataclasses
    return dataclasses.replace(spec, **kw)


@pytest.mark.parametrize("m,d", [(37, 19), (5, 3), (130, 33)])
def test_masked_equals_gather(m, d):
    mlp, x, pred = _problem(m * 100 + d, m=m, d=d, tokens=(3, 4))
    mlp, x = jax.tree.map(jnp.asarray, mlp), jnp.asarray(x)
    cases = [(SparseSpec("m_countdown", "ideal"), _layer("ideal", 0.6), True),
             (SparseSpec("d_countdown", "predictor"), _layer("predictor", -0.5, pred), True),
             (SparseSpec("cats", "threshold"), _layer("threshold", 0.3), False),
             (SparseSpec("dejavu", "topk"), _layer("topk", 0.8), False),
             (SparseSpec("s_countdown", "ideal"), _layer("ideal", 0.5), False)]
    if m != 37:
        cases = cases[:2]
    for spec, layer, with_cap in cases:
        for cap in (None, max(1, m // 4)) if with_cap else (None,):
            sm = dataclass_replace(spec, capacity=cap)
            sg = dataclass_replace(sm, implementation="xla")
            y1, k1, d1 = _jitted(sm, "silu")(mlp, x, policy=layer)
            y2, k2, d2 = _jitted(sg, "silu")(mlp, x, policy=layer)
            np.testing.assert_array_equal(_counts(k1, m), _counts(k2, m))
            np.testing.assert_array_equal(d1, d2)
            np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-5, err_msg=f"{spec} cap={cap}")
            if cap is not None:
                assert (np.asarray(k1) <= cap / m + 1e-7).all()
                assert np.asarray(d1).any()                 # the cut happened


def test_capacity_overflow_keeps_highest_ranked_and_reports():
    mlp, x, _ = _problem(3)
    mlp64, x64 = _to64(mlp), _to64(x)
    cap = 6
    spec = SparseSpec("m_countdown", "threshold", "xla", capacity=cap)
    y, kept, dropped = jax.jit(_jitted(spec, "silu"))(
        jax.tree.map(jnp.asarray, mlp), jnp.asarray(x), policy=_layer("threshold", 0.05))
    q = ref.quantity("m_countdown", mlp64, x64, "silu")
    rule = ref.select("threshold", q, 0.05)
    capped = np.stack([ref.cap_row(mr, qr, cap) for mr, qr in
                       zip(rule.reshape(-1, M), q.reshape(-1, M))]).reshape(rule.shape)
    assert (rule.sum(-1) > cap).any()                       # the case under test occurs
    np.testing.assert_array_equal(dropped, rule.sum(-1) - capped.sum(-1))
    np.testing.assert_array_equal(np.rint(np.asarray(kept) * M), capped.sum(-1))
    np.testing.assert_allclose(y, ref.sparse_ffn(mlp64, x64, capped, "silu"), rtol=1e-4, atol=1e-5)


# Which rows of a skipped neuron each rule never reads (the others feed its selection).
SKIPPABLE = [
    (SparseSpec("cats", "threshold"), ("threshold", 1.0), ("up", "down")),
    (SparseSpec("m_countdown", "threshold"), ("threshold", 2.0), ("gate", "down")),
    (SparseSpec("m_countdown", "ideal"), ("ideal", 0.7), ("gate", "down")),
    (SparseSpec("d_countdown", "predictor"), ("predictor", 0.5), ("gate", "up", "down")),
    (SparseSpec("dejavu", "predictor"), ("predictor", 0.5), ("gate", "up", "down")),
    (SparseSpec("d_countdown", "ideal"), ("ideal", 0.7), ("down",)),
]


@pytest.mark.parametrize("spec,pv,rows", SKIPPABLE, ids=lambda v: getattr(v, "method", None))
def test_skipped_neuron_has_no_influence(spec, pv, rows):
    mlp, x, pred = _problem(4, tokens=(3,))
    layer = _layer(*pv, pred)
    mlp = jax.tree.map(jnp.asarray, mlp)
    x = jnp.asarray(x).at[0].set(jax.random.normal(jax.random.PRNGKey(0), (D,)))  # no zero row
    q = sel.spec_quantity(spec, mlp, x, "silu", layer)
    skipped = ~np.asarray(sel.select(spec, q, layer)).any(0)  # skipped by every token
    assert 3 <= skipped.sum() < M
    assert np.asarray(sel.select(spec, q, layer)).any(-1).all()
    for impl in ("masked", "xla"):
        s = dataclass_replace(spec, implementation=impl)
        base, _ = _run(s, mlp, x, layer)
        noise = {k: (mlp[k].at[skipped].set(1e3 * jnp.ones_like(mlp[k][skipped])) if k in rows
                     else mlp[k]) for k in mlp}
        y, _ = _run(s, noise, x, layer)
        np.testing.assert_array_equal(y, base, err_msg=f"{impl} perturbed {rows}")
        # Padding slots of the index list may read row 0 with weight 0 (kernel detail), so
        # NaN goes into the skipped rows other than 0; the finite perturbation covers row 0.
        poison = skipped & (np.arange(M) != 0)
        nan = {k: (mlp[k].at[poison].set(jnp.nan) if k in rows else mlp[k]) for k in mlp}
        y, _ = _run(s, nan, x, layer)
        if impl == "xla":                 # structurally skipped: NaN rows are never read
            np.testing.assert_array_equal(y, base, err_msg=f"gather read a skipped {rows} row")
        elif "down" in rows:                 # the masked reference reads every row (0 * NaN)
            assert np.isnan(np.asarray(y)).any()


@pytest.mark.parametrize("spec", [SparseSpec("d_countdown", "ideal"),
                                  SparseSpec("m_countdown", "topk", "xla")],
                         ids=["masked", "xla"])
def test_vmap_sweep_compiles_once(spec):
    mlp, x, _ = _problem(5)
    mlp, x = jax.tree.map(jnp.asarray, mlp), jnp.asarray(x)
    traces = []

    def run(layer):
        traces.append(1)                                    # Python side effect: per trace
        return ffn(mlp, x, act="silu", spec=spec, policy=layer)

    levels = np.linspace(0.0, 0.95, 16)
    sweep = stack_policies([_layer("ideal", r) for r in levels])
    vrun = jax.jit(jax.vmap(run))
    ys, kept = vrun(sweep)
    assert ys.shape == (16,) + x.shape and len(traces) == 1
    vrun(stack_policies([_layer("ideal", r) for r in levels[::-1]]))
    assert len(traces) == 1                                 # new values, no retrace
    one = jax.jit(run)
    for i, r in enumerate(levels):
        y, k = one(_layer("ideal", r))
        np.testing.assert_allclose(ys[i], y, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(_counts(kept[i]), _counts(k))
        if spec.mode == "topk":
            assert (np.rint(np.asarray(k) * M) == M - int(M * r)).all()
    assert len(traces) == 2                                 # one more for the unbatched jit


@pytest.mark.parametrize("impl", ["masked", "xla"])
def test_sparse_token_flags(impl):
    mlp, x, _ = _problem(6)
    mlp, x = jax.tree.map(jnp.asarray, mlp), jnp.asarray(x)
    spec = SparseSpec("m_countdown", "ideal", impl)
    layer = _layer("ideal", 0.8)
    flags = jnp.asarray(np.random.default_rng(0).random(x.shape[:-1]) < 0.5)
    y, kept = _run(spec, mlp, x, layer, sparse=flags)
    y_all, kept_all = _run(spec, mlp, x, layer)
    dense = dense_ffn(mlp, x, "silu")
    f = np.asarray(flags)
    np.testing.assert_allclose(np.asarray(y)[~f], np.asarray(dense)[~f], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y)[f], np.asarray(y_all)[f], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(kept)[~f], 1.0)
    np.testing.assert_array_equal(_counts(kept)[f], _counts(kept_all)[f])
    y1, k1 = _run(spec, mlp, x, layer, sparse=jnp.ones(x.shape[:-1], bool))
    np.testing.assert_allclose(y1, y_all, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="one flag per token"):
        ffn(mlp, x, act="silu", spec=spec, policy=layer, sparse=flags[0])


def test_scan_over_layers_with_policy_slices():
    rng = np.random.default_rng(7)
    L = 3
    mlps = [jax.tree.map(jnp.asarray, _problem(20 + i)[0]) for i in range(L)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *mlps)
    x = jnp.asarray(rng.standard_normal((4, D)), jnp.float32)
    pol = make_policy(L, sparsity=[0.2, 0.5, 0.9])
    spec = SparseSpec("d_countdown", "ideal", "xla")

    def body(h, layer):
        y, kept = ffn(layer["mlp"], h, act="silu", spec=spec, policy=layer["policy"])
        return h + y, kept

    h, kept = jax.jit(lambda x: jax.lax.scan(body, x, {"mlp": stacked, "policy": pol}))(x)
    h_ref = x
    for i in range(L):
        y, k = _run(spec, mlps[i], h_ref, jax.tree.map(lambda a: a[i], pol))
        h_ref = h_ref + y
        np.testing.assert_array_equal(_counts(kept[i]), _counts(k))
    np.testing.assert_allclose(h, h_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(kept.mean(-1), [1 - int(M * r) / M for r in (0.2, 0.5, 0.9)],
                               rtol=1e-6)


def test_pallas_implementation_routes_to_kernel_api(monkeypatch):
    from countdown_jax.kernels.sparse_ffn import api
    seen = []
    xla = api.sparse_ffn

    def spy(*args, implementation="xla", **kw):
        seen.append((implementation, kw["dense"]))
        return xla(*args, implementation="xla", **kw)

    monkeypatch.setattr(api, "sparse_ffn", spy)
    mlp, x, pred = _problem(8)
    mlp, x = jax.tree.map(jnp.asarray, mlp), jnp.asarray(x)
    for spec, layer, dense in [
            (SparseSpec("m_countdown", "threshold"), _layer("threshold", 0.2), "up"),
            (SparseSpec("cats", "threshold"), _layer("threshold", 0.1), "gate"),
            (SparseSpec("d_countdown", "predictor"), _layer("predictor", 0.0, pred), None)]:
        y_g, y_p = (jax.jit(functools.partial(
            ffn, act="silu", spec=dataclass_replace(spec, implementation=impl)))(
                mlp, x, policy=layer)[0] for impl in ("xla", "pallas"))
        assert seen[-2:] == [("xla", dense), ("pallas", dense)]
        np.testing.assert_array_equal(y_g, y_p)


def test_bfloat16_inputs():
    mlp, x, _ = _problem(9)
    mlp = jax.tree.map(lambda a: jnp.asarray(a, jnp.bfloat16), mlp)
    x = jnp.asarray(x, jnp.bfloat16)
    layer = _layer("topk", 0.5)
    outs = []
    for impl in ("masked", "xla"):
        y, kept = _run(SparseSpec("m_countdown", "topk", impl), mlp, x, layer, act="gelu_tanh")
        assert y.dtype == jnp.bfloat16 and kept.dtype == jnp.float32
        outs.append(np.asarray(y, np.float32))
    np.testing.assert_allclose(outs[0], outs[1], rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("method,mode", [("m_countdown", "threshold"), ("cats", "threshold"),
                                         ("d_countdown", "predictor")])
def test_pallas_fused_path_equals_masked(monkeypatch, pallas_interpret, method, mode):
    """implementation="pallas" where the fused kernel applies (here: interpret mode forced,
    as on a GPU): same kept set as masked, y within float32 rounding, nothing dropped,
    dense-flagged tokens dense. The model's stacked weights + traced layer, other layer
    NaN (the kernel must read layer l's rows in place and nothing else)."""
    import countdown_jax.ffn as ffn_mod
    from countdown_jax.kernels.fused_sparse_ffn import api as fused_api
    # several tokens too (the model routes only single tokens there: measured faster)
    monkeypatch.setattr(ffn_mod, "_FUSED_MAX_TOKENS", 3)
    calls = []
    real = fused_api.fused_sparse_ffn
    monkeypatch.setattr(fused_api, "fused_sparse_ffn",
                        lambda x, mlp, rule, **kw: calls.append(rule.method)
                        or real(x, mlp, rule, **kw))
    l = 1
    mlp, x, pred = _problem(30, tokens=(4,))
    x = jnp.asarray(x[1:])                           # token 0 of _problem is all zero
    stack = {k: jnp.asarray(np.stack([np.full_like(v, np.nan), v])) for k, v in mlp.items()}
    mlp = jax.tree.map(jnp.asarray, mlp)
    # threshold halfway between two neighbouring scores: no score sits on it
    spec_m = SparseSpec(method, mode, "masked")
    stored = {"Vt": pred["V"].T, "U": pred["U"]}              # as make_policy stores it
    q = np.sort(np.asarray(sel.spec_quantity(spec_m, mlp, x, "silu", {"predictor": stored})).ravel())
    cut = (q[len(q) // 2] + q[len(q) // 2 + 1]) / 2
    layer = _layer(mode, float(cut), pred if mode == "predictor" else None)
    spec_p = SparseSpec(method, mode, "pallas")
    run = jax.jit(lambda s, l, xx, pol, sp, spec: ffn(s, xx, act="silu", spec=spec,
                                                      policy=pol, sparse=sp, layer=l,
                                                      return_dropped=True),
                  static_argnums=5)
    for n, flags in ((1, [True]), (3, [True, False, True])):
        sp = jnp.asarray(flags)
        y, kept, dropped = run(stack, jnp.int32(l), x[:n], layer, sp, spec_p)
        ym, km, _ = run(mlp, None, x[:n], layer, sp, spec_m)
        assert np.isfinite(np.asarray(y)).all()
        np.testing.assert_array_equal(_counts(kept), _counts(km))
        assert (0 < _counts(kept)).all() and (_counts(kept)[np.asarray(flags)] < M).all()
        np.testing.assert_array_equal(np.asarray(dropped), 0)
        np.testing.assert_allclose(np.asarray(y), np.asarray(ym), rtol=1e-5, atol=1e-6)
    assert len(calls) == 2       # the fused kernel ran (once per traced batch size)


def test_pallas_routes_only_single_tokens_to_fused(pallas_interpret):
    """Batches of several tokens take the index list (the fused kernel is slower there)."""
    import countdown_jax.ffn as ffn_mod
    spec = SparseSpec("m_countdown", "threshold", "pallas")
    assert ffn_mod._runs_fused(spec, 1)
    assert not ffn_mod._runs_fused(spec, 2)
    assert not ffn_mod._runs_fused(SparseSpec("m_countdown", "threshold", "pallas",
                                              capacity=8), 1)


@pytest.mark.parametrize("method,mode", [("m_countdown", "threshold"), ("cats", "threshold"),
                                         ("d_countdown", "predictor")])
def test_pallas_union_batches_equal_masked(pallas_interpret, method, mode):
    """batch_kernel="union" / "compact" (interpret mode, as on a GPU): a decode batch reads
    the rows any token keeps once (``batch_union``: the GEMV with row predicates) and gives the
    masked path's y and counts; the stack is read in place (the other layer NaN);
    thresholds keep half, all, or none of the neurons. Explicit (ragged) GEMV tiles
    against the float32 per-token masked FFN."""
    import countdown_jax.batch_union as bu
    mlp, x, pred = _problem(31, tokens=(5,))
    x = jnp.asarray(x[1:])                           # token 0 of _problem is all zero
    stack = {k: jnp.asarray(np.stack([np.full_like(v, np.nan), v])) for k, v in mlp.items()}
    mlp = jax.tree.map(jnp.asarray, mlp)
    spec_m = SparseSpec(method, mode, "masked")
    specs_p = [SparseSpec(method, mode, "pallas", batch_kernel=k) for k in ("union", "compact")]
    stored = {"Vt": pred["V"].T, "U": pred["U"]}
    q = sel.spec_quantity(spec_m, mlp, x, "silu", {"predictor": stored})
    qs = np.sort(np.asarray(q).ravel())
    cuts = ((qs[len(qs) // 2] + qs[len(qs) // 2 + 1]) / 2, qs[0] - 1.0, qs[-1] + 1.0)
    run = jax.jit(lambda s, l, pol, spec: ffn(s, x, act="silu", spec=spec, policy=pol,
                                              layer=l, return_dropped=True),
                  static_argnums=3)
    for cut in cuts:
        layer = _layer(mode, float(cut), pred if mode == "predictor" else None)
        ym, km, _ = run(mlp, None, layer, spec_m)
        for spec_p in specs_p:
            y, kept, dropped = run(stack, jnp.int32(1), layer, spec_p)
            assert np.isfinite(np.asarray(y)).all(), cut
            np.testing.assert_array_equal(_counts(kept), _counts(km))
            np.testing.assert_array_equal(np.asarray(dropped), 0)
            np.testing.assert_allclose(np.asarray(y), np.asarray(ym), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{spec_p.batch_kernel} {cut}")
    hi = jax.lax.Precision.HIGHEST
    g = jnp.einsum("nd,md->nm", x, mlp["gate"], precision=hi)
    u = jnp.einsum("nd,md->nm", x, mlp["up"], precision=hi)
    mask = q > cuts[0]
    dense, coef = {"m_countdown": ("up", u), "cats": ("gate", activation("silu")(g)),
                   "d_countdown": (None, None)}[method]
    y = bu.union_ffn(stack, x, mask, act="silu", dense=dense, coef=coef,
                     layer=jnp.int32(1), configs=(GemvConfig(block_n=16, block_d=32),
                                         GemvConfig(block_n=32, block_d=16, split_d=3)))
    ref_y = jnp.einsum("nm,md->nd", jnp.where(mask, activation("silu")(g) * u, 0.0),
                       mlp["down"], precision=hi)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), rtol=1e-4, atol=1e-4)


def test_dense_batch_kernel_runs_the_dense_ffn(pallas_interpret):
    """batch_kernel="dense": a decode call (1 to MAX_TOKENS tokens) gets the dense FFN
    and kept 1 (the stack read at its layer); a prefill keeps the rule's sparse path (the
    index lists)."""
    from countdown_jax.batch_union import MAX_TOKENS
    mlp, x, _ = _problem(5, tokens=(MAX_TOKENS + 1,))
    stack = {k: jnp.asarray(np.stack([np.full_like(v, np.nan), v])) for k, v in mlp.items()}
    mlp = jax.tree.map(jnp.asarray, mlp)
    x = jnp.asarray(x)
    spec = SparseSpec("m_countdown", "threshold", "pallas", batch_kernel="dense")
    layer = _layer("threshold", 0.05)
    run = lambda xs: ffn(stack, xs, act="silu", spec=spec, policy=layer, layer=jnp.int32(1))
    for n in (1, 4):
        y, kept = run(x[:n])
        np.testing.assert_allclose(np.asarray(y), np.asarray(dense_ffn(mlp, x[:n], "silu")),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(kept), 1.0)
    masked = SparseSpec("m_countdown", "threshold", "masked")
    for xs in (x,):                             # a prefill: the exact rule
        y, kept = run(xs)
        ym, km = ffn(mlp, xs, act="silu", spec=masked, policy=layer)
        np.testing.assert_allclose(np.asarray(y), np.asarray(ym), rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(_counts(kept), _counts(km))
        assert float(np.mean(np.asarray(kept))) < 1.0
    with pytest.raises(ValueError, match="batch_kernel must be one of"):
        SparseSpec("m_countdown", "threshold", "pallas", batch_kernel="dens")


def test_union_batches_route_by_size_and_kernel(pallas_interpret):
    """batch_kernel="union" takes decode batches (2 to MAX_TOKENS tokens) to batch_union;
    one token keeps the fused kernel, a prefill (more than MAX_TOKENS), the cascade and a
    capacity keep the per-token lists, and so does the default "lists"; bad input is
    refused by name."""
    import countdown_jax.ffn as ffn_mod
    from countdown_jax.batch_union import MAX_TOKENS, union_ffn
    spec = SparseSpec("m_countdown", "threshold", "pallas", batch_kernel="union")
    union = lambda sp, n: ffn_mod._union_batch(sp, n, None)      # one device
    assert not union(SparseSpec("m_countdown", "threshold", "pallas"), 4)
    assert not union(spec, 1) and union(spec, 2)
    assert union(SparseSpec("m_countdown", "threshold", "pallas", batch_kernel="compact"), 2)
    assert union(spec, MAX_TOKENS) and not union(spec, MAX_TOKENS + 1)
    assert not union(SparseSpec("d_countdown", "cascade", "pallas", batch_kernel="union"), 4)
    assert not union(SparseSpec("m_countdown", "threshold", "pallas", capacity=8,
                                batch_kernel="union"), 4)
    w = {k: jnp.zeros((8, 4)) for k in ("gate", "up", "down")}
    with pytest.raises(ValueError, match="MAX_TOKENS"):
        union_ffn(w, jnp.zeros((MAX_TOKENS + 1, 4)), jnp.ones((MAX_TOKENS + 1, 8), bool),
                  act="silu")
    with pytest.raises(ValueError, match="dense must be"):
        union_ffn(w, jnp.zeros((2, 4)), jnp.ones((2, 8), bool), act="silu", dense="down")
