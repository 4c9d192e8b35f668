"""HF tensor names -> our params layout (countdown_jax/layout.py), one table per family.

Each table row: a regex over the HF name (``{i}`` = layer index), the target path(s) in
the params pytree and the transform into our layout (transpose of down_proj, heads split
out of q/k/v/o, Phi-3's fused qkv / gate_up split, Gemma's 1+w norm folding). The shape
the HF tensor must have and whether the config holds it are not written here: they follow
from the targets' declaration in ``countdown_jax/layout.py`` and the transform's HF form.
``hf_to_params`` applies the table, checks every shape, and reports missing, unexpected
and duplicate tensors by name.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Mapping

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from countdown_jax import layout
from countdown_jax.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Transform:
    """HF tensor -> our leaves (``apply``), and the HF form of one target's shape
    (``hf_shape``: our per-layer shape -> the HF rows it comes from; several targets'
    forms are concatenated along axis 0, as Phi-3's fused tensors are)."""

    apply: Callable[[ModelConfig, np.ndarray], tuple[np.ndarray, ...]]
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]

    def __call__(self, cfg, w):
        return self.apply(cfg, w)


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str  # HF name with "{i}" for the layer index
    targets: tuple[Path, ...]  # paths under params (under params["layers"] when per-layer)
    transform: Transform
    per_layer: bool = True

    @property
    def regex(self) -> re.Pattern:
        return re.compile("^" + re.escape(self.hf).replace(r"\{i\}", r"(\d+)") + "$")

    def _leaves(self):
        tree = layout.PARAMS["layers"] if self.per_layer else layout.PARAMS
        out = []
        for path in self.targets:
            node = tree
            for k in path:
                node = node[k]
            out.append(node)
        return out

    def when(self, cfg: ModelConfig) -> bool:
        """The config holds this tensor (its targets are declared for it)."""
        return all(leaf.present(cfg) for leaf in self._leaves())

    def shape(self, cfg: ModelConfig) -> tuple[int, ...]:
        """The HF shape this tensor must have, from the targets' declared shapes."""
        forms = [self.transform.hf_shape(leaf.shape(cfg)) for leaf in self._leaves()]
        return (sum(f[0] for f in forms),) + forms[0][1:]


# -- transforms (HF torch Linear weight is [out, in]) ------------------------------------
def _same_fn(cfg, w):
    return (w,)


def _norm_fn(cfg, w):
    # Gemma applies (1 + w); fold it so one RMSNorm serves every family. Add in float32.
    if cfg.norm_offset:
        return ((w.astype(np.float32) + np.float32(cfg.norm_offset)),)
    return (w,)


def _in_heads_fn(cfg, w):
    """[H*hd, d] -> [d, H, hd] (H from the rows)."""
    return (np.ascontiguousarray(w.T).reshape(cfg.d_model, -1, cfg.head_dim),)


def _bias_heads_fn(cfg, b):
    return (b.reshape(-1, cfg.head_dim),)


def _out_heads_fn(cfg, w):
    """o_proj [d, H*hd] -> [H, hd, d]."""
    return (np.ascontiguousarray(w.T).reshape(cfg.num_heads, cfg.head_dim, cfg.d_model),)


def _transpose_fn(cfg, w):
    return (np.ascontiguousarray(w.T),)


def _split_qkv_fn(cfg, w):
    """Phi-3 qkv_proj [(H + 2 Hkv) hd, d] -> wq, wk, wv (rows: q heads, k heads, v heads)."""
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    q, k, v = w[:q_rows], w[q_rows:q_rows + kv_rows], w[q_rows + kv_rows:]
    return tuple(_in_heads_fn(cfg, part)[0] for part in (q, k, v))


def _split_gate_up_fn(cfg, w):
    """Phi-3 gate_up_proj [2m, d] -> gate (first m rows), up (last m rows)."""
    return (w[:cfg.d_ff], w[cfg.d_ff:])


_AS_IS = lambda s: s                                  # noqa: E731
_IN_HEADS = lambda s: (s[1] * s[2], s[0])             # noqa: E731  [d, H, hd] <- [H*hd, d]
_same = Transform(_same_fn, _AS_IS)
_norm = Transform(_norm_fn, _AS_IS)
_in_heads = Transform(_in_heads_fn, _IN_HEADS)
_bias_heads = Transform(_bias_heads_fn, lambda s: (s[0] * s[1],))       # [H, hd] <- [H*hd]
_out_heads = Transform(_out_heads_fn, lambda s: (s[2], s[0] * s[1]))    # [H, hd, d] <- [d, H*hd]
_transpose = Transform(_transpose_fn, lambda s: s[::-1])
_split_qkv = Transform(_split_qkv_fn, _IN_HEADS)
_split_gate_up = Transform(_split_gate_up_fn, _AS_IS)


# -- the tables ----------------------------------------------------------------------------
def _common_top() -> list[Rule]:
    return [
        Rule("model.embed_tokens.weight", (("embed",),), _same, per_layer=False),
        Rule("model.norm.weight", (("final_norm",),), _norm, per_layer=False),
        Rule("lm_head.weight", (("lm_head",),), _transpose, per_layer=False),
    ]


def _attn_rules(fused: bool) -> list[Rule]:
    p = "model.layers.{i}.self_attn."
    if fused:
        rules = [Rule(p + "qkv_proj.weight", (("wq",), ("wk",), ("wv",)), _split_qkv)]
    else:
        rules = [Rule(p + f"{n}_proj.weight", ((f"w{n}",),), _in_heads) for n in "qkv"]
    rules += [Rule(p + "o_proj.weight", (("wo",),), _out_heads)]
    rules += [Rule(p + f"{n}_proj.bias", ((f"b{n}",),), _bias_heads) for n in "qkv"]
    rules += [Rule(p + f"{n}_norm.weight", ((f"{n}_norm",),), _norm) for n in "qk"]
    return rules


def _mlp_rules(fused: bool) -> list[Rule]:
    p = "model.layers.{i}.mlp."
    down = Rule(p + "down_proj.weight", (("mlp", "down"),), _transpose)
    if fused:
        return [Rule(p + "gate_up_proj.weight", (("mlp", "gate"), ("mlp", "up")),
                     _split_gate_up), down]
    return [Rule(p + "gate_proj.weight", (("mlp", "gate"),), _same),
            Rule(p + "up_proj.weight", (("mlp", "up"),), _same), down]


def _layer_norm_rules(gemma: bool) -> list[Rule]:
    p = "model.layers.{i}."
    if gemma:
        return [
            Rule(p + "input_layernorm.weight", (("attn_norm",),), _norm),
            Rule(p + "post_attention_layernorm.weight", (("post_attn_norm",),), _norm),
            Rule(p + "pre_feedforward_layernorm.weight", (("mlp_norm",),), _norm),
            Rule(p + "post_feedforward_layernorm.weight", (("post_mlp_norm",),), _norm),
        ]
    return [
        Rule(p + "input_layernorm.weight", (("attn_norm",),), _norm),
        Rule(p + "post_attention_layernorm.weight", (("mlp_norm",),), _norm),
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
