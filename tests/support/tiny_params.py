"""A tiny random decoder (params pytree + ModelConfig) built directly in JAX: no torch,
no conversion, for fast tests of calibration, predictors and evaluation.

Weights are O(1)-scale (fan-in scaled) so logits and MLP coefficients are far from
uniform, and the sparsity rules have something to select.
"""

from __future__ import annotations

import numpy as np

from countdown_jax.config import ModelConfig

HF = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=97,
          hidden_size=32, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
          num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=10000.0,
          hidden_act="silu", tie_word_embeddings=True, max_position_embeddings=512,
          bos_token_id=1, eos_token_id=2, pad_token_id=0)
# The decoder the fake-device sharding tests split (test_sharding, test_sharding_kernels):
# 2 layers, an untied head, a vocabulary that is not a power of two.
MESH_HF = {**HF, "vocab_size": 98, "num_hidden_layers": 2, "tie_word_embeddings": False,
           "max_position_embeddings": 64}


def tiny_model(seed: int = 0, **overrides):
    cfg = ModelConfig.from_hf({**HF, **overrides})
    rng = np.random.default_rng(seed)
    L, d, m, V = cfg.num_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
    H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def w(*shape, fan_in):
        return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)

    params = {
        "embed": rng.standard_normal((V, d)).astype(np.float32),
        "final_norm": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
        "layers": {
            "attn_norm": (1 + 0.1 * rng.standard_normal((L, d))).astype(np.float32),
            "wq": w(L, d, H, hd, fan_in=d),
            "wk": w(L, d, K, hd, fan_in=d),
            "wv": w(L, d, K, hd, fan_in=d),
            "wo": w(L, H, hd, d, fan_in=H * hd),
            "mlp_norm": (1 + 0.1 * rng.standard_normal((L, d))).astype(np.float32),
            "mlp": {"gate": w(L, m, d, fan_in=d), "up": w(L, m, d, fan_in=d),
                    "down": w(L, m, d, fan_in=m)},
        },
    }
    return params, cfg


def byte_tokenizer(out_dir):
    """A byte-level tokenizer with no merges (vocabulary 259: pad, bos, eos, 256 bytes),
    saved where ``api.load_tokenizer`` reads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({c: 3 + i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(out_dir))
    return out_dir


def model_dir(out_dir, seed: int = 0):
    """A model directory (``api.load`` / the CLI read it) of the tiny decoder, with the
    byte tokenizer: vocabulary 259."""
    from pathlib import Path

    from conversion.checkpoint import save_model

    out_dir = Path(out_dir)
    hf = {**HF, "vocab_size": 259}
    params, _ = tiny_model(seed, vocab_size=259)
    tok = byte_tokenizer(out_dir.parent / f".{out_dir.name}-tokenizer")
    return save_model(out_dir, params, hf, tokenizer_dir=tok)
