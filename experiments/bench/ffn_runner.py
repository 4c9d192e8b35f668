"""The FFN benchmark's runner: times one variant at a list of sparsities (checked against
the float32 reference on the same call), records rows, stage profiles, HBM ceilings, and
keeps to the run's time budget. Plans (ffn_plans) decide what to time."""

from __future__ import annotations

import dataclasses
import os
import time

import jax

from countdown_jax.kernels.fused_sparse_ffn.api import IndexLists
from countdown_jax.kernels.sparse_ffn.pallas_gpu import GatherConfig

from . import harness
from .ffn_problem import (Problem, bytes_needed, capacity, check, compare, dense_step,
                          make_problem, overhead_step, reference, sparse_step, thresholds)
from .ffn_variants import Scale, for_dtype

FIELDS = ["device", "shape", "dtype", "method", "implementation", "variant", "sparsity", "batch",
          "kept_frac", "us_per_call", "gb_per_s", "bytes_needed", "rel_err", "note"]
STAGE_FIELDS = ["device", "shape", "dtype", "method", "implementation", "variant", "sparsity",
                "batch", "op", "us_per_call", "launches_per_call"]
OVERHEAD = ("loop-overhead", "xla", "x<-x0+eps*y only")     # (method, impl, variant) rows
DENSE = ("dense", "xla-dense", "einsum")
# --best's key for the index-list kernel's variant (beside one fused variant per method).
LISTS = "lists"


def log(*a):
    print(*a, flush=True)


class Runner:
    """Rows of one run (rewritten to ``out``/bench_kernels.csv after every row) and one
    compiled timing loop per variant. ``args``: iters, reps, sets, budget_s, batches,
    only, out (the entry script's flags)."""

    def __init__(self, args, scale: Scale):
        self.args = args
        self.scale = scale
        self.device = jax.devices()[0].device_kind
        self.rows = []
        self.stage_rows = []
        self.fns = {}
        self.t_start = time.time()
        os.makedirs(args.out, exist_ok=True)
        self.csv_path = os.path.join(args.out, "bench_kernels.csv")

    def left(self):
        return self.args.budget_s - (time.time() - self.t_start)

    def problem(self, name, dtype, batch):
        return make_problem(name, self.scale.shapes[name], dtype, batch, self.args.sets,
                            self.scale.rank, self.scale.interpret)

    def add(self, **row):
        row.setdefault("device", self.device)
        self.rows.append({k: row.get(k, "") for k in FIELDS})
        harness.write_csv(self.csv_path, self.rows, FIELDS)

    def add_ceilings(self):
        """Copy (read + write) and read ceilings of this card, as rows of the run."""
        copy_bw, read_bw = harness.ceilings(n=self.scale.ceiling_elems)
        self.add(shape="copy-2GiB", dtype="float32", method="hbm-copy", implementation="xla",
                 gb_per_s=f"{copy_bw:.0f}", note="device-to-device copy, read+write bytes")
        self.add(shape="read-2GiB", dtype="float32", method="hbm-read", implementation="xla",
                 gb_per_s=f"{read_bw:.0f}", note="reduction over 2 GiB, bytes read")
        log(f"device {self.device}; HBM copy ceiling {copy_bw:.0f} GB/s, read {read_bw:.0f} GB/s")
        return copy_bw

    def time_variant(self, p: Problem, method, impl, variant, step, ratios):
        """One compile per variant (thresholds are arguments), timed at each r; the first
        call's output is checked against the float32 reference at the same r. Returns
        {r: median us} of the rows that passed their check."""
        key = (*p.key, method, impl, variant)
        out = {}
        if key not in self.fns:          # one jit per variant: later calls reuse its compile
            self.fns[key] = harness.timed_loop(step, len(p.sets), self.args.iters)
        f = self.fns[key]
        calls = harness.calls_per_run(self.args.iters, len(p.sets))
        for r in ratios:
            if self.left() < 20:
                log("  (budget exhausted, skipping)")
                return out
            base = dict(shape=p.name, dtype=p.dtype.__name__, method=method, implementation=impl,
                        variant=variant, sparsity=r, batch=p.batch)
            try:
                taus, kept = thresholds(p, method, r)
                med, lo, hi, first, (_, y0, c0) = harness.measure(
                    f, (p.x0, p.sets, taus), calls, self.args.reps)
            except Exception as e:   # noqa: BLE001
                log(f"  FAILED {p.name} {p.dtype.__name__} {method} {impl} {variant} r={r}: "
                    f"{type(e).__name__}: {str(e)[:300]}")
                self.add(**base, note=f"FAILED {type(e).__name__}: {str(e)[:200]}")
                continue
            rel, flag = "", ""
            if method != "loop-overhead":
                try:
                    ref, rc = reference(p, method, taus[0])
                    err, failed = compare(y0, c0, ref, rc, p.dtype)
                    rel = "" if err is None else f"{err:.1e}"
                except Exception as e:   # noqa: BLE001
                    failed = f"{type(e).__name__}: {e}"
                if failed:               # keep the time, flag the row
                    flag = f"CHECK FAILED: {failed[:160]}; "
                    log(f"  {flag}")
            nbytes = bytes_needed(p, method, kept)
            gbps = harness.gb_per_s(nbytes, med) if nbytes else ""
            self.add(**base, kept_frac=f"{kept / p.m:.4f}", us_per_call=f"{med:.2f}",
                     gb_per_s=f"{gbps:.0f}" if gbps != "" else "", bytes_needed=nbytes,
                     rel_err=rel, note=f"{flag}min {lo:.2f} max {hi:.2f} first-call {first:.1f}s")
            log(f"  {p.name:13s} {p.dtype.__name__:8s} B={p.batch} {method:5s} "
                f"{impl:13s} {variant:28s} r={r:<4} kept={kept / p.m:.3f} "
                f"{med:8.2f} us  {gbps if gbps == '' else round(gbps):>5} GB/s  "
                f"(first {first:.1f}s) rel={rel}")
            if not flag:                 # a variant that failed its check never wins a sweep
                out[r] = med
        return out

    def baseline(self, p):
        """The loop's own cost and XLA dense, on the problem just made."""
        self.time_variant(p, *OVERHEAD, overhead_step(p), (0.0,))
        return self.time_variant(p, *DENSE, dense_step(p), (0.0,))

    def xla_index_lists(self, p, method, ratios):
        """Index list + jnp.take; capacity 2% above the kept count (+8)."""
        for r in ratios:
            cap = capacity(p.m, r)
            self.time_variant(p, method, "xla-gather", f"cap={cap}",
                              sparse_step(p, method, "xla", IndexLists(capacity=cap)), (r,))

    def pallas(self, p, method, label, cfg, ratios):
        """A Pallas variant: ``cfg`` a FusedConfig (the fused kernel) or a GatherConfig
        (the index-list kernel)."""
        name, config = _route(for_dtype(cfg, p.dtype))
        return self.time_variant(p, method, name, label,
                                 sparse_step(p, method, "pallas", config), ratios)

    def poison_check(self, p, method, label, cfg):
        """Outputs start as NaN / INT_MIN: every element must be written (r = 0.5, 0.9)."""
        name, config = _route(dataclasses.replace(for_dtype(cfg, p.dtype), poison=True))
        try:
            rel = check(p, method, "pallas", config)
            note = f"poison check passed, max rel err {rel:.1e}"
        except Exception as e:   # noqa: BLE001
            note = f"poison check FAILED: {type(e).__name__}: {str(e)[:200]}"
        log(f"  {method} {name} {label}: {note}")
        self.add(shape=p.name, dtype=p.dtype.__name__, method=method, implementation=name,
                 variant=label + " [poison check]", batch=p.batch, note=note)

    def stage_profile(self, p: Problem, method, impl, variant, r):
        """Per-kernel GPU time per FFN call of an already-timed variant (profiler trace of
        one timed run; the loop's input update shows as its own op). Rows go to
        bench_kernels_stages.csv; "(busy)" is the union of kernel intervals per call."""
        from .profile import profile_call
        key = (*p.key, method, impl, variant)
        if key not in self.fns or self.left() < 20:
            return
        taus, _ = thresholds(p, method, r)
        f = self.fns[key]
        calls = harness.calls_per_run(self.args.iters, len(p.sets))
        try:
            jax.block_until_ready(f(p.x0, p.sets, taus))
            prof, summ = profile_call(f, p.x0, p.sets, taus)
        except Exception as e:   # noqa: BLE001
            log(f"  stage profile failed ({method} {variant}): {type(e).__name__}: {str(e)[:200]}")
            return
        base = dict(device=self.device, shape=p.name, dtype=p.dtype.__name__, method=method,
                    implementation=impl, variant=variant, sparsity=r, batch=p.batch)
        rows = [dict(base, op=row["op"], us_per_call=f"{row['us'] / calls:.2f}",
                     launches_per_call=f"{row['launches'] / calls:.2f}") for row in prof]
        rows.append(dict(base, op="(busy)", us_per_call=f"{summ['busy_us'] / calls:.2f}",
                         launches_per_call=f"{summ['kernels'] / calls:.2f}"))
        self.stage_rows += rows
        harness.write_csv(os.path.join(self.args.out, "bench_kernels_stages.csv"),
                          self.stage_rows, STAGE_FIELDS)
        log(f"  stages {method} {variant} r={r}: " + ", ".join(
            f"{row['op'][:28]} {row['us_per_call']}" for row in rows[:5]) +
            f"; busy {summ['busy_us'] / calls:.2f} us/call")

    def profile_baseline(self, p):
        """Stage profiles of the loop's own update and of XLA dense."""
        self.stage_profile(p, *OVERHEAD, 0.0)
        self.stage_profile(p, *DENSE, 0.0)


def _route(cfg):
    """(the `implementation` column, the fused op's config) of a kernel variant."""
    if isinstance(cfg, GatherConfig):
        return "pallas-gather", IndexLists(kernel=cfg)
    return "pallas-fused", cfg
