"""The JAX decoder against transformers (float32, eager attention) for every family.

Each tiny model is saved with save_pretrained, read back with read_hf_checkpoint and
converted with ModelConfig.from_hf + hf_to_params; then a batch of two right-padded prompts
of different lengths is prefilled and decoded for 5 steps through the KV cache, and every
valid position is compared with transformers on the unpadded sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conversion.hf_dir import read_hf_checkpoint
from conversion.names import hf_to_params
from countdown_jax import model as M
from countdown_jax.config import ModelConfig, RopeConfig
from tests.support import tiny_hf

TOL = 1e-4
LENS = (10, 6)  # right-padded batch: longer than every sliding window (4-5)
T_PAD = 10
N_DECODE = 5
MAX_LEN = 32

prefill = jax.jit(M.prefill, static_argnames=("cfg", "spec"))
decode_step = jax.jit(M.decode_step, static_argnames=("cfg", "spec"))
forward = jax.jit(M.forward, static_argnames=("cfg", "spec"))


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """variant -> (hf model, cfg, params, sequences, reference logits per sequence)."""
    out = {}
    rng = np.random.default_rng(0)
    for variant in tiny_hf.VARIANTS:
        hf_model = tiny_hf.build(variant)
        path = tiny_hf.save(hf_model, str(tmp_path_factory.mktemp(variant)))
        hf_config, tensors = read_hf_checkpoint(path, progress=False)
        cfg = ModelConfig.from_hf(hf_config)
        params = hf_to_params(cfg, tensors, np.float32, progress=False)
        seqs = [rng.integers(3, cfg.vocab_size, size=n + N_DECODE).astype(np.int32) for n in LENS]
        refs = [tiny_hf.reference_logits(hf_model, s) for s in seqs]
        out[variant] = (hf_model, cfg, params, seqs, refs)
    return out


def run_cached(cfg, params, seqs):
    """Prefill the padded prompts then decode N_DECODE tokens; logits per row, per position."""
    toks = np.zeros((len(LENS), T_PAD), np.int32)
    for b, n in enumerate(LENS):
        toks[b, :n] = seqs[b][:n]
    cache = M.init_cache(cfg, len(LENS), MAX_LEN)
    logits, cache, kept = prefill(params, cfg, jnp.asarray(toks), jnp.asarray(LENS), cache)
    assert logits.shape == (len(LENS), T_PAD, cfg.vocab_size) and logits.dtype == jnp.float32
    assert kept.shape == (cfg.num_layers, len(LENS), T_PAD)
    rows = [[np.asarray(logits[b, :n])] for b, n in enumerate(LENS)]
    pos = np.array(LENS, np.int32)
    for j in range(N_DECODE):
        tok = np.array([seqs[b][pos[b]] for b in range(len(LENS))], np.int32)
        lg, cache, kept = decode_step(params, cfg, jnp.asarray(tok), jnp.asarray(pos), cache)
        assert lg.shape == (len(LENS), cfg.vocab_size) and kept.shape == (cfg.num_layers, 2)
        for b in range(len(LENS)):
            rows[b].append(np.asarray(lg[b])[None])
        pos = pos + 1
    return [np.concatenate(r) for r in rows]


def forward_error(cfg, params, seqs, refs):
    """No-cache forward over both full sequences (one compile per config)."""
    n = min(len(s) for s in seqs)
    toks = jnp.asarray(np.stack([s[:n] for s in seqs]))
    logits, _ = forward(params, cfg, toks, jnp.asarray([n] * len(seqs)))
    return max(rel(logits[b], refs[b][:n]) for b in range(len(seqs)))


@pytest.mark.parametrize("variant", list(tiny_hf.VARIANTS))
def test_prefill_and_decode_match_transformers(converted, variant):
    _, cfg, params, seqs, refs = converted[variant]
    ours = run_cached(cfg, params, seqs)
    errs = [rel(o, r) for o, r in zip(ours, refs)]
    # decode steps alone, too (the prefill part could hide a cache bug in the average)
    dec = [rel(o[n:], r[n:]) for o, r, n in zip(ours, refs, LENS)]
    print(f"{variant}: max rel err {max(errs):.2e} (decode {max(dec):.2e})")
    assert max(errs) <= TOL and max(dec) <= TOL, (errs, dec)


@pytest.mark.parametrize("variant", ["llama", "gemma2"])
def test_forward_matches_transformers(converted, variant):
    _, cfg, params, seqs, refs = converted[variant]
    n = N_DECODE + min(LENS)
    toks = jnp.asarray(np.stack([s[:n] for s in seqs]))
    logits, kept = forward(params, cfg, toks, jnp.asarray([n, n]))
    assert kept.shape == (cfg.num_layers, 2, n)
    for b in range(2):
        assert rel(logits[b], refs[b][:n]) <= TOL
    # right padding: the padded row's valid prefix is unaffected
    logits, _ = forward(params, cfg, toks, jnp.asarray([n, 4]))
    assert rel(logits[1, :4], refs[1][:4]) <= TOL


def test_tied_and_untied_heads(converted):
    for variant, tied in (("llama", False), ("llama_tied", True), ("gemma3", True)):
        _, cfg, params, _, _ = converted[variant]
        assert cfg.tie_embeddings is tied
        assert ("lm_head" in params) is (not tied)


# Each feature must change the answer on these inputs, else the parity test above could not
# catch it being wrong. Switching one off must push the error well above the tolerance.
ABLATIONS = [
    ("mistral", dict(layer_sliding=(False,) * 3)),
    ("gemma3", dict(layer_sliding=(False,) * 3)),
    ("gemma2", dict(attn_softcap=None)),
    ("gemma2", dict(final_softcap=None)),
    ("llama3_rope", dict(rope=RopeConfig(theta=10000.0))),
    ("gemma3", dict(rope=RopeConfig(theta=1e6))),  # linear scaling of global layers
    ("gemma3", dict(rope_local=RopeConfig(theta=1e6))),  # local base (100) on sliding layers
    ("gemma3", dict(embed_scale=1.0)),
    ("gemma2", dict(attn_scale=16 ** -0.5)),  # query_pre_attn_scalar, not head_dim
]


@pytest.mark.parametrize("variant,change", ABLATIONS,
                         ids=[f"{v}-{next(iter(c))}" for v, c in ABLATIONS])
def test_each_feature_matters(converted, variant, change):
    _, cfg, params, seqs, refs = converted[variant]
    assert forward_error(cfg, params, seqs, refs) <= TOL
    wrong = dataclasses.replace(cfg, **change)
    assert forward_error(wrong, params, seqs, refs) > 10 * TOL


def test_bfloat16_params_run_close(converted):
    """bf16 compute (params dtype) stays near the float32 oracle; logits come out float32."""
    _, cfg, params, seqs, refs = converted["gemma3"]
    p16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    n = min(len(s) for s in seqs)
    logits, _ = forward(p16, cfg, jnp.asarray(np.stack([s[:n] for s in seqs])),
                        jnp.asarray([n, n]))
    assert logits.dtype == jnp.float32
    err = max(rel(logits[b], refs[b][:n]) for b in range(2))
    assert 1e-4 < err < 5e-2  # really ran in bf16, and still close


def test_policy_sliced_per_layer_and_sparse_defaults(converted, monkeypatch):
    """The scan hands layer l its policy slice and the documented sparse flags to ffn
    (decode: None, i.e. every token follows the spec; prefill / forward: bool flags)."""
    _, cfg, params, seqs, _ = converted["llama"]
    from countdown_jax.ffn import dense_ffn
    from countdown_jax.gated import layer_weights
    from countdown_jax.policy import SparseSpec

    def fake_ffn(mlp, x, *, act, spec, policy, sparse, layer):
        if sparse is None:
            sparse = jnp.ones(x.shape[:-1], bool)
        assert sparse.dtype == jnp.bool_ and sparse.shape == x.shape[:-1]
        assert mlp["gate"].shape[0] == cfg.num_layers     # the stack, read in place
        kept = jnp.broadcast_to(policy["r"], x.shape[:-1]) + sparse.astype(jnp.float32)
        return dense_ffn(layer_weights(mlp, layer), x, act), kept

    monkeypatch.setattr(M, "ffn", fake_ffn)
    spec = SparseSpec(method="cats", mode="ideal")
    policy = {"r": jnp.array([0.25, 0.5, 0.75], jnp.float32)}
    toks = jnp.asarray(np.stack([s[:6] for s in seqs]))
    cache = M.init_cache(cfg, 2, MAX_LEN)
    _, cache, kept = M.prefill(params, cfg, toks, jnp.asarray([6, 6]), cache, spec=spec,
                               policy=policy)
    np.testing.assert_allclose(kept, np.broadcast_to(np.array([.25, .5, .75])[:, None, None],
                                                     (3, 2, 6)))  # prompt runs dense
    _, _, kept = M.decode_step(params, cfg, toks[:, 0], jnp.asarray([6, 6]), cache, spec=spec,
                               policy=policy)
    np.testing.assert_allclose(kept, np.array([[1.25] * 2, [1.5] * 2, [1.75] * 2]))
    _, kept = M.forward(params, cfg, toks, spec=spec, policy=policy,
                        sparse=jnp.asarray(np.arange(6)[None].repeat(2, 0) >= 3))
    np.testing.assert_allclose(kept[0, 0], [.25] * 3 + [1.25] * 3)
    with pytest.raises(ValueError, match="leading layer axis"):
        M.forward(params, cfg, toks, spec=spec, policy={"r": jnp.zeros(2)})


def test_decode_refuses_position_outside_cache(converted):
    _, cfg, params, _, _ = converted["llama"]
    cache = M.init_cache(cfg, 1, 8)
    with pytest.raises(ValueError, match="outside the cache"):
        M.decode_step(params, cfg, jnp.asarray([5]), jnp.asarray([8]), cache)
    with pytest.raises(ValueError, match="exceeds the cache"):
        M.prefill(params, cfg, jnp.zeros((1, 9), jnp.int32), jnp.asarray([9]), cache)


def test_config_is_a_valid_static_jit_argument(converted):
    _, cfg, params, seqs, refs = converted["qwen3"]
    again = ModelConfig.from_hf(cfg.to_hf())
    assert again == cfg and hash(again) == hash(cfg) and again is not cfg
    # an equal config rebuilt from its HF dict is the same static arg: no retrace
    traces = []

    def counted(params, cfg, toks):
        traces.append(cfg)
        return M.forward(params, cfg, toks)

    f = jax.jit(counted, static_argnames=("cfg",))
    toks = jnp.asarray(np.stack([s[:5] for s in seqs]))
    f(params, cfg, toks)
    f(params, again, toks)
    assert len(traces) == 1

