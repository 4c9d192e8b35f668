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
from experiments.bench.proxy_plan import formats

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments"
RESULTS = EXP / "results"
# the kernels' shipped defaults and the first index-list variant (what --best names)
BEST = {**chosen(), "lists": "bj8-bd1024-w4-p132"}
M, D = "m_countdown", "d_countdown"
TINY_RUN = ("--smoke", "--iters", 1, "--reps", 1, "--sets", 1)


def _run(*args, timeout=600, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **(env or {})}
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
                                    "bench_decode", "bench_spmd", "bench_gemv"])
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
    best = {M: "xs-bn64-bd1024-w4-p264-c8", "cats": "xs-bn64-bd1024-w4-p264-c8",
            D: "bn32-bds256-bd1024-w4-b2-c8", "lists": "bj8-bd1024-w4-p132"}
    r = _run(EXP / "bench_kernels.py", "--plan", "prefetch", "--out", tmp_path, *TINY_RUN,
             "--batches", 2, "--only", "llama-3.1-8b/float32/1", "--best", json.dumps(best))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(tmp_path / "bench_kernels.csv")
    timed = [x for x in rows if x["us_per_call"]]
    assert {x["method"] for x in timed} >= {"dense", M, "cats", D, "loop-overhead"}
    assert {x["dtype"] for x in timed if x["method"] == M} == {"bfloat16", "float32"}
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
    assert {BEST[M], BEST[D], "xs-bn64-bd1024-w4-p264-c4-pf-s2",
            "xs-bn32-bd1024-w4-p448-c2-pf"} <= probed
    gemma = {(x["method"], x["implementation"]) for x in rows
             if x["shape"] == "gemma-2-9b" and x["us_per_call"]}
    assert (M, "pallas-gather") in gemma and (D, "xla-gather") in gemma
    assert not [x for x in gemma if x[1] == "pallas-fused"]


@pytest.mark.parametrize("args,message", [
    (("--plan", "all"), "plan 'all' was renamed 'tune'"),
    (("--best", '{"gather": "bj8-bd1024-w4-p132"}'), "'gather' was renamed 'lists'"),
    (("--xs-best", '{"m": "xs-bn16-bd1024-w4-p264"}'), "'m' was renamed 'm_countdown'"),
    (("--methods", "m_countdown", "d"), "'d' was renamed 'd_countdown'")])
def test_bench_kernels_refuses_old_names_naming_the_new(args, message, capsys):
    from experiments.bench_kernels import parse_args
    with pytest.raises(SystemExit) as exit_:
        parse_args([*args, "--smoke"])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_bench_kernels_stages_plan_defaults_to_the_shipped_kernels(tmp_path):
    r = _run(EXP / "bench_kernels.py", "--plan", "stages", "--out", tmp_path, *TINY_RUN)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(tmp_path / "bench_kernels.csv")
    assert {(x["method"], x["variant"], x["sparsity"]) for x in rows if x["us_per_call"]} >= {
        (M, BEST[M], "0.9"), (M, BEST[M], "1.0"), (D, BEST[D], "0.9"),
        (D, BEST[D], "1.0"), ("dense", "einsum", "0.0")}
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
    shapes = {(x["shape"], x["dtype"]) for x in rows if x["method"] == M and x["us_per_call"]}
    for run in runs:
        assert shapes <= {(x["shape"], x["dtype"]) for x in rows
                          if x["run"] == run and x["method"] in (M, "cats", D)}
    partial = [dict(x, run="99") for x in rows if x["run"] == runs[0]
               and x["shape"] != "phi-4"]
    assert "99" not in matrix_runs(rows + partial)


def test_bench_kernels_proxy_plan_times_the_kernel_and_the_proxy_ffn(tmp_path):
    """The proxy rule's plan at toy shapes: the scores kernel alone per format (plus its
    poisoned full check), the proxy FFN by the fused kernel at
    r = 0.5 / 0.9, dense and D in the same run, every row checked; bench_proxy.md lists
    the timed rows."""
    r = _run(EXP / "bench_kernels.py", "--plan", "proxy", "--out", tmp_path, *TINY_RUN)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(tmp_path / "bench_kernels.csv")
    assert not [x for x in rows if "FAILED" in x["note"]]
    timed = {(x["method"], x["implementation"], x["sparsity"]) for x in rows
             if x["us_per_call"]}
    for fmt in (f"b{bits}g{group}" for bits, group in formats(64)):     # smoke: d = 64
        assert (f"proxy-{fmt}", "pallas", "0.0") in timed
        assert {(f"proxy-d-{fmt}", "pallas-fused", s) for s in ("0.5", "0.9")} <= timed
    assert {("dense", "xla-dense", "0.0"), (D, "pallas-fused", "0.9")} <= timed
    checks = [x["note"] for x in rows if "[poison check]" in x["variant"]]
    assert len(checks) >= 2 and all("passed" in c for c in checks)   # per format, plus sweep winners
    md = (tmp_path / "bench_proxy.md").read_text()
    summary = _rows(tmp_path / "bench_proxy.csv")
    assert {x["kernel"] for x in summary} >= {"scores", "ffn", "dense"}
    assert md.count("\n| ") == len(summary) + 1                      # header + one per row


# ----------------------------------------------------------------------------- gemv

def test_bench_gemv_tiny_checks_then_times_and_records_failures(tmp_path, monkeypatch):
    """Every shape x batch gets its loop row, XLA in both layouts and each config; a config
    that does not parse, one the kernel refuses and one giving wrong numbers are recorded
    and skipped, the rest run (Pallas in interpret mode)."""
    from experiments import bench_gemv

    real = bench_gemv.implementations

    def with_a_wrong_one(names):
        out = real(names)
        out["wrong"] = (False, lambda x, w: 2 * bench_gemv.gemv_xla(x, w))
        return out

    monkeypatch.setattr(bench_gemv, "implementations", with_a_wrong_one)
    configs = "bn64-bd32,bn32-bd64-s3,bn32-bd32-dot,t-bn16-bd64-s2,bn8-dot,zz"
    rows = bench_gemv.main(["--tiny", "--out", str(tmp_path), "--iters", "1", "--reps", "1",
                            "--batches", "1,3", "--configs", configs])
    csv_rows = _rows(tmp_path / "bench_gemv.csv")
    assert len(csv_rows) == len(rows) == 2 * 2 * (1 + 2 + 6 + 1)
    status = {(r["batch"], r["shape"], r["impl"]): r["status"] for r in csv_rows}
    for b in ("1", "3"):
        for shape in bench_gemv.TINY_SHAPES:
            for impl in ["loop+feedback", "xla", "xla t",
                         *(f"pallas {c}" for c in configs.split(",")[:4])]:
                assert status[(b, shape, impl)] == "ok", (b, shape, impl)
            assert status[(b, shape, "wrong")] == "wrong"
            assert status[(b, shape, "pallas bn8-dot")].startswith("error: ValueError: "
                                                                   "GemvConfig.dot needs")
            assert "unknown token 'zz'" in status[(b, shape, "pallas zz")]
    assert all(float(r["us_per_call"]) > 0 for r in csv_rows if r["status"] == "ok")
    md = (tmp_path / "bench_gemv.md").read_text()
    assert md.count("## batch") == 4 and "| pallas bn32-bd32-dot |" in md


# ----------------------------------------------------------------------------- decode

def test_bench_decode_tiny_both_attentions_and_plot(tmp_path):
    r = _run(EXP / "bench_decode.py", "--tiny", "--out", tmp_path, "--batches", "1",
             "--sparsities", "0.9", "--implementations", "pallas", "--capacity", "none",
             "--attention", "xla,pallas", "--projections", "xla,pallas", "--gemv-config",
             "32,64,2,4", "--steps", 2, "--repeats", 1, "--prompt-len", 8)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "GEMV config: GemvConfig(block_n=32, block_d=64, split_d=2" in r.stdout
    rows = _rows(tmp_path / "bench_decode_tiny.csv")
    got = {(x["method"], x["attention"], x["projections"]) for x in rows}
    assert got == {(m, a, p) for m in ("dense", "m_countdown", "d_countdown")
                   for a in ("xla", "pallas") for p in ("xla", "pallas")}
    for x in rows:
        assert float(x["tokens_per_s"]) > 0 and not x["note"]
        if x["method"] != "dense":      # realised sparsity measured from the masks
            assert abs(float(x["sparsity_realised"]) - 0.9) < 0.1
        # batch 1: the byte floor at this run's read ceiling, and the share of it reached
        assert float(x["floor_ms_per_step"]) > 0 and float(x["pct_of_read_ceiling"]) > 0
    assert (tmp_path / "bench_decode_tiny.md").read_text().count("\n| ") == len(rows) + 1
    (tmp_path / "bench_decode.csv").write_bytes((RESULTS / "bench_decode.csv").read_bytes())
    r = _run(EXP / "bench_decode.py", "--plot", "--out", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "bench_decode.png").stat().st_size > 10_000


def test_bench_spmd_tiny_on_two_cpu_devices(tmp_path):
    """One call: meshes 1x1, 1x2 and 2x1, the fast path (Pallas kernels interpreted),
    ratios within the call, the cache check against one device, the profile step."""
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    r = _run("-m", "experiments.bench_spmd", "--tiny", "--cpu-devices", 2, "--out", tmp_path,
             "--batches", "1,2", "--methods", "dense,m_countdown", "--profile", "dense",
             "--steps", 2, "--repeats", 1, "--prompt-len", 8, "--compile-workers", 2,
             "--cache-dir", "", env={"XLA_FLAGS": flags}, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(tmp_path / "bench_spmd_tiny.csv")
    got = {(x["mesh"], x["batch"], x["method"], x["attention"]) for x in rows}
    assert got == {(mh, b, k, "pallas") for mh in ("1x1", "1x2") for b in "12"
                   for k in ("dense", "m_countdown")} | {
        ("2x1", "2", k, "pallas") for k in ("dense", "m_countdown")} | {
        (mh, "1", "dense", "xla") for mh in ("1x1", "1x2")}
    for x in rows:
        assert float(x["tokens_per_s"]) > 0, x
        assert float(x["check_rel_err"]) < 0.05, x       # the same decode as one device
        assert x["mesh"] == "1x1" or x["x_one_device"], x
        assert x["note"] in ("", "profiled: no GPU device plane in the trace"), x
        if x["method"] == "m_countdown":
            assert x["x_dense_same_mesh"] and abs(float(x["sparsity_realised"]) - 0.9) < 0.1
    scope = {(x["mesh"], x["batch"]): x["capacity_scope"] for x in rows
             if x["method"] == "m_countdown"}
    assert scope == {("1x1", "1"): "none (fused)", ("1x2", "1"): "none (fused)",
                     ("1x1", "2"): "-", ("1x2", "2"): "shard", ("2x1", "2"): "none (fused)"}
    assert [x["note"] for x in rows if x["note"]] == [
        "profiled: no GPU device plane in the trace"]       # the 1x2 batch-1 dense row
    assert (tmp_path / "bench_spmd_tiny.md").read_text().count("\n| ") == len(rows) + 1
    for x in rows:      # GB/s per device against this run's read ceiling: batch 1 per
        # replica, or dense (a sparse batch reads its tokens' union: not modelled)
        per_replica = int(x["batch"]) // int(x["mesh"].split("x")[0])
        has = x["method"] == "dense" or per_replica == 1
        assert bool(x["gb_per_s_per_device"]) == has, x
        if has:
            assert float(x["pct_of_read_ceiling"]) > 0, x


def test_step_bytes_at_llama_8b():
    """Bytes a decode step reads (bench.decode.step_bytes) at Llama-3.1-8B, bf16, batch 1:
    dense 15.0 GB (the figure bench_decode.md's floors use), M at r = 0.9 about 8.2 GB,
    D with a rank-512 predictor about 5.5 GB; halved per device on 2 model shards; a
    sparse batch is not modelled."""
    from countdown_jax.config import ModelConfig
    from experiments.bench.decode import step_bytes
    from experiments.bench.shapes import LLAMA_3_1_8B

    cfg = ModelConfig.from_hf(LLAMA_3_1_8B)
    gb = lambda *a, **k: step_bytes(cfg, *a, context=160, **k) / 1e9
    assert abs(gb("dense", 1.0, batch=1) - 15.05) < 0.1
    assert abs(gb("m_countdown", 0.1, batch=1) - 8.3) < 0.15
    assert abs(gb("d_countdown", 0.1, batch=1, rank=512) - 5.5) < 0.15
    assert gb("dense", 1.0, batch=1, model_shards=2) == gb("dense", 1.0, batch=1) / 2
    assert gb("dense", 1.0, batch=4) > gb("dense", 1.0, batch=1)        # the KV cache
    assert step_bytes(cfg, "m_countdown", 0.1, batch=4, context=160) is None


def test_profile_devices_splits_collectives_per_gpu(monkeypatch):
    """profile_devices on a synthetic trace (the GPU-only path of bench_spmd): per device
    plane, collective kernel time apart from compute, the part no compute overlaps, idle
    gaps; the report renders it per decode step."""
    from types import SimpleNamespace as NS

    from experiments.bench import profile, spmd

    def ev(name, t0, dur, op=None):
        return NS(name=name, start_ns=t0, duration_ns=dur,
                  stats=[("hlo_op", op)] if op else [])

    gpu0 = [NS(name="Stream #1(compute)", events=[
                ev("fusion_1", 0, 4000, "fusion.1"), ev("fusion_2", 6000, 2000, "fusion.2")]),
            NS(name="Stream #2(nccl)", events=[
                ev("ncclDevKernel_AllReduce_Sum_bf16", 3000, 2000, "all-reduce-start.1"),
                # an explicit psum's all-reduce, as XLA names it on the GPU
                ev("psum_kernel", 8000, 1000, "psum.229.0-fusion.1")]),
            NS(name="XLA Ops", events=[ev("fusion_1", 0, 4000, "fusion.1")])]   # not counted
    gpu1 = [NS(name="Stream #1(compute)", events=[ev("fusion_1", 0, 1000, "fusion.1")])]
    pd = NS(planes=[NS(name="/device:GPU:1", lines=gpu1), NS(name="/device:GPU:0", lines=gpu0),
                    NS(name="/host:CPU", lines=gpu0)])
    monkeypatch.setattr(profile, "_trace", lambda fn, *a, **k: pd)
    rows, summ = profile.profile_devices(None)
    s0, s1 = summ
    assert s0["device"] == "/device:GPU:0" and s1["device"] == "/device:GPU:1"
    assert (s0["wall_us"], s0["busy_us"], s0["idle_us"]) == (9.0, 8.0, 1.0)
    assert (s0["compute_us"], s0["collective_us"], s0["collective_launches"]) == (6.0, 3.0, 2)
    assert s0["exposed_collective_us"] == 2.0         # 4000-5000, 8000-9000 ns: collectives
    assert s1["collective_us"] == 0.0 and s1["busy_us"] == 1.0
    assert {(r["device"], r["op"], r["collective"]) for r in rows} == {
        ("/device:GPU:0", "fusion.1", False), ("/device:GPU:0", "fusion.2", False),
        ("/device:GPU:0", "all-reduce-start.1", True), ("/device:GPU:0", "psum.229.0-fusion.1",
                                                         True),
        ("/device:GPU:1", "fusion.1", False)}
    prof = [dict(s, mesh="1x2", batch=1, method="dense", steps=2) for s in summ]
    md = spmd.table([], prof, "head")
    assert "| 1x2 | 1 | dense | unstacked | xla | /device:GPU:0 | 0.004 | 0.004 | 0.001 | " \
           "0.003 | 0.002 | 1 | 0.001 |" in md, md



def test_bench_spmd_plan_repeats_the_fast_path_per_projection_path():
    from experiments.bench import spmd
    rows = spmd.plan([(1, 1), (1, 2)], [1], ["dense", "d_countdown"], [0.9],
                     projections=("xla", "pallas"))
    got = [(r.method, r.projections, r.attention, r.label, r.primer) for r in rows]
    assert got == [(m, p, "pallas", mh, m == "dense" and p == "xla")
                   for m in ("dense", "d_countdown") for p in ("xla", "pallas")
                   for mh in ("1x1", "1x2")] + [
        ("dense", "xla", "xla", mh, False) for mh in ("1x1", "1x2")]
    rec = [dict(mesh=mh, batch=1, method=m, attention="pallas", projections=p, sparsity=r,
                tokens_per_s=t) for mh, m, p, r, t in (
        ("1x1", "dense", "xla", 0.0, 10.0), ("1x1", "dense", "pallas", 0.0, 20.0),
        ("1x2", "dense", "pallas", 0.0, 30.0), ("1x1", "d_countdown", "pallas", 0.9, 40.0))]
    spmd.add_ratios(rec)
    assert [r["x_dense_same_mesh"] for r in rec] == [1.0, 1.0, 1.0, 2.0]  # same projections
    assert rec[2]["x_one_device"] == 1.5


def test_bench_kernels_union_plan(tmp_path):
    """--plan union at toy sizes (interpret mode): for a batch of 2, the union read once
    (as a row predicate and as an index list, form="compact") with its tiles, the
    per-token lists and masked dense each pass their reference check at every r, only the
    --labels columns run, and the table of x dense with the union's share and the byte
    floor is written."""
    labels = ["union", "compact", "compact-d32x128s8st3", "lists", "masked"]
    r = _run(EXP / "bench_kernels.py", "--plan", "union", "--out", tmp_path, *TINY_RUN,
             "--batches", 2, "--methods", M, D, "--budget-s", 400, "--labels", *labels)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(tmp_path / "bench_kernels.csv")
    batch = [x for x in rows if x["implementation"] == "batch-union" and x["us_per_call"]]
    assert batch and not any("FAILED" in x["note"] for x in rows)
    assert {x["variant"] for x in batch} == set(labels)
    assert {x["method"] for x in batch} == {M, D}
    md = (tmp_path / "bench_kernels_union.md").read_text()
    assert ("| batch | method | r | union share | dense | floor | " + " | ".join(labels)
            + " |") in md


def test_union_labels_filter():
    from experiments.bench.ffn_floor import UNION_STEPS, union_labels
    assert union_labels(None) == list(UNION_STEPS)
    assert union_labels(["masked", "compact"]) == ["compact", "masked"]    # table order
    assert {"union", "compact", "lists", "masked"} <= set(UNION_STEPS)
    with pytest.raises(ValueError, match=r"unknown \['compakt'\]"):
        union_labels(["compakt"])


# ----------------------------------------------------------------------------- auto path

def test_bench_auto_path_tiny(tmp_path):
    """The user path (every choice "auto": the portable path on CPU) beside bench_decode's
    best path, one row per rule, r and batch with both rates, their ratio and the user
    path over dense of the same batch."""
    r = _run(EXP / "bench_auto_path.py", "--tiny", "--out", tmp_path, "--methods",
             "dense,m_countdown", "--sparsity", "0.5,0.9", "--batches", "1,2", "--best",
             "masked,dense", "--steps", 2, "--repeats", 1, "--prompt-len", 8,
             "--name", "auto", "--budget-s", 600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = _rows(tmp_path / "auto.csv")
    assert [(x["method"], float(x["sparsity"]), int(x["batch"])) for x in rows] == [
        (m, s, b) for b in (1, 2) for m, s in (("dense", 0.0), ("m_countdown", 0.5),
                                               ("m_countdown", 0.9))]
    for x in rows:
        assert x["user_path"] == "stacked/masked/xla" and x["batch_kernel"] == ""
        assert float(x["user_tokens_per_s"]) > 0 and float(x["best_tokens_per_s"]) > 0
        assert float(x["x_dense"]) > 0
        assert x["within_10pct"] in ("yes", "NO") and x["note"].startswith("(")
        assert x["best_ffn"] in ("lists", "masked", "dense")
    assert [x["best_ffn"] for x in rows if x["batch"] == "1"] == ["dense", "lists", "lists"]
    assert float(rows[0]["x_dense"]) == 1.0
    assert abs(float(rows[1]["realised_user"]) - 0.5) < 0.1
    assert abs(float(rows[2]["realised_user"]) - 0.9) < 0.1
    assert (tmp_path / "auto.md").read_text().count("\n| ") == len(rows) + 1
    r = _run(EXP / "bench_auto_path.py", "--tiny", "--out", tmp_path, "--best", "fast")
    assert r.returncode != 0 and "unknown candidates ['fast']" in r.stderr


def test_bench_spmd_plan_repeats_the_first_batch_per_layer_form():
    """--layers unstacked,fused_qkv: every row on the first form, then the first batch's
    fast-path rows again on the second; ratios compare within a form."""
    from experiments.bench import spmd

    rows = spmd.plan([(1, 1), (1, 2), (2, 1)], [1, 4], ["dense", "d_countdown"], [0.9],
                     layer_forms=("unstacked", "fused_qkv"))
    fused = [r for r in rows if r.layers == "fused_qkv"]
    assert rows[:len(rows) - len(fused)] == spmd.plan([(1, 1), (1, 2), (2, 1)], [1, 4],
                                                      ["dense", "d_countdown"], [0.9])
    assert {(r.label, r.method, r.batch, r.attention, r.primer) for r in fused} == {
        (mh, k, 1, "pallas", False) for mh in ("1x1", "1x2") for k in ("dense", "d_countdown")}
    recs = [dict(mesh=mh, batch=1, method=k, attention="pallas", sparsity=0.0, layers=f,
                 tokens_per_s=t) for mh, f, t in (("1x1", "unstacked", 100.0),
                                                   ("1x2", "unstacked", 110.0),
                                                   ("1x1", "fused_qkv", 120.0),
                                                   ("1x2", "fused_qkv", 180.0))
            for k in ("dense",)]
    spmd.add_ratios(recs)
    assert [r["x_one_device"] for r in recs] == ["", 1.1, "", 1.5]
