"""HF tensor names -> our params layout (countdown_jax/layout.py), one table per family.

Each table row: a regex over the HF name (``{i}`` = layer index), the target path(s) in
the params pytree, the HF shape it must have, and the transform into our layout (transpose
of down_proj, heads split out of q/k/v/o, Phi-3's fused qkv / gate_up split, Gemma's 1+w
norm folding). ``hf_to_params`` applies the table, checks every shape, and reports missing,
unexpected and duplicate tensors by name.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from countdown_jax.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF name with "{i}" for the layer index
    targets: tuple[Path, ...]  # paths under params (under params["layers"] when per-layer)
    shape: Callable[[ModelConfig], tuple[int, ...]]  # expected HF shape
    transform: Callable[[ModelConfig, np.ndarray], tuple[np.ndarray, ...]]
    per_layer: bool = True
    when: Callable[[ModelConfig], bool] = lambda cfg: True  # rule applies to this config

    @property
    def regex(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.hf).replace(r"\{i\}", r"(\d+)") + "$")


# -- transforms (HF torch Linear weight is [out, in]) ------------------------------------
def _same(cfg, w):
    return (w,)


def _norm(cfg, w):
    # Gemma applies (1 + w); fold it so one RMSNorm serves every family. Add in float32.
    if cfg.norm_offset:
        return ((w.astype(np.float32) + np.float32(cfg.norm_offset)),)
    return (w,)


def _in_heads(heads_of):
    """[H*hd, d] -> [d, H, hd]."""
    def f(cfg, w):
        return (np.ascontiguousarray(w.T).reshape(cfg.d_model, heads_of(cfg), cfg.head_dim),)
    return f


def _bias_heads(heads_of):
    def f(cfg, b):
        return (b.reshape(heads_of(cfg), cfg.head_dim),)
    return f


def _out_heads(cfg, w):
    """o_proj [d, H*hd] -> [H, hd, d]."""
    return (np.ascontiguousarray(w.T).reshape(cfg.num_heads, cfg.head_dim, cfg.d_model),)


def _transpose(cfg, w):
    return (np.ascontiguousarray(w.T),)


def _split_qkv(cfg, w):
    """Phi-3 qkv_proj [(H + 2 Hkv) hd, d] -> wq, wk, wv (rows: q heads, k heads, v heads)."""
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q, k, v = w[:q_rows], w[q_rows:q_rows + kv_rows], w[q_rows + kv_rows:]
    return (_in_heads(lambda c: c.num_heads)(cfg, q)[0],
            _in_heads(lambda c: c.num_kv_heads)(cfg, k)[0],
            _in_heads(lambda c: c.num_kv_heads)(cfg, v)[0])


def _split_gate_up(cfg, w):
    """Phi-3 gate_up_proj [2m, d] -> gate (first m rows), up (last m rows)."""
    return (w[:cfg.d_ff], w[cfg.d_ff:])


_Hq = lambda c: c.num_heads  # noqa: E731
_Hkv = lambda c: c.num_kv_heads  # noqa: E731


# -- the tables ----------------------------------------------------------------------------
def _common_top() -> list[Rule]:
    return [
        Rule("model.embed_tokens.weight", (("embed",),),
             lambda c: (c.vocab_size, c.d_model), _same, per_layer=False),
        Rule("model.norm.weight", (("final_norm",),), lambda c: (c.d_model,), _norm,
             per_layer=False),
        Rule("lm_head.weight", (("lm_head",),), lambda c: (c.vocab_size, c.d_model),
             _transpose, per_layer=False, when=lambda c: not c.tie_embeddings),
    ]


def _attn_rules(fused: bool) -> list[Rule]:
    p = "model.layers.{i}.self_attn."
    qkv_shape = lambda c, h: (h(c) * c.head_dim, c.d_model)  # noqa: E731
    if fused:
        rules = [Rule(p + "qkv_proj.weight", (("wq",), ("wk",), ("wv",)),
                      lambda c: ((c.num_heads + 2 * c.num_kv_heads) * c.head_dim, c.d_model),
                      _split_qkv)]
    else:
        rules = [
            Rule(p + "q_proj.weight", (("wq",),), lambda c: qkv_shape(c, _Hq), _in_heads(_Hq)),
            Rule(p + "k_proj.weight", (("wk",),), lambda c: qkv_shape(c, _Hkv), _in_heads(_Hkv)),
            Rule(p + "v_proj.weight", (("wv",),), lambda c: qkv_shape(c, _Hkv), _in_heads(_Hkv)),
        ]
    rules += [
        Rule(p + "o_proj.weight", (("wo",),), lambda c: (c.d_model, c.num_heads * c.head_dim),
             _out_heads),
        Rule(p + "q_proj.bias", (("bq",),), lambda c: (c.num_heads * c.head_dim,),
             _bias_heads(_Hq), when=lambda c: c.qkv_bias),
        Rule(p + "k_proj.bias", (("bk",),), lambda c: (c.num_kv_heads * c.head_dim,),
             _bias_heads(_Hkv), when=lambda c: c.qkv_bias),
        Rule(p + "v_proj.bias", (("bv",),), lambda c: (c.num_kv_heads * c.head_dim,),
             _bias_heads(_Hkv), when=lambda c: c.qkv_bias),
        Rule(p + "q_norm.weight", (("q_norm",),), lambda c: (c.head_dim,), _norm,
             when=lambda c: c.qk_norm),
        Rule(p + "k_norm.weight", (("k_norm",),), lambda c: (c.head_dim,), _norm,
             when=lambda c: c.qk_norm),
    ]
    return rules


def _mlp_rules(fused: bool) -> list[Rule]:
    p = "model.layers.{i}.mlp."
    if fused:
        return [
            Rule(p + "gate_up_proj.weight", (("mlp", "gate"), ("mlp", "up")),
                 lambda c: (2 * c.d_ff, c.d_model), _split_gate_up),
            Rule(p + "down_proj.weight", (("mlp", "down"),), lambda c: (c.d_model, c.d_ff),
                 _transpose),
        ]
    return [
        Rule(p + "gate_proj.weight", (("mlp", "gate"),), lambda c: (c.d_ff, c.d_model), _same),
        Rule(p + "up_proj.weight", (("mlp", "up"),), lambda c: (c.d_ff, c.d_model), _same),
        Rule(p + "down_proj.weight", (("mlp", "down"),), lambda c: (c.d_model, c.d_ff),
             _transpose),
    ]


def _layer_norm_rules(gemma: bool) -> list[Rule]:
    p = "model.layers.{i}."
    d = lambda c: (c.d_model,)  # noqa: E731
    if gemma:
        return [
            Rule(p + "input_layernorm.weight", (("attn_norm",),), d, _norm),
            Rule(p + "post_attention_layernorm.weight", (("post_attn_norm",),), d, _norm),
            Rule(p + "pre_feedforward_layernorm.weight", (("mlp_norm",),), d, _norm),
            Rule(p + "post_feedforward_layernorm.weight", (("post_mlp_norm",),), d, _norm),
        ]
    return [
        Rule(p + "input_layernorm.weight", (("attn_norm",),), d, _norm),
        Rule(p + "post_attention_layernorm.weight", (("mlp_norm",),), d, _norm),
    ]


def _table(fused: bool = False, gemma: bool = False) -> tuple[Rule, ...]:
    return tuple(_common_top() + _layer_norm_rules(gemma) + _attn_rules(fused)
                 + _mlp_rules(fused))


TABLES: dict[str, tuple[Rule, ...]] = {
    "llama": _table(),
    "mistral": _table(),
    "qwen2": _table(),
    "qwen3": _table(),
    "gemma2": _table(gemma=True),
    "gemma3": _table(gemma=True),
    "phi3": _table(fused=True),
}

# Non-parameter buffers some HF versions wrote into checkpoints; dropped explicitly.
IGNORED = (
    re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$"),
    re.compile(r"^model\.rotary_emb\.inv_freq$"),
)

# Gemma 3 multimodal wrapper: the language model's names under 5.x / 4.x prefixes, and the
# vision parts, which a text-only decoder does not use.
_GEMMA3_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                    ("language_model.lm_head.", "lm_head."))
_GEMMA3_VISION = re.compile(r"^(model\.)?(vision_tower|multi_modal_projector)\.")


class ConversionError(ValueError):
    """The checkpoint's tensors do not match the config's layout."""


def canonical_name(cfg: ModelConfig, name: str) -> str | None:
    """The table's name for an HF tensor name; None if it is a known ignorable tensor."""
    if any(r.match(name) for r in IGNORED):
        return None
    if cfg.family == "gemma3":
        if _GEMMA3_VISION.match(name):
            return None
        for old, new in _GEMMA3_PREFIXES:
            if name.startswith(old):
                return new + name[len(old):]
    return name


def expected_names(cfg: ModelConfig) -> list[str]:
    """Every HF tensor name (canonical) the config requires."""
    out = []
    for rule in TABLES[cfg.family]:
        if not rule.when(cfg):
            continue
        if rule.per_layer:
            out += [rule.hf.replace("{i}", str(i)) for i in range(cfg.num_layers)]
        else:
            out.append(rule.hf)
    return out


def _set(tree: dict, path: Path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def hf_to_params(cfg: ModelConfig, tensors: Mapping[str, np.ndarray], dtype, *,
                 progress: bool = True, as_jax: bool = True) -> dict:
    """HF tensors (name -> array) -> params pytree in ``dtype`` with layers stacked.

    Raises ConversionError listing every missing, unexpected, duplicate or mis-shaped
    tensor. A tied checkpoint that also stores ``lm_head.weight`` is accepted only when it
    equals the embedding.
    """
    # by name through ml_dtypes: NumPy knows "bfloat16" only once something registered it
    dtype = np.dtype(getattr(ml_dtypes, dtype, dtype) if isinstance(dtype, str) else dtype)
    table = [(rule, rule.regex) for rule in TABLES[cfg.family] if rule.when(cfg)]
    L = cfg.num_layers
    top: dict = {}
    layers: dict[Path, list] = {}
    seen: dict[str, str] = {}  # canonical name -> original name
    unexpected, duplicate, shape_errors = [], [], []
    tied_head = None

    for name in tqdm(list(tensors), desc="converting tensors", unit="tensor", disable=not progress,
                     leave=False):
        canon = canonical_name(cfg, name)
        if canon is None:
            continue
        if canon in seen:
            duplicate.append(f"{name} (same tensor as {seen[canon]})")
            continue
        seen[canon] = name
        if canon == "lm_head.weight" and cfg.tie_embeddings:
            tied_head = name
            continue
        for rule, rx in table:
            m = rx.match(canon)
            if m is None:
                continue
            if rule.per_layer and int(m.group(1)) >= L:
                unexpected.append(f"{name} (layer {m.group(1)} >= num_hidden_layers={L})")
                break
            arr = np.asarray(tensors[name])
            want = tuple(rule.shape(cfg))
            if tuple(arr.shape) != want:
                shape_errors.append(f"{name}: expected shape {want}, got {tuple(arr.shape)}")
                break
            outs = rule.transform(cfg, arr)
            for path, out in zip(rule.targets, outs):
                out = np.asarray(out).astype(dtype, copy=False)
                if rule.per_layer:
                    layers.setdefault(path, [None] * L)[int(m.group(1))] = out
                else:
                    _set(top, path, out)
            break
        else:
            unexpected.append(name)

    missing = [n for n in expected_names(cfg) if n not in seen]
    if tied_head is not None and "model.embed_tokens.weight" in seen:
        emb = np.asarray(tensors[seen["model.embed_tokens.weight"]])
        head = np.asarray(tensors[tied_head])
        if head.shape != emb.shape or not np.array_equal(head, emb):
            unexpected.append(f"{tied_head} (tie_word_embeddings=True but it differs from "
                              f"the embedding)")
    problems = []
    for title, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                         ("duplicate tensors", duplicate), ("wrong shapes", shape_errors)):
        if items:
            shown = items[:20] + ([f"... and {len(items) - 20} more"] if len(items) > 20 else [])
            problems.append(f"{title} ({len(items)}): " + "; ".join(shown))
    if problems:
        raise ConversionError(f"checkpoint does not match the {cfg.family} config: "
                              + " | ".join(problems))

    params = dict(top)
    params["layers"] = {}
    for path, per in layers.items():
        _set(params["layers"], path, np.stack(per))
    if as_jax:
        import jax.numpy as jnp
        import jax
        params = jax.tree_util.tree_map(jnp.asarray, params)
    return params
