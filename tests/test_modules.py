"""Flax NNX modules (countdown_jax/modules.py): the sparse MLP dropped into a Flax model,
the whole decoder as a module, sharding metadata, the README snippet, gradients.

The drop-in target is a small Llama-style NNX transformer written here (nnx.Linear
gate/up/down projections, as NNX model zoos write them), with random weights.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.support import fake_devices
from tests.support import np_sparse_ffn as ref
from countdown_jax import model as model_lib
from countdown_jax.ffn import ffn
from countdown_jax.modules import CountdownLM, SparseGatedMLP, shard_module
from countdown_jax.policy import DENSE, METHOD_MODES, SparseSpec, make_policy
from countdown_jax.proxy import quantize_mlp

ROOT = Path(__file__).resolve().parents[1]
D, M, H, HD, V, L, RANK = 32, 96, 4, 8, 61, 2, 8
RULES = [(meth, mode) for meth, modes in METHOD_MODES.items() if meth != "dense"
         for mode in modes]
# One layer's policy per mode (threshold 0.3 keeps part of every rule's neurons here).
VALUES = {"ideal": 0.6, "topk": 0.6, "threshold": 0.3, "predictor": 0.5,
          "cascade": (-0.5, 0.05),          # cascade: (theta of the candidates, |s| tau)
          "proxy": 0.05}                    # |s_hat| tau of the 4-bit proxy (group 8)


# -- a researcher's Flax NNX model ---------------------------------------------------------
class RMSNorm(nnx.Module):
    def __init__(self, d):
        self.scale = nnx.Param(jnp.ones((d,)))

    def __call__(self, x):
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * self.scale[...]


def rope(x, pos):
    half = x.shape[-1] // 2
    ang = pos[:, None] * 10000.0 ** (-jnp.arange(half) / half)
    c, s = jnp.cos(ang)[:, None], jnp.sin(ang)[:, None]
    a, b = x[..., :half], x[..., half:]
    return jnp.concatenate([a * c - b * s, a * s + b * c], -1)


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.q, self.k, self.v = (nnx.Linear(D, H * HD, use_bias=False, rngs=rngs)
                                  for _ in range(3))
        self.o = nnx.Linear(H * HD, D, use_bias=False, rngs=rngs)

    def __call__(self, x):
        T = x.shape[1]
        pos = jnp.arange(T, dtype=jnp.float32)
        q, k, v = (f(x).reshape(x.shape[0], T, H, HD) for f in (self.q, self.k, self.v))
        q, k = rope(q, pos), rope(k, pos)
        w = jnp.einsum("bthk,bshk->bhts", q, k) / np.sqrt(HD)
        w = jnp.where(jnp.tril(jnp.ones((T, T), bool)), w, -jnp.inf)
        out = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(w, -1), v)
        return self.o(out.reshape(x.shape[0], T, H * HD))


class LlamaMLP(nnx.Module):
    def __init__(self, rngs, bias=False):
        self.gate_proj = nnx.Linear(D, M, use_bias=bias, rngs=rngs)
        self.up_proj = nnx.Linear(D, M, use_bias=bias, rngs=rngs)
        self.down_proj = nnx.Linear(M, D, use_bias=bias, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, rngs):
        self.attn_norm, self.attn = RMSNorm(D), Attention(rngs)
        self.mlp_norm, self.mlp = RMSNorm(D), LlamaMLP(rngs)


class TinyLlama(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.blocks = nnx.List([Block(rngs) for _ in range(L)])
        self.norm = RMSNorm(D)
        self.head = nnx.Linear(D, V, use_bias=False, rngs=rngs)

    def __call__(self, tokens, mlp_fn=None):
        """mlp_fn(layer, h) replaces the blocks' MLP calls (the functional reference)."""
        x = self.embed(tokens)
        for i, b in enumerate(self.blocks):
            x = x + b.attn(b.attn_norm(x))
            h = b.mlp_norm(x)
            x = x + (b.mlp(h) if mlp_fn is None else mlp_fn(i, h))
        return self.head(self.norm(x))


def _model():
    return TinyLlama(nnx.Rngs(0))


TOKENS = jax.random.randint(jax.random.key(1), (2, 7), 0, V)


def _weights(mlp: LlamaMLP):
    return {"gate": mlp.gate_proj.kernel[...].T, "up": mlp.up_proj.kernel[...].T,
            "down": mlp.down_proj.kernel[...]}


def _policies(mode, model=None):
    """One policy per layer (a predictor: random V [d, rank], U [m, rank]; a proxy: the
    4-bit copy of ``model``'s layer)."""
    out = []
    for l in range(L):
        if mode == "proxy":
            w = _weights(model.blocks[l].mlp)
            out.append({"threshold": VALUES[mode],
                        "proxy": quantize_mlp({"gate": w["gate"], "up": w["up"]}, 4, 8)})
        elif mode in ("predictor", "cascade"):
            kv, ku = jax.random.split(jax.random.key(10 + l))
            theta, tau = VALUES[mode] if mode == "cascade" else (VALUES[mode], None)
            out.append({"theta": theta, "predictor": {
                "V": jax.random.normal(kv, (D, RANK)) / np.sqrt(D),
                "U": jax.random.normal(ku, (M, RANK)) / np.sqrt(RANK)}})
            if tau is not None:
                out[-1]["threshold"] = tau
        else:
            key = {"ideal": "sparsity", "topk": "sparsity", "threshold": "threshold"}[mode]
            out.append({key: VALUES[mode]})
    return out


def _bf16(a):
    """The proxy's scales are stored in bfloat16: the reference rounds them the same way."""
    return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)


def _swap(model, spec, policies=None):
    """A copy of ``model`` whose blocks run SparseGatedMLP (built from their Linears)."""
    model = nnx.clone(model)
    for l, b in enumerate(model.blocks):
        b.mlp = SparseGatedMLP.from_linears(b.mlp.gate_proj, b.mlp.up_proj, b.mlp.down_proj,
                                            act="silu", spec=spec,
                                            policy=None if policies is None else policies[l])
    return model


def _layer_policy(pol):
    """The stored form ffn.ffn reads: float32 scalars, predictor as {"Vt", "U"}."""
    return jax.tree.map(lambda a: a[0], make_policy(
        1, **{k: v for k, v in pol.items() if k not in ("predictor", "proxy")},
        predictor=None if "predictor" not in pol else
        jax.tree.map(lambda a: a[None], pol["predictor"]),
        proxy=None if "proxy" not in pol else jax.tree.map(lambda a: a[None], pol["proxy"])))


# -- drop-in ---------------------------------------------------------------------------------
def test_dense_swap_equals_the_flax_model():
    model = _model()
    want = model(TOKENS)
    got = _swap(model, DENSE)(TOKENS)
    rel = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
    assert rel <= 1e-6, rel


@pytest.mark.parametrize("method,mode", RULES)
def test_sparse_swap_equals_functional_and_numpy(method, mode):
    model, spec = _model(), SparseSpec(method, mode)
    pols = _policies(mode, model)
    swapped = _swap(model, spec, pols)
    got, inter = nnx.capture(lambda m: m(TOKENS), nnx.Intermediate)(swapped)
    seen = {}

    def functional(l, h):       # ffn.ffn on the original Linears' weights
        seen[l] = np.asarray(h, np.float64)
        return ffn(_weights(model.blocks[l].mlp), h, act="silu", spec=spec,
                   policy=_layer_policy(pols[l]))[0]

    want = model(TOKENS, functional)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for l in range(L):          # each layer against the float64 NumPy reference
        w64 = {k: np.asarray(a, np.float64) for k, a in _weights(model.blocks[l].mlp).items()}
        h = seen[l]
        pred64 = {k: np.asarray(a, np.float64) for k, a in pols[l].get("predictor", {}).items()}
        if mode == "cascade":
            _, mask = ref.cascade(w64, h, pred64, pols[l]["theta"], pols[l]["threshold"],
                                  "silu")
        elif mode == "proxy":
            mask, _ = ref.proxy_rule(w64, h, 4, 8, pols[l]["threshold"], "silu",
                                     round_scale=_bf16)
        else:
            q = (ref.predictor_logits(pred64, h) if mode == "predictor"
                 else ref.quantity(method, w64, h, "silu"))
            mask = ref.select(mode, q, pols[l][{"ideal": "sparsity", "topk": "sparsity",
                                               "threshold": "threshold",
                                               "predictor": "theta"}[mode]])
        assert 0 < mask.mean() < 1, (l, mask.mean())          # the rule did select
        kept = np.asarray(inter["blocks"][l]["mlp"]["kept"].get_value()[0])
        np.testing.assert_array_equal(np.rint(kept * M), mask.sum(-1))
        y = SparseGatedMLP.from_linears(*(getattr(model.blocks[l].mlp, p) for p in
                                          ("gate_proj", "up_proj", "down_proj")),
                                        spec=spec, policy=pols[l])(jnp.asarray(h, jnp.float32))
        np.testing.assert_allclose(y, ref.sparse_ffn(w64, h, mask, "silu"), rtol=1e-4,
                                   atol=1e-5)


def test_swapped_model_under_nnx_jit():
    model = _model()
    swapped = _swap(model, SparseSpec("m_countdown", "topk", "xla"), _policies("topk"))
    eager = swapped(TOKENS)
    jitted = nnx.jit(lambda m, t: m(t))(swapped, TOKENS)
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5)


def test_from_linears_bias():
    rngs = nnx.Rngs(3)
    mlp = LlamaMLP(rngs, bias=True)                      # nnx.Linear biases start at 0
    x = jax.random.normal(jax.random.key(4), (3, D))
    sp = SparseGatedMLP.from_linears(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    np.testing.assert_allclose(sp(x), mlp(x), rtol=1e-5, atol=1e-6)
    mlp.up_proj.bias[...] = jnp.full((M,), 0.1)
    with pytest.raises(ValueError, match="up has a nonzero bias"):
        SparseGatedMLP.from_linears(mlp.gate_proj, mlp.up_proj, mlp.down_proj)


def test_bad_input_is_refused():
    rngs = nnx.Rngs(0)
    a, b = nnx.Linear(D, M, rngs=rngs), nnx.Linear(D, M, rngs=rngs)
    with pytest.raises(ValueError, match="do not form a gated MLP"):
        SparseGatedMLP.from_linears(a, b, nnx.Linear(D, M, rngs=rngs))
    with pytest.raises(ValueError, match=r"\[m, d\]"):
        SparseGatedMLP(jnp.zeros((M, D)), jnp.zeros((M, D)), jnp.zeros((D, M)))
    with pytest.raises(ValueError, match="unsupported MLP activation"):
        SparseGatedMLP.from_linears(a, b, nnx.Linear(M, D, rngs=rngs), act="relu")
    mlp = SparseGatedMLP.from_linears(a, b, nnx.Linear(M, D, rngs=rngs),
                                      spec=SparseSpec("cats", "threshold"))
    with pytest.raises(ValueError, match="needs a policy"):
        mlp(jnp.ones((D,)))
    with pytest.raises(ValueError, match="must be a scalar"):
        mlp(jnp.ones((D,)), {"threshold": jnp.zeros((L,))})  # a whole-model policy


def test_from_params_equals_the_models_ffn():
    from tests.support import tiny_params
    params, cfg = tiny_params.tiny_model()
    spec = SparseSpec("d_countdown", "ideal")
    policy = make_policy(cfg.num_layers, sparsity=[0.3, 0.6, 0.9])
    x = jax.random.normal(jax.random.key(2), (4, cfg.d_model))
    for l in range(cfg.num_layers):
        mlp = {k: params["layers"]["mlp"][k][l] for k in ("gate", "up", "down")}
        want, kept = ffn(mlp, x, act=cfg.act, spec=spec,
                         policy=jax.tree.map(lambda a: a[l], policy))
        for p in (params, model_lib.unstack_layers(params)):
            mod = SparseGatedMLP.from_params(p, cfg, l, spec=spec, policy=policy)
            y, k = mod(x, return_kept=True)
            np.testing.assert_array_equal(y, want)
            np.testing.assert_array_equal(k, kept)
        np.testing.assert_allclose(1 - kept.mean(), int(cfg.d_ff * [0.3, 0.6, 0.9][l])
                                   / cfg.d_ff, atol=0.02)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        SparseGatedMLP.from_params(params, cfg, 3)


def _one_mlp(spec, policy=None):
    rngs = nnx.Rngs(5)
    lin = LlamaMLP(rngs)
    return SparseGatedMLP.from_linears(lin.gate_proj, lin.up_proj, lin.down_proj,
                                       spec=spec, policy=policy)


def test_jit_compiles_once_and_vmap_sweeps_policies():
    mlp = _one_mlp(SparseSpec("m_countdown", "topk"))
    x = jax.random.normal(jax.random.key(6), (3, D))
    traces = []

    @nnx.jit
    def run(m, x, pol):
        traces.append(1)
        return m(x, pol, return_kept=True)

    levels = jnp.array([0.1, 0.5, 0.9], jnp.float32)
    singles = [run(mlp, x, {"sparsity": r}) for r in levels]
    assert len(traces) == 1                              # new values, no retrace
    held = nnx.jit(lambda m, x: (traces.append(1), m(x, return_kept=True))[1])
    for i, r in enumerate(levels):                       # the held policy is data too
        mlp.set_policy({"sparsity": r})
        np.testing.assert_array_equal(held(mlp, x)[1], singles[i][1])
    assert len(traces) == 2
    for sweep in (jax.vmap(lambda p: mlp(x, p, return_kept=True))({"sparsity": levels}),
                  nnx.vmap(lambda m, p: m(x, p, return_kept=True), in_axes=(None, 0))(
                      mlp, {"sparsity": levels})):
        for i, (y, k) in enumerate(singles):
            np.testing.assert_allclose(sweep[0][i], y, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(np.rint(sweep[1][i] * M), M - int(M * levels[i]))


@pytest.mark.parametrize("spec,pol", [
    (SparseSpec("m_countdown", "topk"), {"sparsity": 0.5}),
    (SparseSpec("d_countdown", "ideal"), {"sparsity": 0.7}),
    (SparseSpec("cats", "threshold", "xla"), {"threshold": 0.3}),
], ids=["m_topk", "d_ideal", "cats_threshold_gather"])
def test_gradient_reaches_only_kept_rows(spec, pol):
    mlp = _one_mlp(spec, pol)
    x = jax.random.normal(jax.random.key(7), (1, D))      # one token: one fixed mask
    c = jax.random.normal(jax.random.key(8), (1, D))
    grads = nnx.grad(lambda m: jnp.sum(m(x) * c))(mlp)
    w64 = {k: np.asarray(getattr(mlp, k)[...], np.float64) for k in ("gate", "up", "down")}
    x64 = np.asarray(x, np.float64)
    mask = ref.select(spec.mode, ref.quantity(spec.method, w64, x64, "silu"),
                      next(iter(pol.values())))[0]
    assert 0 < mask.sum() < M
    for k in ("gate", "up", "down"):
        g = np.asarray(grads[k][...])
        assert not g[~mask].any(), k                      # dropped rows: exactly zero
        assert np.abs(g[mask]).sum(-1).min() > 0, k       # every kept row moves
    # so a plain SGD step leaves the dropped rows untouched
    before = np.asarray(mlp.up[...])
    nnx.update(mlp, jax.tree.map(lambda p, g: p - 0.1 * g, nnx.state(mlp, nnx.Param), grads))
    assert np.array_equal(np.asarray(mlp.up[...])[~mask], before[~mask])


# -- the whole decoder -------------------------------------------------------------------------
def _lm():
    from tests.support import tiny_params
    params, cfg = tiny_params.tiny_model()
    return jax.tree.map(jnp.asarray, params), cfg


def test_countdown_lm_state_is_the_params_pytree():
    params, cfg = _lm()
    lm = CountdownLM(params, cfg)
    pure = nnx.to_pure_dict(nnx.state(lm, nnx.Param))
    assert jax.tree.structure(pure) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, pure, params)
    from countdown_jax import sharding
    mesh = jax.sharding.AbstractMesh((1, 2), sharding.AXES)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(lm, nnx.Param)))
    assert specs == sharding.param_specs(cfg, mesh, params)   # the project's mesh rules


def test_countdown_lm_equals_the_functional_model():
    params, cfg = _lm()
    spec = SparseSpec("m_countdown", "ideal")
    policy = make_policy(cfg.num_layers, sparsity=0.6)
    lm = CountdownLM(params, cfg, spec=spec)
    tokens = jax.random.randint(jax.random.key(3), (2, 6), 3, cfg.vocab_size)
    want, want_kept = model_lib.forward(params, cfg, tokens, spec=spec, policy=policy)
    got, kept = lm.forward(tokens, policy=policy)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(kept, want_kept)
    jitted = nnx.jit(lambda m, t, p: m(t, policy=p))(lm, tokens, policy)
    np.testing.assert_allclose(jitted, want, rtol=1e-5, atol=1e-5)
    # prefill + decode_step + generate
    lengths = jnp.array([6, 4], jnp.int32)
    cache = lm.init_cache(2, 10)
    lg, cache, _ = lm.prefill(tokens, lengths, cache, policy=policy)
    lg2, _, _ = model_lib.prefill(params, cfg, tokens, lengths, model_lib.init_cache(cfg, 2, 10),
                                  spec=spec, policy=policy)
    np.testing.assert_array_equal(lg, lg2)
    step, _, k = lm.decode_step(tokens[:, 0], lengths, cache, policy=policy)
    assert step.shape == (2, cfg.vocab_size) and 0 < float(k.mean()) < 1
    gen = lm.generate(tokens, lengths, jax.random.key(0), policy, max_new_tokens=3)
    from countdown_jax.generate import generate
    ref_gen = generate(params, cfg, tokens, lengths, jax.random.key(0), policy,
                       max_new_tokens=3, spec=spec)
    np.testing.assert_array_equal(gen.tokens, ref_gen.tokens)


def test_countdown_lm_split_merge_and_orbax(tmp_path):
    import orbax.checkpoint as ocp
    params, cfg = _lm()
    lm = CountdownLM(params, cfg)
    tokens = jax.random.randint(jax.random.key(3), (2, 6), 3, cfg.vocab_size)
    want = lm(tokens)
    graphdef, state = nnx.split(lm)
    np.testing.assert_array_equal(nnx.merge(graphdef, state)(tokens), want)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
        ckpt.wait_until_finished()
        graphdef2, abstract = nnx.split(nnx.eval_shape(lambda: CountdownLM(params, cfg)))
        restored = ckpt.restore(tmp_path / "state", abstract)
    back = nnx.merge(graphdef2, restored)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(back, nnx.Param)),
                 params)
    np.testing.assert_array_equal(back(tokens), want)


def test_countdown_lm_refuses_unstacked_layers():
    params, cfg = _lm()
    with pytest.raises(ValueError, match="stacked layers"):
        CountdownLM(model_lib.unstack_layers(params), cfg)


# -- the README snippet ------------------------------------------------------------------------
def test_readme_snippet_runs():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it in your Flax model", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert 0 < float(1 - scope["kept"].mean()) < 1            # it ran a sparse layer


# -- sharding (4 fake CPU devices in a subprocess, as tests/test_sharding.py) ------------------
def _axes(a):
    """An array's PartitionSpec as a list without trailing Nones (JSON-able)."""
    spec = list(a.sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return spec


def _worker():
    from countdown_jax import sharding
    from tests.support import tiny_params

    assert len(jax.devices()) == 4, jax.devices()
    params, cfg = tiny_params.tiny_model(num_key_value_heads=2)
    params = jax.tree.map(jnp.asarray, params)
    mesh = sharding.make_mesh(model=2, data=2)
    x = jax.random.normal(jax.random.key(1), (4, 3, cfg.d_model))
    report = {}
    for name, spec, pol in [
        ("dense", DENSE, None),
        ("m_topk", SparseSpec("m_countdown", "topk"), make_policy(cfg.num_layers, sparsity=0.7)),
        ("cats_threshold_gather", SparseSpec("cats", "threshold", "xla"),
         make_policy(cfg.num_layers, threshold=0.3)),
        ("d_predictor_gather", SparseSpec("d_countdown", "predictor", "xla"),
         make_policy(cfg.num_layers, theta=0.5, predictor={
             "V": jax.random.normal(jax.random.key(3), (cfg.num_layers, cfg.d_model, 8)),
             "U": jax.random.normal(jax.random.key(4), (cfg.num_layers, cfg.d_ff, 8))})),
    ]:
        single = SparseGatedMLP.from_params(params, cfg, 1, spec=spec, policy=pol)
        y0, k0 = single(x, return_kept=True)
        mod = shard_module(SparseGatedMLP.from_params(params, cfg, 1, spec=spec, policy=pol),
                           mesh)
        with jax.set_mesh(mesh):
            y, k = nnx.jit(lambda m, x: m(x, return_kept=True))(mod, x)
            built = SparseGatedMLP.from_params(params, cfg, 1, spec=spec, policy=pol)
        report[name] = {
            "y_max_abs": float(jnp.max(jnp.abs(y - y0))),
            "kept_equal": bool(jnp.array_equal(jnp.round(k * cfg.d_ff),
                                               jnp.round(k0 * cfg.d_ff))),
            "gate_shard": list(mod.gate[...].addressable_shards[0].data.shape),
            "eager_shard": list(built.gate[...].addressable_shards[0].data.shape),
            "spec": _axes(mod.gate[...]),
        }
    lm = CountdownLM(params, cfg, mesh=mesh)
    tokens = jax.random.randint(jax.random.key(2), (4, 5), 3, cfg.vocab_size)
    spec, pol = SparseSpec("d_countdown", "ideal"), make_policy(cfg.num_layers, sparsity=0.6)
    want = model_lib.forward(params, cfg, tokens, spec=spec, policy=pol)[0]
    with jax.set_mesh(mesh):
        got = nnx.jit(lambda m, t: m(t, spec=spec, policy=pol))(lm, tokens)
        built = CountdownLM(params, cfg)                  # placed on creation
    report["lm"] = {"logits_max_abs": float(jnp.max(jnp.abs(got - want))),
                    "wq_spec": _axes(lm.layers["wq"][...]),
                    "eager_gate_spec": _axes(built.layers["mlp"]["gate"][...])}
    print("RESULT " + json.dumps(report))


@pytest.fixture(scope="module")
def sharded():
    return fake_devices.run_worker(__file__)


@pytest.mark.parametrize("name", ["dense", "m_topk", "cats_threshold_gather",
                                  "d_predictor_gather"])
def test_sharded_module_equals_single_device(sharded, name):
    r = sharded[name]
    assert r["y_max_abs"] < 1e-5 and r["kept_equal"], r
    m, d = 96, 32                                         # tiny_model: m rows split in two
    assert r["gate_shard"] == [m // 2, d] and r["eager_shard"] == [m // 2, d], r
    assert r["spec"] == ["model"], r                  # m on "model", d replicated


def test_sharded_countdown_lm_equals_functional(sharded):
    r = sharded["lm"]
    assert r["logits_max_abs"] < 2e-4, r
    assert r["wq_spec"] == [None, None, "model"], r     # heads split (Hkv=2 over model=2)
    assert r["eager_gate_spec"] == [None, "model"], r


if __name__ == "__main__":
    fake_devices.worker_main(_worker)
