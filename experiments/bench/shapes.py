"""The paper models' shapes, in one place: MLP shapes (d, m, activation) for the kernel
benchmark and the Llama-3.1-8B decoder config (HF config.json keys) for the decode,
attention and projection benchmarks. Weights are always random: only shapes matter."""

from __future__ import annotations

from typing import NamedTuple

LLAMA_3_1_8B = dict(
    model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
    rope_theta=500000.0, hidden_act="silu", tie_word_embeddings=False,
    max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)

# CPU smoke runs of the decode benchmarks: Llama's layout at toy sizes
TINY_DECODER = dict(LLAMA_3_1_8B, vocab_size=512, hidden_size=64, intermediate_size=256,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16)


class MLPShape(NamedTuple):
    d: int        # model width
    m: int        # MLP neurons
    act: str      # gate activation (countdown_jax.ffn.activation name)


MLP_SHAPES = {
    "llama-3.1-8b": MLPShape(LLAMA_3_1_8B["hidden_size"], LLAMA_3_1_8B["intermediate_size"],
                             "silu"),
    "gemma-2-9b": MLPShape(3584, 14336, "gelu_tanh"),
    "qwen2.5-14b": MLPShape(5120, 13824, "silu"),
    "phi-4": MLPShape(5120, 17920, "silu"),
}
