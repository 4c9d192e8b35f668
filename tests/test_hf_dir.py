"""read_hf_checkpoint + hf_to_params: formats, and clear errors for every bad input."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile

import ml_dtypes
import numpy as np
import pytest

from conversion.hf_dir import CheckpointError, read_hf_checkpoint
from conversion.names import ConversionError, expected_names, hf_to_params
from countdown_jax.config import ModelConfig
from tests.support import tiny_hf


@pytest.fixture(scope="module")
def models():
    return {v: tiny_hf.build(v) for v in ("llama", "llama_tied", "phi3", "gemma3")}


def state(model) -> dict[str, np.ndarray]:
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


@pytest.fixture(scope="module")
def llama_dir(models, tmp_path_factory):
    return tiny_hf.save(models["llama"], str(tmp_path_factory.mktemp("llama")))


def test_single_safetensors_round_trip(models, llama_dir):
    hf_config, tensors = read_hf_checkpoint(llama_dir, progress=False)
    assert hf_config["model_type"] == "llama"
    ref = state(models["llama"])
    assert set(tensors) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(tensors[k], ref[k])


def test_sharded_safetensors(models, tmp_path):
    path = tiny_hf.save(models["llama"], str(tmp_path / "m"), shard_size="60KB")
    shards = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors.index.json" in os.listdir(path)
    _, tensors = read_hf_checkpoint(path, progress=False)
    ref = state(models["llama"])
    assert set(tensors) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(tensors[k], ref[k])


def test_bf16_safetensors_and_bin(models, tmp_path):
    import torch

    model = tiny_hf.build("llama_tied").to(torch.bfloat16)
    ref = {k: v.float().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    for fmt in ("safetensors", "bin"):
        _, tensors = read_hf_checkpoint(tiny_hf.save(model, str(tmp_path / fmt), fmt=fmt),
                                        progress=False)
        assert set(tensors) == set(ref)
        for k in ref:
            assert tensors[k].dtype == ml_dtypes.bfloat16
            np.testing.assert_array_equal(tensors[k].astype(np.float32), ref[k])
    cfg = ModelConfig.from_hf(model.config.to_dict())
    params = hf_to_params(cfg, tensors, ml_dtypes.bfloat16, progress=False)
    assert params["embed"].dtype == ml_dtypes.bfloat16


def test_bin_checkpoint(models, tmp_path):
    path = tiny_hf.save(models["phi3"], str(tmp_path / "bin"), fmt="bin")
    assert os.listdir(path).count("pytorch_model.bin") == 1
    hf_config, tensors = read_hf_checkpoint(path, progress=False)
    ref = state(models["phi3"])
    assert set(tensors) == set(ref)
    for k in ref:
        np.testing.assert_array_equal(tensors[k], ref[k])
    hf_to_params(ModelConfig.from_hf(hf_config), tensors, np.float32, progress=False)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickled_callable_is_refused_without_running(tmp_path):
    import torch

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    marker = tmp_path / "pwned"
    torch.save({"w": torch.zeros(2), "evil": _Exploit(str(marker))},
               tmp_path / "pytorch_model.bin")
    assert zipfile.is_zipfile(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*weights_only"):
        read_hf_checkpoint(str(tmp_path), progress=False)
    assert not marker.exists()
    # legacy (non-zip) pickle format too
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"evil": _Exploit(str(marker))}, f)
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        read_hf_checkpoint(str(tmp_path), progress=False)
    assert not marker.exists()


def test_truncated_and_corrupt_safetensors(llama_dir, tmp_path):
    src = os.path.join(llama_dir, "model.safetensors")
    data = open(src, "rb").read()
    for name, payload in (("truncated", data[: len(data) - 100]),
                          ("corrupt", b"\xff" * 8 + data[8:200])):
        d = tmp_path / name
        d.mkdir()
        shutil.copy(os.path.join(llama_dir, "config.json"), d / "config.json")
        (d / "model.safetensors").write_bytes(payload)
        with pytest.raises(CheckpointError,
                           match=f"{name}/model.safetensors: corrupt or truncated"):
            read_hf_checkpoint(str(d), progress=False)


def test_directory_errors(models, llama_dir, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        read_hf_checkpoint(str(tmp_path), progress=False)
    shutil.copy(os.path.join(llama_dir, "config.json"), tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="no weight files"):
        read_hf_checkpoint(str(tmp_path), progress=False)
    sharded = tiny_hf.save(models["llama"], str(tmp_path / "sh"), shard_size="60KB")
    index = json.load(open(os.path.join(sharded, "model.safetensors.index.json")))
    gone = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(sharded, gone))
    with pytest.raises(CheckpointError, match=f"missing shard files: \\['{gone}'\\]"):
        read_hf_checkpoint(sharded, progress=False)


def test_duplicate_tensor_across_shards(models, tmp_path):
    from safetensors.numpy import save_file

    sd = state(models["llama"])
    path = tmp_path / "dup"
    path.mkdir()
    models["llama"].config.save_pretrained(path)
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:5]}, str(path / "a.safetensors"))
    save_file({k: sd[k] for k in names[4:]}, str(path / "b.safetensors"))
    with pytest.raises(CheckpointError, match=f"{names[4]}' is stored twice"):
        read_hf_checkpoint(str(path), progress=False)


def convert(model, tensors):
    cfg = ModelConfig.from_hf(model.config.to_dict())
    return hf_to_params(cfg, tensors, np.float32, progress=False)


def test_missing_unexpected_and_wrong_shape(models):
    sd = state(models["llama"])
    convert(models["llama"], sd)  # the untouched dict converts
    bad = dict(sd)
    del bad["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConversionError,
                       match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj"):
        convert(models["llama"], bad)
    bad = {**sd, "model.layers.0.mlp.extra.weight": np.zeros(3)}
    with pytest.raises(ConversionError,
                       match=r"unexpected tensors \(1\): model\.layers\.0\.mlp\.extra"):
        convert(models["llama"], bad)
    bad = {**sd, "model.layers.3.input_layernorm.weight": np.zeros(64, np.float32)}
    with pytest.raises(ConversionError, match=r"layer 3 >= num_hidden_layers=3"):
        convert(models["llama"], bad)
    bad = {**sd, "model.layers.2.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)}
    with pytest.raises(ConversionError,
                       match=r"k_proj.weight: expected shape \(32, 64\), got \(64, 64\)"):
        convert(models["llama"], bad)
    # rotary inv_freq buffers older transformers wrote are dropped explicitly
    ok = {**sd, "model.layers.0.self_attn.rotary_emb.inv_freq": np.zeros(8, np.float32)}
    convert(models["llama"], ok)


def test_tied_head_stored_anyway(models):
    sd = state(models["llama_tied"])
    emb = sd["model.embed_tokens.weight"]
    params = convert(models["llama_tied"], {**sd, "lm_head.weight": emb.copy()})
    assert "lm_head" not in params
    with pytest.raises(ConversionError, match="differs from the embedding"):
        convert(models["llama_tied"], {**sd, "lm_head.weight": emb + 1})


def test_layout_transforms(models):
    """Spot-check our layout against the HF tensors (layout.py's contract)."""
    sd = state(models["phi3"])
    cfg = ModelConfig.from_hf(models["phi3"].config.to_dict())
    p = hf_to_params(cfg, sd, np.float32, progress=False, as_jax=False)
    qkv = sd["model.layers.1.self_attn.qkv_proj.weight"]  # [(H + 2 Hkv) hd, d]
    hd, H, Hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    np.testing.assert_array_equal(p["layers"]["wq"][1][:, 2, :], qkv[2 * hd:3 * hd].T)
    np.testing.assert_array_equal(p["layers"]["wk"][1][:, 1, :], qkv[(H + 1) * hd:(H + 2) * hd].T)
    np.testing.assert_array_equal(p["layers"]["wv"][1][:, 0, :],
                                  qkv[(H + Hkv) * hd:(H + Hkv + 1) * hd].T)
    gu = sd["model.layers.2.mlp.gate_up_proj.weight"]
    np.testing.assert_array_equal(p["layers"]["mlp"]["gate"][2], gu[:cfg.d_ff])
    np.testing.assert_array_equal(p["layers"]["mlp"]["up"][2], gu[cfg.d_ff:])
    np.testing.assert_array_equal(p["layers"]["mlp"]["down"][0],
                                  sd["model.layers.0.mlp.down_proj.weight"].T)
    o = sd["model.layers.0.self_attn.o_proj.weight"]  # [d, H hd]
    np.testing.assert_array_equal(p["layers"]["wo"][0][3], o[:, 3 * hd:4 * hd].T)
    # Gemma: 1 + w folded into every norm scale
    sd = state(models["gemma3"])
    cfg = ModelConfig.from_hf(models["gemma3"].config.to_dict())
    p = hf_to_params(cfg, sd, np.float32, progress=False, as_jax=False)
    np.testing.assert_allclose(p["layers"]["q_norm"][1],
                               1 + sd["model.layers.1.self_attn.q_norm.weight"])
    np.testing.assert_allclose(p["final_norm"], 1 + sd["model.norm.weight"])


def test_gemma3_multimodal_wrapper_names(models):
    """Gemma 3 multimodal checkpoints: language model under a prefix, vision parts dropped."""
    sd = state(models["gemma3"])
    text_cfg = models["gemma3"].config.to_dict()
    wrapped = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"],
               "text_config": text_cfg}
    cfg = ModelConfig.from_hf(wrapped)
    ref = hf_to_params(cfg, sd, np.float32, progress=False, as_jax=False)
    for old, new in (("model.", "model.language_model."), ("model.", "language_model.model.")):
        renamed = {(new + k[len(old):]) if k.startswith(old) else k: v for k, v in sd.items()}
        renamed["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = np.zeros(3)
        renamed["multi_modal_projector.mm_input_projection_weight"] = np.zeros(3)
        got = hf_to_params(cfg, renamed, np.float32, progress=False, as_jax=False)
        np.testing.assert_array_equal(got["layers"]["wq"], ref["layers"]["wq"])
        np.testing.assert_array_equal(got["embed"], ref["embed"])
    both = {**sd, **{"model.language_model." + k[6:]: v for k, v in sd.items()}}
    with pytest.raises(ConversionError, match="duplicate tensors"):
        hf_to_params(cfg, both, np.float32, progress=False)


def test_expected_names_cover_a_real_checkpoint(models):
    for v, model in models.items():
        cfg = ModelConfig.from_hf(model.config.to_dict())
        assert sorted(expected_names(cfg)) == sorted(state(model))
