"""The lm-evaluation-harness model ``countdown-jax`` (lm-eval 0.4.x; ``pip install
'countdown-jax[lm-eval]'``), registered with lm-eval when this module is imported.

Log-likelihood requests run through ``countdown_jax.evaluate.score``, the scorer of
``countdown-jax eval``: the context is prefilled dense, the continuation runs under the sparse
rule (its first token is predicted from the dense context), requests are bucketed by length
so a run compiles a handful of programs. Tokenization is the evaluator's ``encode_pair`` and a
context is cut to its first token plus its last ``MAX_SCORED_CONTEXT - 1`` tokens when the
continuation has several tokens (as ``mc_items`` does). Rolling log-likelihood (perplexity)
scores lm-eval's disjoint windows of ``ROLLING_WINDOW`` tokens: a full window is a sparse
continuation after one dense token (the prefix token first), a document's last, shorter
window keeps the last ``MAX_SCORED_CONTEXT`` tokens before it as dense context.
``generate_until`` runs ``api.generate_tokens`` (prefill dense, decode sparse) and cuts each
text at the request's first stop string.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the optional extra is missing
    raise ImportError("the lm-eval model needs lm-evaluation-harness: "
                      "pip install 'countdown-jax[lm-eval]' (lm-eval==0.4.13)") from e

from countdown_jax import api
from countdown_jax.evaluate.items import MAX_SCORED_CONTEXT, Item, encode_pair
from countdown_jax.evaluate.scoring import MAX_ROWS, score
from countdown_jax.evaluate.settings import (EVAL_MODES, Setting, dense_setting, ideal_setting,
                                             spec_mode, stacked_setting)
from countdown_jax.generate import Sampling

ROLLING_WINDOW = 512          # tokens per rolling window (the scorer's buckets go to 641)
MAX_CONTINUATION = 641        # the scorer's largest continuation bucket (640 inputs)
MODES = EVAL_MODES + ("threshold", "predictor")
_LM_EVAL_KWARGS = ("device", "max_batch_size")   # passed by lm-eval, meaningless here


def resolve_model_dir(source, dtype: str = "float32") -> Path:
    """A converted model directory for SOURCE: itself when ``countdown-jax convert`` wrote
    it; the registry names ``smollm2`` / ``gemma3`` (embedded weights); otherwise a source
    ``convert`` accepts (HF directory, .gguf), converted once into the per-user cache."""
    from conversion import registry_models as reg

    path = Path(source)
    if (path / "params").is_dir():
        return path
    if not path.exists() and str(source) in (reg.SMOLLM2, reg.GEMMA3):
        return reg.converted(str(source), dtype)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {source} (a directory written by "
                                "`countdown-jax convert`, a source it accepts, or smollm2 / "
                                "gemma3)")
    from conversion.convert import convert

    stamp = f"{path.resolve()}:{path.stat().st_mtime_ns}"
    key = hashlib.sha256(stamp.encode()).hexdigest()[:12]
    out = reg.cache_dir() / f"lm-eval-{path.name}-{key}-{dtype}"
    if not (out / "params").is_dir():
        convert(path, out, dtype=dtype, overwrite=out.exists())
    return out


def generation_mode(method: str, mode: str) -> str:
    """Scoring's mode names (ideal / practical / proxy) or generate's (threshold /
    predictor) -> the SparseSpec mode."""
    if method == "dense":
        return "ideal"
    if mode in ("threshold", "predictor"):
        return mode
    if mode not in EVAL_MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return spec_mode(method, mode)


def scoring_setting(model: api.Model, method: str, mode: str, sparsity) -> Setting:
    """The one ``Setting`` the scorer runs for a method / mode / sparsity."""
    if method == "dense":
        return dense_setting()
    smode = generation_mode(method, mode)
    if smode == "ideal":
        return ideal_setting(model.cfg.num_layers, method, [float(sparsity)])
    spec, pol = api.sparsity_setup(model, method, smode, float(sparsity))
    return stacked_setting(f"{method}/{smode}", spec, [float(sparsity)], [pol])


def _rows(batch_size) -> int:
    """lm-eval's batch_size (int, "auto", "auto:N", None) -> scorer rows (a power of two)."""
    if batch_size is None or str(batch_size).startswith("auto"):
        return MAX_ROWS
    b = int(batch_size)
    if b < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return 1 << (b.bit_length() - 1)


@register_model("countdown-jax")
class HarnessLM(TemplateLM):
    """lm-eval model on a converted countdown-jax model.

    model_args: pretrained (or model_dir): a converted directory, a source ``convert``
    accepts, or smollm2 / gemma3; method: dense | cats | m_countdown | d_countdown | dejavu |
    s_countdown; mode: ideal | practical | proxy (as ``countdown-jax eval``; threshold /
    predictor also accepted); sparsity: target r; dtype: float32 | bfloat16 (None: as
    stored); batch_size: rows per scored batch (a power of two; generation batch too);
    max_gen_toks: default generation budget; seed: sampling seed."""

    def __init__(self, pretrained=None, method: str = "dense", mode: str = "ideal",
                 sparsity=None, dtype=None, batch_size=None, max_gen_toks: int = 256,
                 seed: int = 0, progress: bool = True, **kwargs):
        super().__init__()
        pretrained = kwargs.pop("model_dir", pretrained)
        unknown = sorted(k for k in kwargs if k not in _LM_EVAL_KWARGS)
        if unknown:
            raise ValueError(f"countdown-jax model_args: unknown {unknown}; expected pretrained "
                             "(or model_dir), method, mode, sparsity, dtype, batch_size, "
                             "max_gen_toks, seed")
        if pretrained is None:
            raise ValueError("countdown-jax model_args need pretrained=<converted model dir>")
        sparsity = None if sparsity in (None, "", "None") else float(sparsity)
        model_dir = resolve_model_dir(pretrained, dtype or "float32")
        api.check_setup(model_dir, method, generation_mode(method, mode), sparsity)
        self.model = api.load(model_dir, dtype=dtype)
        self.method, self.mode, self.sparsity = method, mode, sparsity
        self.setting = scoring_setting(self.model, method, mode, sparsity)
        self.rows = _rows(batch_size)
        self.max_gen_toks, self.seed, self.progress = int(max_gen_toks), int(seed), progress
        self.tokenizer = self.model.tokenizer

    def with_rule(self, method: str, mode: str = "ideal", sparsity=None) -> "HarnessLM":
        """A sibling model on the same loaded weights with another FFN rule (one load
        serves a sweep of rules)."""
        api.check_setup(self.model.path, method, generation_mode(method, mode), sparsity)
        other = copy.copy(self)
        other.method, other.mode, other.sparsity = method, mode, sparsity
        other.setting = scoring_setting(self.model, method, mode, sparsity)
        other.__dict__.pop("_gen_rule", None)
        return other

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return int(getattr(self.model.cfg, "max_position_embeddings", 2048) or 2048)

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.path).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def _pair(self, context: str, continuation: str):
        """(context ids, continuation ids) as the evaluator's ``encode_pair`` makes them;
        trailing context spaces move to the continuation (lm-eval's rule); an empty
        context is the prefix token."""
        if context == "":
            return (self.prefix_token_id,), tuple(self.tok_encode(continuation))
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        return encode_pair(self.tokenizer, context, continuation)

    # ------------------------------------------------------------------ scoring

    def _score(self, pairs, desc: str, disable_tqdm: bool):
        """(log-likelihood, greedy) per (context ids, continuation ids) pair."""
        items = []
        for i, (ctx, cont) in enumerate(pairs):
            ctx, cont = tuple(ctx), tuple(cont)
            if not cont:
                raise ValueError(f"request {i}: empty continuation")
            if len(cont) > MAX_CONTINUATION:
                raise ValueError(f"request {i}: continuation of {len(cont)} tokens exceeds "
                                 f"the scorer's {MAX_CONTINUATION}")
            if len(cont) > 1 and len(ctx) > MAX_SCORED_CONTEXT:   # as mc_items cuts
                ctx = ctx[:1] + ctx[len(ctx) - MAX_SCORED_CONTEXT + 1:]
            items.append(Item("lm-eval", i, 0, ctx, cont))
        if not items:
            return np.zeros(0), np.zeros(0, bool)
        scores = score(self.model.params, self.model.cfg, items, [self.setting],
                       progress=self.progress and not disable_tqdm, desc=desc,
                       max_rows=self.rows)
        return scores.item_ll(0, 0), scores.item_greedy(0, 0)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        ll, greedy = self._score([(c, y) for _, c, y in requests], "lm-eval loglikelihood",
                                 disable_tqdm)
        out = []
        for (key, _, _), v, g in zip(requests, ll, greedy):
            res = (float(v), bool(g))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
            out.append(res)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        reqs = [((c, y), *self._pair(c, y)) for c, y in (r.args[:2] for r in requests)]
        return self._loglikelihood_tokens(reqs, disable_tqdm=disable_tqdm)

    def rolling_windows(self, text: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        """lm-eval's disjoint rolling windows of TEXT (prefix token first) as (context,
        continuation); a context keeps its last ``MAX_SCORED_CONTEXT`` tokens (contiguous:
        the scorer's cache holds no more)."""
        tokens = self.tok_encode(text)
        windows = (lm_utils.make_disjoint_window(w) for w in
                   lm_utils.get_rolling_token_windows(tokens, self.prefix_token_id,
                                                      ROLLING_WINDOW, 1))
        return [(tuple(c[-MAX_SCORED_CONTEXT:]), tuple(y)) for c, y in windows]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        owner, pairs = [], []
        for i, r in enumerate(requests):
            for w in self.rolling_windows(r.args[0]):
                owner.append(i)
                pairs.append(w)
        ll, _ = self._score(pairs, "lm-eval rolling", disable_tqdm)
        total = np.zeros(len(requests))
        np.add.at(total, np.asarray(owner, int), ll)
        for r, v in zip(requests, total):
            self.cache_hook.add_partial("loglikelihood_rolling", (r.args[0],), float(v))
        return [float(v) for v in total]

    # ------------------------------------------------------------------ generation

    def _generation_rule(self):
        if not hasattr(self, "_gen_rule"):
            self._gen_rule = api.sparsity_setup(
                self.model, self.method, generation_mode(self.method, self.mode),
                self.sparsity)
        return self._gen_rule

    def _generate_group(self, prompts: list[str], kwargs: dict) -> list[str]:
        """One gen_kwargs group: batches of ``rows`` prompts (the last padded), longest
        first, texts cut at the first stop string."""
        kwargs = dict(kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not kwargs.pop("do_sample", temperature > 0):
            temperature = 0.0
        sampling = Sampling(temperature, int(kwargs.pop("top_k", 0) or 0),
                            float(kwargs.pop("top_p", 1.0) or 1.0))
        spec, policy = self._generation_rule()
        ids = api.format_prompts(self.tokenizer, prompts)
        keep = max(1, self.max_length - max_new)
        ids = [x[-keep:] for x in ids]      # lm-eval's rule: keep the prompt's end
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        rows = min(self.rows, len(ids))
        out = [""] * len(ids)
        for s in range(0, len(order), rows):
            chunk = order[s:s + rows]
            batch = [ids[i] for i in chunk] + [ids[chunk[0]]] * (rows - len(chunk))
            tokens = np.zeros((rows, api.bucket_length(max(map(len, batch)))), np.int32)
            for j, x in enumerate(batch):
                tokens[j, :len(x)] = x
            lengths = np.array([len(x) for x in batch], np.int32)
            res = api.generate_tokens(self.model, tokens, lengths, spec, policy,
                                      max_new_tokens=max_new, sampling=sampling,
                                      seed=self.seed)
            stops = set(api.stop_tokens(self.model))
            for j, i in enumerate(chunk):
                text = self.tokenizer.decode([t for t in res.token_ids[j] if t not in stops])
                out[i] = cut_at_stop(text, until)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        bar = tqdm(total=len(requests), desc="lm-eval generate_until",
                   disable=disable_tqdm or not self.progress)
        for key, idx in groups.items():
            texts = self._generate_group([requests[i].args[0] for i in idx], json.loads(key))
            for i, t in zip(idx, texts):
                out[i] = t
                self.cache_hook.add_partial("generate_until", requests[i].args, t)
            bar.update(len(idx))
        bar.close()
        return out


def cut_at_stop(text: str, until) -> str:
    """TEXT up to the earliest occurrence of any stop string."""
    cut = len(text)
    for s in until:
        if s:
            k = text.find(s)
            if k != -1:
                cut = min(cut, k)
    return text[:cut]
