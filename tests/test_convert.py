"""`countdown-jax convert` end to end: HF directory and GGUF in, loadable model dir out."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conversion.checkpoint import load_model
from conversion.hf_dir import read_hf_checkpoint
from conversion.names import hf_to_params
from countdown_jax import cli
from countdown_jax import model as M
from tests.support import real_models as rm
from tests.support import tiny_hf


def _layout_shapes(cfg):
    L, d, m, V = cfg.num_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
    H, K, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    shapes = {
        "embed": (V, d), "final_norm": (d,),
        "layers/attn_norm": (L, d), "layers/mlp_norm": (L, d),
        "layers/wq": (L, d, H, hd), "layers/wk": (L, d, K, hd), "layers/wv": (L, d, K, hd),
        "layers/wo": (L, H, hd, d),
        "layers/mlp/gate": (L, m, d), "layers/mlp/up": (L, m, d), "layers/mlp/down": (L, m, d),
    }
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (d, V)
    if cfg.qk_norm:
        shapes["layers/q_norm"] = shapes["layers/k_norm"] = (L, hd)
    if cfg.sandwich_norm:
        shapes["layers/post_attn_norm"] = shapes["layers/post_mlp_norm"] = (L, d)
    return shapes


def _flat(params):
    return {"/".join(k.key for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_layout(params, cfg, dtype):
    flat = _flat(params)
    assert {k: tuple(v.shape) for k, v in flat.items()} == _layout_shapes(cfg)
    assert all(v.dtype == jnp.dtype(dtype) for v in flat.values())


def _tiny_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in "the capital of france is paris a an".split():
        vocab[w] = len(vocab)
    assert len(vocab) <= vocab_size
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", unk_token="<unk>").save_pretrained(str(path))


@pytest.mark.parametrize("variant", ["llama", "gemma3"])
def test_cli_converts_tiny_hf_dir(tmp_path, variant):
    model = tiny_hf.build(variant, seed=2)
    src = tiny_hf.save(model, tmp_path / "src")
    _tiny_tokenizer(src, model.config.vocab_size)

    assert cli.main(["convert", str(src), str(tmp_path / "f32"), "--dtype", "float32"]) == 0
    params, cfg, hf_cfg = load_model(tmp_path / "f32")
    assert hf_cfg == json.loads((src / "config.json").read_text())
    _assert_layout(params, cfg, "float32")
    # Exactly the name table's output on the source tensors.
    ref = hf_to_params(cfg, read_hf_checkpoint(str(src), progress=False)[1], np.float32,
                       progress=False, as_jax=False)
    for k, v in _flat(ref).items():
        np.testing.assert_array_equal(np.asarray(_flat(params)[k]), v, err_msg=k)
    # The model directory runs and agrees with the source model.
    tokens = np.array([1, 5, 9, 4, 7, 30, 2, 11], np.int32)
    ours, _ = M.forward(params, cfg, jnp.asarray(tokens[None]))
    np.testing.assert_allclose(np.asarray(ours[0]), tiny_hf.reference_logits(model, tokens),
                               rtol=1e-4, atol=1e-4)
    # Tokenizer files travelled with it.
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "f32" / "tokenizer"))
    assert tok.encode("the capital of france", add_special_tokens=False) == [4, 5, 6, 7]

    assert cli.main(["convert", str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    p16, _, _ = load_model(tmp_path / "bf16")
    _assert_layout(p16, cfg, "bfloat16")
    for k, v in _flat(params).items():
        np.testing.assert_array_equal(np.asarray(_flat(p16)[k]), np.asarray(v.astype(jnp.bfloat16)))


def test_cli_errors(tmp_path, capsys):
    def run(*argv):
        rc = cli.main(["convert", *map(str, argv)])
        return rc, capsys.readouterr().err

    rc, err = run(tmp_path / "absent", tmp_path / "out")
    assert rc == 2 and "conversion source not found" in err
    txt = tmp_path / "notes.txt"
    txt.write_text("not a model")
    rc, err = run(txt, tmp_path / "out")
    assert rc == 2 and "neither a Hugging Face checkpoint directory nor a GGUF file" in err
    rc, err = run(tmp_path, tmp_path / "out")  # a directory without config.json
    assert rc == 2 and "config.json" in err

    src = tiny_hf.save(tiny_hf.build("llama"), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    rc, err = run(src, tmp_path / "out")
    assert rc == 2 and "model_type 'gpt2'" in err
    assert not (tmp_path / "out").exists()

    (src / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    rc, err = run(src, tmp_path / "full")
    assert rc == 2 and "not empty" in err
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    rc, err = run(src, tmp_path / "full", "--force")  # never replaces what it did not write
    assert rc == 2 and "not a model directory" in err
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    with pytest.raises(SystemExit):
        cli.main(["convert", str(src), str(tmp_path / "o2"), "--dtype", "float16"])


@pytest.mark.slow
def test_cli_converts_smollm2_gguf(tmp_path, smollm2_dir):
    out = tmp_path / "smollm2-bf16"
    assert cli.main(["convert", str(rm.smollm2_gguf()), str(out), "--dtype", "bfloat16"]) == 0
    params, cfg, _ = load_model(out)
    assert (cfg.family, cfg.num_layers, cfg.d_model, cfg.d_ff) == ("llama", 30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.tie_embeddings and cfg.rope.theta == 1e5
    _assert_layout(params, cfg, "bfloat16")
    # Same weights as the cached float32 conversion, rounded to bfloat16.
    p32, _, _ = load_model(smollm2_dir)
    for k, v in _flat(p32).items():
        np.testing.assert_array_equal(np.asarray(_flat(params)[k]),
                                      np.asarray(v.astype(jnp.bfloat16)), err_msg=k)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    text = "The capital of France is Paris."
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    assert len(tok) == cfg.vocab_size
