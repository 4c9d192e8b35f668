"""The lm-evaluation-harness model against ``countdown_jax.evaluate`` on the embedded
SmolLM2-135M: the same documents scored through lm-eval (shipped offline tasks, our model)
and through our evaluator give the same log-likelihoods and metrics, dense and sparse;
where the two differ by design (acc_norm's length, LAMBADA's sparse tail, perplexity's
average) the test pins the difference. Both sides run at one batch size (``ROWS``), so each
item runs in the same compiled shapes: a sparse score moves when the shapes change (float
rounding flips near-ties of the hard top-k rule, pinned below). Plus the offline task data,
the command's errors and the package without lm-eval, which need no model."""

from __future__ import annotations

import functools
import math
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from countdown_jax import api, data
from countdown_jax import evaluate as E
from countdown_jax import model as M
from countdown_jax.evaluate import harness_docs
from countdown_jax.policy import make_policy
from countdown_jax.selection import num_dropped

ROOT = Path(__file__).resolve().parents[1]
SPARSE = ("m_countdown", "ideal", 0.7)
N_MC, N_BOOLQ, N_LAMBADA, N_PASSAGES = 12, 4, 4, 3
ROWS = 8              # rows per scored batch on both sides: the same compiled shapes
SHORT = 128           # BoolQ / LAMBADA contexts and passages short enough for small buckets
PASSAGE_TOKENS = 63   # passages + the prefix token fit one 64-token forward
ATOL = 2e-3           # summed log-likelihoods of up to ~60 tokens, float32


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


_WITHOUT_LM_EVAL = """
import importlib, pkgutil, sys
sys.modules["lm_eval"] = None                  # import lm_eval now fails: as if not installed
import countdown_jax as cj
from countdown_jax import cli
cj.load, cj.generate_text, cj.SparseGatedMLP    # the lazy re-exports resolve
cli.build_parser()                              # every command registers, lm-eval included
guarded = "countdown_jax.evaluate.harness"
for m in pkgutil.walk_packages(cj.__path__, "countdown_jax."):
    if m.name != guarded:
        importlib.import_module(m.name)
try:
    importlib.import_module(guarded)
except ImportError as e:
    print("guarded:", e)
"""


def test_package_imports_without_lm_eval():
    """Every module but the lm-eval model imports with lm-eval absent; the model's import
    names the extra."""
    out = subprocess.run([sys.executable, "-c", _WITHOUT_LM_EVAL], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "guarded: " in out.stdout and "countdown-jax[lm-eval]" in out.stdout


def test_every_shipped_task_loads_offline(monkeypatch):
    """Each YAML builds its requests with no network (lm-eval's dummy model scores them)."""
    lm_eval = pytest.importorskip("lm_eval")       # the [lm-eval] extra (CI installs it)

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
    pytest.importorskip("lm_eval")                  # the [lm-eval] extra (CI installs it)
    from countdown_jax.evaluate.harness import HarnessLM

    dense = HarnessLM(pretrained=str(smollm2_dir), batch_size=ROWS, progress=False)
    return dense, dense.with_rule(SPARSE[0], SPARSE[1], SPARSE[2])


def _short(tok, texts, limit, n):
    return [i for i, t in enumerate(texts) if len(tok.encode(t)) <= limit][:n]


@pytest.fixture(scope="module")
def harness_runs(lms):
    """lm-eval's per-sample results, dense and sparse, on the same documents."""
    from countdown_jax.evaluate.harness_command import run

    tok = lms[0].tokenizer
    samples = {"arc_easy": list(range(N_MC)), "piqa": list(range(N_MC)),
               "boolq": _short(tok, [d.contexts[0] for d in data.boolq_eval_docs()[:32]],
                               SHORT, N_BOOLQ),
               # contexts short enough that no truncation rule applies on either side
               "lambada_openai": _short(tok, [x.context for x in data.lambada_items()[:64]],
                                        SHORT, N_LAMBADA),
               "boolq_passages": _short(tok, data.perplexity_texts()[:32], PASSAGE_TOKENS - 1,
                                        N_PASSAGES)}
    out = {}
    for name, lm in zip(("dense", "sparse"), lms):
        out[name] = run(lm, list(samples), samples=samples, log_samples=True,
                        bootstrap_iters=0)
    return samples, out


@pytest.fixture(scope="module")
def evaluator(lms, harness_runs):
    """``countdown_jax.evaluate.score`` on the same documents, dense + sparse in one call,
    at the harness's batch size."""
    samples, _ = harness_runs
    lm = lms[0]
    model, tok = lm.model, lm.tokenizer
    docs = {"arc_easy": data.mc_docs("arc_easy"), "piqa": data.mc_docs("piqa"),
            "boolq": data.boolq_eval_docs()}
    docs = {t: [d[i] for i in samples[t]] for t, d in docs.items()}
    lam = [data.lambada_items()[i] for i in samples["lambada_openai"]]
    texts = data.perplexity_texts()
    items = [it for t in docs for it in E.mc_items(tok, docs[t])]
    items += E.lambada_items(tok, lam, task="lambada")                       # default tail
    items += E.lambada_items(tok, lam, task="lambada_target", sparse_tail=0)  # target only
    # a passage as one item: the prefix token dense, every passage token a continuation
    items += [E.Item("passages", pos, 0, (lm.prefix_token_id,), tuple(lm.tok_encode(texts[pos])))
              for pos in samples["boolq_passages"]]
    settings = [E.dense_setting(), E.ideal_setting(model.cfg.num_layers, SPARSE[0],
                                                   [SPARSE[2]])]
    sc = E.score(model.params, model.cfg, items, settings, progress=False, max_rows=ROWS)
    return docs, items, sc


def _harness_ll(res, task):
    """{doc position: [log-likelihood per request]} from lm-eval's logged samples (a
    request's response: (log-likelihood, greedy), or a rolling log-likelihood)."""
    def ll(r):
        return float(r[0] if np.ndim(r[0]) == 0 else r[0][0])

    return {s["doc_id"]: [ll(r) for r in s["resps"]] for s in res["samples"][task]}


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
    """(logits, MLP inputs [L, B, T, d]) of a plain no-cache forward."""
    logits, _, h = M.forward(params, cfg, seq, spec=spec, policy=policy, sparse=sparse,
                             collect=True)
    return logits, h


def _forward_lp(lm, toks, pad, sparse="passage"):
    """Per-token log p(toks[t + 1] | toks[:t + 1]) [n - 1] (float64) and the MLP inputs
    [L, n, d] of one forward over toks padded to PAD. sparse: "passage" runs every token
    after the prefix token sparse (the evaluator's convention), "all" every token."""
    n = len(toks)
    seq = np.zeros((1, pad), np.int32)
    seq[0, :n] = toks
    mask = None
    if not lm.setting.spec.is_dense and sparse == "passage":
        mask = np.zeros(seq.shape, bool)
        mask[0, 1:n] = True
        mask = jnp.asarray(mask)
    policy = lm.setting.policies
    policy = None if policy is None else jax.tree.map(lambda a: a[0], policy)
    logits, h = _forward(lm.model.params, lm.model.cfg, jnp.asarray(seq), mask, policy,
                         spec=lm.setting.spec)
    z = np.asarray(logits[0, :n - 1], np.float64)
    z -= z.max(axis=-1, keepdims=True)
    lp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return lp[np.arange(n - 1), toks[1:]], np.asarray(h)[:, 0, :n]


def _window_tokens(lm, text):
    (ctx, cont), = lm.rolling_windows(text)       # one window: short passages
    return np.array(ctx + cont)


@pytest.mark.slow
@pytest.mark.parametrize("setting", [0, 1], ids=["dense", "m_countdown_r0.7"])
def test_rolling_loglikelihood_matches_evaluator(lms, harness_runs, evaluator, setting):
    """boolq_passages: lm-eval's rolling log-likelihood = our scorer's score of the same
    passage as one item (the prefix token dense, the passage a sparse continuation), and
    lm-eval's word / byte perplexity and bits per byte are those log-likelihoods over its
    word and byte counts. Dense, both equal a plain float32 forward."""
    samples, runs = harness_runs
    res = runs["dense" if setting == 0 else "sparse"]
    _, items, sc = evaluator
    texts = data.perplexity_texts()
    passages = samples["boolq_passages"]
    got = np.array([_harness_ll(res, "boolq_passages")[p][0] for p in passages])
    ours = np.array([v[0] for v in _ours_ll(items, sc, setting, "passages").values()])
    np.testing.assert_allclose(got, ours, atol=ATOL)
    words = sum(len(re.split(r"\s+", texts[p])) for p in passages)
    nbytes = sum(len(texts[p].encode()) for p in passages)
    metrics = res["results"]["boolq_passages"]
    assert metrics["word_perplexity,none"] == pytest.approx(math.exp(-ours.sum() / words),
                                                            rel=1e-4)
    assert metrics["byte_perplexity,none"] == pytest.approx(math.exp(-ours.sum() / nbytes),
                                                            rel=1e-4)
    assert metrics["bits_per_byte,none"] == pytest.approx(-ours.sum() / nbytes / math.log(2),
                                                          rel=1e-4)
    if setting == 0:
        ref = [_forward_lp(lms[0], _window_tokens(lms[0], texts[p]), 64)[0].sum()
               for p in passages]
        np.testing.assert_allclose(got, ref, atol=ATOL)
    else:   # no forward reference: other shapes flip top-k near-ties (test below)
        dense = np.array([_harness_ll(runs["dense"], "boolq_passages")[p][0]
                          for p in passages])
        assert (dense - got).min() > 1.0      # the sparse rule costs every passage


def _first_divergence(h_a, h_b, tol=1e-4):
    """(token, layer) where the MLP inputs of two runs first differ by more than TOL
    (rounding differs by ~1e-6), the token first, then the layer; None if they never do."""
    diff = np.abs(h_a - h_b).max(axis=-1)              # [L, n]
    tokens = np.nonzero((diff > tol).any(axis=0))[0]
    if not len(tokens):
        return None
    t = int(tokens[0])
    return t, int(np.nonzero(diff[:, t] > tol)[0][0])


@pytest.mark.slow
def test_sparse_rolling_vs_a_forward_parts_only_at_near_ties(lms, harness_runs, evaluator):
    """Why lm-eval's sparse rolling log-likelihood can differ from a plain forward with the
    same dense / sparse tokens (e.g. -326.2 against -331.5 on the 63-token passage here):
    both paths make the same choices (prefix token dense, every passage token sparse), but
    float32 rounds differently in programs of other shapes (here ~1e-6 in the MLP inputs).
    Where two neurons' ranked |u| are that close at the top-k boundary, the kept set
    flips; the flipped token's hidden state then moves by ~0.1-1 and every later token
    sees it through attention. The same happens between two forwards that differ only in
    padding, so a sparse score is reproducible at fixed shapes (bucket, batch rows), not
    across them; the other tests compare at fixed shapes."""
    samples, _ = harness_runs
    _, items, sc = evaluator
    dense_lm, lm = lms
    text = data.perplexity_texts()[samples["boolq_passages"][0]]
    toks = _window_tokens(lm, text)
    item = next(i for i, it in enumerate(items)
                if it.task == "passages" and it.doc == samples["boolq_passages"][0])
    scored = sc.token_lp(1, 0, item)
    lp64, h64 = _forward_lp(lm, toks, 64)
    lp80, h80 = _forward_lp(lm, toks, 80)
    dense_lp = _forward_lp(dense_lm, toks, 64)[0]

    # the same choices: the first passage token comes from the dense prefix in both paths
    # (a forward with every token sparse would differ there), and every later input runs
    # sparse with exactly k of m neurons dropped in both
    assert scored[0] == pytest.approx(dense_lp[0], abs=1e-4)
    assert lp64[0] == pytest.approx(dense_lp[0], abs=1e-4)
    assert abs(_forward_lp(lm, toks, 64, sparse="all")[0][0] - dense_lp[0]) > 1e-3
    m = lm.model.params["layers"]["mlp"]["up"].shape[1]
    k = int(num_dropped(SPARSE[2], m))
    realised, _ = sc.realised_sparsity(1, 0, "passages")
    assert realised == pytest.approx(k / m, abs=1e-6)
    assert abs(scored[1:] - dense_lp[1:]).max() > 1e-2       # sparse from the second token

    # two forwards of different padding part at a near-tie of the top-k boundary
    where = _first_divergence(h64, h80)
    if where is None:     # no near-tie met on this machine's rounding: they agree
        np.testing.assert_allclose(lp64, lp80, atol=1e-3)
        return
    t, layer = where               # every earlier token and layer: rounding-level apart
    assert layer > 0
    flipped = layer - 1            # the FFN whose output first differs
    up = np.asarray(lm.model.params["layers"]["mlp"]["up"][flipped], np.float64)   # [m, d]
    q = np.sort(np.abs(up @ h64[flipped, t].astype(np.float64)))
    gap = (q[k] - q[k - 1]) / q[k]       # the smallest kept |u| vs the largest dropped one
    assert gap < 1e-5, f"token {t} layer {flipped}: boundary gap {gap:.2e} is no near-tie"
    np.testing.assert_allclose(lp64[:t], lp80[:t], atol=1e-4)
    assert np.abs(h64[:, t:] - h80[:, t:]).max() > 1e-2      # and it grows from there


@pytest.mark.slow
def test_rolling_windows_cover_a_long_document_once(lms):
    """A document longer than one window: full windows are a sparse continuation after one
    token, the last window keeps the ``MAX_SCORED_CONTEXT`` tokens before it as context,
    every token is scored exactly once."""
    from countdown_jax.evaluate.harness import ROLLING_WINDOW

    lm = lms[0]
    texts = data.perplexity_texts()
    text = next(t for t in texts if ROLLING_WINDOW + 64 < len(lm.tok_encode(t))
                < 2 * ROLLING_WINDOW)
    tokens = lm.tok_encode(text)
    windows = lm.rolling_windows(text)
    assert len(windows) == 2
    (c0, y0), (c1, y1) = windows
    assert c0 == (lm.prefix_token_id,) and len(y0) == ROLLING_WINDOW
    assert list(y0 + y1) == tokens
    assert len(c1) == E.MAX_SCORED_CONTEXT
    assert list(c1) == tokens[ROLLING_WINDOW - E.MAX_SCORED_CONTEXT:ROLLING_WINDOW]


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
