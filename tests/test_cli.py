"""`countdown-jax generate` and the library entry point on the real SmolLM2-135M."""

from __future__ import annotations

import json

import numpy as np
import pytest

from countdown_jax import cli

pytestmark = pytest.mark.slow


def run_json(capsys, *args):
    assert cli.main(["generate", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_json_dense_and_sparse(capsys, smollm2_dir):
    dense = run_json(capsys, smollm2_dir, "--prompt", "The capital of France is",
                     "--max-new-tokens", 6)
    assert dense["text"].startswith(" Paris")
    assert len(dense["token_ids"]) == 6 and dense["realised_sparsity"] == 0.0
    assert dense["tokens_per_s"] > 0
    sparse = run_json(capsys, smollm2_dir, "--prompt", "The capital of France is",
                      "--max-new-tokens", 6, "--method", "m_countdown", "--mode", "ideal",
                      "--sparsity", 0.5)
    # ideal mode drops int(m r) neurons of every decode token in every layer
    assert sparse["realised_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert len(sparse["realised_sparsity_per_layer"]) == 30
    assert sparse["token_ids"][0] == dense["token_ids"][0]   # first token: dense prefill


def test_generate_errors(capsys, smollm2_dir):
    assert cli.main(["generate", str(smollm2_dir), "--prompt", "x", "--method", "cats",
                     "--sparsity", "1.0"]) == 2
    assert "sparsity must be in [0, 1)" in capsys.readouterr().err
    assert cli.main(["generate", str(smollm2_dir), "--prompt", "x", "--method", "d_countdown",
                     "--mode", "predictor", "--sparsity", "0.37"]) == 2
    assert "needs a trained predictor" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["generate", str(smollm2_dir), "--prompt", "x", "--method", "nope"])


def test_readme_library_example(smollm2_dir):
    import countdown_jax as cj

    model = cj.load(smollm2_dir)
    out = cj.generate_text(model, ["The capital of France is", "Water boils at"],
                           method="d_countdown", mode="ideal", sparsity=0.7,
                           max_new_tokens=5)
    assert len(out.texts) == 2 and all(len(ids) == 5 for ids in out.token_ids)
    assert out.realised_sparsity == pytest.approx(0.7, abs=2e-3)
    assert np.all(out.realised_sparsity_per_layer > 0.69)


def test_generate_with_pallas_attention_matches_xla(capsys, smollm2_dir, pallas_interpret):
    """The decode-attention kernel (interpret mode on CPU) on the real model: 9 query heads
    in 3 groups of 3, head size 64; same greedy tokens as XLA's attention."""
    base = ["--prompt", "The capital of France is", "--max-new-tokens", 5,
            "--method", "m_countdown", "--sparsity", 0.5]
    xla = run_json(capsys, smollm2_dir, *base)
    pal = run_json(capsys, smollm2_dir, *base, "--attention", "pallas")
    assert pal["token_ids"] == xla["token_ids"]
    assert pal["realised_sparsity"] == pytest.approx(xla["realised_sparsity"], abs=1e-6)
