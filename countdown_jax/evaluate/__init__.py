"""Offline quality evaluation (package: items, settings, scoring, metrics, agreement,
command): log-likelihood scoring with a dense context and a sparse
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

from countdown_jax.evaluate.agreement import agreement, agreement_rows
from countdown_jax.evaluate.command import register
from countdown_jax.evaluate.items import (MAX_SCORED_CONTEXT, Item, build_items, encode_pair,
                                          lambada_items, mc_items, perplexity_items)
from countdown_jax.evaluate.metrics import (doc_groups, mc_accuracy, mean_stderr, perplexity,
                                            perplexity_stderr, summarize)
from countdown_jax.evaluate.scoring import LOGIT_BUDGET_BYTES, MAX_ROWS, Scores, score
from countdown_jax.evaluate.settings import (Setting, dense_setting, ideal_setting,
                                             settings_for, stacked_setting)
from countdown_jax.policy import DENSE

__all__ = ["DENSE", "Item", "LOGIT_BUDGET_BYTES", "MAX_ROWS", "MAX_SCORED_CONTEXT", "Scores",
           "Setting", "agreement", "agreement_rows", "build_items", "dense_setting",
           "doc_groups", "encode_pair", "ideal_setting", "lambada_items", "mc_accuracy",
           "mc_items", "mean_stderr", "perplexity", "perplexity_items", "perplexity_stderr",
           "register", "score", "settings_for", "stacked_setting", "summarize"]
