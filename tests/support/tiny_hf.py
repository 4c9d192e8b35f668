"""Tiny random transformers models of every supported family, built locally (no hub).

Weights are redrawn at O(1) scale (HF's 0.02 init gives near-uniform logits, which would
make any parity check easy to pass) and the sliding windows / softcaps are small enough to
change the result on the short prompts the tests use.
"""

from __future__ import annotations

import os

import numpy as np

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)

# name -> (transformers config class, model class, config overrides)
VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", "LlamaForCausalLM", dict(
        tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        use_sliding_window=True, sliding_window=5, max_window_layers=1,
        tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        sliding_window=4, attn_logit_softcapping=2.0, final_logit_softcapping=4.0,
        query_pre_attn_scalar=24, hidden_activation="gelu_pytorch_tanh")),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        sliding_window=4, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(sliding_window=5)),
}


def build(variant: str, seed: int = 0, **overrides):
    """A float32 eager-attention transformers model with O(1)-scale random weights."""
    import torch
    import transformers

    cfg_cls, model_cls, extra = VARIANTS[variant]
    kw = {**BASE, **extra, **overrides}
    config = getattr(transformers, cfg_cls)(**kw)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval().to(torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norm scales (Gemma: w in 1+w) and biases
                base = 0.0 if "gemma" in variant or "bias" in name else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1]
                scale = 1.0 if "embed" in name else fan_in ** -0.5
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def save(model, path, *, shard_size: str | None = None, fmt: str = "safetensors"):
    """save_pretrained (safetensors, optionally sharded) or a torch .bin state dict."""
    import torch

    os.makedirs(path, exist_ok=True)
    if fmt == "safetensors":
        kw = {"max_shard_size": shard_size} if shard_size else {}
        model.save_pretrained(path, **kw)
    elif fmt == "bin":
        model.config.save_pretrained(path)
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            sd.pop("lm_head.weight", None)
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
    else:
        raise ValueError(fmt)
    return path


def reference_logits(model, tokens: np.ndarray) -> np.ndarray:
    """float32 logits [T, V] of one unpadded sequence."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens[None], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()
