"""Scored requests (items): context tokens run dense, continuation tokens sparse."""

from __future__ import annotations

import dataclasses
from typing import Sequence

# Few distinct shapes = few compiles (each spec compiles once per continuation bucket):
# the KV cache of every item with a continuation is MAX_SCORED_CONTEXT + its bucket long,
# whatever the context bucket of its (dense, single-spec) prefill.
MAX_SCORED_CONTEXT = 128

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
    joined = tokenizer.encode(context + continuation, add_special_tokens=True)
    if joined[:len(ctx)] == ctx and len(joined) > len(ctx):
        cont = joined[len(ctx):]
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


# Task names as lm-eval-harness spells them (the multiple-choice ones are data.MC_TASKS),
# plus boolq_ppl (perplexity on held-out BoolQ passages, not an lm-eval task).
PPL_TASKS = ("boolq_ppl", "lambada")
TASK_ALIASES = {"lambada_openai": "lambada"}
# --num-fewshot K -> the requests variant the package ships. BoolQ's 5-shot requests are
# numbered apart from its rows, so the held-out passage split cannot be applied to them.
FEWSHOT_VARIANTS = {0: "rc_0shot", 5: "rc_5shot"}
NO_FEWSHOT = ("boolq",) + PPL_TASKS


def task_names() -> list[str]:
    """Every accepted task name (aliases included)."""
    from countdown_jax import data

    return list(data.MC_TASKS) + list(PPL_TASKS) + list(TASK_ALIASES)


def canonical_tasks(tasks: Sequence[str], num_fewshot: int = 0) -> list[str]:
    """Resolve aliases (lambada_openai -> lambada) and check names and the few-shot count."""
    out = []
    for task in tasks:
        task = TASK_ALIASES.get(task, task)
        if task not in task_names():
            raise ValueError(f"unknown task {task!r}; expected one of {task_names()}")
        if task not in out:
            out.append(task)
    if num_fewshot not in FEWSHOT_VARIANTS:
        raise ValueError(f"--num-fewshot {num_fewshot}: the bundled requests exist for "
                         f"{sorted(FEWSHOT_VARIANTS)} shots")
    if num_fewshot:
        bad = [t for t in out if t in NO_FEWSHOT]
        if bad:
            raise ValueError(f"--num-fewshot {num_fewshot}: {', '.join(bad)} run zero-shot only "
                             "(no held-out few-shot requests bundled); drop them or use 0")
    return out


def build_items(tokenizer, tasks: Sequence[str], n_docs: dict | int, *, seed: int = 0,
                ppl_texts: int = 32, lambada: int = 32, num_fewshot: int = 0):
    """Items for the requested tasks plus the gold labels of the multiple-choice ones.
    num_fewshot 5 reads the tasks' bundled rc_5shot requests (the same documents)."""
    from countdown_jax import data

    items, gold = [], {}
    for task in canonical_tasks(tasks, num_fewshot):
        n = n_docs.get(task) if isinstance(n_docs, dict) else n_docs
        if task == "boolq_ppl":
            items += perplexity_items(tokenizer, data.subsample(data.perplexity_texts(),
                                                                ppl_texts, seed))
        elif task == "lambada":
            items += lambada_items(tokenizer, data.subsample(data.lambada_items(), lambada, seed))
        else:
            docs = (data.mc_docs(task, FEWSHOT_VARIANTS[num_fewshot]) if num_fewshot
                    else data.eval_docs(task))
            docs = data.subsample(docs, n, seed)
            gold[task] = {d.doc_id: d.gold for d in docs}
            items += mc_items(tokenizer, docs)
    return items, gold
