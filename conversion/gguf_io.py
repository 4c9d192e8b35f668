"""Read a GGUF file as an HF checkpoint: (config.json dict, {HF name: float32 [out, in]}).

The result is exactly what ``conversion.hf_dir.read_hf_checkpoint`` hands out for an HF
directory, so one name table (``conversion.names``) serves both sources. Quantized tensors
are dequantized with the ``gguf`` package; llama.cpp's storage conventions are undone here:

- Llama-family q/k projections are stored RoPE-permuted (interleaved pairs); HF uses the
  rotate-half layout. Qwen2/3 and Gemma are stored unpermuted.
- Gemma norms are stored as the applied multiplier ``1 + w``; HF stores ``w``. We hand out
  ``w`` (HF semantics) so the shared name table's +1 fold applies to both sources.

The config dict follows the hub's config.json for the architecture (transformers 4 style
keys such as ``rope_theta``), with the values llama.cpp keeps in the GGUF metadata and the
architecture defaults for what it drops (e.g. Gemma 3's local RoPE base and layer pattern).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

GGUF_MAGIC = b"GGUF"


class GGUFError(ValueError):
    """The file is not a GGUF, is damaged, or holds something we do not convert."""


# llama.cpp architecture -> hub model_type / architectures entry.
_ARCH = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
SUPPORTED_ARCHITECTURES = tuple(_ARCH)
_GEMMA = ("gemma2", "gemma3")
_ROPE_PERMUTED = ("llama",)  # llama.cpp permutes q/k only for these (mistral is "llama")

# blk.{i}.<gguf> -> model.layers.{i}.<hf>; the pre-FFN norm differs between families.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LAYER_NAMES_LLAMA = {"ffn_norm": "post_attention_layernorm"}
_LAYER_NAMES_GEMMA = {"ffn_norm": "pre_feedforward_layernorm",
                      "post_attention_norm": "post_attention_layernorm"}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def hf_name(gguf_name: str, arch: str) -> str | None:
    """HF parameter name of a GGUF tensor name (None if it has no HF counterpart)."""
    stem, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    table = {**_LAYER_NAMES, **(_LAYER_NAMES_GEMMA if arch in _GEMMA else _LAYER_NAMES_LLAMA)}
    if parts[2] not in table:
        return None
    return f"model.layers.{int(parts[1])}.{table[parts[2]]}.{kind}"


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> HF rotate-half)."""
    out = w.shape[0]
    if out % (2 * n_head):
        raise GGUFError(f"cannot un-permute a q/k tensor of {out} rows into {n_head} heads")
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------------- metadata

def check_magic(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError(f"{path} is not a GGUF file (starts with {magic!r}, "
                        f"expected {GGUF_MAGIC!r})")
    return path


def _open(path) -> "gguf.GGUFReader":  # noqa: F821
    import gguf

    path = check_magic(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises a mix of ValueError/IndexError/OverflowError
        raise GGUFError(f"{path}: damaged or truncated GGUF ({type(e).__name__}: {e})") from e
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise GGUFError(f"{path}: truncated GGUF, tensor {t.name!r} ends past the end of "
                            "the file")
    return reader


def _field(reader, key, default=None):
    import gguf

    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    if f.types and f.types[0] == gguf.GGUFValueType.FLOAT32:
        # Stored as float32: hand out the shortest decimal that round-trips (1e-06, not
        # 9.999999974752427e-07), i.e. the value the source config.json most likely held.
        v = float(str(np.float32(v)))
    return v


def _require(reader, key):
    v = _field(reader, key)
    if v is None:
        raise GGUFError(f"GGUF metadata lacks required key {key!r}")
    return v


def architecture(reader) -> str:
    arch = _field(reader, "general.architecture")
    if arch is None:
        raise GGUFError("GGUF metadata has no general.architecture")
    if arch not in _ARCH:
        raise GGUFError(f"unsupported GGUF architecture {arch!r}; this converter reads "
                        f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _gemma_layer_types(n_layers: int, pattern: int) -> list[str]:
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(n_layers)]


def config_from_metadata(reader) -> dict:
    """Hub-style config.json dict rebuilt from the GGUF metadata."""
    arch = architecture(reader)
    model_type, hf_arch = _ARCH[arch]
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    r = lambda k: _require(reader, f"{arch}.{k}")  # noqa: E731

    hidden = int(r("embedding_length"))
    n_head = int(r("attention.head_count"))
    n_kv = int(g("attention.head_count_kv", n_head))
    head_dim = int(g("attention.key_length", hidden // n_head))
    value_dim = int(g("attention.value_length", head_dim))
    if value_dim != head_dim:
        raise GGUFError(f"attention.value_length {value_dim} != key_length {head_dim}: "
                        "not supported")
    rot_dim = g("rope.dimension_count")
    if rot_dim is not None and int(rot_dim) != head_dim:
        raise GGUFError(f"partial rotary embedding (rope.dimension_count {rot_dim} != head dim "
                        f"{head_dim}) is not supported")
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise GGUFError("GGUF carries rope_freqs (Llama-3.1-style RoPE scaling): not supported")
    n_layers = int(r("block_count"))
    vocab = g("vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise GGUFError("GGUF has neither a vocab_size nor a token list")
        vocab = len(tokens.data)

    cfg = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(r("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "max_position_embeddings": int(g("context_length", 2048)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
    }
    scaling = g("rope.scaling.type")
    if scaling not in (None, "none"):
        factor = float(g("rope.scaling.factor", 1.0))
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": factor}
        if g("rope.scaling.original_context_length") is not None:
            cfg["rope_scaling"]["original_max_position_embeddings"] = int(
                g("rope.scaling.original_context_length"))
    for key, gkey in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("pad_token_id", "padding_token_id")):
        v = _field(reader, f"tokenizer.ggml.{gkey}")
        if v is not None:
            cfg[key] = int(v)

    if arch in ("llama", "qwen2", "qwen3"):
        cfg["hidden_act"] = "silu"
        if arch == "llama":
            cfg["mlp_bias"] = False
        if arch == "qwen2":
            cfg["use_sliding_window"] = False
    else:  # Gemma family: GeGLU with tanh-approximate GELU, embeddings scaled by sqrt(d)
        cfg["hidden_activation"] = "gelu_pytorch_tanh"
    if arch in ("gemma2", "gemma3"):
        # llama.cpp scales queries by 1/sqrt(head_dim) except for the 27B models
        # (n_embd / n_head); HF keeps that number as query_pre_attn_scalar.
        big = (arch == "gemma2" and n_layers == 46) or (arch == "gemma3" and n_layers == 62)
        cfg["query_pre_attn_scalar"] = hidden // n_head if big else head_dim
        cfg["sliding_window"] = int(g("attention.sliding_window", 4096))
        cfg["final_logit_softcapping"] = g("final_logit_softcapping")
        cfg["attn_logit_softcapping"] = g("attn_logit_softcapping")
    if arch == "gemma2":
        cfg["layer_types"] = _gemma_layer_types(n_layers, 2)
    if arch == "gemma3":
        # Older GGUFs omit both: llama.cpp then uses a 5 local : 1 global pattern and a local
        # RoPE base of 10000, the same defaults as the hub configs.
        pattern = g("attention.sliding_window_pattern", 6)
        if isinstance(pattern, list):  # per layer, True = sliding window
            if len(pattern) != n_layers:
                raise GGUFError(f"attention.sliding_window_pattern has {len(pattern)} entries "
                                f"for {n_layers} layers")
            cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            cfg["sliding_window_pattern"] = int(pattern)
            cfg["layer_types"] = _gemma_layer_types(n_layers, int(pattern))
        cfg["rope_local_base_freq"] = float(g("rope.freq_base_swa", 10000.0))
    return cfg


# ---------------------------------------------------------------------------- tensors

def _dequantize(t) -> np.ndarray:
    import gguf

    try:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError as e:
        raise GGUFError(f"tensor {t.name!r}: quantization {t.tensor_type.name} cannot be "
                        f"dequantized by the gguf package ({e})") from e
    shape = tuple(int(s) for s in reversed(t.shape.tolist()))  # ggml dims are [in, out]
    return np.asarray(w, dtype=np.float32).reshape(shape)


def read_gguf(path, progress: bool = True) -> tuple[dict, dict[str, np.ndarray]]:
    """(hub-style config dict, {HF name: float32 array in HF [out, in] layout})."""
    from tqdm.auto import tqdm

    reader = _open(path)
    cfg = config_from_metadata(reader)
    arch = architecture(reader)
    unknown = [t.name for t in reader.tensors if hf_name(t.name, arch) is None]
    if unknown:
        raise GGUFError(f"{path}: tensors with no HF counterpart for {arch!r}: "
                        f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    tensors = {}
    for t in tqdm(reader.tensors, desc=f"dequantize {Path(path).name}", disable=not progress,
                  unit="tensor"):
        name = hf_name(t.name, arch)
        w = _dequantize(t)
        stem = t.name.rpartition(".")[0]
        if arch in _ROPE_PERMUTED and stem.endswith((".attn_q", ".attn_k")):
            heads = cfg["num_attention_heads"] if stem.endswith("q") else cfg["num_key_value_heads"]
            w = unpermute_rope(w, heads)
        if arch in _GEMMA and t.name.endswith("norm.weight"):
            w = w - np.float32(1.0)
        tensors[name] = np.ascontiguousarray(w)
    return cfg, tensors


def read_gguf_config(path) -> dict:
    """Only the config dict (no dequantization): convert refuses an unsupported
    architecture before it reads any weight."""
    return config_from_metadata(_open(path))


# ---------------------------------------------------------------------------- tokenizer

def save_tokenizer_from_gguf(gguf_path, out_dir) -> Path:
    """Build the HF tokenizer transformers derives from the GGUF and save it to out_dir."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ImportError("extracting a tokenizer from a GGUF needs transformers "
                          "(and gguf, accelerate)") from e
    gguf_path = Path(gguf_path).resolve()
    check_magic(gguf_path)  # clear error before transformers' own
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as e:  # transformers raises many types for tokenizers it cannot build
        raise GGUFError(f"{gguf_path}: transformers cannot build a tokenizer from this GGUF "
                        f"({type(e).__name__}: {e}); convert with --no-tokenizer to skip it") from e
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return out_dir
