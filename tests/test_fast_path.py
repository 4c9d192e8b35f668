"""Fast by default: a ``DecodePath`` of "auto" resolves (``fast_path.resolve``, the one
place) to the portable path on CPU and to unstacked layers + Pallas FFN (where the rule
skips work) + Pallas attention on a GPU (faked here by patching ``fast_path.backend``);
generation with "auto" equals the explicit path it resolves to; explicit values win; bad
values are refused by name."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import countdown_jax as cj
from countdown_jax import api, fast_path
from countdown_jax import model as model_lib
from countdown_jax.decode_path import PORTABLE, DecodePath
from countdown_jax.generate import CACHES, decode_params, generate, layer_form
from countdown_jax.policy import SparseSpec, make_policy
from tests.support import tiny_params
from tests.test_user_path import CharTokenizer

M_THR = SparseSpec(method="m_countdown", mode="threshold")
AUTO_PATH = DecodePath()
FAST = DecodePath(layers="unstacked", ffn="pallas", batch_kernel="lists", attention="pallas",
                  projections="xla")


def impl(spec, n):
    return fast_path.resolve(AUTO_PATH, spec, n).ffn


def kernel(spec, n):
    got = fast_path.resolve(AUTO_PATH, spec, n)
    return got.batch_kernel if got.ffn == "pallas" else "masked"


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(fast_path, "backend", lambda: "gpu")
    jax.clear_caches()            # "auto" is a static argument: forget CPU-traced programs
    CACHES.clear()
    yield
    jax.clear_caches()
    CACHES.clear()


@pytest.fixture(scope="module")
def tiny():
    params, cfg = tiny_params.tiny_model(seed=7)
    return jax.tree.map(jnp.asarray, params), dataclasses.replace(cfg, eos_token_ids=())


def test_cpu_resolves_to_the_portable_path():
    assert jax.default_backend() == "cpu"
    assert fast_path.resolve(AUTO_PATH, M_THR, 1) == PORTABLE
    held = fast_path.resolve(AUTO_PATH, M_THR, 1, held_layers="unstacked")
    assert held.layers == "unstacked"               # the portable path keeps the form held


def test_gpu_choices(fake_gpu):
    assert impl(M_THR, 1) == "pallas"                       # fused kernel at one token
    # batches: the index lists or the union read once where measured faster than
    # dense, by batch and the rule's target sparsity (H200, bench_decode.md); dense where
    # none is; an unknown r: masked (exact)
    d_pred = SparseSpec("d_countdown", "predictor")
    cats = SparseSpec("cats", "threshold")
    at = lambda spec, r: dataclasses.replace(spec, target_sparsity=r)
    for spec in (M_THR, d_pred, cats):
        assert [impl(spec, n) for n in (1, 2, 4)] == ["pallas", "masked", "masked"]
        small = (["lists", "compact", "compact", "dense", "dense"] if spec is d_pred
                 else ["compact", "compact", "compact", "union", "union"])   # 2-8 tokens
        assert [kernel(at(spec, 0.9), n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17)] == \
            ["lists", *small, "dense", "dense", "masked"]
        assert kernel(at(spec, 0.5), 1) == "lists"                   # the fused kernel
        capped = dataclasses.replace(at(spec, 0.9), capacity=3)
        assert [kernel(capped, n) for n in (1, 2, 3)] == ["lists", "lists", "dense"]
        assert kernel(dataclasses.replace(spec, capacity=3), 2) == "masked"   # r unknown
    # below the table's entries a batch with a known r runs dense (no sparse path won)
    assert [kernel(at(M_THR, r), 2) for r in (0.5, 0.7, 0.89, 0.9)] == \
        ["dense", "union", "union", "compact"]
    assert [kernel(at(M_THR, r), 4) for r in (0.7, 0.89)] == ["dense", "dense"]
    assert [kernel(at(d_pred, r), 2) for r in (0.4, 0.5, 0.7)] == ["dense", "dense", "union"]
    assert [kernel(at(d_pred, r), 4) for r in (0.5, 0.7)] == ["dense", "dense"]
    assert [kernel(at(d_pred, r), 8) for r in (0.7, 0.9)] == ["dense", "dense"]
    dejavu = SparseSpec("dejavu", "predictor")                        # lists only
    assert [kernel(at(dejavu, 0.9), n) for n in (2, 4, 8)] == ["lists", "lists", "dense"]
    explicit = fast_path.resolve(DecodePath(ffn="pallas"), at(M_THR, 0.9), 4)
    assert (explicit.ffn, explicit.batch_kernel) == ("pallas", "lists")  # explicit stays
    cascade = SparseSpec("d_countdown", "cascade")
    assert (impl(cascade, 1), impl(cascade, 2)) == ("pallas", "masked")   # not measured
    assert kernel(at(cascade, 0.9), 2) == "dense"
    assert impl(SparseSpec("d_countdown", "predictor"), 1) == "pallas"
    proxy = SparseSpec("d_countdown", "proxy")
    assert impl(proxy, 1) == "masked"                          # r unknown: exact
    # the proxy's one token: the fused kernel from r = 0.5, dense below (measured slower);
    # up to four tokens the index lists at r = 0.9 only
    with pytest.warns(fast_path.DenseBatchWarning, match="one token per call dense"):
        assert [kernel(at(proxy, r), 1) for r in (0.4, 0.49, 0.5, 0.9)] == \
            ["dense", "dense", "lists", "lists"]
    assert [kernel(at(proxy, 0.9), n) for n in (2, 4, 8)] == ["lists", "lists", "dense"]
    assert kernel(at(proxy, 0.7), 4) == "dense"
    assert impl(SparseSpec("dejavu", "predictor"), 1) == "pallas"
    assert impl(SparseSpec("d_countdown", "ideal"), 1) == "masked"          # needs dense s
    assert kernel(SparseSpec("d_countdown", "ideal", target_sparsity=0.5), 4) == \
        "masked"                                    # an oracle stays exact at any batch
    assert impl(SparseSpec(), 1) == "masked"                                # dense
    assert fast_path.resolve(AUTO_PATH, M_THR, 1) == FAST


def test_explicit_values_win(fake_gpu):
    got = fast_path.resolve(DecodePath(ffn="xla", attention="xla", layers="stacked"),
                            M_THR, 1)
    assert (got.ffn, got.attention, got.layers, got.projections) == \
        ("xla", "xla", "stacked", "xla")
    assert fast_path.resolve(PORTABLE, M_THR, 1) is PORTABLE


@pytest.mark.parametrize("call, match", [
    (lambda: DecodePath(attention="cuda"), "attention must be 'auto' or one of"),
    (lambda: DecodePath(layers="flat"), "layers must be 'auto' or one of"),
    (lambda: DecodePath(ffn="gather"), "ffn must be 'auto' or one of"),
    (lambda: DecodePath(batch_kernel="rows"), "batch_kernel must be 'auto' or one of"),
    (lambda: SparseSpec(method="cats", implementation="fast"), "unknown implementation 'fast'"),
    (lambda: SparseSpec(method="cats", implementation="auto"), "DecodePath"),
])
def test_bad_values_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_decode_params_converts_once(tiny, fake_gpu):
    params, _ = tiny
    assert decode_params(params, "stacked") is params
    un = decode_params(params, fast_path.resolve(AUTO_PATH, M_THR, 1).layers)
    assert isinstance(un["layers"], tuple)
    assert decode_params(params, "unstacked") is un          # kept while params live
    assert decode_params(un, "unstacked") is un              # already unstacked
    CACHES.clear()


def _gen(params, cfg, spec, policy, **kw):
    prompt = jnp.asarray([[5, 17, 33, 8, 60, 11]], jnp.int32)
    g = generate(params, cfg, prompt, jnp.asarray([6], jnp.int32), jax.random.PRNGKey(0),
                 policy, max_new_tokens=5, spec=spec, **kw)
    return np.asarray(g.tokens), np.asarray(g.realised_sparsity)


def _threshold_policy(cfg):
    return make_policy(cfg.num_layers, threshold=0.05)


def test_auto_equals_the_portable_path_on_cpu(tiny):
    params, cfg = tiny
    pol = _threshold_policy(cfg)
    auto = _gen(params, cfg, M_THR, pol)
    explicit = _gen(params, cfg, M_THR, pol, path=PORTABLE)
    np.testing.assert_array_equal(auto[0], explicit[0])
    np.testing.assert_array_equal(auto[1], explicit[1])
    assert 0.0 < float(auto[1].mean()) < 1.0                 # the rule really ran sparse


def test_auto_equals_the_gpu_path_when_faked(tiny, fake_gpu, pallas_interpret):
    """On a faked GPU the kernels run in the Pallas interpreter: "auto" is the explicit
    fast path, and it keeps the masked reference's tokens and kept sets."""
    params, cfg = tiny
    pol = _threshold_policy(cfg)
    auto = _gen(params, cfg, M_THR, pol)
    fast = _gen(params, cfg, M_THR, pol, path=FAST)
    ref = _gen(params, cfg, M_THR, pol, path=PORTABLE)
    np.testing.assert_array_equal(auto[0], fast[0])
    np.testing.assert_array_equal(auto[1], fast[1])
    np.testing.assert_array_equal(auto[0], ref[0])
    np.testing.assert_allclose(auto[1], ref[1], atol=1e-6)
    CACHES.clear()


def test_generate_text_reports_the_path(tiny, fake_gpu, pallas_interpret):
    params, cfg = tiny
    tok = CharTokenizer()
    tok.eos_token_id = None
    model = api.Model(params=params, cfg=cfg, path=Path("/nonexistent"), tokenizer=tok)
    out = cj.generate_text(model, "hello", max_new_tokens=4)
    assert out.path == DecodePath(layers="unstacked", ffn="masked", batch_kernel="lists",
                                  attention="pallas", projections="xla")
    ref = cj.generate_text(model, "hello", max_new_tokens=4, path=PORTABLE)
    assert ref.path == PORTABLE
    assert out.token_ids == ref.token_ids
    gemv = cj.generate_text(model, "hello", max_new_tokens=4,
                            path=DecodePath(projections="pallas"))
    assert gemv.path.projections == "pallas" and gemv.token_ids == ref.token_ids
    assert out.tokens_per_s > 0 and out.prefill_tokens_per_s > 0
    # a sparse batch says which batch kernel ran (3 rows at r = 0.9: the compact union)
    spec = dataclasses.replace(M_THR, target_sparsity=0.9)
    tokens = np.full((3, 4), 7, np.int32)
    sparse = api.generate_tokens(model, tokens, np.full((3,), 4, np.int32), spec,
                                 _threshold_policy(cfg), max_new_tokens=3)
    assert sparse.path == DecodePath(layers="unstacked", ffn="pallas", batch_kernel="compact",
                                     attention="pallas", projections="xla")
    CACHES.clear()


@pytest.mark.parametrize("rows,kernel", [([6, 3, 5, 2, 4], "union"), ([2, 4], "compact"),
                                         ([3], "lists")])
def test_auto_batches_equal_the_masked_reference(tiny, fake_gpu, pallas_interpret, rows,
                                                 kernel):
    """A decode batch the table admits at a target r of 0.9 (``BATCH_KERNEL_TABLE``)
    runs the Pallas path under "auto" (M: 5 rows the union as a row predicate, 2 as an
    index list; 1: the fused kernel) and keeps the masked reference's tokens and kept sets."""
    params, cfg = tiny
    pol = _threshold_policy(cfg)
    spec = dataclasses.replace(M_THR, target_sparsity=0.9)
    resolved = fast_path.resolve(AUTO_PATH, spec, len(rows))
    assert (resolved.ffn, resolved.batch_kernel) == ("pallas", kernel)
    prompt = np.zeros((len(rows), max(rows)), np.int32)
    for i, n in enumerate(rows):
        prompt[i, :n] = np.arange(5, 5 + n) * (i + 3) % cfg.vocab_size
    run = lambda spec, **kw: generate(params, cfg, jnp.asarray(prompt), jnp.asarray(rows),
                                      jax.random.PRNGKey(0), pol, max_new_tokens=4,
                                      spec=spec, **kw)
    auto = run(spec)
    ref = run(spec, path=PORTABLE)
    np.testing.assert_array_equal(np.asarray(auto.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(auto.realised_sparsity),
                               np.asarray(ref.realised_sparsity), atol=1e-6)
    assert 0.0 < float(np.mean(auto.realised_sparsity)) < 1.0
    CACHES.clear()


def test_auto_runs_a_batch_dense_where_no_sparse_path_wins(tiny, fake_gpu,
                                                          pallas_interpret):
    """At r = 0.5 a batch of 4 (the union of their kept sets near all of m) runs the dense
    FFN under "auto": dense generation's tokens, realised sparsity 0 (kept 1.0 is what
    ran), and the path says "dense"; an unknown r or an explicit implementation keeps
    the rule exact."""
    params, cfg = tiny
    pol = _threshold_policy(cfg)
    prompt = jnp.asarray(np.arange(24).reshape(4, 6) * 7 % cfg.vocab_size, jnp.int32)
    run = lambda spec, **kw: generate(params, cfg, prompt, jnp.full((4,), 6, jnp.int32),
                                      jax.random.PRNGKey(0), pol, max_new_tokens=4,
                                      spec=spec, **kw)
    with pytest.warns(fast_path.DenseBatchWarning, match="batch of 4 tokens dense"):
        auto = run(dataclasses.replace(M_THR, target_sparsity=0.5))
    dense = run(SparseSpec(), path=PORTABLE)
    np.testing.assert_array_equal(np.asarray(auto.tokens), np.asarray(dense.tokens))
    np.testing.assert_array_equal(np.asarray(auto.realised_sparsity), 0.0)
    exact = run(M_THR)                                       # r unknown: masked
    ref = run(M_THR, path=PORTABLE)
    np.testing.assert_array_equal(np.asarray(exact.tokens), np.asarray(ref.tokens))
    assert 0.0 < float(np.mean(exact.realised_sparsity)) < 1.0
    tok = CharTokenizer()
    tok.eos_token_id = None
    model = api.Model(params=params, cfg=cfg, path=Path("/nonexistent"), tokenizer=tok)
    with pytest.warns(fast_path.DenseBatchWarning):
        out = api.generate_tokens(model, np.full((4, 4), 7, np.int32),
                                  np.full((4,), 4, np.int32),
                                  dataclasses.replace(M_THR, target_sparsity=0.5), pol,
                                  max_new_tokens=3)
    assert out.path.batch_kernel == "dense" and out.realised_sparsity == 0.0
    CACHES.clear()


def test_auto_runs_one_proxy_token_dense_below_its_measured_r(tiny, fake_gpu,
                                                             pallas_interpret):
    """The proxy at r = 0.4 (slower than dense at one token, fast_path's table): "auto"
    decodes dense (dense generation's tokens, realised sparsity 0); at r = 0.9 it keeps
    the rule (the fused kernel, the masked path's tokens)."""
    from countdown_jax.proxy import quantize_mlp

    params, cfg = tiny
    proxy = quantize_mlp(params["layers"]["mlp"], 4, 8)
    pol = make_policy(cfg.num_layers, threshold=0.05, proxy=proxy)
    prompt = jnp.asarray(np.arange(6)[None] * 7 % cfg.vocab_size, jnp.int32)
    run = lambda spec, **kw: generate(params, cfg, prompt, jnp.full((1,), 6, jnp.int32),
                                      jax.random.PRNGKey(0), pol, max_new_tokens=4,
                                      spec=spec, **kw)
    spec = SparseSpec("d_countdown", "proxy")
    with pytest.warns(fast_path.DenseBatchWarning, match="one token per call dense"):
        auto = run(dataclasses.replace(spec, target_sparsity=0.4))
    dense = run(SparseSpec(), path=PORTABLE)
    np.testing.assert_array_equal(np.asarray(auto.tokens), np.asarray(dense.tokens))
    np.testing.assert_array_equal(np.asarray(auto.realised_sparsity), 0.0)
    kept = run(dataclasses.replace(spec, target_sparsity=0.9))
    ref = run(spec, path=PORTABLE)
    np.testing.assert_array_equal(np.asarray(kept.tokens), np.asarray(ref.tokens))
    assert 0.0 < float(np.mean(kept.realised_sparsity)) < 1.0
    CACHES.clear()


def _with_qkv_bias(params, cfg):
    """The tiny model with random q/k/v biases (Qwen2-style)."""
    rng = np.random.default_rng(1)
    L, H, K, hd = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    params = {**params, "layers": {**params["layers"], **{
        n: jnp.asarray(rng.standard_normal((L, h, hd)).astype(np.float32))
        for n, h in (("bq", H), ("bk", K), ("bv", K))}}}
    return params, dataclasses.replace(cfg, qkv_bias=True)


def _assert_same_model(params, other, cfg, form):
    """``other`` (a layer form of ``params``) gives the same forward logits (stacked, scan)
    and greedy generation (``layers=form``, unrolled) as ``params``."""
    tokens = jnp.asarray([[5, 17, 33, 8, 60, 11]], jnp.int32)
    ref, _ = model_lib.forward(params, cfg, tokens)
    got, _ = model_lib.forward(other, cfg, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    pol = _threshold_policy(cfg)
    a = _gen(params, cfg, M_THR, pol, path=DecodePath(layers="stacked"))
    b = _gen(params, cfg, M_THR, pol, path=DecodePath(layers=form))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)


@pytest.mark.parametrize("bias,groups", [(False, 1), (True, 1), (True, 2)])
def test_fused_qkv_equals_separate_projections(tiny, bias, groups):
    """model.fuse_qkv (one q/k/v weight, in 1 or 2 head groups) against the three
    projections: forward logits (stacked, scan) and greedy generation (layers="fused_qkv",
    unrolled) agree."""
    params, cfg = tiny
    if bias:
        params, cfg = _with_qkv_bias(params, cfg)
    fused = model_lib.fuse_qkv(params, groups)
    assert "wqkv" in fused["layers"] and "wq" not in fused["layers"]
    assert fused["layers"]["wqkv"].shape[-3] == groups
    assert ("bqkv" in fused["layers"]) == bias
    _assert_same_model(params, fused, cfg, "fused_qkv")
    CACHES.clear()


@pytest.mark.parametrize("bias", [False, True])
def test_transposed_projections_equal_the_einsum_layout(tiny, bias):
    """model.transpose_projections (q/k/v/o one row per output) against the einsum layout:
    forward logits (stacked, scan) and greedy generation (layers="transposed", unrolled)
    agree; it refuses fused q/k/v, and the Pallas GEMV names the layout it needs."""
    params, cfg = tiny
    if bias:
        params, cfg = _with_qkv_bias(params, cfg)
    tr = model_lib.transpose_projections(params)
    lay, src = tr["layers"], params["layers"]
    assert not {"wq", "wk", "wv", "wo"} & set(lay)
    np.testing.assert_array_equal(np.asarray(lay["wq_t"][1, 2, 3]),
                                  np.asarray(src["wq"][1, :, 2, 3]))
    np.testing.assert_array_equal(np.asarray(lay["wo_t"][1, 5]),
                                  np.asarray(src["wo"][1, :, :, 5]))
    _assert_same_model(params, tr, cfg, "transposed")
    unstacked = model_lib.unstack_layers(tr)
    assert layer_form(unstacked) == "transposed"
    assert decode_params(unstacked, "unstacked") is unstacked      # already unstacked
    with pytest.raises(ValueError, match="fused"):
        model_lib.transpose_projections(model_lib.fuse_qkv(params))
    with pytest.raises(ValueError, match="transposed"):
        model_lib.fuse_qkv(tr)
    cache = model_lib.init_cache(cfg, 1, 8)
    with pytest.raises(ValueError, match="projections='xla'"):
        model_lib.decode_step(tr, cfg, jnp.asarray([3]), jnp.asarray([0]), cache,
                              path=dataclasses.replace(PORTABLE, projections="pallas"))
    with pytest.raises(ValueError, match="resolved DecodePath"):
        model_lib.decode_step(tr, cfg, jnp.asarray([3]), jnp.asarray([0]), cache,
                              path=DecodePath())
    CACHES.clear()


def test_the_copy_goes_with_its_source(fake_gpu):
    import gc

    params, _ = tiny_params.tiny_model(seed=11)
    params = jax.tree.map(jnp.asarray, params)
    decode_params(params, "unstacked")
    assert len(CACHES.layer_copy) == 1
    del params
    gc.collect()
    assert not CACHES.layer_copy


def test_the_per_layer_policy_is_made_once_per_policy():
    """decode_policy keeps its per-layer copy for the same policy (every leaf the same
    array), makes a new one when any leaf changes, never caches NumPy leaves (mutable),
    and drops the copy with its source."""
    import gc

    from countdown_jax.generate import decode_policy
    from countdown_jax.policy import make_policy

    CACHES.clear()
    params = {"embed": jnp.zeros((5, 8)), "layers": [{}, {}]}
    pol = make_policy(2, threshold=jnp.asarray([0.1, 0.2]))
    first = decode_policy(params, pol)
    assert decode_policy(params, pol) is first
    assert float(first[1]["threshold"]) == pytest.approx(0.2)
    other = decode_policy(params, {**pol, "threshold": jnp.asarray([0.3, 0.4])})
    assert other is not first and float(other[1]["threshold"]) == pytest.approx(0.4)
    host = {**pol, "threshold": np.asarray([0.1, 0.2], np.float32)}
    got = decode_policy(params, host)
    host["threshold"][1] = 0.9                  # changed in place: not served from a cache
    assert float(decode_policy(params, host)[1]["threshold"]) == pytest.approx(0.9)
    assert float(got[1]["threshold"]) == pytest.approx(0.2)
    pol = {**pol, "threshold": jnp.asarray([0.5, 0.6])}
    decode_policy(params, pol)
    assert len(CACHES.policy_copy) == 1
    del pol
    gc.collect()
    assert not CACHES.policy_copy


def test_setup_carries_the_target_sparsity(tmp_path):
    """api.check_setup hands fast_path the r the rule was set for; dense carries none; a
    target outside [0, 1) is refused by name."""
    assert api.check_setup(tmp_path, "m_countdown", "ideal", 0.7).target_sparsity == 0.7
    assert api.check_setup(tmp_path).target_sparsity is None
    with pytest.raises(ValueError, match="target_sparsity must be in"):
        SparseSpec("m_countdown", "threshold", target_sparsity=1.0)
    with pytest.raises(ValueError, match="batch_kernel must be one of"):
        SparseSpec("m_countdown", "threshold", batch_kernel="rows")


def test_auto_is_resolved_in_one_module():
    """Only fast_path decides what "auto" means: no other module of the package compares a
    value with "auto" (decode_path only validates it)."""
    import re

    pkg = Path(fast_path.__file__).parent
    pattern = re.compile(r"""(==|!=)\s*(AUTO|["']auto["'])|(AUTO|["']auto["'])\s*(==|!=)""")
    found = [f"{p.relative_to(pkg)}:{i}" for p in sorted(pkg.rglob("*.py"))
             if p.name not in ("fast_path.py", "decode_path.py")
             for i, line in enumerate(p.read_text().splitlines(), 1)
             if pattern.search(line)]
    assert not found, found
