"""The GPU benchmark scripts run end to end on CPU at tiny sizes (Pallas in interpret mode
or the XLA fallback): no timing is checked here, only that every path they time runs,
passes the scripts' own correctness checks and writes the files the reports read."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments"


def _run(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_kernels_smoke_plan_s3(tmp_path):
    best = {"m": "xs-bn64-bd1024-w4-p264-c8", "cats": "xs-bn64-bd1024-w4-p264-c8",
            "d": "bn32-bds256-bd1024-w4-b2-c8", "gather": "bj8-bd1024-w4-p132"}
    r = _run(EXP / "bench_kernels.py", "--smoke", "--plan", "s3", "--out", tmp_path,
             "--iters", 1, "--reps", 1, "--sets", 1, "--batches", 2,
             "--only", "llama-3.1-8b/float32/1", "--best", json.dumps(best))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "bench_kernels.csv")))
    timed = [x for x in rows if x["us_per_call"]]
    assert {x["method"] for x in timed} >= {"dense", "m", "cats", "d", "loop-overhead"}
    assert {x["dtype"] for x in timed if x["method"] == "m"} == {"bfloat16", "float32"}
    assert not [x for x in rows if "FAILED" in x["note"]]          # every check passed
    assert (tmp_path / "bench_kernels_stages.csv").exists()


def test_bench_kernels_smoke_plans_s4_and_stages(tmp_path):
    """Session 4's probe (variants vs the chosen kernels, then one ``:kind`` step of the
    full plan) and the stage-profile plan."""
    best = {"m": "xs-bn64-bd1024-w4-p264-c4-pf", "cats": "xs-bn64-bd1024-w4-p264-c4-pf",
            "d": "xs-bn32-bd1024-w4-p448-c4-pf", "gather": "bj8-bd1024-w4-p132"}
    common = ("--smoke", "--iters", 1, "--reps", 1, "--sets", 1, "--best", json.dumps(best))
    r = _run(EXP / "bench_kernels.py", "--plan", "s4", "--out", tmp_path / "s4",
             "--only", "gemma-2-9b/bfloat16/1:gathered", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "s4" / "bench_kernels.csv")))
    assert not [x for x in rows if "FAILED" in x["note"]]
    probed = {x["variant"] for x in rows if x["shape"] == "llama-3.1-8b" and x["us_per_call"]}
    assert {"xs-bn64-bd1024-w4-p264-c4-pf-s2", "xs-bn32-bd1024-w4-p448-c2-pf"} <= probed
    gemma = {(x["method"], x["implementation"]) for x in rows
             if x["shape"] == "gemma-2-9b" and x["us_per_call"]}
    assert ("m", "pallas-gather") in gemma and ("d", "xla-gather") in gemma
    assert not [x for x in gemma if x[1] == "pallas-fused"]     # ":gathered" ran only that step
    r = _run(EXP / "bench_kernels.py", "--plan", "stages", "--out", tmp_path / "st", *common)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "st" / "bench_kernels.csv")))
    assert {(x["method"], x["sparsity"]) for x in rows if x["us_per_call"]} >= {
        ("m", "0.9"), ("m", "1.0"), ("d", "0.9"), ("d", "1.0"), ("dense", "0.0")}


def test_bench_kernels_report_from_committed_csv(tmp_path):
    """--plan report regenerates the markdown and plot from experiments/results."""
    for name in ("bench_kernels.csv", "bench_kernels_stages.csv"):
        (tmp_path / name).write_bytes((EXP / "results" / name).read_bytes())
    r = _run(EXP / "bench_kernels.py", "--plan", "report", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    md = (tmp_path / "bench_kernels.md").read_text()
    assert "## Every shape, dtype and batch" in md and "phi-4, float32, batch 1" in md
    assert (tmp_path / "bench_kernels.png").stat().st_size > 10_000


def test_bench_decode_tiny_both_attentions(tmp_path):
    r = _run(EXP / "bench_decode.py", "--tiny", "--out", tmp_path, "--batches", "1",
             "--sparsities", "0.9", "--implementations", "pallas", "--capacity", "none",
             "--attention", "xla,pallas", "--steps", 2, "--repeats", 1, "--prompt-len", 8)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "bench_decode_tiny.csv")))
    got = {(x["method"], x["attention"]) for x in rows}
    assert got == {(m, a) for m in ("dense", "m_countdown", "d_countdown")
                   for a in ("xla", "pallas")}
    for x in rows:
        assert float(x["tokens_per_s"]) > 0 and not x["note"]
        if x["method"] != "dense":      # realised sparsity measured from the masks
            assert abs(float(x["sparsity_realised"]) - 0.9) < 0.1
