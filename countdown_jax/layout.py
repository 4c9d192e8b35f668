"""The params pytree: the one place its layout is written down.

Every leaf under ``layers`` is stacked over the layer axis L (axis 0) so the decoder runs
as one ``lax.scan`` over layers and a per-layer policy pytree (thresholds, predictors)
slices the same way.

    params = {
      "embed":      [V, d]            token embeddings (also the head when tied)
      "final_norm": [d]               RMSNorm scale (Gemma's 1+w already folded in)
      "lm_head":    [d, V]            only when the checkpoint's head is untied
      "layers": {
        "attn_norm":      [L, d]
        "wq":             [L, d, Hq, hd]     einsum-ready: x @ wq -> [.., Hq, hd]
        "wk", "wv":       [L, d, Hkv, hd]
        "wo":             [L, Hq, hd, d]
        "bq":             [L, Hq, hd]        optional (Qwen2 qkv bias); "bk", "bv": [L, Hkv, hd]
        "q_norm","k_norm":[L, hd]            optional (Qwen3, Gemma 3)
        "post_attn_norm": [L, d]             optional (Gemma 2/3 sandwich norms)
        "mlp_norm":       [L, d]             pre-FFN norm (HF post_attention_layernorm for
                                             Llama-likes, pre_feedforward_layernorm for Gemma)
        "post_mlp_norm":  [L, d]             optional (Gemma 2/3)
        "mlp": {
          "gate": [L, m, d]    row i = neuron i of W_gate   (HF gate_proj.weight, unchanged)
          "up":   [L, m, d]    row i = neuron i of W_up     (HF up_proj.weight, unchanged)
          "down": [L, m, d]    row i = column i of W_down   (HF down_proj.weight TRANSPOSED)
        }
      }
    }

Why row-per-neuron for all three MLP matrices: skipping neuron i skips row i of each, so a
sparse gather reads contiguous rows (d elements) and one index list serves gate, up and down.

Norm scales are stored as the multiplier actually applied (Gemma's ``1 + w`` is folded in
at conversion), so one RMSNorm serves every family.
"""

from __future__ import annotations

MLP_KEYS = ("gate", "up", "down")
