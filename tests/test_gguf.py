"""GGUF reading: tensors and config against transformers' own GGUF loader, clear errors.

Real files: SmolLM2-135M (llama, Q4_1/Q8_0) and Gemma-3-270M (gemma3, Q4_K/Q5_0/Q6_K/Q8_0).
Synthetic float32 GGUFs written here the way llama.cpp's converter writes them cover the
families without a real file (qwen2, qwen3, gemma2) and llama's RoPE permutation exactly.
"""

import dataclasses

import numpy as np
import pytest

from conversion import gguf_io
from conversion.names import hf_to_params
from countdown_jax.config import ModelConfig
from tests.support import real_models as rm


def _semantics(cfg: ModelConfig) -> ModelConfig:
    """Everything but the stored JSON text (which differs in irrelevant keys). GGUF keeps
    the norm epsilon in float32; we hand out its shortest decimal (1e-06), transformers the
    widened float32 (9.999999974752427e-07): compare at float32 precision."""
    return dataclasses.replace(cfg, hf_config_json="{}", norm_eps=float(np.float32(cfg.norm_eps)))


def _oracle_config(hf_model) -> dict:
    d = hf_model.config.to_dict()
    d["architectures"] = [type(hf_model).__name__]
    return d


def _assert_params_equal(ours, ref, path=""):
    if isinstance(ref, dict):
        assert set(ours) == set(ref), path
        for k in ref:
            _assert_params_equal(ours[k], ref[k], f"{path}/{k}")
    else:
        a, b = np.asarray(ours), np.asarray(ref)
        assert a.dtype == b.dtype and a.shape == b.shape, path
        np.testing.assert_array_equal(a, b, err_msg=path)


# -- real files ------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_tensors_match_transformers_gguf_loader(smollm2_hf):
    cfg, tensors = gguf_io.read_gguf(rm.smollm2_gguf(), progress=False)
    ref = {k: v.numpy() for k, v in smollm2_hf.state_dict().items()}
    assert cfg["tie_word_embeddings"] and "lm_head.weight" not in tensors
    ref_tied = ref.pop("lm_head.weight")
    np.testing.assert_array_equal(ref_tied, ref["model.embed_tokens.weight"])
    assert set(tensors) == set(ref)
    for k, v in tensors.items():
        assert v.dtype == np.float32 and v.shape == ref[k].shape, k
        np.testing.assert_array_equal(v, ref[k], err_msg=k)
    # The config dict means the same model as transformers' config.
    assert _semantics(ModelConfig.from_hf(cfg)) == _semantics(
        ModelConfig.from_hf(_oracle_config(smollm2_hf)))
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == (49152, 576, 30)


@pytest.mark.slow
@pytest.mark.parametrize("name", [rm.SMOLLM2, rm.GEMMA3])
def test_converted_params_match_transformers_gguf_loader(name, request):
    """Whole chain (our reader + name table) vs transformers' GGUF load + the same table."""
    from conversion.checkpoint import load_model

    model_dir = request.getfixturevalue(f"{name}_dir")
    hf = request.getfixturevalue(f"{name}_hf")
    params, cfg, hf_cfg = load_model(model_dir)
    assert _semantics(cfg) == _semantics(ModelConfig.from_hf(_oracle_config(hf)))
    ref = hf_to_params(cfg, {k: v.numpy() for k, v in hf.state_dict().items()}, np.float32,
                       progress=False, as_jax=False)
    _assert_params_equal(params, ref)
    if name == rm.GEMMA3:
        assert cfg.qk_norm and cfg.sandwich_norm and cfg.act == "gelu_tanh"
        assert cfg.layer_sliding == tuple((i + 1) % 6 != 0 for i in range(18))
        assert (cfg.sliding_window, cfg.rope.theta, cfg.rope_local.theta) == (512, 1e6, 1e4)


# -- errors ----------------------------------------------------------------------------------
def test_not_a_gguf(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_text("hello, I am a text file")
    with pytest.raises(gguf_io.GGUFError, match="is not a GGUF file"):
        gguf_io.read_gguf(p)
    p.write_bytes(b"")
    with pytest.raises(gguf_io.GGUFError, match="is not a GGUF file"):
        gguf_io.read_gguf(p)
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        gguf_io.read_gguf(tmp_path / "absent.gguf")


def test_broken_header(tmp_path):
    p = tmp_path / "broken.gguf"
    p.write_bytes(b"GGUF" + np.uint32(99).tobytes() + b"\0" * 64)  # unknown version
    with pytest.raises(gguf_io.GGUFError, match="damaged or truncated"):
        gguf_io.read_gguf(p)
    # Valid start, then a key/value count far beyond the data.
    p.write_bytes(b"GGUF" + np.uint32(3).tobytes() + np.uint64(1).tobytes()
                  + np.uint64(10**6).tobytes() + b"\x05\0\0\0")
    with pytest.raises(gguf_io.GGUFError, match="damaged or truncated"):
        gguf_io.read_gguf(p)


def test_truncated_file(tmp_path):
    from tests.support import tiny_hf

    src = tmp_path / "whole.gguf"
    _write_like_llama_cpp(src, "qwen3", tiny_hf.build("qwen3", seed=0))
    data = src.read_bytes()
    for cut, where in ((len(data) - 1000, "tensor_data"), (300, "header")):
        p = tmp_path / f"cut-{where}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(gguf_io.GGUFError, match="truncated"):
            gguf_io.read_gguf(p, progress=False)


def test_unsupported_architecture(tmp_path):
    import gguf

    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    _finish(w)
    with pytest.raises(gguf_io.GGUFError, match="unsupported GGUF architecture 'gpt2'"):
        gguf_io.read_gguf(p)


# -- synthetic GGUFs, written the way llama.cpp's convert_hf_to_gguf.py writes them -----------
_TO_GGUF = {  # HF suffix -> GGUF name
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}


def _finish(w):
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_name(hf: str, gemma: bool) -> str:
    if hf.startswith("model.layers."):
        _, _, i, rest = hf.split(".", 3)
        stem, kind = rest.rsplit(".", 1)
        if stem == "post_attention_layernorm":
            g = "post_attention_norm" if gemma else "ffn_norm"
        else:
            g = _TO_GGUF[stem]
        return f"blk.{i}.{g}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
            "output_norm.weight", "lm_head.weight": "output.weight"}[hf]


def _write_like_llama_cpp(path, arch: str, model, extra=None):
    import gguf

    c = model.config
    gemma = arch.startswith("gemma")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    w.add_pad_token_id(c.pad_token_id)
    rope = c.rope_parameters
    if arch == "gemma3":
        w.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        w.add_sliding_window(c.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in c.layer_types])
    else:
        w.add_rope_freq_base(rope["rope_theta"])
    if arch == "llama":
        w.add_rope_dimension_count(c.head_dim)
    if arch == "gemma2":
        w.add_sliding_window(c.sliding_window)
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight")
    for name, t in sd.items():
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            heads = c.num_attention_heads if ".q_proj." in name else c.num_key_value_heads
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2) \
                .reshape(t.shape)
        if gemma and name.endswith("norm.weight"):
            t = t + np.float32(1)
        w.add_tensor(_gguf_name(name, gemma), np.ascontiguousarray(t))
    for name, t in (extra or {}).items():
        w.add_tensor(name, t)
    _finish(w)
    return sd


SYNTHETIC = {  # tiny_hf variant, config overrides llama.cpp can represent
    "llama": ("llama", {}),
    "qwen2": ("qwen2", dict(use_sliding_window=False)),
    # transformers' loader ignores qwen3.attention.key_length (assumes the default 128)
    "qwen3": ("qwen3", dict(head_dim=128)),
    "gemma2": ("gemma2", dict(query_pre_attn_scalar=16)),
    "gemma3": ("gemma3", dict(query_pre_attn_scalar=16, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}})),
}


@pytest.mark.parametrize("arch", list(SYNTHETIC))
def test_synthetic_gguf_matches_source_and_transformers(tmp_path, arch):
    import torch
    from transformers import AutoModelForCausalLM
    from tests.support import tiny_hf

    variant, overrides = SYNTHETIC[arch]
    model = tiny_hf.build(variant, seed=1, **overrides)
    path = tmp_path / f"{arch}.gguf"
    sd = _write_like_llama_cpp(path, arch, model)
    cfg, tensors = gguf_io.read_gguf(path, progress=False)
    # Same tensors as the source checkpoint, exactly (F32 storage, inverse transforms).
    # Gemma norms: the file holds 1+w (rounded), so compare the multiplier the model applies.
    assert set(tensors) == set(sd)
    for k in sd:
        if arch.startswith("gemma") and k.endswith("norm.weight"):
            np.testing.assert_array_equal(tensors[k] + 1, sd[k] + 1, err_msg=k)
        else:
            np.testing.assert_array_equal(tensors[k], sd[k], err_msg=k)
    # The same model as the source config says.
    src = model.config.to_dict()
    src["architectures"] = [type(model).__name__]
    assert _semantics(ModelConfig.from_hf(cfg)) == _semantics(ModelConfig.from_hf(src))
    # And transformers' own GGUF loader reads the file the same way.
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name,
                                              dtype=torch.float32)
    ref = {k: v.numpy() for k, v in hf.state_dict().items()}
    for k in sd:
        np.testing.assert_array_equal(tensors[k], ref[k], err_msg=k)


def test_unknown_tensor_is_named(tmp_path):
    from tests.support import tiny_hf

    path = tmp_path / "q.gguf"
    _write_like_llama_cpp(path, "qwen3", tiny_hf.build("qwen3"),
                          extra={"blk.0.ffn_gate_exps.weight": np.zeros((2, 4), np.float32)})
    with pytest.raises(gguf_io.GGUFError, match=r"no HF counterpart.*blk\.0\.ffn_gate_exps"):
        gguf_io.read_gguf(path)
