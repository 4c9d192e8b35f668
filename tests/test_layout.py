"""The params layout is declared once (countdown_jax/layout.py); random params, the
sharding specs and the converter's HF shape checks derive from it. Checked here against
shapes written out independently (what each of those places wrote by hand before)."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conversion.names import TABLES
from countdown_jax import layout, sharding
from tests.support import tiny_params


def _configs():
    _, cfg = tiny_params.tiny_model()
    full = dataclasses.replace(cfg, qkv_bias=True, qk_norm=True, sandwich_norm=True,
                               tie_embeddings=False)
    return {"llama_tied": cfg, "everything": full}


@pytest.mark.parametrize("name", ["llama_tied", "everything"])
def test_random_params_and_specs_follow_the_declaration(name):
    cfg = _configs()[name]
    L, d, m, V = cfg.num_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
    H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    want = {"embed": (V, d), "final_norm": (d,),
            "layers": {"attn_norm": (L, d), "mlp_norm": (L, d), "wq": (L, d, H, hd),
                       "wk": (L, d, K, hd), "wv": (L, d, K, hd), "wo": (L, H, hd, d),
                       "mlp": {k: (L, m, d) for k in ("gate", "up", "down")}}}
    if name == "everything":
        want["lm_head"] = (d, V)
        want["layers"].update(bq=(L, H, hd), bk=(L, K, hd), bv=(L, K, hd), q_norm=(L, hd),
                              k_norm=(L, hd), post_attn_norm=(L, d), post_mlp_norm=(L, d))
    assert layout.param_shapes(cfg) == want
    params = layout.random_params(cfg, jax.random.key(0))
    assert jax.tree.map(lambda a: tuple(a.shape), params) == want
    # norms around 1, weights at fan-in scale (down: 1/sqrt(m))
    assert abs(float(np.mean(params["final_norm"])) - 1.0) < 0.1
    assert abs(float(np.std(params["layers"]["mlp"]["down"])) * np.sqrt(m) - 1.0) < 0.1
    specs = sharding.param_specs(cfg, sharding.make_mesh(1, 1))
    flat_p, tree_p = jax.tree.flatten(params)
    flat_s, tree_s = jax.tree.flatten(specs, is_leaf=lambda x: isinstance(x, P))
    assert tree_p == tree_s
    assert all(len(s) == a.ndim for s, a in zip(flat_s, flat_p))
    assert specs["layers"]["mlp"]["gate"] == P(None, sharding.MODEL, None)


def test_mlp_logical_axes():
    assert layout.mlp_logical_axes() == {k: ("mlp", "embed") for k in ("gate", "up", "down")}
    assert layout.mlp_logical_axes(stacked=True)["down"] == ("layers", "mlp", "embed")


@pytest.mark.parametrize("family", sorted(TABLES))
def test_converter_shapes_follow_the_declaration(family):
    _, cfg = tiny_params.tiny_model()
    cfg = dataclasses.replace(cfg, family=family, qkv_bias=True, qk_norm=True,
                              sandwich_norm=True, tie_embeddings=False)
    d, m, V = cfg.d_model, cfg.d_ff, cfg.vocab_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    want = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,),
            "lm_head.weight": (V, d), "self_attn.q_proj.weight": (q, d),
            "self_attn.k_proj.weight": (kv, d), "self_attn.v_proj.weight": (kv, d),
            "self_attn.qkv_proj.weight": (q + 2 * kv, d), "self_attn.o_proj.weight": (d, q),
            "self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
            "self_attn.v_proj.bias": (kv,), "self_attn.q_norm.weight": (cfg.head_dim,),
            "self_attn.k_norm.weight": (cfg.head_dim,), "mlp.gate_proj.weight": (m, d),
            "mlp.up_proj.weight": (m, d), "mlp.gate_up_proj.weight": (2 * m, d),
            "mlp.down_proj.weight": (d, m)}
    for rule in TABLES[family]:
        key = rule.hf.replace("model.layers.{i}.", "")
        expect = want.get(key, (d,) if key.endswith("layernorm.weight") else None)
        assert rule.when(cfg), rule.hf
        assert rule.shape(cfg) == expect, rule.hf
    plain = dataclasses.replace(cfg, tie_embeddings=True, qkv_bias=False)
    off = {r.hf for r in TABLES[family] if not r.when(plain)}
    assert "lm_head.weight" in off
    assert {r.hf for r in TABLES[family] if r.hf.endswith("_proj.bias")} <= off
