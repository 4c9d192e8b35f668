"""The GPU benchmarks (experiments/bench/ + the experiments/bench_*.py entry scripts) on CPU:
the timing loop does what its timings assume, every plan runs end to end at toy sizes
(Pallas in interpret mode or the XLA fallback) and passes its own correctness checks, and
the reports rebuild from the committed CSVs. No timing value is checked here."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.bench import harness
from experiments.bench.ffn_report import matrix_runs
from experiments.bench.ffn_variants import chosen

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments"
RESULTS = EXP / "results"
# the kernels' shipped defaults and the first index-list variant (what --best names)
BEST = {**chosen(), "gather": "bj8-bd1024-w4-p132"}
TINY_RUN = ("--smoke", "--iters", 1, "--reps", 1, "--sets", 1)


def _run(*args, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _rows(path):
    return list(csv.DictReader(open(path)))


# ----------------------------------------------------------------------------- harness

def test_timed_loop_feeds_each_output_back_into_the_next_input():
    """iters x nsets dependent calls after one checked call: the result equals the same
    recurrence in numpy, whatever the unroll (so no call was hoisted or dropped)."""
    nsets, iters = 2, 3
    x0 = jnp.asarray([[1.0, -2.0, 0.5]], jnp.float32)
    sets = [jnp.asarray([2.0, 3.0, -1.0], jnp.float32), jnp.asarray([0.5, -4.0, 1.5])]
    taus = jnp.asarray([0.25, -1.0], jnp.float32)

    def step(x, w, tau):
        return x * w + tau, jnp.ones(x.shape[:1], jnp.int32)

    want = np.asarray(x0, np.float64)
    for _ in range(iters):
        for s in range(nsets):
            y = want * np.asarray(sets[s]) + float(taus[s])
            want = np.asarray(x0, np.float64) + 1e-3 * y
    for unroll in (1, 2, 5):
        x, y0, c0 = harness.timed_loop(step, nsets, iters, unroll=unroll)(x0, sets, taus)
        np.testing.assert_allclose(np.asarray(x), want, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(y0), np.asarray(x0 * sets[0] + taus[0]))
        assert np.asarray(c0).tolist() == [1]
    assert harness.calls_per_run(iters, nsets) == 7


def test_measure_reports_per_call_medians_of_the_timed_runs():
    f = jax.jit(lambda x: x + 1.0)
    med, lo, hi, first_s, out = harness.measure(f, (jnp.zeros(4),), calls=10, reps=3)
    assert 0 < lo <= med <= hi and first_s > 0
    np.testing.assert_array_equal(np.asarray(out), np.ones(4))
    assert harness.gb_per_s(3e9, 1e6) == pytest.approx(3.0)      # 3 GB in 1 s


def test_write_csv_keeps_every_column_in_first_seen_order(tmp_path):
    harness.write_csv(tmp_path / "a.csv", [dict(a=1, b=2), dict(a=3, c=4)])
    assert harness.read_csv(tmp_path / "a.csv") == [dict(a="1", b="2", c=""),
                                                     dict(a="3", b="", c="4")]
    harness.write_csv(tmp_path / "b.csv", [dict(a=1, z=9)], fields=["a", "b"])
    assert (tmp_path / "b.csv").read_text().splitlines() == ["a,b", "1,"]


def test_hbm_ceiling_script_prints_both_ceilings():
    r = _run(EXP / "hbm_ceiling.py", "--elements", 4096)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"copy \d+ GB/s .*read \d+ GB/s", r.stdout), r.stdout


@pytest.mark.parametrize("script", ["bench_attention", "bench_projections", "bench_kernels",
                                    "bench_decode", "bench_spmd"])
def test_entry_scripts_import_as_a_package(script):
    r = _run("-m", f"experiments.{script}", "--help")
    assert r.returncode == 0, r.stderr[-2000:]


def test_no_session_or_run_numbers_in_benchmark_code():
    """Defaults say why by pointing at CSV rows; the history lives in the CSVs."""
    diary = re.compile(r"(?i:session|\bruns? \d|\bplan_s\d)|\bS\d\b|\bS\d-[A-Z]")
    files = [*sorted((EXP / "bench").glob("*.py")), *sorted(EXP.glob("bench_*.py")),
             EXP / "gpu_profile.py", EXP / "hbm_ceiling.py"]
    hits = [f"{f.name}:{i}: {line.strip()}" for f in files
            for i, line in enumerate(f.read_text().splitlines(), 1) if diary.search(line)]
    assert not hits, "\n".join(hits)


# ----------------------------------------------------------------------------- kernel bench

def test_bench_kernels_prefetch_plan_then_the_matrix_steps_named(tmp_path):
    best = {"m": "xs-bn64-bd1024-w4-p264-c8", "cats": "xs-bn64-bd1024-w4-p264-c8",
            "d": "bn32-bds256-bd1024-w4-b2-c8", "gather": "bj8-bd1024-w4-p132"}
    r = _run(EXP / "bench_kernels.py", "--plan", "prefetch", "--out", tmp_path, *TINY_RUN,
             "--batches", 2, "--only", "llama-3.1-8b/float32/1", "--best", json.dumps(best))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(tmp_path / "bench_kernels.csv")
    timed = [x for x in rows if x["us_per_call"]]
    assert {x["method"] for x in timed} >= {"dense", "m", "cats", "d", "loop-overhead"}
    assert {x["dtype"] for x in timed if x["method"] == "m"} == {"bfloat16", "float32"}
    assert {x["method"] for x in rows} >= {"hbm-copy", "hbm-read"}
    prefetched = {x["variant"] for x in timed if x["variant"].endswith("-pf")}
    assert "xs-bn64-bd1024-w4-p264-c4-pf" in prefetched and "bj4-bd1024-w4-p264-pf" in prefetched
    assert not [x for x in rows if "FAILED" in x["note"]]          # every check passed
    assert _rows(tmp_path / "bench_kernels_stages.csv")             # written (CPU: no ops)


def test_bench_kernels_probe_plan_and_one_kind_of_matrix_step(tmp_path):
    """The probe times one-knob variants of the chosen kernels against them; ``:gathered``
    runs only the index-list and plain-XLA rows of that matrix step."""
    r = _run(EXP / "bench_kernels.py", "--plan", "probe", "--out", tmp_path, *TINY_RUN,
             "--only", "gemma-2-9b/bfloat16/1:gathered", "--best", json.dumps(BEST))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(tmp_path / "bench_kernels.csv")
    assert not [x for x in rows if "FAILED" in x["note"]]
    probed = {x["variant"] for x in rows if x["shape"] == "llama-3.1-8b" and x["us_per_call"]}
    assert {BEST["m"], BEST["d"], "xs-bn64-bd1024-w4-p264-c4-pf-s2",
            "xs-bn32-bd1024-w4-p448-c2-pf"} <= probed
    gemma = {(x["method"], x["implementation"]) for x in rows
             if x["shape"] == "gemma-2-9b" and x["us_per_call"]}
    assert ("m", "pallas-gather") in gemma and ("d", "xla-gather") in gemma
    assert not [x for x in gemma if x[1] == "pallas-fused"]


def test_bench_kernels_stages_plan_defaults_to_the_shipped_kernels(tmp_path):
    r = _run(EXP / "bench_kernels.py", "--plan", "stages", "--out", tmp_path, *TINY_RUN)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(tmp_path / "bench_kernels.csv")
    assert {(x["method"], x["variant"], x["sparsity"]) for x in rows if x["us_per_call"]} >= {
        ("m", BEST["m"], "0.9"), ("m", BEST["m"], "1.0"), ("d", BEST["d"], "0.9"),
        ("d", BEST["d"], "1.0"), ("dense", "einsum", "0.0")}
    assert not [x for x in rows if "FAILED" in x["note"]]


def test_bench_kernels_report_rebuilds_the_committed_markdown(tmp_path):
    """--plan report from the committed CSVs writes the committed bench_kernels.md byte for
    byte (numbers read from the CSVs, never typed in) and a plot."""
    for name in ("bench_kernels.csv", "bench_kernels_stages.csv", "bench_kernels_runs.csv"):
        (tmp_path / name).write_bytes((RESULTS / name).read_bytes())
    r = _run(EXP / "bench_kernels.py", "--plan", "report", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "bench_kernels.md").read_text() == \
        (RESULTS / "bench_kernels.md").read_text()
    assert (tmp_path / "bench_kernels.png").stat().st_size > 10_000


def test_report_matrix_runs_are_the_runs_covering_every_shape_and_dtype():
    rows = _rows(RESULTS / "bench_kernels.csv")
    runs = matrix_runs(rows)
    assert runs and runs == tuple(sorted(runs, key=int, reverse=True))
    shapes = {(x["shape"], x["dtype"]) for x in rows if x["method"] == "m" and x["us_per_call"]}
    for run in runs:
        assert shapes <= {(x["shape"], x["dtype"]) for x in rows
                          if x["run"] == run and x["method"] in ("m", "cats", "d")}
    partial = [dict(x, run="99") for x in rows if x["run"] == runs[0]
               and x["shape"] != "phi-4"]
    assert "99" not in matrix_runs(rows + partial)


# ----------------------------------------------------------------------------- decode

def test_bench_decode_tiny_both_attentions_and_plot(tmp_path):
    r = _run(EXP / "bench_decode.py", "--tiny", "--out", tmp_path, "--batches", "1",
             "--sparsities", "0.9", "--implementations", "pallas", "--capacity", "none",
             "--attention", "xla,pallas", "--steps", 2, "--repeats", 1, "--prompt-len", 8)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(tmp_path / "bench_decode_tiny.csv")
    got = {(x["method"], x["attention"]) for x in rows}
    assert got == {(m, a) for m in ("dense", "m_countdown", "d_countdown")
                   for a in ("xla", "pallas")}
    for x in rows:
        assert float(x["tokens_per_s"]) > 0 and not x["note"]
        if x["method"] != "dense":      # realised sparsity measured from the masks
            assert abs(float(x["sparsity_realised"]) - 0.9) < 0.1
    assert (tmp_path / "bench_decode_tiny.md").read_text().count("\n| ") == len(rows) + 1
    (tmp_path / "bench_decode.csv").write_bytes((RESULTS / "bench_decode.csv").read_bytes())
    r = _run(EXP / "bench_decode.py", "--plot", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "bench_decode.png").stat().st_size > 10_000


def test_bench_spmd_tiny_on_two_cpu_devices(tmp_path):
    r = _run("-m", "experiments.bench_spmd", "--tiny", "--cpu-devices", 2, "--out", tmp_path,
             "--batches", 2, "--methods", "dense,m_countdown", "--scopes", "shard",
             "--steps", 2, "--repeats", 1, "--prompt-len", 8)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(tmp_path / "bench_spmd_tiny.csv")
    assert {(x["mesh"], x["method"]) for x in rows} == {
        (m, k) for m in ("1x1", "1x2") for k in ("dense", "m_countdown")}
    assert all(float(x["tokens_per_s"]) > 0 and not x["note"] for x in rows)
    sharded = [x for x in rows if x["mesh"] == "1x2" and x["method"] == "m_countdown"]
    assert sharded[0]["capacity_scope"] == "shard" and sharded[0]["x_one_device"]


# ----------------------------------------------------------------------------- auto path

def test_bench_auto_path_tiny(tmp_path):
    """The user path (every choice "auto": the portable path on CPU) beside bench_decode's
    best path, one row per rule with both rates and their ratio."""
    r = _run(EXP / "bench_auto_path.py", "--tiny", "--out", tmp_path, "--methods",
             "m_countdown,dense", "--steps", 2, "--repeats", 1, "--prompt-len", 8)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(tmp_path / "bench_auto_path_tiny.csv")
    assert [x["method"] for x in rows] == ["m_countdown", "dense"]
    for x in rows:
        assert x["user_path"] == "stacked/masked/xla"
        assert float(x["user_tokens_per_s"]) > 0 and float(x["best_tokens_per_s"]) > 0
        assert x["within_10pct"] in ("yes", "NO") and x["note"].startswith("(")
    assert abs(float(rows[0]["realised_user"]) - 0.9) < 0.1
    assert (tmp_path / "bench_auto_path_tiny.md").read_text().count("\n| ") == len(rows) + 1
