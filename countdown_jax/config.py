"""ModelConfig: the static description of a decoder, parsed from a HF ``config.json`` dict.

``ModelConfig.from_hf`` reads config.json as written by transformers 4.x (``rope_theta`` +
``rope_scaling``) and 5.x (``rope_parameters``, per layer type for Gemma 3) and refuses,
naming the setting, anything the model code does not implement. The config is frozen and
hashable (tuples only) so it can be a static ``jax.jit`` argument; the original HF dict is
kept as canonical JSON (``to_hf()``) so checkpoints store config.json and rebuild from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping

__all__ = ["ACTIVATIONS", "ARCHITECTURES", "FAMILIES", "LAYER_TYPES", "ModelConfig",
           "ROPE_TYPES", "RopeConfig", "UnsupportedConfig"]

# model_type -> family. "gemma3" is the multimodal wrapper: its text_config is used and the
# vision tower is dropped at conversion (see conversion/names.py).
FAMILIES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
    "phi3": "phi3",
}

# Architectures we can serve: the causal-LM head (or Gemma 3's multimodal wrapper, text only).
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM",),
    "mistral": ("MistralForCausalLM",),
    "qwen2": ("Qwen2ForCausalLM",),
    "qwen3": ("Qwen3ForCausalLM",),
    "gemma2": ("Gemma2ForCausalLM",),
    "gemma3_text": ("Gemma3ForCausalLM",),
    "gemma3": ("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM"),
    "phi3": ("Phi3ForCausalLM",),
}

# transformers' class defaults for keys that older config.json files may omit (4.x wrote
# only values differing from the defaults for some keys, e.g. tie_word_embeddings).
_DEFAULTS = {
    "llama": dict(bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, rms_norm_eps=1e-6,
                  rope_theta=10000.0, hidden_act="silu", max_position_embeddings=2048),
    "mistral": dict(bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                    rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu",
                    sliding_window=4096, max_position_embeddings=131072),
    "qwen2": dict(tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0,
                  hidden_act="silu", max_position_embeddings=32768),
    "qwen3": dict(tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0,
                  hidden_act="silu", max_position_embeddings=32768),
    "gemma2": dict(bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
                   rms_norm_eps=1e-6, rope_theta=10000.0,
                   hidden_activation="gelu_pytorch_tanh", head_dim=256,
                   query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   max_position_embeddings=8192),
    "gemma3": dict(bos_token_id=2, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True,
                   rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                   rope_local_base_freq=10_000.0, hidden_activation="gelu_pytorch_tanh",
                   head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=None, attn_logit_softcapping=None,
                   max_position_embeddings=131072),
    "phi3": dict(bos_token_id=1, eos_token_id=32000, pad_token_id=32000,
                 tie_word_embeddings=False, rms_norm_eps=1e-5, rope_theta=10000.0,
                 hidden_act="silu", sliding_window=None, max_position_embeddings=4096),
}

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedConfig(ValueError):
    """config.json asks for something this implementation does not do."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one layer kind: base and optional frequency scaling."""

    theta: float
    rope_type: str = "default"  # default | linear | llama3
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str
    vocab_size: int
    d_model: int
    d_ff: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float
    act: str  # "silu" | "gelu_tanh"
    tie_embeddings: bool
    qkv_bias: bool  # Qwen2
    qk_norm: bool  # Qwen3, Gemma 3
    sandwich_norm: bool  # Gemma 2/3: post-attention and post-FFN norms
    norm_offset: float  # HF stores Gemma norms as w and applies 1+w; folded at conversion
    fused_qkv: bool  # Phi-3 qkv_proj / gate_up_proj (split at conversion)
    embed_scale: float
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    sliding_window: int | None
    layer_sliding: tuple[bool, ...]  # per layer: uses the sliding window (and local rope)
    rope: RopeConfig  # global (full-attention) layers
    rope_local: RopeConfig  # sliding layers (== rope except Gemma 3)
    max_position_embeddings: int
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    hf_config_json: str = dataclasses.field(repr=False, default="{}")

    # -- derived -----------------------------------------------------------------------
    @property
    def num_groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    def layer_rope(self, i: int) -> RopeConfig:
        return self.rope_local if self.layer_sliding[i] else self.rope

    def to_hf(self) -> dict:
        """The HF config.json dict this config was parsed from (round-trips via from_hf)."""
        return json.loads(self.hf_config_json)

    # -- parsing -----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any]) -> "ModelConfig":
        return _from_hf(dict(hf_config))


def _refuse(model_type: str, msg: str):
    raise UnsupportedConfig(f"{model_type} config: {msg}")


def _require(c: dict, key: str, model_type: str):
    if c.get(key) is None:
        _refuse(model_type, f"required setting {key!r} is missing")
    return c[key]


def _parse_rope(params: Mapping[str, Any], model_type: str, where: str) -> RopeConfig:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in ("longrope", "su"):
        _refuse(model_type, f"{where} rope_type {rope_type!r} (Phi-3 long-context scaling) is not "
                            f"implemented; supported: {ROPE_TYPES}")
    if rope_type not in ROPE_TYPES:
        _refuse(model_type, f"{where} rope_type {rope_type!r} is not implemented; "
                            f"supported: {ROPE_TYPES}")
    prf = params.get("partial_rotary_factor", 1.0)
    if prf is not None and float(prf) != 1.0:
        _refuse(model_type, f"{where} partial_rotary_factor={prf} is not implemented (only 1.0)")
    if params.get("rope_theta") is None:
        _refuse(model_type, f"{where} rope_theta is missing")
    theta = float(params["rope_theta"])
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if params.get("factor") is None:
        _refuse(model_type, f"{where} rope_type {rope_type!r} needs 'factor'")
    factor = float(params["factor"])
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if params.get(k) is None:
            _refuse(model_type, f"{where} rope_type 'llama3' needs {k!r}")
    return RopeConfig(theta=theta, rope_type="llama3", factor=factor,
                      low_freq_factor=float(params["low_freq_factor"]),
                      high_freq_factor=float(params["high_freq_factor"]),
                      original_max_position_embeddings=int(
                          params["original_max_position_embeddings"]))


def _rope_params(c: dict, family: str, model_type: str) -> tuple[RopeConfig, RopeConfig]:
    """(global, local) rope from 5.x rope_parameters or 4.x rope_theta/rope_scaling."""
    d = _DEFAULTS[family]
    rp = c.get("rope_parameters")
    per_type = (isinstance(rp, Mapping) and rp
                and set(rp) <= set(LAYER_TYPES) and all(isinstance(v, Mapping) or v is None
                                                        for v in rp.values()))
    if family == "gemma3":
        if per_type:
            full = dict(rp.get("full_attention") or {})
            slid = dict(rp.get("sliding_attention") or {})
        else:
            # 4.x: rope_theta + rope_scaling are the global layers', rope_local_base_freq local.
            full = dict(rp or {})
            if c.get("rope_scaling"):
                full.update(c["rope_scaling"])
            slid = {}
        full.setdefault("rope_theta", c.get("rope_theta", d["rope_theta"]))
        slid.setdefault("rope_theta", c.get("rope_local_base_freq", d["rope_local_base_freq"]))
        return (_parse_rope(full, model_type, "full_attention"),
                _parse_rope(slid, model_type, "sliding_attention"))
    if per_type:
        _refuse(model_type, "per-layer-type rope_parameters are only implemented for Gemma 3")
    params = dict(rp or {})
    if c.get("rope_scaling"):
        params.update(c["rope_scaling"])
    # Phi-3 keeps partial_rotary_factor at the top level in 4.x.
    if "partial_rotary_factor" in c and "partial_rotary_factor" not in params:
        params["partial_rotary_factor"] = c["partial_rotary_factor"]
    params.setdefault("rope_theta", c.get("rope_theta", d["rope_theta"]))
    r = _parse_rope(params, model_type, "rope")
    return r, r


def _token_ids(v) -> tuple[int, ...]:
    if v is None:
        return ()
    if isinstance(v, (list, tuple)):
        return tuple(int(x) for x in v)
    return (int(v),)


def _from_hf(hf: dict) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedConfig(f"model_type {model_type!r} is not implemented; supported: "
                                f"{sorted(FAMILIES)}")
    archs = hf.get("architectures") or []
    bad = [a for a in archs if a not in ARCHITECTURES[model_type]]
    if bad:
        _refuse(model_type, f"architectures {bad} not implemented; supported: "
                            f"{list(ARCHITECTURES[model_type])}")
    family = FAMILIES[model_type]
    c = hf
    if model_type == "gemma3":  # multimodal wrapper: the language model's config
        c = dict(_require(hf, "text_config", model_type))
        c.setdefault("model_type", "gemma3_text")
    if hf.get("quantization_config") or c.get("quantization_config"):
        _refuse(model_type, "quantization_config is set: quantized checkpoints are not "
                            "supported; dequantize to a float checkpoint first")
    d = _DEFAULTS[family]
    get = lambda k: c.get(k, d.get(k))  # noqa: E731

    vocab = int(_require(c, "vocab_size", model_type))
    d_model = int(_require(c, "hidden_size", model_type))
    d_ff = int(_require(c, "intermediate_size", model_type))
    L = int(_require(c, "num_hidden_layers", model_type))
    H = int(_require(c, "num_attention_heads", model_type))
    Hkv = int(c.get("num_key_value_heads") or H)
    if H % Hkv:
        _refuse(model_type, f"num_attention_heads={H} is not a multiple of "
                            f"num_key_value_heads={Hkv}")
    head_dim = get("head_dim")
    if head_dim is None:
        if d_model % H:
            _refuse(model_type, f"hidden_size={d_model} not divisible by num_attention_heads={H}"
                                " and head_dim not given")
        head_dim = d_model // H
    head_dim = int(head_dim)
    if head_dim % 2:
        _refuse(model_type, f"head_dim={head_dim} must be even for rotary embeddings")

    gemma = family in ("gemma2", "gemma3")
    act_key = "hidden_activation" if gemma and c.get("hidden_activation") else "hidden_act"
    act_name = c.get(act_key) or d.get("hidden_activation") or d.get("hidden_act")
    if act_name not in ACTIVATIONS:
        _refuse(model_type, f"{act_key}={act_name!r} is not implemented; supported: "
                            f"{sorted(ACTIVATIONS)}")

    if c.get("mlp_bias"):
        _refuse(model_type, "mlp_bias=True is not implemented")
    if c.get("attention_bias") and family != "qwen2":
        _refuse(model_type, "attention_bias=True is not implemented (only Qwen2's fixed "
                            "q/k/v bias is)")
    if c.get("use_bidirectional_attention"):
        _refuse(model_type, "use_bidirectional_attention=True is not implemented")

    rope, rope_local = _rope_params(c, family, model_type)

    # Sliding window: which layers use it, and its size (HF: key j visible from query i
    # iff i - W < j <= i).
    window = None
    sliding = (False,) * L
    layer_types = c.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != L or any(t not in LAYER_TYPES for t in layer_types):
            _refuse(model_type, f"layer_types must be {L} entries of {LAYER_TYPES}; "
                                f"got {layer_types}")
    if family == "mistral" or family == "phi3":
        window = get("sliding_window")
        sliding = (window is not None,) * L
    elif family in ("qwen2", "qwen3"):
        if c.get("use_sliding_window"):
            window = _require(c, "sliding_window", model_type)
            if layer_types is None:
                mwl = int(c.get("max_window_layers", 28))
                layer_types = ["sliding_attention" if i >= mwl else "full_attention"
                               for i in range(L)]
            sliding = tuple(t == "sliding_attention" for t in layer_types)
    elif gemma:
        window = get("sliding_window")
        if layer_types is None:
            if family == "gemma2":
                pattern = 2
            else:
                pattern = int(c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6)))
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                           for i in range(L)]
        sliding = tuple(t == "sliding_attention" for t in layer_types)
        if window is None:
            sliding = (False,) * L
    if window is not None:
        window = int(window)
        if window < 1:
            _refuse(model_type, f"sliding_window={window} must be >= 1")
    if not any(sliding):
        window = None

    if gemma:
        attn_scale = float(get("query_pre_attn_scalar")) ** -0.5
        embed_scale = math.sqrt(d_model)
        attn_softcap = get("attn_logit_softcapping")
        final_softcap = get("final_logit_softcapping")
    else:
        attn_scale = head_dim ** -0.5
        embed_scale = 1.0
        attn_softcap = final_softcap = None

    return ModelConfig(
        family=family,
        vocab_size=vocab,
        d_model=d_model,
        d_ff=d_ff,
        num_layers=L,
        num_heads=H,
        num_kv_heads=Hkv,
        head_dim=head_dim,
        norm_eps=float(get("rms_norm_eps")),
        act=ACTIVATIONS[act_name],
        tie_embeddings=bool(get("tie_word_embeddings")),
        qkv_bias=family == "qwen2",
        qk_norm=family in ("qwen3", "gemma3"),
        sandwich_norm=gemma,
        norm_offset=1.0 if gemma else 0.0,
        fused_qkv=family == "phi3",
        embed_scale=embed_scale,
        attn_scale=attn_scale,
        attn_softcap=None if attn_softcap is None else float(attn_softcap),
        final_softcap=None if final_softcap is None else float(final_softcap),
        sliding_window=window,
        layer_sliding=sliding,
        rope=rope,
        rope_local=rope_local,
        max_position_embeddings=int(get("max_position_embeddings") or 0),
        bos_token_id=None if get("bos_token_id") is None else int(get("bos_token_id")),
        eos_token_ids=_token_ids(get("eos_token_id")),
        pad_token_id=None if get("pad_token_id") is None else int(get("pad_token_id")),
        hf_config_json=json.dumps(hf, sort_keys=True, default=str),  # str: e.g. torch dtypes
    )
