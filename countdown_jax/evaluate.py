"""Offline quality evaluation: log-likelihood scoring with a dense context and a sparse
continuation, multiple-choice accuracy, perplexity, LAMBADA, generation agreement.

Every request is one *item*: context tokens c, continuation tokens y. Only the
continuation runs sparse (method.md, "Where sparsity applies"), so

  1. the context is prefilled once, dense, into a KV cache (``model.prefill``), with logits
     at its last position only: log p(y_0 | c) is the same for every method and sparsity;
  2. per sparsity setting, y[:-1] is run as one chunk against that cache
     (``model.extend``) with the sparse spec, giving log p(y_j | c, y_<j) for j >= 1.
     Settings that share a spec are stacked and ``jax.vmap``-ed over their policy: one
     compile serves every r of a method.

Consequence worth knowing: a one-token continuation (BoolQ's " yes"/" no") is scored
entirely from the dense context, so sparsity cannot change it.

Items are bucketed by padded (context, continuation) length, rows per batch sized so the
float32 logits of a batch stay under a memory budget (Gemma-3's vocabulary is 262144).

Metrics (lm-eval-harness definitions): acc = argmax_i ll_i is the gold choice; acc_norm =
argmax_i ll_i / bytes_i with bytes_i the UTF-8 length of choice i's continuation string.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from countdown_jax import model as model_lib
from countdown_jax.policy import DENSE, SparseSpec, make_policy, stack_policies

LOGIT_BUDGET_BYTES = 1 << 29   # float32 logits per batch (all stacked settings together)
MAX_ROWS = 64
# Few distinct shapes = few compiles (each spec compiles once per continuation bucket):
# the KV cache of every item with a continuation is MAX_SCORED_CONTEXT + its bucket long,
# whatever the context bucket of its (dense, single-spec) prefill.
MAX_SCORED_CONTEXT = 128
_CTX_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048)
_CONT_BUCKETS = (8, 16, 40, 80, 160, 320)


# -- items ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Item:
    """One scored request. ``score_from``: continuation index from which tokens count."""

    task: str
    doc: int
    choice: int
    context: tuple[int, ...]
    continuation: tuple[int, ...]
    score_from: int = 0
    nbytes: int = 0        # UTF-8 bytes of the continuation string (acc_norm)


def encode_pair(tokenizer, context: str, continuation: str, max_context: int = 1024):
    """lm-eval-harness style: continuation tokens = tokens of (context + continuation)
    after the context's own tokens; the tokenizer's special tokens (BOS) lead the context.
    A context longer than max_context keeps its first token and its last tokens."""
    ctx = tokenizer.encode(context, add_special_tokens=True)
    whole = tokenizer.encode(context + continuation, add_special_tokens=True)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
        cont = whole[len(ctx):]
    else:  # the boundary merged into one token: encode the continuation alone
        cont = tokenizer.encode(continuation, add_special_tokens=False)
    if not ctx or not cont:
        raise ValueError(f"empty context or continuation after tokenization: "
                         f"{context[-40:]!r} / {continuation!r}")
    if len(ctx) > max_context:
        ctx = ctx[:1] + ctx[len(ctx) - max_context + 1:]
    return tuple(ctx), tuple(cont)


def mc_items(tokenizer, docs, max_context: int = 1024) -> list[Item]:
    """Items of multiple-choice docs. A context is cut (first token + last tokens) to
    MAX_SCORED_CONTEXT only when its continuation has sparse positions (> 1 token)."""
    items = []
    for d in docs:
        for i, (c, y) in enumerate(zip(d.contexts, d.continuations)):
            ctx, cont = encode_pair(tokenizer, c, y, max_context)
            if len(cont) > 1 and len(ctx) > MAX_SCORED_CONTEXT:
                ctx = ctx[:1] + ctx[len(ctx) - MAX_SCORED_CONTEXT + 1:]
            items.append(Item(d.task, d.doc_id, i, ctx, cont, 0, len(y.encode("utf-8"))))
    return items


def perplexity_items(tokenizer, texts, *, task: str = "boolq_ppl", prefix: int = 64,
                     scored: int = 41, min_tokens: int = 32) -> list[Item]:
    """Passage = dense prefix (up to ``prefix`` tokens, at most half the passage) + up to
    ``scored`` sparse tokens; perplexity counts the tokens predicted from sparse states
    (continuation index >= 1)."""
    items = []
    for i, t in enumerate(texts):
        ids = tokenizer.encode(t, add_special_tokens=True)
        if len(ids) < min_tokens:
            continue
        c = min(prefix, len(ids) // 2)
        y = ids[c:c + scored]
        items.append(Item(task, i, 0, tuple(ids[:c]), tuple(y), 1))
    return items


def lambada_items(tokenizer, lambada, *, task: str = "lambada", sparse_tail: int = 32,
                  max_context: int = MAX_SCORED_CONTEXT + 32) -> list[Item]:
    """LAMBADA with sparse decoding of the passage's end: the last ``sparse_tail`` context
    tokens and the target word run sparse after a dense prefix (the rest of the passage),
    and the target word is scored (accuracy = every target token is the greedy one)."""
    items = []
    for it in lambada:
        ctx, tgt = encode_pair(tokenizer, it.context, it.target, max_context)
        h = max(1, len(ctx) - sparse_tail)
        y = ctx[h:] + tgt
        items.append(Item(task, it.doc_id, 0, ctx[:h], y, len(y) - len(tgt)))
    return items


# -- compiled pieces ------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("cfg", "cache_len"))
def _dense_context(params, cfg, ctx, ctx_len, first, *, cache_len: int):
    """Dense prefill: cache, log p(first | ctx) [B], first == argmax [B]."""
    B = ctx.shape[0]
    cache = model_lib.init_cache(cfg, B, cache_len, params["embed"].dtype)
    logits, cache, _ = model_lib.prefill(params, cfg, ctx, ctx_len, cache,
                                         logits_at=(ctx_len - 1)[:, None])
    lp = jax.nn.log_softmax(logits[:, 0], axis=-1)
    lp_first = jnp.take_along_axis(lp, first[:, None], axis=-1)[:, 0]
    return cache, lp_first, jnp.argmax(logits[:, 0], axis=-1) == first


def _continuation(params, cfg, cache, y_in, y_tgt, start, valid, policy, spec):
    """One setting: per-position log p(y_tgt) [B, T], greedy hit [B, T], per-row kept
    sums over valid positions [L, B]."""
    logits, _, kept = model_lib.extend(params, cfg, y_in, start, cache, spec=spec,
                                       policy=policy)
    lp = jax.nn.log_softmax(logits, axis=-1)
    lp_t = jnp.take_along_axis(lp, y_tgt[..., None], axis=-1)[..., 0]
    hit = jnp.argmax(logits, axis=-1) == y_tgt
    vf = valid.astype(jnp.float32)
    return lp_t * vf, hit | ~valid, jnp.sum(kept * vf[None], axis=2)


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _continuation_sweep(params, cfg, cache, y_in, y_tgt, start, valid, policies, *, spec):
    """``_continuation`` vmapped over stacked policies (leading axis R); dense: R = 1."""
    if spec.is_dense:
        out = _continuation(params, cfg, cache, y_in, y_tgt, start, valid, None, spec)
        return jax.tree.map(lambda a: a[None], out)
    return jax.vmap(lambda p: _continuation(params, cfg, cache, y_in, y_tgt, start, valid, p,
                                            spec))(policies)


# -- settings -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Setting:
    """A spec plus R policies sharing it (e.g. every r of one method/mode)."""

    name: str                      # e.g. "cats/ideal"
    spec: SparseSpec
    sparsities: tuple[float, ...]  # target r per policy (0 for dense)
    policies: Any = None           # stacked policy pytree, leading axis R (None: dense)

    @property
    def size(self) -> int:
        return len(self.sparsities)


def dense_setting() -> Setting:
    return Setting("dense", DENSE, (0.0,), None)


def ideal_setting(num_layers: int, method: str, sparsities: Sequence[float],
                  mode: str = "ideal") -> Setting:
    pols = [make_policy(num_layers, sparsity=r) for r in sparsities]
    return Setting(f"{method}/{mode}", SparseSpec(method=method, mode=mode),
                   tuple(float(r) for r in sparsities), stack_policies(pols))


def stacked_setting(name: str, spec: SparseSpec, sparsities, policies: Sequence[dict]) -> Setting:
    return Setting(name, spec, tuple(float(r) for r in sparsities), stack_policies(policies))


# -- scoring --------------------------------------------------------------------------------
@dataclasses.dataclass
class Scores:
    """Per setting index s, per item: lp [n_tokens] (position 0 dense), greedy flags."""

    items: list[Item]
    settings: list[Setting]
    lp: list[list[np.ndarray]]           # [setting][r] -> object array of per-item lp
    hit: list[list[np.ndarray]]
    kept: dict                           # (setting, r, task) -> (sum kept [L], n tokens)
    seconds: float = 0.0

    def token_lp(self, s: int, r: int, i: int) -> np.ndarray:
        return self.lp[s][r][i]

    def item_ll(self, s: int, r: int) -> np.ndarray:
        """Summed log-likelihood of each item's scored tokens (index >= score_from)."""
        return np.array([self.lp[s][r][i][it.score_from:].sum()
                         for i, it in enumerate(self.items)])

    def item_greedy(self, s: int, r: int) -> np.ndarray:
        return np.array([bool(self.hit[s][r][i][it.score_from:].all())
                         for i, it in enumerate(self.items)])

    def item_count(self) -> np.ndarray:
        return np.array([len(it.continuation) - it.score_from for it in self.items])

    def realised_sparsity(self, s: int, r: int, task: str) -> tuple[float, np.ndarray]:
        k, n = self.kept.get((s, r, task), (None, 0))
        if n == 0:
            return float("nan"), None
        per_layer = 1.0 - k / n
        return float(per_layer.mean()), per_layer


def _bucket(n: int, buckets) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"length {n} exceeds the largest bucket {buckets[-1]}")


def _batches(items: list[Item], vocab: int, stacked: int, max_rows: int = MAX_ROWS):
    """Group item indices by (context bucket, continuation bucket): (ctx_len, cont_len,
    cache_len, rows, indices). Rows per continuation bucket are fixed (a power of two with
    the logits of ``stacked`` settings under LOGIT_BUDGET_BYTES) so a continuation shape
    compiles once across tasks."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, it in enumerate(items):
        n_in = len(it.continuation) - 1
        cb = 0 if n_in == 0 else _bucket(n_in, _CONT_BUCKETS)
        if cb and len(it.context) > MAX_SCORED_CONTEXT:
            raise ValueError(f"item {it.task}/{it.doc}: context of {len(it.context)} tokens "
                             f"exceeds MAX_SCORED_CONTEXT={MAX_SCORED_CONTEXT} (truncate it)")
        groups.setdefault((_bucket(len(it.context), _CTX_BUCKETS), cb), []).append(i)
    out = []
    for (tc, tn), idx in sorted(groups.items()):
        per_row = max(tn, 1) * vocab * 4 * max(stacked, 1)
        rows = max(1, min(max_rows, LOGIT_BUDGET_BYTES // per_row))
        rows = 1 << int(math.floor(math.log2(rows)))
        if tn == 0:  # prefill only: size the batch to the group
            rows = min(rows, 1 << int(math.ceil(math.log2(len(idx)))))
        cache_len = (MAX_SCORED_CONTEXT + tn) if tn else tc + 1
        for s in range(0, len(idx), rows):
            out.append((tc, tn, cache_len, rows, idx[s:s + rows]))
    return out


def score(params, cfg, items: list[Item], settings: list[Setting], *,
          progress: bool = True, desc: str = "score", max_rows: int = MAX_ROWS) -> Scores:
    """Log-probabilities of every item's continuation under every setting."""
    t0 = time.perf_counter()
    S = len(settings)
    lp = [[[None] * len(items) for _ in range(st.size)] for st in settings]
    hit = [[[None] * len(items) for _ in range(st.size)] for st in settings]
    kept: dict = {}
    stacked = max(st.size for st in settings)
    batches = _batches(items, cfg.vocab_size, stacked, max_rows)
    total = sum(len(b[4]) for b in batches)
    bar = tqdm(total=total, desc=desc, unit="item", disable=not progress)
    L = cfg.num_layers
    for tc, tn, cache_len, rows, idx in batches:
        nb = len(idx)
        ctx = np.zeros((rows, tc), np.int32)
        clen = np.ones((rows,), np.int32)
        first = np.zeros((rows,), np.int32)
        y_in = np.zeros((rows, max(tn, 1)), np.int32)
        y_tgt = np.zeros((rows, max(tn, 1)), np.int32)
        valid = np.zeros((rows, max(tn, 1)), bool)
        for j, i in enumerate(idx):
            it = items[i]
            c, y = it.context, it.continuation
            ctx[j, :len(c)] = c
            clen[j] = len(c)
            first[j] = y[0]
            n = len(y) - 1
            y_in[j, :n] = y[:-1]
            y_tgt[j, :n] = y[1:]
            valid[j, :n] = True
        cache, lp0, hit0 = _dense_context(params, cfg, jnp.asarray(ctx), jnp.asarray(clen),
                                          jnp.asarray(first), cache_len=cache_len)
        lp0, hit0 = np.asarray(lp0), np.asarray(hit0)
        for s, st in enumerate(settings):
            if tn == 0:
                outs = (np.zeros((st.size, rows, 1)), np.ones((st.size, rows, 1), bool),
                        np.zeros((st.size, L, rows)))
            else:
                outs = _continuation_sweep(params, cfg, cache, jnp.asarray(y_in),
                                           jnp.asarray(y_tgt), jnp.asarray(clen),
                                           jnp.asarray(valid), st.policies, spec=st.spec)
                outs = [np.asarray(o) for o in outs]
            lpr, hitr, keptr = outs
            for r in range(st.size):
                for j, i in enumerate(idx):
                    n = len(items[i].continuation) - 1
                    lp[s][r][i] = np.concatenate([[lp0[j]], lpr[r, j, :n]])
                    hit[s][r][i] = np.concatenate([[hit0[j]], hitr[r, j, :n]])
                if tn == 0:
                    continue
                for j, i in enumerate(idx):
                    task = items[i].task
                    k0, n0 = kept.get((s, r, task), (np.zeros(L), 0.0))
                    kept[(s, r, task)] = (k0 + keptr[r, :, j], n0 + float(valid[j].sum()))
        bar.update(nb)
    bar.close()
    return Scores(items, settings, lp, hit, kept, time.perf_counter() - t0)


# -- metrics --------------------------------------------------------------------------------
def mc_accuracy(ll: np.ndarray, nbytes: np.ndarray, groups: Sequence[Sequence[int]],
                gold: Sequence[int]):
    """Per-document correctness: (acc [D] bool, acc_norm [D] bool). groups[d] are the item
    indices of document d's choices in choice order; gold[d] the right choice."""
    acc = np.zeros(len(groups), bool)
    acc_norm = np.zeros(len(groups), bool)
    for d, g in enumerate(groups):
        ll_d = ll[list(g)]
        acc[d] = int(np.argmax(ll_d)) == gold[d]
        acc_norm[d] = int(np.argmax(ll_d / np.maximum(nbytes[list(g)], 1))) == gold[d]
    return acc, acc_norm


def mean_stderr(x) -> tuple[float, float]:
    x = np.asarray(x, np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    se = x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else float("nan")
    return float(x.mean()), float(se)


def perplexity(nll_sum: np.ndarray, counts: np.ndarray) -> float:
    """exp(total NLL / total tokens)."""
    return float(math.exp(np.sum(nll_sum) / max(np.sum(counts), 1)))


def perplexity_stderr(nll_sum, counts) -> float:
    """Delta-method stderr of the corpus perplexity from per-item (ratio estimator)."""
    nll_sum = np.asarray(nll_sum, np.float64)
    counts = np.asarray(counts, np.float64)
    n = nll_sum.size
    if n < 2:
        return float("nan")
    mu = nll_sum.sum() / counts.sum()
    resid = nll_sum - mu * counts
    se_mu = math.sqrt(np.sum(resid ** 2) / (n - 1) / n) / counts.mean()
    return float(math.exp(mu) * se_mu)


def doc_groups(items: list[Item], task: str):
    """Item indices per document of a multiple-choice task, and the items' task mask."""
    by_doc: dict[int, list[tuple[int, int]]] = {}
    for i, it in enumerate(items):
        if it.task == task:
            by_doc.setdefault(it.doc, []).append((it.choice, i))
    docs = sorted(by_doc)
    return docs, [[i for _, i in sorted(by_doc[d])] for d in docs]


def summarize(scores: Scores, mc_gold: dict, *, model: str = "") -> list[dict]:
    """Tidy rows: per setting x r x task x metric, with the dense score of the same items.

    mc_gold: {task: {doc_id: gold}} for the multiple-choice tasks; other tasks present in
    the items are perplexity-style (ppl over scored tokens, plus accuracy for LAMBADA).
    """
    rows = []
    dense_idx = next((s for s, st in enumerate(scores.settings) if st.spec.is_dense), None)
    if dense_idx is None:
        raise ValueError("summarize needs a dense setting among the scored settings")
    tasks = sorted({it.task for it in scores.items})
    nbytes = np.array([it.nbytes for it in scores.items])
    counts = scores.item_count()
    per = {}
    for s, st in enumerate(scores.settings):
        for r in range(st.size):
            per[(s, r)] = (scores.item_ll(s, r), scores.item_greedy(s, r))
    for task in tasks:
        if task in mc_gold:
            docs, groups = doc_groups(scores.items, task)
            gold = [mc_gold[task][d] for d in docs]
            metric_vals = {}
            for key, (ll, _) in per.items():
                acc, accn = mc_accuracy(ll, nbytes, groups, gold)
                metric_vals[key] = {"acc": acc.astype(float), "acc_norm": accn.astype(float)}
            n_ex = len(docs)
        else:
            mask = np.array([it.task == task for it in scores.items])
            metric_vals = {}
            for key, (ll, greedy) in per.items():
                metric_vals[key] = {"nll": -ll[mask], "count": counts[mask],
                                    "acc": greedy[mask].astype(float)}
            n_ex = int(mask.sum())
        dense_m = metric_vals[(dense_idx, 0)]
        for (s, r), mv in metric_vals.items():
            st = scores.settings[s]
            realised, _ = scores.realised_sparsity(s, r, task)
            if st.spec.is_dense:
                realised = 0.0
            base = dict(model=model, method=st.spec.method, mode=_mode_label(st.spec),
                        setting=st.name, sparsity_target=st.sparsities[r],
                        sparsity_realised=realised, task=task, n_examples=n_ex)
            if task in mc_gold:
                for metric in ("acc", "acc_norm"):
                    v, se = mean_stderr(mv[metric])
                    dv, _ = mean_stderr(dense_m[metric])
                    _, dse = mean_stderr(mv[metric] - dense_m[metric])
                    rows.append({**base, "metric": metric, "score": v, "stderr": se,
                                 "dense_score": dv, "diff_stderr": dse})
            else:
                ppl = perplexity(mv["nll"], mv["count"])
                dppl = perplexity(dense_m["nll"], dense_m["count"])
                rows.append({**base, "metric": "ppl", "score": ppl,
                             "stderr": perplexity_stderr(mv["nll"], mv["count"]),
                             "dense_score": dppl,
                             "diff_stderr": _paired_log_ppl_se(mv, dense_m, ppl, dppl)})
                if task == "lambada":
                    v, se = mean_stderr(mv["acc"])
                    dv, _ = mean_stderr(dense_m["acc"])
                    _, dse = mean_stderr(mv["acc"] - dense_m["acc"])
                    rows.append({**base, "metric": "acc", "score": v, "stderr": se,
                                 "dense_score": dv, "diff_stderr": dse})
    return rows


def _paired_log_ppl_se(mv, dense_m, ppl, dppl):
    """Stderr of ppl - dense ppl from the per-item NLL differences (delta method)."""
    diff = np.asarray(mv["nll"], np.float64) - np.asarray(dense_m["nll"], np.float64)
    c = np.asarray(mv["count"], np.float64)
    n = diff.size
    if n < 2:
        return float("nan")
    mu = diff.sum() / c.sum()
    se_mu = math.sqrt(np.sum((diff - mu * c) ** 2) / (n - 1) / n) / c.mean()
    return float(ppl * se_mu)


def _mode_label(spec: SparseSpec) -> str:
    if spec.is_dense:
        return "dense"
    return "ideal" if spec.mode in ("ideal", "topk") else "practical"


# -- generation agreement -------------------------------------------------------------------
def agreement(params, cfg, prompts: np.ndarray, lengths: np.ndarray, settings: list[Setting],
              *, max_new_tokens: int = 32, progress: bool = True) -> dict:
    """Greedy generation per setting vs dense: {(setting, r): tokens matched before the
    first divergence [P]} plus realised decode sparsity; prefill dense, every generated
    token sparse (generate.generate)."""
    from countdown_jax.generate import generate

    key = jax.random.PRNGKey(0)
    args = (params, cfg, jnp.asarray(prompts), jnp.asarray(lengths), key)
    ref = np.asarray(generate(*args, None, max_new_tokens=max_new_tokens).tokens)
    out = {}
    for s, st in enumerate(tqdm(settings, desc="agreement", disable=not progress)):
        if st.spec.is_dense:
            toks = ref[None]
            sp = np.zeros((1, cfg.num_layers))
        else:
            gen = _vmapped_generate(*args, st.policies, spec=st.spec,
                                    max_new_tokens=max_new_tokens)
            toks = np.asarray(gen[0])
            sp = np.asarray(gen[1])
        for r in range(st.size):
            same = toks[r] == ref
            matched = np.where(same.all(axis=1), max_new_tokens, np.argmin(same, axis=1))
            out[(s, r)] = (matched, sp[r])
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "max_new_tokens"))
def _vmapped_generate(params, cfg, prompts, lengths, key, policies, *, spec, max_new_tokens):
    from countdown_jax.generate import generate

    def one(p):
        g = generate(params, cfg, prompts, lengths, key, p, max_new_tokens=max_new_tokens,
                     spec=spec)
        return g.tokens, g.realised_sparsity

    return jax.vmap(one)(policies)


def agreement_rows(result: dict, settings: list[Setting], *, model: str,
                   max_new_tokens: int) -> list[dict]:
    rows = []
    for (s, r), (matched, sp) in result.items():
        st = settings[s]
        v, se = mean_stderr(matched / max_new_tokens)
        rows.append(dict(model=model, method=st.spec.method, mode=_mode_label(st.spec),
                         setting=st.name, sparsity_target=st.sparsities[r],
                         sparsity_realised=0.0 if st.spec.is_dense else float(np.mean(sp)),
                         task="generation", metric="agreement", score=v, stderr=se,
                         dense_score=1.0, diff_stderr=se, n_examples=len(matched)))
    return rows


# -- command line ---------------------------------------------------------------------------
def settings_for(model, methods, modes, sparsities) -> list[Setting]:
    """Dense plus, per method/mode, one setting stacking every r (practical modes read the
    calibrated thresholds / trained predictors saved with the model)."""
    from countdown_jax import api

    out = [dense_setting()]
    L = model.cfg.num_layers
    for method in methods:
        for mode in modes:
            if mode == "ideal":
                out.append(ideal_setting(L, method, sparsities))
                continue
            practical = "predictor" if method in ("d_countdown", "dejavu") else "threshold"
            pols = []
            for r in sparsities:
                spec, pol = api.sparsity_setup(model, method, practical, r)
                pols.append(pol)
            out.append(stacked_setting(f"{method}/{practical}", spec, sparsities, pols))
    return out


def build_items(tokenizer, tasks: Sequence[str], n_docs: dict | int, *, seed: int = 0,
                ppl_texts: int = 32, lambada: int = 32):
    """Items for the requested tasks plus the gold labels of the multiple-choice ones."""
    from countdown_jax import data

    items, gold = [], {}
    for task in tasks:
        n = n_docs.get(task) if isinstance(n_docs, dict) else n_docs
        if task == "boolq_ppl":
            items += perplexity_items(tokenizer, data.subsample(data.perplexity_texts(),
                                                                ppl_texts, seed))
        elif task == "lambada":
            items += lambada_items(tokenizer, data.subsample(data.lambada_items(), lambada, seed))
        elif task in data.MC_TASKS:
            docs = data.subsample(data.eval_docs(task), n, seed)
            gold[task] = {d.doc_id: d.gold for d in docs}
            items += mc_items(tokenizer, docs)
        else:
            raise ValueError(f"unknown task {task!r}; expected one of "
                             f"{list(data.MC_TASKS) + ['boolq_ppl', 'lambada']}")
    return items, gold


def _run(args):
    import csv
    import sys

    from countdown_jax import api

    model = api.load(args.model_dir)
    items, gold = build_items(model.tokenizer, args.tasks, args.n, seed=args.seed,
                              ppl_texts=args.n, lambada=args.n)
    settings = settings_for(model, args.method, args.mode, args.sparsity)
    scores = score(model.params, model.cfg, items, settings)
    rows = summarize(scores, gold, model=str(args.model_dir))
    w = csv.DictWriter(open(args.out, "w", newline="") if args.out else sys.stdout,
                       fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    print(f"scored {len(items)} items x {sum(s.size for s in settings)} settings in "
          f"{scores.seconds:.1f} s", file=sys.stderr)


def register(subparsers):
    from countdown_jax import data

    p = subparsers.add_parser("eval", help="offline zero-shot / perplexity evaluation, "
                                           "dense context and sparse continuation")
    p.add_argument("model_dir")
    p.add_argument("--tasks", nargs="+", default=["arc_easy", "boolq_ppl"],
                   choices=list(data.MC_TASKS) + ["boolq_ppl", "lambada"])
    p.add_argument("--method", nargs="+", default=["m_countdown"],
                   choices=("cats", "m_countdown", "d_countdown", "dejavu", "s_countdown"))
    p.add_argument("--mode", nargs="+", default=["ideal"], choices=("ideal", "practical"))
    p.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9])
    p.add_argument("--n", type=int, default=50, help="examples per task (deterministic "
                                                      "subsample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="CSV path (default: stdout)")
    p.set_defaults(func=_run)
