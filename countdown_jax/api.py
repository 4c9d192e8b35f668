"""Library entry point: load a converted model, pick a method, generate (or sweep).

    import countdown_jax as cj
    model = cj.load("out/smollm2")
    out = cj.generate_text(model, "The capital of France is", method="m_countdown",
                           mode="ideal", sparsity=0.7, max_new_tokens=16)
    print(out.texts[0], out.realised_sparsity)
    for res in cj.sweep(model, "The capital of France is", method="m_countdown",
                        sparsities=[0.5, 0.7, 0.9], max_new_tokens=16):
        print(res.sparsity, res.realised_sparsity, res.texts[0])
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from countdown_jax import fast_path
from countdown_jax.config import ModelConfig
from countdown_jax.decode_path import PORTABLE, DecodePath
from countdown_jax.generate import (Sampling, compiled, decode_jit, decode_params,
                                    decode_policy, finish, generate, is_finished, layer_form,
                                    start_jit)
from countdown_jax.policy import (BUDGET_MODES, Budget, SparseSpec, make_policy,
                                  stack_policies)


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model. A pytree whose only leaves are the params (config, path and
    tokenizer are static), so ``jax.tree.map`` / ``jax.jit`` / ``jax.device_put`` apply."""

    params: Any
    cfg: ModelConfig
    path: Path
    tokenizer: Any = None


jax.tree_util.register_dataclass(Model, data_fields=["params"],
                                 meta_fields=["cfg", "path", "tokenizer"])


def load(model_dir, dtype=None, tokenizer: bool = True) -> Model:
    """Load a directory written by ``countdown-jax convert``; ``dtype`` casts the floating
    params (None: as stored)."""
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


def policy_name(kind: str, method: str, sparsity: float | Budget) -> str:
    """Where calibrated thresholds / predictors live inside a model directory (one per
    sparsity on a 0.01 grid; any other value would silently share its neighbour's fit);
    a ``Budget``'s per-layer allocation: ``budget-<mode>/<method>/b<share>``."""
    if isinstance(sparsity, Budget):
        return f"{kind}/{method}/b{sparsity.share:.2f}"
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if abs(round(sparsity, 2) - sparsity) > 1e-9:
        raise ValueError(f"sparsity {sparsity} is not on the 0.01 grid that calibrated "
                         f"thresholds / predictors are saved on; use e.g. {round(sparsity, 2)}")
    return f"{kind}/{method}/r{sparsity:.2f}"


def _practical(mode: str):
    """(kind, hint, command) of the saved fit a practical mode reads, None otherwise."""
    if mode == "threshold":
        return "thresholds", "no calibrated thresholds", "calibrate"
    if mode == "predictor":
        return "predictors", "{method} in predictor mode needs a trained predictor; none", \
            "train-predictor"
    if mode == "proxy":
        return "proxy", "{method} in proxy mode needs thresholds calibrated on its proxy; " \
            "none", "calibrate"
    if mode == "cascade":
        return "cascade", "{method} in cascade mode needs a fitted cascade (predictor, " \
            "candidate theta, |s| threshold); none", None
    return None


def check_setup(model_dir, method: str = "dense", mode: str = "ideal",
                sparsity: float | Budget | None = None,
                capacity: int | None = None) -> SparseSpec:
    """Every check ``sparsity_setup`` makes that needs no weights (method / mode / sparsity,
    the saved thresholds or predictor present): the CLI runs it before loading a model.
    The spec's implementation is the reference ("masked"); decode runs its ``DecodePath``.
    A ``Budget`` names the per-layer allocation `calibrate --budget` saved."""
    from conversion.checkpoint import list_trees

    spec = SparseSpec(method=method, mode=mode, capacity=capacity)
    if spec.is_dense:
        return spec
    if sparsity is None:
        raise ValueError(f"method {method!r} needs a sparsity r in [0, 1) (e.g. 0.7); "
                         "without one it would run dense")
    if isinstance(sparsity, Budget):
        if mode not in BUDGET_MODES:
            raise ValueError(f"bytes budgets are allocated for modes {BUDGET_MODES}, not "
                             f"{mode!r}")
        name = policy_name(f"budget-{mode}", method, sparsity)
        if name not in list_trees(model_dir):
            saved = [n.rsplit("/b", 1)[1] for n in list_trees(model_dir)
                     if n.startswith(f"budget-{mode}/{method}/")]
            bits = " --proxy-bits 4" if mode == "proxy" else ""
            raise FileNotFoundError(
                f"no {method}/{mode} allocation for {sparsity} at {name!r} in {model_dir} "
                f"(saved for bytes {', '.join(saved) or 'none'}): run `countdown-jax "
                f"calibrate {model_dir} --method {method} --mode {mode}{bits} --budget "
                f"{sparsity.share:.2f}`")
        return spec
    if 0.0 <= sparsity < 1.0:       # fast_path picks a decode batch's kernel by the target r
        spec = dataclasses.replace(spec, target_sparsity=float(sparsity))
    practical = _practical(mode)
    if practical is None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        return spec
    kind, missing, command = practical
    name = policy_name(kind, method, sparsity)
    if name not in list_trees(model_dir):
        saved = [n.rsplit("/r", 1)[1] for n in list_trees(model_dir)
                 if n.startswith(f"{kind}/{method}/")]
        fix = (f"countdown-jax {command} {model_dir} --method {method} --sparsity "
               f"{sparsity}" + (" --proxy-bits 4" if mode == "proxy" else "") if command else
               f"python -m experiments.quality_frontier --model {model_dir} --stage fit")
        raise FileNotFoundError(
            f"{missing.format(method=method)} at {name!r} in {model_dir} (saved for r = "
            f"{', '.join(saved) or 'none'}): run `{fix}`")
    return spec


def sparsity_setup(model: Model, method: str = "dense", mode: str = "ideal",
                   sparsity: float | None = 0.0, capacity: int | None = None,
                   theta_offset: float = 0.0):
    """(spec, policy) for a method/mode. Practical modes read what calibration saved."""
    from conversion.checkpoint import load_tree

    spec = check_setup(model.path, method, mode, sparsity, capacity)
    n = model.cfg.num_layers
    if spec.is_dense:
        return spec, None
    if isinstance(sparsity, Budget):
        return _budget_setup(model, spec, sparsity)
    if mode in ("ideal", "topk"):
        return spec, make_policy(n, sparsity=sparsity)
    kind = _practical(mode)[0]
    tree = load_tree(model.path, policy_name(kind, method, sparsity))
    if mode == "threshold":
        return spec, make_policy(n, sparsity=sparsity, threshold=tree["threshold"])
    if mode == "proxy":
        from countdown_jax.proxy import quantize_mlp

        proxy = quantize_mlp(model.params["layers"]["mlp"], int(tree["bits"]),
                             int(tree["group"]))
        return spec, make_policy(n, sparsity=sparsity, threshold=tree["threshold"],
                                 proxy=proxy)
    theta = np.asarray(tree.get("theta", np.zeros(n, np.float32))) + theta_offset
    return spec, make_policy(n, sparsity=sparsity, theta=theta,
                             threshold=tree["threshold"] if mode == "cascade" else None,
                             predictor={"V": tree["V"], "U": tree["U"]})


def _budget_setup(model: Model, spec: SparseSpec, budget: Budget):
    """(spec, policy) of a saved per-layer allocation: per-layer r or tau (the proxy
    rebuilt from the weights); the spec's target is the mean r."""
    from conversion.checkpoint import load_tree

    tree = load_tree(model.path, policy_name(f"budget-{spec.mode}", spec.method, budget))
    n = model.cfg.num_layers
    spec = dataclasses.replace(spec, target_sparsity=float(1.0 - np.mean(tree["kept"])))
    if spec.mode in ("ideal", "topk"):
        return spec, make_policy(n, sparsity=tree["sparsity"])
    proxy = None
    if spec.mode == "proxy":
        from countdown_jax.proxy import quantize_mlp

        proxy = quantize_mlp(model.params["layers"]["mlp"], int(tree["bits"]),
                             int(tree["group"]))
    return spec, make_policy(n, threshold=tree["threshold"], proxy=proxy)


@dataclasses.dataclass
class TextOutput:
    """One generation setting's result. Rates exclude compilation; ``tokens_per_s`` is the
    decode rate (tokens after the first, per second of the decode loop), the prompt's
    prefill has its own rate."""

    texts: list[str]
    token_ids: list[list[int]]
    realised_sparsity: float              # mean over decode tokens and layers
    realised_sparsity_per_layer: np.ndarray
    tokens_per_s: float = math.nan        # decode: generated tokens after the first / s
    prefill_tokens_per_s: float = math.nan  # prompt tokens / s of the prefill
    seconds: dict = dataclasses.field(default_factory=dict)  # compile, prefill, decode
    method: str = "dense"
    mode: str = "ideal"
    sparsity: float = 0.0                 # the target r
    path: DecodePath | None = None        # what decode ran (resolved)


def bucket_length(n: int, minimum: int = 16) -> int:
    """Padded prompt length: the next power of two (>= minimum), so prompts of nearby
    lengths share one compiled program."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def format_prompts(tokenizer, prompts: Sequence[str], chat: bool = False) -> list[list[int]]:
    """Token ids per prompt. chat: as one user turn through the tokenizer's chat template
    (which places the special tokens itself); otherwise the tokenizer's own convention
    decides BOS (Gemma's adds one, SmolLM2's does not)."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; drop --chat")
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                               tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    else:
        ids = [tokenizer.encode(p, add_special_tokens=True) for p in prompts]
    if any(len(x) == 0 for x in ids):
        raise ValueError("empty prompt")
    return ids


def encode(tokenizer, prompts: Sequence[str], chat: bool = False, bucket: bool = True):
    """Right-padded token array (length bucketed, see ``bucket_length``) + lengths."""
    ids = format_prompts(tokenizer, prompts, chat)
    t = max(len(x) for x in ids)
    arr = np.zeros((len(ids), bucket_length(t) if bucket else t), np.int32)
    for i, x in enumerate(ids):
        arr[i, :len(x)] = x
    return arr, np.array([len(x) for x in ids], np.int32)


def stop_tokens(model: Model) -> tuple[int, ...]:
    ids = set(model.cfg.eos_token_ids or ())
    if model.tokenizer is not None and model.tokenizer.eos_token_id is not None:
        ids.add(int(model.tokenizer.eos_token_id))
    return tuple(sorted(ids))


def _check_context(cfg: ModelConfig, longest: int, max_new_tokens: int):
    limit = getattr(cfg, "max_position_embeddings", None)
    if limit and longest + max_new_tokens > limit:
        warnings.warn(f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                      f"the model's max_position_embeddings ({limit}); output past "
                      f"{limit} positions is not what the model was trained for",
                      stacklevel=3)


def _ids(tokens, num) -> list[list[int]]:
    tokens, num = np.asarray(tokens), np.asarray(num)
    return [tokens[i, :num[i]].tolist() for i in range(len(num))]


def _texts(model: Model, ids) -> list[str]:
    stops = set(stop_tokens(model))
    return [model.tokenizer.decode([t for t in x if t not in stops]) for x in ids]


def generate_tokens(model: Model, tokens, lengths, spec: SparseSpec, policy=None, *,
                    max_new_tokens: int = 32, sampling: Sampling = Sampling(), seed: int = 0,
                    path: DecodePath = DecodePath(),
                    on_chunk: Callable[[dict], None] | None = None,
                    stream_every: int = 8) -> TextOutput:
    """What ``generate_text`` runs once the prompts are token ids (right-padded [B, T],
    lengths [B]) and the rule is a (spec, policy): prefill and decode compiled ahead and
    timed apart, decode on ``path`` resolved by ``fast_path``. on_chunk(state) is called
    before the first and after every ``stream_every`` decode steps (streaming). The result
    has token ids, rates and the resolved path, no texts."""
    if stream_every < 1:
        raise ValueError(f"stream_every must be >= 1, got {stream_every}")
    batch = len(lengths)
    path = fast_path.resolve(path, spec, batch, held_layers=layer_form(model.params))
    params = decode_params(model.params, path.layers)
    policy = decode_policy(params, policy)
    common = dict(cfg=model.cfg, spec=spec, sampling=sampling, stop_tokens=stop_tokens(model))
    start_args = (params, jnp.asarray(tokens), jnp.asarray(lengths),
                  jax.random.PRNGKey(seed), policy)
    t0 = time.perf_counter()
    start_c = compiled(start_jit, dict(common, max_new_tokens=max_new_tokens, cache_dtype=None),
                       *start_args)
    t1 = time.perf_counter()
    state = jax.block_until_ready(start_c(*start_args))
    t2 = time.perf_counter()
    decode_c = compiled(decode_jit, dict(common, path=path), params, state, policy,
                        jnp.int32(0))
    t3 = time.perf_counter()
    if on_chunk is None:
        state = jax.block_until_ready(decode_c(params, state, policy,
                                               jnp.int32(max_new_tokens)))
    else:
        while True:
            on_chunk(state)
            if is_finished(state):
                break
            state = decode_c(params, state, policy,
                             jnp.int32(int(state["step"]) + stream_every))
    t4 = time.perf_counter()
    gen = finish(state)
    per_layer = np.asarray(gen.realised_sparsity)
    decoded = int(np.asarray(gen.num_tokens).sum()) - batch
    return TextOutput(
        texts=[], token_ids=_ids(gen.tokens, gen.num_tokens),
        realised_sparsity=float(per_layer.mean()), realised_sparsity_per_layer=per_layer,
        tokens_per_s=decoded / (t4 - t3) if decoded else math.nan,
        prefill_tokens_per_s=float(np.asarray(lengths).sum()) / (t2 - t1),
        seconds=dict(compile=(t1 - t0) + (t3 - t2), prefill=t2 - t1, decode=t4 - t3),
        method=spec.method, mode=spec.mode, path=path)


def generate_text(model: Model, prompts: str | Sequence[str], *, method: str = "dense",
                  mode: str = "ideal", sparsity: float | None = None,
                  max_new_tokens: int = 32, sampling: Sampling = Sampling(), seed: int = 0,
                  path: DecodePath = DecodePath(), chat: bool = False,
                  stream: Callable[[list[str]], None] | None = None,
                  stream_every: int = 8) -> TextOutput:
    """Generate from one prompt or a batch, dense or with a sparse FFN rule.

    method: one of ``policy.METHODS`` (``Method``). mode: ideal | topk (oracle, per
        token), threshold (calibrated thresholds), predictor (a trained predictor), proxy
        (D's low-bit proxy, ``calibrate_proxy``), cascade.
    sparsity: target fraction r of FFN neurons skipped per decode token (required for a
        sparse method; practical modes need a fit saved at that r, on a 0.01 grid), or a
        ``Budget``: the per-layer allocation saved for that bytes share.
    sampling: ``Sampling(temperature, top_k, top_p)`` (greedy by default); seed drives it.
    path: how decode runs (``DecodePath``; every field "auto" by default: the fastest
        exact path for the backend, ``fast_path``). The result's ``path`` says what ran.
    chat: wrap each prompt as a user turn with the tokenizer's chat template.
    stream: called with the new text of every row after each ``stream_every`` decode steps.

    Prompts are padded to a power-of-two length bucket, so nearby lengths reuse one
    compile. Prefill and decode run as two compiled programs (compiled ahead, timed
    apart); the result carries both rates and the realised sparsity measured from the
    masks applied.
    """
    if model.tokenizer is None:
        raise ValueError("model was loaded without a tokenizer")
    if isinstance(prompts, str):
        prompts = [prompts]
    spec, policy = sparsity_setup(model, method, mode, sparsity)
    tokens, lengths = encode(model.tokenizer, prompts, chat)
    _check_context(model.cfg, int(lengths.max()), max_new_tokens)
    on_chunk = None
    if stream is not None:
        shown = [""] * len(prompts)

        def on_chunk(state):
            nonlocal shown
            texts = _texts(model, _ids(state["out"], state["num"]))
            stream([t[len(s):] for t, s in zip(texts, shown)])
            shown = texts
    out = generate_tokens(model, tokens, lengths, spec, policy, max_new_tokens=max_new_tokens,
                          sampling=sampling, seed=seed, path=path, on_chunk=on_chunk,
                          stream_every=stream_every)
    return dataclasses.replace(out, texts=_texts(model, out.token_ids),
                               sparsity=0.0 if spec.is_dense else spec.target_sparsity)


def sweep(model: Model, prompts: str | Sequence[str], *, method: str,
          sparsities: Sequence[float], mode: str = "ideal", max_new_tokens: int = 32,
          sampling: Sampling = Sampling(), seed: int = 0,
          chat: bool = False) -> list[TextOutput]:
    """Generate at every sparsity in one call: the policies are stacked and generation is
    ``jax.vmap``-ed over them (one compile, all settings in one program, on the portable
    decode path). Returns one ``TextOutput`` per sparsity, in order, each with its
    realised sparsity."""
    if model.tokenizer is None:
        raise ValueError("model was loaded without a tokenizer")
    if isinstance(prompts, str):
        prompts = [prompts]
    sparsities = [float(r) for r in sparsities]
    if not sparsities:
        raise ValueError("sweep needs at least one sparsity")
    setups = [sparsity_setup(model, method, mode, r) for r in sparsities]
    spec = setups[0][0]
    if spec.is_dense:
        raise ValueError("sweep needs a sparse method (dense has nothing to sweep)")
    policies = stack_policies([pol for _, pol in setups])
    tokens, lengths = encode(model.tokenizer, prompts, chat)
    _check_context(model.cfg, int(lengths.max()), max_new_tokens)
    kw = dict(max_new_tokens=max_new_tokens, spec=spec, sampling=sampling,
              stop_tokens=stop_tokens(model))
    tokens, lengths, key = jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(seed)
    # one program vmapped over the settings (quality sweeps): the portable decode path
    run = jax.vmap(lambda pol: generate(model.params, model.cfg, tokens, lengths, key, pol,
                                        path=PORTABLE, **kw))
    t0 = time.perf_counter()
    gen = jax.block_until_ready(run(policies))
    seconds = time.perf_counter() - t0
    per_layer = np.asarray(gen.realised_sparsity)   # [R, L]
    outs = []
    for i, r in enumerate(sparsities):
        ids = _ids(gen.tokens[i], gen.num_tokens[i])
        texts = _texts(model, ids)
        outs.append(TextOutput(texts=texts, token_ids=ids,
                               realised_sparsity=float(per_layer[i].mean()),
                               realised_sparsity_per_layer=per_layer[i],
                               seconds=dict(total_with_compile=seconds),
                               method=method, mode=mode, sparsity=r, path=PORTABLE))
    return outs
