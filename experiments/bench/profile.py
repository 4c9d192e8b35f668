"""Per-kernel GPU time of one call, from JAX's profiler (no TensorBoard needed).

    rows, summary = profile_call(fn, *args)

traces one call of ``fn`` (already compiled: call it once before), reads the xplane with
``jax.profiler.ProfileData`` and returns, per kernel (grouped by its XLA op name when the
trace has one and it is not a CUDA graph, else by the kernel name), total GPU time and launch count, plus the wall
span, the busy time (union of kernel intervals) and the idle gaps between kernels. Idle
time inside one compiled program is launch overhead / host round trips, which no kernel
speedup removes.
"""

from __future__ import annotations

import glob
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


def _device_events(pd):
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
                yield line.name, ev.name, ev.start_ns, ev.duration_ns, stats


def profile_call(fn, *args, **kwargs):
    """(rows sorted by total time, summary dict); times in microseconds."""
    from jax.profiler import ProfileData

    d = tempfile.mkdtemp(prefix="cdj_prof_")
    with jax.profiler.trace(d):
        jax.block_until_ready(fn(*args, **kwargs))
    files = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
    if not files:
        raise RuntimeError(f"profiler wrote no xplane under {d}")
    pd = ProfileData.from_file(files[0])
    total = defaultdict(float)
    count = defaultdict(int)
    spans = []
    for _, name, t0, dur, stats in _device_events(pd):
        # kernel name: under CUDA graphs ("command buffers") hlo_op names the whole
        # graph, the kernel name still says which fusion / custom call ran
        key = name if str(stats.get("hlo_op", "")).startswith("command_buffer") or \
            not stats.get("hlo_op") else str(stats["hlo_op"])
        total[key] += dur / 1e3
        count[key] += 1
        spans.append((t0, t0 + dur))
    if not spans:
        return [], dict(kernels=0, wall_us=0.0, busy_us=0.0, idle_us=0.0)
    spans.sort()
    busy, cur0, cur1 = 0.0, *spans[0]
    for a, b in spans[1:]:
        if a > cur1:
            busy += cur1 - cur0
            cur0, cur1 = a, b
        else:
            cur1 = max(cur1, b)
    busy += cur1 - cur0
    wall = spans[-1][1] - spans[0][0]
    rows = sorted(({"op": k, "us": total[k], "launches": count[k]} for k in total),
                  key=lambda r: -r["us"])
    return rows, dict(kernels=len(spans), wall_us=wall / 1e3, busy_us=busy / 1e3,
                      idle_us=(wall - busy) / 1e3)
