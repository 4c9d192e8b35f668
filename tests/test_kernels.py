"""Sparse FFN kernels vs plain-JAX references (Pallas interpret mode on CPU; GPU compiled
when a GPU is present).

Shapes are ragged on purpose (m=37, d=19: not multiples of any block size) and every
check uses fresh random data. Interpret mode starts outputs as NaN / INT_MIN, so an
unwritten element fails the comparison. Each kernel is jitted once per config and then
fed several selections (random, all kept, none kept), which are data, not shapes.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax.kernels.fused_sparse_ffn.api import IndexLists, Rule, fused_sparse_ffn
from countdown_jax.kernels.fused_sparse_ffn.pallas_gpu import FusedConfig, default_config
from countdown_jax.gated import activation
from countdown_jax.kernels.fused_sparse_ffn.reference import project_f32 as project
from countdown_jax.kernels.fused_sparse_ffn.reference import FUSED_METHODS, selection_scores
from countdown_jax.kernels import _platform
from countdown_jax.kernels.sparse_ffn.api import index_list, sparse_ffn
from countdown_jax.kernels.sparse_ffn.pallas_gpu import GatherConfig
from countdown_jax.policy import Method

M, D, R = 37, 19, 8
M_COUNTDOWN, CATS, D_COUNTDOWN = Method.M_COUNTDOWN, Method.CATS, Method.D_COUNTDOWN


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "kernel output has NaN/inf (unwritten or poisoned element)"
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def weights(seed, m=M, d=D, dtype=jnp.float32):
    """({"gate", "up", "down"} [m, d], the predictor's Vt [R, d], U [m, R])."""
    k = jax.random.split(jax.random.key(seed), 6)
    w = {name: jax.random.normal(k[i], (m, d), jnp.float32).astype(dtype)
         for i, name in enumerate(("gate", "up", "down"))}
    v = (jax.random.normal(k[3], (R, d), jnp.float32) / np.sqrt(d)).astype(dtype)  # Vt
    u = jax.random.normal(k[4], (m, R), jnp.float32).astype(dtype)
    return w, v, u


def gap_tau(q, frac):
    """Per-token threshold halfway between two neighbouring scores: kept count is
    round(frac*m) and no score sits near the threshold (kernel rounding can't flip it)."""
    qs = np.sort(np.asarray(q, np.float64), axis=1)
    k = int(round(frac * qs.shape[1]))
    if k <= 0:
        return jnp.asarray(qs[:, 0] - 1.0, jnp.float32)
    if k >= qs.shape[1]:
        return jnp.asarray(qs[:, -1] + 1.0, jnp.float32)
    return jnp.asarray((qs[:, k - 1] + qs[:, k]) / 2, jnp.float32)


def selections(seed, n, m=M):
    """(name, idx, count) cases: random per-token lists with junk past count, all, none."""
    rng = np.random.default_rng(seed)
    cases = []
    keep = rng.random((n, m)) < 0.35
    idx, cnt = index_list(jnp.asarray(keep), m)
    junk = rng.integers(-5, m + 5, size=(n, m))          # past count: must be ignored
    idx = jnp.where(jnp.arange(m)[None, :] < cnt[:, None], idx, junk)
    cases.append(("random", idx.astype(jnp.int32), cnt))
    cases.append(("all", jnp.tile(jnp.asarray(rng.permutation(m), jnp.int32), (n, 1)),
                  jnp.full((n,), m, jnp.int32)))
    cases.append(("none", jnp.asarray(junk, jnp.int32), jnp.zeros((n,), jnp.int32)))
    return cases


# --------------------------------------------------------------------------- gathered list

GATHER_CASES = [
    # dense, act, n, dtype, config
    (None, "silu", 3, jnp.float32, GatherConfig(bj=4, bd=8, programs=3)),
    ("up", "silu", 1, jnp.bfloat16, GatherConfig(bj=8, bd=16, programs=2, reduce="atomic")),
    ("gate", "gelu_tanh", 2, jnp.float32, GatherConfig(bj=4, bd=32, programs=4)),
    (None, "silu", 2, jnp.bfloat16, GatherConfig(bj=4, bd=16, programs=3, prefetch=True)),
    ("up", "silu", 1, jnp.float32, GatherConfig(bj=8, bd=8, programs=2, prefetch=True)),
]


@pytest.mark.parametrize("dense,act,n,dtype,cfg", GATHER_CASES)
def test_gather_kernel_matches_reference(dense, act, n, dtype, cfg):
    w, _, _ = weights(1, dtype=dtype)
    wg, wu, wd = w["gate"], w["up"], w["down"]
    x = jax.random.normal(jax.random.key(2), (n, D), jnp.float32).astype(dtype)
    coef = None if dense is None else jax.random.normal(jax.random.key(3), (n, M), jnp.float32)

    def run(impl, idx, cnt):
        return sparse_ffn(x, w, idx, cnt, act=act, dense=dense, coef=coef,
                          implementation=impl, interpret=True, config=cfg)

    kern = jax.jit(lambda i, c: run("pallas_gpu", i, c))
    ref = jax.jit(lambda i, c: run("xla", i, c))
    for name, idx, cnt in selections(4, n):
        y = kern(idx, cnt)
        r = ref(idx, cnt)
        if name == "none":
            assert np.all(np.asarray(y, np.float32) == 0), "no neuron kept must give y == 0"
        else:
            assert rel_err(y, r) < 1e-5, name
        if name == "all":   # everything kept == the dense FFN
            xf, f = x.astype(jnp.float32), jax.nn.silu if act == "silu" else (
                lambda g: jax.nn.gelu(g, approximate=True))
            g, u = xf @ wg.astype(jnp.float32).T, xf @ wu.astype(jnp.float32).T
            if dense == "up":
                u = coef
            elif dense == "gate":
                g, f = coef, (lambda a: a)
            dense_y = (f(g) * u) @ wd.astype(jnp.float32)
            assert rel_err(y, dense_y) < (1e-2 if dtype == jnp.bfloat16 else 1e-5)


@pytest.mark.parametrize("n,dtype,cfg", [
    (1, jnp.float32, GatherConfig(bj=4, bd=8, programs=3, poison=True)),
    (3, jnp.bfloat16, GatherConfig(bj=8, bd=16, programs=2, reduce="atomic", poison=True)),
    (2, jnp.float32, GatherConfig(bj=4, bd=32, programs=4))])
def test_gather_kernel_cascade(n, dtype, cfg):
    """s_tau: of the listed neurons only |s| > s_tau are kept (count returned); W_down rows
    of the others are never read (NaN there changes nothing)."""
    w, _, _ = weights(61, dtype=dtype)
    wd = w["down"]
    x = jax.random.normal(jax.random.key(62), (n, D), jnp.float32).astype(dtype)
    s = exact_s(x, w)

    def run(impl, w_down, idx, cnt, s_tau):
        return sparse_ffn(x, {**w, "down": w_down}, idx, cnt, act="silu", implementation=impl,
                          interpret=True, config=cfg, s_tau=s_tau)

    kern = jax.jit(lambda w, i, c, t: run("pallas_gpu", w, i, c, t))
    ref = jax.jit(lambda i, c, t: run("xla", wd, i, c, t))
    big = jnp.full((n,), 1e30, jnp.float32)
    for name, idx, cnt in selections(63, n):
        for s_case, s_tau in (("mid", gap_tau(jnp.abs(s), 0.5)), ("all", -big),
                              ("none", big)):
            (y, kept), (r, rk) = kern(wd, idx, cnt, s_tau), ref(idx, cnt, s_tau)
            case = f"{name}/{s_case}"
            np.testing.assert_array_equal(np.asarray(kept), np.asarray(rk), err_msg=case)
            if name == "none" or s_case == "none":
                assert np.all(np.asarray(y, np.float32) == 0) and not np.asarray(kept).any()
                continue
            assert rel_err(y, r) < 1e-5, case
            if s_case == "all":
                np.testing.assert_array_equal(np.asarray(kept), np.asarray(cnt))
            if s_case == "mid":
                listed = np.zeros((n, M), bool)
                for b in range(n):
                    listed[b, np.asarray(idx[b, :int(cnt[b])])] = True
                keep = listed & np.asarray(jnp.abs(s) > s_tau[:, None])
                np.testing.assert_array_equal(np.asarray(kept), keep.sum(1), err_msg=case)
                assert (keep.sum(1) < listed.sum(1)).all()
                unread = ~keep.any(0)      # not listed, or refined out, for every token
                yp, kp = kern(wd.at[unread].set(jnp.nan), idx, cnt, s_tau)
                np.testing.assert_array_equal(np.asarray(yp), np.asarray(y), err_msg=case)
    with pytest.raises(ValueError, match="prefetch"):
        sparse_ffn(x, w, *selections(63, n)[0][1:], act="silu", s_tau=big,
                   implementation="pallas_gpu", interpret=True,
                   config=GatherConfig(prefetch=True))


def test_tpu_block_kernel_matches_reference():
    w, _, _ = weights(5)
    n = 2
    x = jax.random.normal(jax.random.key(6), (n, D), jnp.float32)
    coef = jax.random.normal(jax.random.key(7), (n, M), jnp.float32)
    for dense in (None, "up", "gate"):
        c = None if dense is None else coef

        def run(impl, idx, cnt):
            return sparse_ffn(x, w, idx, cnt, act="silu", dense=dense, coef=c,
                              implementation=impl, interpret=True, config=8)

        kern = jax.jit(lambda i, k: run("pallas_tpu", i, k))
        for name, idx, cnt in selections(8, n):
            y = kern(idx, cnt)
            r = run("xla", idx, cnt)
            if name == "none":
                assert np.all(np.asarray(y) == 0)
            else:
                assert rel_err(y, r) < 1e-5, (dense, name)


# --------------------------------------------------------------------------- fused selection

FUSED_CASES = [
    # method, n, dtype, config
    (M_COUNTDOWN, 1, jnp.float32, FusedConfig(bn=8, bd=8, blocks_per_program=2)),
    (CATS, 3, jnp.bfloat16, FusedConfig(bn=16, bd=16, blocks_per_program=1, reduce="atomic")),
    (D_COUNTDOWN, 2, jnp.float32, FusedConfig(bn=16, bd=8, bds=4, blocks_per_program=2,
                                              compact=4)),
    (M_COUNTDOWN, 2, jnp.float32, FusedConfig(bn=32, bd=32, bds=8, blocks_per_program=1,
                                              compact=8, reduce="atomic")),
    (D_COUNTDOWN, 2, jnp.bfloat16, FusedConfig(bn=8, bd=8, score="xla", programs=3)),
    (CATS, 1, jnp.float32, FusedConfig(bn=16, bd=16, score="xla", programs=2, compact=4)),
    # prefetch: W_down tiles loaded with the gate/up tiles (one or more batch rows)
    (M_COUNTDOWN, 1, jnp.bfloat16, FusedConfig(bn=32, bd=16, score="xla", programs=3,
                                               compact=8, prefetch=True)),
    (D_COUNTDOWN, 2, jnp.float32, FusedConfig(bn=16, bd=8, bds=4, compact=4, prefetch=True)),
    (CATS, 2, jnp.float32, FusedConfig(bn=8, bd=32, blocks_per_program=2, prefetch=True)),
    (D_COUNTDOWN, 1, jnp.bfloat16, FusedConfig(bn=16, bd=16, score="xla", programs=2,
                                               compact=4, prefetch=True)),
    # atomics into a few slots (program p -> slot p % groups)
    (M_COUNTDOWN, 2, jnp.bfloat16, FusedConfig(bn=8, bd=16, score="xla", programs=5,
                                               compact=4, prefetch=True, reduce="atomic",
                                               atomic_groups=2)),
    (D_COUNTDOWN, 1, jnp.float32, FusedConfig(bn=8, bd=8, score="xla", programs=3,
                                              reduce="atomic", atomic_groups=3)),
]


@pytest.mark.parametrize("method,n,dtype,cfg", FUSED_CASES)
def test_fused_kernel_matches_reference(method, n, dtype, cfg):
    w, v, u = weights(11, dtype=dtype)
    x = jax.random.normal(jax.random.key(12), (n, D), jnp.float32).astype(dtype)
    q, _ = selection_scores(x, w, act="silu", method=method, pred_vt=v, pred_u=u)

    def run(impl, tau):
        return fused_sparse_ffn(x, w, Rule(method, tau, pred_vt=v, pred_u=u), act="silu",
                                implementation=impl, interpret=True, config=cfg)

    kern = jax.jit(lambda t: run("pallas", t))
    ref = jax.jit(lambda t: run("xla", t))
    # per-token random sparsities, then all kept, then none kept
    fracs = np.random.default_rng(13).uniform(0.2, 0.9, size=n)
    taus = [jnp.concatenate([gap_tau(q[i:i + 1], 1 - f) for i, f in enumerate(fracs)]),
            gap_tau(q, 0.0), gap_tau(q, 1.0)]
    for case, tau in zip(("random", "all", "none"), taus):
        y, cnt = kern(tau)
        r, rc = ref(tau)
        np.testing.assert_array_equal(np.asarray(cnt), np.asarray(rc), err_msg=case)
        if case == "none":
            assert np.all(np.asarray(y, np.float32) == 0) and np.all(np.asarray(cnt) == 0)
        else:
            assert rel_err(y, r) < 1e-5, case
        if case == "all":
            assert np.all(np.asarray(cnt) == M)


# --------------------------------------------------------------------------- the cascade

def cascade_taus(q, s, cand_frac, keep_frac):
    """(tau, tau_s) per token: candidates z > tau are ~cand_frac of m, and |s| > tau_s
    ~keep_frac of m (so ~cand_frac * keep_frac kept), no value near either threshold."""
    return gap_tau(q, 1 - cand_frac), gap_tau(jnp.abs(s), 1 - keep_frac)


def exact_s(x, w, act="silu"):
    """s = act(g) * u [N, m] float32 (float32 accumulation, no TF32 on a GPU)."""
    return activation(act)(project(x, w["gate"])) * project(x, w["up"])


CASCADE_CASES = [
    # n, dtype, act, config (prefetch is off: W_down rows are known only after s)
    (1, jnp.float32, "silu", FusedConfig(bn=8, bd=8, blocks_per_program=2, poison=True)),
    (2, jnp.bfloat16, "gelu_tanh", FusedConfig(bn=16, bd=8, bds=4, compact=4,
                                               reduce="atomic")),
    (1, jnp.bfloat16, "silu", FusedConfig(bn=16, bd=16, score="xla", programs=2, compact=4,
                                          poison=True)),
    (3, jnp.float32, "silu", FusedConfig(bn=32, bd=32, score="xla", programs=3, poison=True)),
    (1, jnp.float32, "silu", dataclasses.replace(
        default_config(jnp.float32, D_COUNTDOWN, cascade=True), poison=True)),
]


@pytest.mark.parametrize("n,dtype,act,cfg", CASCADE_CASES)
def test_cascade_kernel_matches_reference(n, dtype, act, cfg):
    """The cascade: candidates z > tau, then |s| > tau_s; kept count = the final set.
    Rows the kernel must not read are NaN: every row of the non-candidates and the W_down
    rows of the candidates refined out (for every token)."""
    w, v, u = weights(51, dtype=dtype)
    wg, wu, wd = w["gate"], w["up"], w["down"]
    x = jax.random.normal(jax.random.key(52), (n, D), jnp.float32).astype(dtype)
    q, _ = selection_scores(x, w, act=act, method=D_COUNTDOWN, pred_vt=v, pred_u=u)
    s = exact_s(x, w, act)

    def run(impl, w, tau, tau_s):
        return fused_sparse_ffn(x, w, Rule(D_COUNTDOWN, tau, pred_vt=v, pred_u=u, tau_s=tau_s),
                                act=act, implementation=impl, interpret=True, config=cfg)

    kern = jax.jit(lambda w, t, ts: run("pallas", w, t, ts))
    ref = jax.jit(lambda t, ts: run("xla", w, t, ts))
    big = jnp.full((n,), 1e30, jnp.float32)
    rng = np.random.default_rng(53)
    cases = {"random": cascade_taus(q, s, rng.uniform(0.5, 0.9), rng.uniform(0.3, 0.7)),
             "all": (-big, -big), "none (candidates)": (big, -big),
             "none (refined)": (-big, big),
             "per-token": (gap_tau(q, 0.3), jnp.asarray(rng.uniform(0.0, 1.0, n), jnp.float32))}
    for case, (tau, tau_s) in cases.items():
        y, cnt = kern(w, tau, tau_s)
        r, rc = ref(tau, tau_s)
        np.testing.assert_array_equal(np.asarray(cnt), np.asarray(rc), err_msg=case)
        if case.startswith("none"):
            assert np.all(np.asarray(y, np.float32) == 0) and np.all(np.asarray(cnt) == 0)
        else:
            assert rel_err(y, r) < 1e-5, case
        if case == "all":
            assert np.all(np.asarray(cnt) == M)
        if case != "random":
            continue
        cand = np.asarray(q > tau[:, None])
        keep = cand & np.asarray(jnp.abs(s) > tau_s[:, None])
        np.testing.assert_array_equal(np.asarray(cnt), keep.sum(1))
        assert (keep.sum(1) < cand.sum(1)).all() and keep.any(1).all()
        never = ~cand.any(0)
        refined = cand.any(0) & ~keep.any(0)
        assert never.any() and refined.any()
        poisoned = {"gate": wg.at[never].set(jnp.nan), "up": wu.at[never].set(jnp.nan),
                    "down": wd.at[never | refined].set(jnp.nan)}
        yp, cp = kern(poisoned, tau, tau_s)
        np.testing.assert_array_equal(np.asarray(cp), np.asarray(cnt))
        np.testing.assert_array_equal(np.asarray(yp), np.asarray(y), err_msg="read a skipped row")


def test_cascade_index_list_pipelines_match_reference():
    w, v, u = weights(55)
    x = jax.random.normal(jax.random.key(56), (2, D), jnp.float32)
    q, _ = selection_scores(x, w, act="silu", method=D_COUNTDOWN, pred_vt=v, pred_u=u)
    tau, tau_s = cascade_taus(q, exact_s(x, w), 0.7, 0.5)
    rule = Rule(D_COUNTDOWN, tau, pred_vt=v, pred_u=u, tau_s=tau_s)
    ref, rc = fused_sparse_ffn(x, w, rule, act="silu", implementation="xla", interpret=True)
    assert (np.asarray(rc) > 0).all()
    for impl in ("xla", "pallas"):
        y, cnt = fused_sparse_ffn(x, w, rule, act="silu", implementation=impl,
                                  config=IndexLists(), interpret=True)
        np.testing.assert_array_equal(np.asarray(cnt), np.asarray(rc), err_msg=impl)
        assert rel_err(y, ref) < 1e-5, impl


def test_cascade_api_errors():
    w, v, u = weights(57)
    x = jax.random.normal(jax.random.key(58), (2, D), jnp.float32)
    pred = dict(pred_vt=v, pred_u=u)
    with pytest.raises(ValueError, match="tau_s"):
        fused_sparse_ffn(x, w, Rule(M_COUNTDOWN, 0.0, tau_s=0.1), act="silu")
    with pytest.raises(ValueError, match="tau_s must be a scalar or one value per token"):
        fused_sparse_ffn(x, w, Rule(D_COUNTDOWN, 0.0, tau_s=jnp.zeros(3), **pred), act="silu")
    with pytest.raises(ValueError, match="prefetch"):
        fused_sparse_ffn(x, w, Rule(D_COUNTDOWN, 0.0, tau_s=0.1, **pred), act="silu",
                         implementation="pallas", interpret=True,
                         config=FusedConfig(prefetch=True))
    assert not default_config(jnp.bfloat16, D_COUNTDOWN, cascade=True).prefetch
    assert default_config(jnp.bfloat16, D_COUNTDOWN).prefetch


@pytest.mark.parametrize("method", FUSED_METHODS)
def test_index_list_pipelines_match_reference(method):
    w, v, u = weights(21)
    x = jax.random.normal(jax.random.key(22), (2, D), jnp.float32)
    q, _ = selection_scores(x, w, act="silu", method=method, pred_vt=v, pred_u=u)
    rule = Rule(method, gap_tau(q, 0.7), pred_vt=v, pred_u=u)
    kw = dict(act="silu", interpret=True)
    ref, rc = fused_sparse_ffn(x, w, rule, implementation="xla", **kw)
    for impl, lists in (("xla", IndexLists(capacity=16)),
                        ("pallas", IndexLists(kernel=GatherConfig(bj=4, bd=8, programs=2)))):
        y, cnt = fused_sparse_ffn(x, w, rule, implementation=impl, config=lists, **kw)
        np.testing.assert_array_equal(np.asarray(cnt), np.asarray(rc))
        assert rel_err(y, ref) < 1e-5, impl
    # capacity overflow is reported through the untruncated count
    _, cnt = fused_sparse_ffn(x, w, rule, implementation="xla", config=IndexLists(capacity=4),
                              **kw)
    assert np.all(np.asarray(cnt) > 4)


def test_api_errors_and_cpu_fallback():
    w, v, u = weights(31)
    x = jax.random.normal(jax.random.key(32), (1, D), jnp.float32)
    idx, cnt = index_list(jnp.ones((1, M), bool), M)
    with pytest.raises(ValueError, match=r"must be \[m, d\]"):
        sparse_ffn(x, {**w, "down": w["down"].T}, idx, cnt, act="silu")
    with pytest.raises(ValueError, match="coef"):
        sparse_ffn(x, w, idx, cnt, act="silu", dense="up")
    with pytest.raises(ValueError, match="implementation"):
        sparse_ffn(x, w, idx, cnt, act="silu", implementation="cuda")
    with pytest.raises(ValueError, match="predictor"):
        fused_sparse_ffn(x, w, Rule(D_COUNTDOWN, 0.0), act="silu")
    with pytest.raises(ValueError, match="power of two"):
        FusedConfig(bn=12)
    with pytest.raises(ValueError, match="method must be one of"):
        Rule(Method.DEJAVU, 0.0)
    if jax.default_backend() == "cpu":
        _platform.reset_fallback_warnings()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            y = sparse_ffn(x, w, idx, cnt, act="silu", implementation="pallas")
        assert any("falls back" in str(i.message) for i in caught)
        r = sparse_ffn(x, w, idx, cnt, act="silu")
        assert rel_err(y, r) == 0.0


@pytest.mark.parametrize("old,new", [("m", "Method.M_COUNTDOWN"), ("d", "Method.D_COUNTDOWN"),
                                     ("dc", "with tau_s")])
def test_old_rule_names_name_their_replacement(old, new):
    with pytest.raises(ValueError, match=f"{old!r} was renamed: use .*{new}"):
        Rule(old, 0.0)


@pytest.mark.parametrize("old,impl", [("xla_gather", "xla"), ("pallas_gather", "pallas")])
def test_old_implementation_names_name_their_replacement(old, impl):
    w, _, _ = weights(33)
    x = jnp.ones((1, D), jnp.float32)
    with pytest.raises(ValueError, match=rf"{old}.*removed; use implementation='{impl}', "
                                         r"config=IndexLists\(\)"):
        fused_sparse_ffn(x, w, Rule(Method.M_COUNTDOWN, 0.0), act="silu", implementation=old)


# --------------------------------------------------------------------------- compiled GPU

@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kernels_compiled_on_gpu(dtype):
    """Compiled Triton kernels on ragged shapes, poisoned outputs, r = 0 / 0.5 / 0.9 / 1."""
    m, d, n = 1000, 576, 2          # ragged against every block size used below
    w, v, u = weights(41, m=m, d=d, dtype=dtype)
    tol = 1e-2 if dtype == jnp.bfloat16 else 1e-4
    x = jax.random.normal(jax.random.key(42), (n, d), jnp.float32).astype(dtype)
    for method in (M_COUNTDOWN, CATS, D_COUNTDOWN):
        q, _ = selection_scores(x, w, act="silu", method=method, pred_vt=v, pred_u=u)
        rule = lambda t, method=method: Rule(method, t, pred_vt=v, pred_u=u)
        ref = jax.jit(lambda t: fused_sparse_ffn(x, w, rule(t), act="silu",
                                                 implementation="xla"))
        default = dataclasses.replace(default_config(dtype, method), poison=True)
        for impl, cfg in (("pallas", default),   # the shipped one: XLA scores + prefetch
                          ("pallas", FusedConfig(bn=16, bd=256, poison=True)),
                          ("pallas", FusedConfig(bn=64, bd=512, compact=8, reduce="atomic",
                                                 poison=True)),
                          ("pallas", FusedConfig(bn=64, bd=256, compact=8, prefetch=True,
                                                 poison=True)),
                          ("pallas", IndexLists(kernel=GatherConfig(bj=8, bd=256, programs=16,
                                                                    poison=True))),
                          ("pallas", IndexLists(kernel=GatherConfig(
                              bj=4, bd=256, programs=16, prefetch=True, poison=True)))):
            kern = jax.jit(lambda t, impl=impl, cfg=cfg: fused_sparse_ffn(
                x, w, rule(t), act="silu", implementation=impl, config=cfg))
            for frac in (0.0, 0.5, 0.9, 1.0):
                tau = gap_tau(q, frac)
                (y, cnt), (r, rc) = kern(tau), ref(tau)
                np.testing.assert_array_equal(np.asarray(cnt), np.asarray(rc))
                if frac == 1.0:
                    assert np.all(np.asarray(y, np.float32) == 0)
                else:
                    assert rel_err(y, r) < tol, (method, frac, impl, cfg)
    # the cascade: candidates z > tau, W_down rows of |s| > tau_s only
    q, _ = selection_scores(x, w, act="silu", method=D_COUNTDOWN, pred_vt=v, pred_u=u)
    s = exact_s(x, w)
    cascade = lambda t, ts: Rule(D_COUNTDOWN, t, pred_vt=v, pred_u=u, tau_s=ts)
    ref = jax.jit(lambda t, ts: fused_sparse_ffn(x, w, cascade(t, ts), act="silu",
                                                 implementation="xla"))
    for impl, cfg in (
            ("pallas", dataclasses.replace(default_config(dtype, D_COUNTDOWN, cascade=True),
                                           poison=True)),
            ("pallas", FusedConfig(bn=16, bd=256, poison=True)),
            ("pallas", FusedConfig(bn=64, bd=512, compact=8, reduce="atomic", poison=True)),
            ("pallas", FusedConfig(bn=32, bd=256, compact=4, score="xla", programs=100,
                                   poison=True)),
            ("pallas", IndexLists(kernel=GatherConfig(bj=8, bd=256, programs=16,
                                                      poison=True)))):
        kern = jax.jit(lambda t, ts, impl=impl, cfg=cfg: fused_sparse_ffn(
            x, w, cascade(t, ts), act="silu", implementation=impl, config=cfg))
        for cand, keep in ((1.0, 1.0), (0.7, 0.5), (0.3, 0.2), (0.0, 1.0), (1.0, 0.0)):
            tau, tau_s = cascade_taus(q, s, cand, keep)
            (y, cnt), (r, rc) = kern(tau, tau_s), ref(tau, tau_s)
            np.testing.assert_array_equal(np.asarray(cnt), np.asarray(rc))
            if cand == 0.0 or keep == 0.0:
                assert np.all(np.asarray(y, np.float32) == 0) and not np.asarray(cnt).any()
            else:
                assert rel_err(y, r) < tol, (cand, keep, impl, cfg)


