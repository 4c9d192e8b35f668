"""ModelConfig.from_hf: 4.x and 5.x config.json forms agree, and refusals name the setting."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import pytest

from countdown_jax.config import ModelConfig, RopeConfig, UnsupportedConfig

LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=100,
             hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
             rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu")

# Published 4.x-style config.json contents of the two real models the project uses.
SMOLLM2_135M = dict(
    architectures=["LlamaForCausalLM"], attention_bias=False, attention_dropout=0.0,
    bos_token_id=1, eos_token_id=2, hidden_act="silu", hidden_size=576,
    initializer_range=0.041666666666666664,
    intermediate_size=1536, is_llama_config=True, max_position_embeddings=8192,
    model_type="llama", num_attention_heads=9, num_hidden_layers=30, num_key_value_heads=3,
    pad_token_id=2, pretraining_tp=1, rms_norm_eps=1e-05, rope_interleaved=False,
    rope_scaling=None, rope_theta=100000, tie_word_embeddings=True,
    torch_dtype="bfloat16", transformers_version="4.42.3", use_cache=True, vocab_size=49152)
GEMMA3_270M = dict(
    architectures=["Gemma3ForCausalLM"], _sliding_window_pattern=6, attention_bias=False,
    attention_dropout=0.0, attn_logit_softcapping=None, bos_token_id=2, eos_token_id=1,
    final_logit_softcapping=None, head_dim=256, hidden_activation="gelu_pytorch_tanh",
    hidden_size=640, initializer_range=0.02, intermediate_size=2048,
    layer_types=["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"] * 5
    + ["full_attention"] + ["sliding_attention"] * 5 + ["full_attention"],
    max_position_embeddings=32768, model_type="gemma3_text", num_attention_heads=4,
    num_hidden_layers=18, num_key_value_heads=1, pad_token_id=0, query_pre_attn_scalar=256,
    rms_norm_eps=1e-06, rope_local_base_freq=10000.0, rope_scaling=None, rope_theta=1000000.0,
    sliding_window=512, torch_dtype="bfloat16", transformers_version="4.55.0.dev0",
    use_bidirectional_attention=False, use_cache=True, vocab_size=262144)


def fields(cfg: ModelConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("hf_config_json")
    return d


def via_transformers(hf: dict) -> dict:
    """The same dict after transformers 5 parsed it and wrote it back (5.x form)."""
    import transformers

    cls = transformers.AutoConfig.for_model(hf["model_type"]).__class__
    kw = {k: v for k, v in hf.items() if k not in ("model_type", "transformers_version")}
    return json.loads(json.dumps(cls(**kw).to_dict(), default=str))


def test_smollm2_config():
    cfg = ModelConfig.from_hf(SMOLLM2_135M)
    assert (cfg.family, cfg.num_layers, cfg.d_model, cfg.d_ff) == ("llama", 30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (9, 3, 64)
    assert cfg.tie_embeddings and cfg.rope == RopeConfig(theta=100000.0)
    assert cfg.sliding_window is None and not any(cfg.layer_sliding)
    assert cfg.attn_scale == 64 ** -0.5 and cfg.embed_scale == 1.0 and cfg.act == "silu"
    assert cfg.eos_token_ids == (2,) and cfg.norm_eps == 1e-5


def test_gemma3_270m_config():
    cfg = ModelConfig.from_hf(GEMMA3_270M)
    assert cfg.family == "gemma3" and cfg.act == "gelu_tanh" and cfg.qk_norm
    assert cfg.sandwich_norm and cfg.norm_offset == 1.0 and cfg.tie_embeddings
    assert cfg.embed_scale == math.sqrt(640) and cfg.attn_scale == 256 ** -0.5
    assert cfg.sliding_window == 512
    assert cfg.layer_sliding == tuple((i + 1) % 6 != 0 for i in range(18))
    assert cfg.rope == RopeConfig(theta=1e6) and cfg.rope_local == RopeConfig(theta=1e4)
    assert cfg.layer_rope(5) == cfg.rope and cfg.layer_rope(0) == cfg.rope_local


@pytest.mark.parametrize("hf", [
    SMOLLM2_135M,
    GEMMA3_270M,
    {k: v for k, v in GEMMA3_270M.items() if k != "layer_types"},  # from the pattern
    {**GEMMA3_270M, "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    {**LLAMA, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}},
    {**LLAMA, "rope_scaling": {"type": "linear", "factor": 2.0}},
    dict(model_type="gemma2", vocab_size=100, hidden_size=64, intermediate_size=128,
         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
         query_pre_attn_scalar=16, sliding_window=8),
    dict(model_type="qwen2", vocab_size=100, hidden_size=64, intermediate_size=128,
         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
         use_sliding_window=True, sliding_window=8, max_window_layers=2, rope_theta=1e6),
    dict(model_type="qwen2", vocab_size=100, hidden_size=64, intermediate_size=128,
         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
         use_sliding_window=False,
         sliding_window=8),
    dict(model_type="mistral", vocab_size=100, hidden_size=64, intermediate_size=128,
         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=None,
         sliding_window=None),
    dict(model_type="phi3", vocab_size=100, hidden_size=64, intermediate_size=128,
         num_hidden_layers=2, num_attention_heads=4, sliding_window=7, rope_scaling=None,
         eos_token_id=[5, 6]),
], ids=["smollm2", "gemma3-270m", "gemma3-pattern", "gemma3-linear", "llama3", "linear",
        "gemma2", "qwen2-sliding", "qwen2-no-sliding", "mistral", "phi3"])
def test_4x_and_5x_forms_agree(hf):
    """A 4.x dict and transformers 5's rewrite of it (rope_parameters etc.) give one config."""
    old = ModelConfig.from_hf(hf)
    new = ModelConfig.from_hf(via_transformers(hf))
    assert fields(old) == fields(new)


def test_layer_and_window_semantics_follow_transformers():
    import transformers

    g2 = ModelConfig.from_hf({"model_type": "gemma2", "vocab_size": 10, "hidden_size": 8,
                              "intermediate_size": 8, "num_hidden_layers": 5,
                              "num_attention_heads": 2, "head_dim": 4})
    ref = transformers.Gemma2Config(num_hidden_layers=5).layer_types
    assert g2.layer_sliding == tuple(t == "sliding_attention" for t in ref)
    assert g2.attn_softcap == 50.0 and g2.final_softcap == 30.0 and g2.sliding_window == 4096
    q = ModelConfig.from_hf({"model_type": "qwen2", "vocab_size": 10, "hidden_size": 8,
                             "intermediate_size": 8, "num_hidden_layers": 4,
                             "num_attention_heads": 2, "use_sliding_window": True,
                             "sliding_window": 3, "max_window_layers": 2})
    assert q.layer_sliding == (False, False, True, True) and q.qkv_bias
    assert ModelConfig.from_hf({**LLAMA, "eos_token_id": [7, 8]}).eos_token_ids == (7, 8)


def test_hashable_static_and_round_trips():
    cfg = ModelConfig.from_hf(GEMMA3_270M)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    assert cfg.to_hf() == GEMMA3_270M
    hash(cfg)
    traced = jax.jit(lambda x, c: x * c.d_model, static_argnums=1)(2, cfg)
    assert int(traced) == 2 * 640


@pytest.mark.parametrize("change,named", [
    (dict(model_type="gpt2"), "model_type 'gpt2'"),
    (dict(architectures=["LlamaForSequenceClassification"]), "architectures"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}), "rope_type 'dynamic'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}), "low_freq_factor"),
    (dict(rope_scaling={"type": "linear"}), "factor"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(hidden_act="relu"), "hidden_act='relu'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(rope_parameters={"rope_theta": 1e4, "rope_type": "default",
                           "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
])
def test_refusals_name_the_setting(change, named):
    with pytest.raises(UnsupportedConfig, match=named.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_hf({**LLAMA, **change})


@pytest.mark.parametrize("hf,named", [
    (dict(model_type="phi3", rope_scaling={"type": "longrope", "short_factor": [1.0],
                                           "long_factor": [1.0]}), "longrope"),
    (dict(model_type="phi3", rope_scaling={"type": "su", "short_factor": [1.0],
                                           "long_factor": [1.0]}), "'su'"),
    (dict(model_type="phi3", partial_rotary_factor=0.75), "partial_rotary_factor"),
    (dict(model_type="gemma3_text", use_bidirectional_attention=True),
     "use_bidirectional_attention"),
    (dict(model_type="gemma3_text", rope_parameters={
        "full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     "full_attention rope_type 'yarn'"),
    (dict(model_type="gemma2", hidden_activation="gelu"), "hidden_activation='gelu'"),
    (dict(model_type="qwen3", attention_bias=True), "attention_bias"),
    (dict(model_type="llama", rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}), "per-layer-type"),
    (dict(model_type="gemma2", layer_types=["full_attention"]), "layer_types"),
])
def test_family_refusals(hf, named):
    base = {k: v for k, v in LLAMA.items() if k not in ("model_type", "architectures",
                                                          "hidden_act")}
    with pytest.raises(UnsupportedConfig, match=named):
        ModelConfig.from_hf({**base, **hf})
