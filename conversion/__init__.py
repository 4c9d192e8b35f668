"""Checkpoint conversion: HF directories / GGUF files -> params pytree + ModelConfig."""
