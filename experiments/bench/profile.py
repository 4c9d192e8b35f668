"""Per-kernel GPU time of one call, from JAX's profiler (no TensorBoard needed).

    rows, summary = profile_call(fn, *args)

traces one call of ``fn`` (already compiled: call it once before), reads the xplane with
``jax.profiler.ProfileData`` and returns, per kernel (grouped by its XLA op name when the
trace has one and it is not a CUDA graph, else by the kernel name), total GPU time and launch count, plus the wall
span, the busy time (union of kernel intervals) and the idle gaps between kernels. Idle
time inside one compiled program is launch overhead / host round trips, which no kernel
speedup removes.

    rows, summaries = profile_devices(fn, *args)

the same per GPU (one summary per device plane), with the collectives (all-reduce,
all-gather, NCCL kernels) apart from the compute kernels: their kernel time (which
includes waiting for the other devices), and how much of the busy time they alone fill
(``exposed_collective_us``: the part no compute overlaps).
"""

from __future__ import annotations

import glob
import re
import tempfile
from collections import defaultdict

import jax
import jax.numpy as jnp


def chained(step, calls: int):
    """jit of ``calls`` dependent calls, x <- x + 1e-3 * step(x, i, *args) (step returns
    x's shape), so XLA can neither hoist nor merge them: a program to profile per call."""
    def run(x, *args):
        for i in range(calls):
            y = step(x, i, *args)
            x = (x.astype(jnp.float32) + 1e-3 * y.astype(jnp.float32)).astype(x.dtype)
        return x
    return jax.jit(run)


# A collective's XLA op is named after its HLO instruction, and an explicit jax.lax.psum
# (ffn_parallel's shard_map) names it "psum.N" ("psum.229.0-fusion.1" on the GPU):
# missing that counted the FFN's all-reduce as compute (a 1x2 profile then reported 33
# collectives per step where 65 ran).
_COLLECTIVE = re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|"
                         r"collective-permute|nccl|^(psum|pmax|pmin|ppermute|"
                         r"all_gather|psum_scatter)\b", re.IGNORECASE)


def _device_events(pd):
    """(device plane, op key, start ns, duration ns) of every kernel / memcpy."""
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            # kernel / memcpy timelines are the stream lines; "XLA Ops" / "XLA Modules"
            # lines are derived views of the same time and would double count
            if "Stream" not in line.name:
                continue
            for ev in line.events:
                stats = dict(ev.stats)
                # kernel name: under CUDA graphs ("command buffers") hlo_op names the whole
                # graph, the kernel name still says which fusion / custom call ran
                op = str(stats.get("hlo_op", ""))
                key = ev.name if op.startswith("command_buffer") or not op else op
                yield plane.name, key, ev.start_ns, ev.duration_ns


def _trace(fn, *args, **kwargs):
    from jax.profiler import ProfileData

    d = tempfile.mkdtemp(prefix="cdj_prof_")
    with jax.profiler.trace(d):
        jax.block_until_ready(fn(*args, **kwargs))
    files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    if not files:
        raise RuntimeError(f"profiler wrote no xplane under {d}")
    return ProfileData.from_file(files[0])


def _busy_ns(spans) -> float:
    """Length of the union of [start, end) intervals."""
    busy, cur = 0.0, None
    for a, b in sorted(spans):
        if cur is None or a > cur[1]:
            busy += 0.0 if cur is None else cur[1] - cur[0]
            cur = [a, b]
        else:
            cur[1] = max(cur[1], b)
    return busy + (0.0 if cur is None else cur[1] - cur[0])


def _summarise(events):
    """(per-op rows sorted by total time, summary) of (key, start, duration) events."""
    total = defaultdict(float)
    count = defaultdict(int)
    spans = []
    for key, t0, dur in events:
        total[key] += dur / 1e3
        count[key] += 1
        spans.append((t0, t0 + dur))
    if not spans:
        return [], dict(kernels=0, wall_us=0.0, busy_us=0.0, idle_us=0.0)
    busy = _busy_ns(spans)
    wall = max(b for _, b in spans) - min(a for a, _ in spans)
    rows = sorted(({"op": k, "us": total[k], "launches": count[k]} for k in total),
                  key=lambda r: -r["us"])
    return rows, dict(kernels=len(spans), wall_us=wall / 1e3, busy_us=busy / 1e3,
                      idle_us=(wall - busy) / 1e3)


def profile_call(fn, *args, **kwargs):
    """(rows sorted by total time, summary dict); times in microseconds."""
    pd = _trace(fn, *args, **kwargs)
    return _summarise((k, t0, dur) for _, k, t0, dur in _device_events(pd))


def profile_devices(fn, *args, **kwargs):
    """(rows, summaries) per GPU: rows {device, op, us, launches, collective}; summaries
    {device, kernels, wall_us, busy_us, idle_us, collective_us, collective_launches,
    compute_us, exposed_collective_us}. Times in microseconds over the whole call."""
    pd = _trace(fn, *args, **kwargs)
    per_device = defaultdict(list)
    for plane, key, t0, dur in _device_events(pd):
        per_device[plane].append((key, t0, dur))
    rows, summaries = [], []
    for device, events in sorted(per_device.items()):
        ops, summ = _summarise(events)
        compute = [(t0, t0 + dur) for k, t0, dur in events if not _COLLECTIVE.search(k)]
        coll = [r for r in ops if _COLLECTIVE.search(r["op"])]
        summ.update(device=device, collective_us=sum(r["us"] for r in coll),
                    collective_launches=sum(r["launches"] for r in coll),
                    compute_us=sum(r["us"] for r in ops) - sum(r["us"] for r in coll),
                    exposed_collective_us=summ["busy_us"] - _busy_ns(compute) / 1e3)
        summaries.append(summ)
        rows += [dict(r, device=device, collective=bool(_COLLECTIVE.search(r["op"])))
                 for r in ops]
    return rows, summaries
