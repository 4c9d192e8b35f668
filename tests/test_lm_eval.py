"""The lm-evaluation-harness model against ``countdown_jax.evaluate`` on the embedded
SmolLM2-135M: the same documents scored through lm-eval (shipped offline tasks, our model)
and through our evaluator give the same log-likelihoods, dense and sparse; where the two
differ by design (acc_norm's length, LAMBADA's sparse tail, perplexity's average, few-shot
sampling) the test pins the difference. Plus the offline task data and the command's
errors, which need no model."""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax import api, data
from countdown_jax import evaluate as E
from countdown_jax import model as M
from countdown_jax.evaluate import harness_docs
from countdown_jax.policy import make_policy

SPARSE = ("m_countdown", "ideal", 0.7)
N_MC, N_BOOLQ, N_LAMBADA, N_PASSAGES = 16, 6, 6, 2
ATOL = 2e-3          # summed log-likelihoods of up to ~40 tokens, float32, other batching


# ------------------------------------------------------------------ no model needed

def test_offline_docs_are_the_evaluators_documents():
    rows = harness_docs.task_rows("arc_easy")["validation"]
    docs = data.mc_docs("arc_easy")
    assert len(rows) == len(docs)
    for r, d in zip(rows[:50], docs[:50]):
        assert r["doc_id"] == d.doc_id and r["gold"] == d.gold
        assert r["context"] == d.contexts[0]
        assert [" " + c for c in r["choices"]] == list(d.continuations)
    boolq = harness_docs.task_rows("boolq")
    evaluated = {d.doc_id for d in data.boolq_eval_docs()}
    assert {r["doc_id"] for r in boolq["validation"]} == evaluated
    assert not evaluated & {r["doc_id"] for r in boolq["train"]}   # few-shot pool apart
    wino = harness_docs.task_rows("winogrande")["validation"][0]
    assert len(wino["contexts"]) == 2 and isinstance(wino["continuation"], str)
    with pytest.raises(ValueError, match="unknown offline task"):
        harness_docs.task_rows("mmlu")


def test_command_without_lm_eval_names_the_extra(monkeypatch, tmp_path, capsys):
    from countdown_jax import cli

    monkeypatch.setitem(sys.modules, "lm_eval", None)       # as if not installed
    assert cli.main(["lm-eval", str(tmp_path), "--tasks", "arc_easy"]) == cli.EXIT_BAD_INPUT
    assert "countdown-jax[lm-eval]" in capsys.readouterr().err


def test_every_shipped_task_loads_offline(monkeypatch):
    """Each YAML builds its requests with no network (lm-eval's dummy model scores them)."""
    import lm_eval

    from countdown_jax.evaluate.harness_command import run

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = run("dummy", harness_docs.TASKS, limit=2, log_samples=True)
    assert set(out["results"]) == set(harness_docs.TASKS)
    # few-shot contexts are sampled by lm-eval from the few-shot split, not the OLMES
    # rc_5shot requests our evaluator reads with --num-fewshot 5
    shot = run("dummy", ["arc_easy"], limit=1, num_fewshot=2, log_samples=True)
    ctx = shot["samples"]["arc_easy"][0]["arguments"][0][0]
    first = data.mc_docs("arc_easy")[0]
    assert ctx.endswith(first.contexts[0]) and ctx.count("\nAnswer:") == 3
    assert ctx != data.mc_docs("arc_easy", "rc_5shot")[0].contexts[0]
    assert lm_eval.__version__ == "0.4.13"


# ------------------------------------------------------------------ SmolLM2 cross-check

@pytest.fixture(scope="module")
def lms(smollm2_dir):
    from countdown_jax.evaluate.harness import HarnessLM

    dense = HarnessLM(pretrained=str(smollm2_dir), progress=False)
    return dense, dense.with_rule(SPARSE[0], SPARSE[1], SPARSE[2])


def _short(tok, texts, limit, n):
    return [i for i, t in enumerate(texts) if len(tok.encode(t)) <= limit][:n]


@pytest.fixture(scope="module")
def harness_runs(lms):
    """lm-eval's per-sample results, dense and sparse, on the same documents."""
    from countdown_jax.evaluate.harness_command import run

    tok = lms[0].tokenizer
    samples = {"arc_easy": list(range(N_MC)), "piqa": list(range(N_MC)),
               "boolq": list(range(N_BOOLQ)),
               # contexts short enough that no truncation rule applies on either side
               "lambada_openai": _short(tok, [x.context for x in data.lambada_items()[:64]],
                                        E.MAX_SCORED_CONTEXT, N_LAMBADA),
               "boolq_passages": _short(tok, data.perplexity_texts()[:32], 300, N_PASSAGES)}
    out = {}
    for name, lm in zip(("dense", "sparse"), lms):
        res = run(lm, list(samples), samples=samples, log_samples=True, bootstrap_iters=0)
        out[name] = res
    return samples, out


@pytest.fixture(scope="module")
def evaluator(lms, harness_runs):
    """``countdown_jax.evaluate`` on the same documents, dense + sparse in one score()."""
    samples, _ = harness_runs
    model = lms[0].model
    tok = model.tokenizer
    docs = {"arc_easy": data.mc_docs("arc_easy"), "piqa": data.mc_docs("piqa"),
            "boolq": data.boolq_eval_docs()}
    docs = {t: [d[i] for i in samples[t]] for t, d in docs.items()}
    lam = [data.lambada_items()[i] for i in samples["lambada_openai"]]
    items = [it for t in docs for it in E.mc_items(tok, docs[t])]
    items += E.lambada_items(tok, lam, task="lambada")                       # default tail
    items += E.lambada_items(tok, lam, task="lambada_target", sparse_tail=0)  # target only
    settings = [E.dense_setting(), E.ideal_setting(model.cfg.num_layers, SPARSE[0],
                                                   [SPARSE[2]])]
    sc = E.score(model.params, model.cfg, items, settings, progress=False)
    return docs, items, sc


def _harness_ll(res, task):
    """{doc position: [log-likelihood per request]} from lm-eval's logged samples."""
    return {s["doc_id"]: [float(r[0][0]) for r in s["resps"]] for s in res["samples"][task]}


def _ours_ll(items, sc, s, task):
    ll = sc.item_ll(s, 0)
    out = {}
    for i, it in enumerate(items):
        if it.task == task:
            out.setdefault(it.doc, []).append(ll[i])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("setting", [0, 1], ids=["dense", "m_countdown_r0.7"])
@pytest.mark.parametrize("task", ["arc_easy", "piqa", "boolq"])
def test_multiple_choice_matches_evaluator(harness_runs, evaluator, task, setting):
    samples, runs = harness_runs
    res = runs["dense" if setting == 0 else "sparse"]
    docs, items, sc = evaluator
    ours = _ours_ll(items, sc, setting, task)
    theirs = _harness_ll(res, task)
    lls, golds, choices = [], [], []
    for pos, d in zip(samples[task], docs[task]):
        np.testing.assert_allclose(theirs[pos], ours[d.doc_id], atol=ATOL)
        lls.append(np.array(ours[d.doc_id]))
        golds.append(d.gold)
        choices.append(d.continuations)
    # acc: identical definition
    acc = np.mean([int(np.argmax(ll)) == g for ll, g in zip(lls, golds)])
    got = res["results"][task]
    assert got["acc,none"] == pytest.approx(acc)
    groups, start = [], 0
    nbytes = np.array([it.nbytes for it in items if it.task == task])
    for ll in lls:
        groups.append(list(range(start, start + len(ll))))
        start += len(ll)
    our_acc, our_norm = E.mc_accuracy(np.concatenate(lls), nbytes, groups, golds)
    assert our_acc.mean() == pytest.approx(acc)
    # acc_norm differs by design: lm-eval divides by the choice's characters without the
    # target delimiter's space, our evaluator by its UTF-8 bytes with the space
    theirs_norm = np.mean([int(np.argmax(ll / [len(c) - 1 for c in cs])) == g
                           for ll, cs, g in zip(lls, choices, golds)])
    theirs_bytes = np.mean([int(np.argmax(ll / [len(c.encode()) - 1 for c in cs])) == g
                            for ll, cs, g in zip(lls, choices, golds)])
    ours_norm = np.mean([int(np.argmax(ll / [len(c.encode()) for c in cs])) == g
                         for ll, cs, g in zip(lls, choices, golds)])
    assert got["acc_norm,none"] == pytest.approx(theirs_norm)
    assert got["acc_bytes,none"] == pytest.approx(theirs_bytes)
    assert our_norm.mean() == pytest.approx(ours_norm)


@pytest.mark.slow
def test_one_token_answers_are_dense_under_sparsity(harness_runs):
    """BoolQ's " yes" / " no" are predicted from the dense context: sparsity cannot change
    them, through either harness."""
    _, runs = harness_runs
    dense, sparse = (_harness_ll(runs[k], "boolq") for k in ("dense", "sparse"))
    for pos in dense:
        np.testing.assert_allclose(sparse[pos], dense[pos], atol=1e-5)
    # while multi-token answers do change
    d, s = (_harness_ll(runs[k], "piqa") for k in ("dense", "sparse"))
    assert max(abs(np.array(d[p]) - s[p]).max() for p in d) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("setting", [0, 1], ids=["dense", "m_countdown_r0.7"])
def test_lambada_matches_evaluator(harness_runs, evaluator, setting):
    samples, runs = harness_runs
    res = runs["dense" if setting == 0 else "sparse"]
    _, items, sc = evaluator
    theirs = _harness_ll(res, "lambada_openai")
    theirs = np.array([theirs[p][0] for p in samples["lambada_openai"]])
    target_only = np.array([v[0] for v in _ours_ll(items, sc, setting, "lambada_target")
                            .values()])
    tail = np.array([v[0] for v in _ours_ll(items, sc, setting, "lambada").values()])
    # lm-eval's request = our item with the target as the whole sparse continuation
    np.testing.assert_allclose(theirs, target_only, atol=ATOL)
    if setting == 0:
        np.testing.assert_allclose(theirs, tail, atol=ATOL)
    else:   # by design: our evaluator also runs the passage's last 32 tokens sparse
        assert abs(theirs - tail).max() > 1e-2
    # perplexity by design: lm-eval's is per document (exp of the mean document NLL), ours
    # per target token
    got = res["results"]["lambada_openai"]["perplexity,none"]
    assert got == pytest.approx(math.exp(-theirs.mean()), rel=1e-6)
    greedy = sc.item_greedy(setting, 0)[[i for i, it in enumerate(items)
                                          if it.task == "lambada_target"]]
    assert res["results"]["lambada_openai"]["acc,none"] == pytest.approx(greedy.mean())


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _forward(params, cfg, seq, sparse, policy, *, spec):
    logits, _ = M.forward(params, cfg, seq, spec=spec, policy=policy,
                          sparse=None if spec.is_dense else sparse)
    return logits


@pytest.mark.slow
def test_rolling_loglikelihood_matches_a_full_forward(lms, harness_runs):
    """boolq_passages: lm-eval's dense rolling log-likelihood through our model equals a
    plain float32 forward over prefix + passage (one window: passages of <= 300 tokens)."""
    samples, runs = harness_runs
    setting = 0
    res = runs["dense"]
    lm = lms[setting]
    model = lm.model
    policy = None if setting == 0 else make_policy(model.cfg.num_layers, sparsity=SPARSE[2])
    texts = data.perplexity_texts()
    got = {s["doc_id"]: float(s["resps"][0][0]) for s in res["samples"]["boolq_passages"]}
    for pos in samples["boolq_passages"]:
        assert res["samples"]["boolq_passages"] and len(lm.rolling_windows(texts[pos])) == 1
        toks = [lm.prefix_token_id] + lm.tok_encode(texts[pos])
        seq = np.zeros((1, 320), np.int32)
        seq[0, :len(toks)] = toks
        sparse = np.zeros(seq.shape, bool)
        sparse[0, 1:len(toks)] = True
        logits = _forward(model.params, model.cfg, jnp.asarray(seq), jnp.asarray(sparse),
                          policy, spec=lm.setting.spec)
        lp = jax.nn.log_softmax(np.asarray(logits[0], np.float64), axis=-1)
        ref = float(sum(lp[j, toks[j + 1]] for j in range(len(toks) - 1)))
        assert got[pos] == pytest.approx(ref, abs=5e-3, rel=1e-5)


@pytest.mark.slow
def test_generate_until_is_our_generation_cut_at_the_stop(lms):
    from lm_eval.api.instance import Instance

    lm = lms[1]
    prompts = ["The capital of France is", "Question: What is two plus two?\nAnswer:"]
    reqs = [Instance("generate_until", {}, (p, {"until": [".", "\n"], "max_gen_toks": 12}), 0)
            for p in prompts]
    got = lm.generate_until(reqs, disable_tqdm=True)
    ref = api.generate_text(lm.model, prompts, method=SPARSE[0], mode=SPARSE[1],
                            sparsity=SPARSE[2], max_new_tokens=12)
    for g, t in zip(got, ref.texts):
        cut = min([k for k in (t.find("."), t.find("\n")) if k != -1], default=len(t))
        assert g == t[:cut]
    assert any(g != t for g, t in zip(got, ref.texts))   # a stop string did cut


@pytest.mark.slow
def test_sparse_rolling_loglikelihood_is_the_evaluators_window_score(lms, harness_runs):
    """Sparse rolling log-likelihood = ``evaluate.score`` of the window item (prefix token
    dense, the whole passage a sparse continuation)."""
    samples, runs = harness_runs
    lm = lms[1]
    texts = data.perplexity_texts()
    got = {s["doc_id"]: float(s["resps"][0][0])
           for s in runs["sparse"]["samples"]["boolq_passages"]}
    items = [E.Item("p", pos, 0, (lm.prefix_token_id,), tuple(lm.tok_encode(texts[pos])))
             for pos in samples["boolq_passages"]]
    sc = E.score(lm.model.params, lm.model.cfg, items, [lm.setting], progress=False)
    np.testing.assert_allclose([got[p] for p in samples["boolq_passages"]], sc.item_ll(0, 0),
                               atol=ATOL)
    assert abs(got[samples["boolq_passages"][0]]
               - float(runs["dense"]["samples"]["boolq_passages"][0]["resps"][0][0])) > 1e-2
