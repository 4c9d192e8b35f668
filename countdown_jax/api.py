"""Library entry point: load a converted model, pick a method, generate.

    import countdown_jax as cj
    model = cj.load("out/smollm2")
    out = cj.generate_text(model, "The capital of France is", method="m_countdown",
                           mode="ideal", sparsity=0.7, max_new_tokens=16)
    print(out.texts[0], out.realised_sparsity)
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax.config import ModelConfig
from countdown_jax.generate import Sampling, generate
from countdown_jax.policy import SparseSpec, make_policy


@dataclasses.dataclass(frozen=True)
class Model:
    params: Any
    cfg: ModelConfig
    path: Path
    tokenizer: Any = None


def load(model_dir, dtype=None, tokenizer: bool = True) -> Model:
    """Load a directory written by ``countdown-jax convert``."""
    from conversion.checkpoint import load_model

    params, cfg, _ = load_model(model_dir, dtype=dtype)
    tok = load_tokenizer(model_dir) if tokenizer else None
    return Model(params=params, cfg=cfg, path=Path(model_dir), tokenizer=tok)


def load_tokenizer(model_dir):
    tok_dir = Path(model_dir) / "tokenizer"
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} has no tokenizer/ folder; convert the model "
                                "from a source that carries a tokenizer")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def policy_name(kind: str, method: str, sparsity: float) -> str:
    """Where calibrated thresholds / predictors live inside a model directory."""
    return f"{kind}/{method}/r{sparsity:.2f}"


def sparsity_setup(model: Model, method: str = "dense", mode: str = "ideal",
                   sparsity: float = 0.0, implementation: str = "masked",
                   capacity: int | None = None, theta_offset: float = 0.0):
    """(spec, policy) for a method/mode. Practical modes read what calibration saved."""
    spec = SparseSpec(method=method, mode=mode, implementation=implementation,
                      capacity=capacity)
    n = model.cfg.num_layers
    if spec.is_dense:
        return spec, None
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if mode in ("ideal", "topk"):
        return spec, make_policy(n, sparsity=sparsity)
    if mode == "threshold":
        tree = _saved(model, "thresholds", method, sparsity, "no calibrated thresholds",
                      "calibrate")
        return spec, make_policy(n, sparsity=sparsity, threshold=tree["threshold"])
    tree = _saved(model, "predictors", method, sparsity,
                  f"{method} in predictor mode needs a trained predictor; none", "train-predictor")
    theta = np.asarray(tree.get("theta", np.zeros(n, np.float32))) + theta_offset
    return spec, make_policy(n, sparsity=sparsity, theta=theta,
                             predictor={"V": tree["V"], "U": tree["U"]})


def _saved(model: Model, kind: str, method: str, sparsity: float, missing: str, command: str):
    """A tree that calibration / predictor training saved in the model directory."""
    from conversion.checkpoint import load_tree

    name = policy_name(kind, method, sparsity)
    try:
        return load_tree(model.path, name)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{missing} at {name!r} in {model.path}: run `countdown-jax {command} "
            f"{model.path} --method {method} --sparsity {sparsity}`") from e


@dataclasses.dataclass
class TextOutput:
    texts: list[str]
    token_ids: list[list[int]]
    realised_sparsity: float              # mean over decode tokens and layers
    realised_sparsity_per_layer: np.ndarray
    tokens_per_s: float                   # generated tokens / wall time of the compiled call


def encode(tokenizer, prompts: Sequence[str]):
    """Right-padded token array + lengths; the tokenizer's own convention decides BOS
    (Gemma's adds one, SmolLM2's does not)."""
    ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    if any(len(x) == 0 for x in ids):
        raise ValueError("empty prompt")
    t = max(len(x) for x in ids)
    arr = np.zeros((len(ids), t), np.int32)
    for i, x in enumerate(ids):
        arr[i, :len(x)] = x
    return arr, np.array([len(x) for x in ids], np.int32)


def stop_tokens(model: Model) -> tuple[int, ...]:
    ids = set(model.cfg.eos_token_ids or ())
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        ids.add(int(model.tokenizer.eos_token_id))
    return tuple(sorted(ids))


def generate_text(model: Model, prompts: str | Sequence[str], *, method: str = "dense",
                  mode: str = "ideal", sparsity: float = 0.0, max_new_tokens: int = 32,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  seed: int = 0, implementation: str = "masked", attention: str = "xla",
                  timed: bool = True) -> TextOutput:
    if model.tokenizer is None:
        raise ValueError("model was loaded without a tokenizer")
    if isinstance(prompts, str):
        prompts = [prompts]
    spec, policy = sparsity_setup(model, method, mode, sparsity, implementation)
    tokens, lengths = encode(model.tokenizer, prompts)
    kwargs = dict(max_new_tokens=max_new_tokens, spec=spec,
                  sampling=Sampling(temperature, top_k, top_p), stop_tokens=stop_tokens(model),
                  attention=attention)
    args = (model.params, model.cfg, jnp.asarray(tokens), jnp.asarray(lengths),
            jax.random.PRNGKey(seed), policy)
    if timed:  # compile once outside the timing
        jax.block_until_ready(generate(*args, **kwargs))
    t0 = time.perf_counter()
    gen = jax.block_until_ready(generate(*args, **kwargs))
    dt = time.perf_counter() - t0
    num = np.asarray(gen.num_tokens)
    out_ids = [np.asarray(gen.tokens)[i, :num[i]].tolist() for i in range(len(prompts))]
    stops = set(stop_tokens(model))
    texts = [model.tokenizer.decode([t for t in ids if t not in stops]) for ids in out_ids]
    per_layer = np.asarray(gen.realised_sparsity)
    return TextOutput(texts=texts, token_ids=out_ids, realised_sparsity=float(per_layer.mean()),
                      realised_sparsity_per_layer=per_layer,
                      tokens_per_s=float(num.sum() / dt))
