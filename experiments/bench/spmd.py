"""The SPMD decode benchmark's plan and report (experiments/bench_spmd.py runs them).

A plan is the list of rows to time, most wanted first (a time budget drops the last):
  1. batch 1, every mesh without a data split: dense, M, D on the fast path;
  2. the other batches on every mesh the batch splits over: dense, M, D;
  3. dense with XLA attention (the path without the decode-attention kernel) at batch 1;
  4. the rows of 1. again for every other layer form asked for (``--layers``, e.g.
     fused_qkv: ``model.fuse_qkv`` with one head group per "model" device).
Rows 1-2 run once per decode-projection path asked for (``projections``: XLA's einsums,
or "pallas", the GEMV kernel of countdown_jax/decode_projections.py), in that order.
Fast path = unstacked layers, the Pallas decode attention, the dense FFN in XLA, the
sparse FFN with implementation="pallas": at one token per device the fused kernel
(exact rule, no capacity), above it index lists of capacity 1.5 (1 - r) m (per shard
under tensor parallelism: ``SparseSpec.shard_capacity``, no extra communication).
"""

from __future__ import annotations

import dataclasses
import math

FIELDS = ["device", "n_devices", "mesh", "shape", "batch", "method", "mode",
          "implementation", "attention", "projections", "layers", "capacity_scope",
          "capacity_per_device",
          "sparsity", "sparsity_realised", "tokens_per_s", "ms_per_step",
          "x_dense_same_mesh", "x_one_device", "gb_per_s_per_device", "pct_of_read_ceiling",
          "check_rel_err", "compile_s", "note"]
PROFILE_FIELDS = ["mesh", "batch", "method", "layers", "projections", "device", "kernels",
                  "wall_us", "busy_us",
                  "idle_us", "compute_us", "collective_us", "collective_launches",
                  "exposed_collective_us", "steps"]
_MODES = {"dense": "-", "m_countdown": "threshold", "d_countdown": "predictor"}
CAPACITY = 1.5          # index lists (more than one token per device): x (1 - r) m


@dataclasses.dataclass(frozen=True)
class Row:
    """One timed configuration."""
    mesh: tuple[int, int]     # (data, model)
    batch: int
    method: str               # dense | m_countdown | d_countdown
    sparsity: float
    attention: str            # pallas | xla
    primer: bool = False      # compiled alone, first (GEMM autotuning on an idle GPU)
    layers: str = "unstacked"  # unstacked | fused_qkv (model.fuse_qkv, groups = model) |
                               # transposed (model.transpose_projections)
    projections: str = "xla"  # decode q/k/v/o: xla | pallas

    @property
    def label(self) -> str:
        return f"{self.mesh[0]}x{self.mesh[1]}"

    @property
    def tokens_per_device(self) -> int:
        return self.batch // self.mesh[0]


def plan(meshes, batches, methods, sparsities, xla_dense_batches=(1,),
         layer_forms=("unstacked",), projections=("xla",)):
    """The rows, in priority order (see the module docstring); steps 1-3 on the first
    layer form."""
    first, rest = [b for b in batches if b == 1], [b for b in batches if b != 1]
    first_batch = (first + rest)[0]
    form = layer_forms[0]
    rows = []
    for batch in first + rest:
        fits = [mh for mh in meshes if batch % mh[0] == 0]
        for method in methods:
            for r in ([0.0] if method == "dense" else sparsities):
                for proj in projections:
                    for mh in fits:
                        rows.append(Row(mh, batch, method, r, "pallas", layers=form,
                                        primer=(method == "dense" and batch == first_batch
                                                and proj == projections[0]),
                                        projections=proj))
    for batch in xla_dense_batches:
        if batch in batches and "dense" in methods:
            rows += [Row(mh, batch, "dense", 0.0, "xla", layers=form) for mh in meshes
                     if batch % mh[0] == 0]
    first_rows = [r for r in rows if r.batch == first_batch and r.attention == "pallas"]
    for other in layer_forms[1:]:
        rows += [dataclasses.replace(r, layers=other, primer=False) for r in first_rows]
    return rows


def sparse_spec(row: Row, m: int, SparseSpec):
    """(SparseSpec, capacity scope, capacity per device) of a row."""
    if row.method == "dense":
        return SparseSpec(), "-", ""
    n_model = row.mesh[1]
    if row.tokens_per_device == 1:           # the fused kernel: exact rule, no capacity
        return (SparseSpec(row.method, _MODES[row.method], implementation="pallas"),
                "none (fused)", "")
    cap = int(math.ceil(CAPACITY * (1 - row.sparsity) * m))
    shard_cap = int(math.ceil(CAPACITY * (1 - row.sparsity) * m / n_model))
    spec = SparseSpec(row.method, _MODES[row.method], implementation="pallas", capacity=cap,
                      shard_capacity=shard_cap if n_model > 1 else None)
    return spec, "shard" if n_model > 1 else "-", min(shard_cap if n_model > 1 else cap,
                                                      m // n_model)


def add_ratios(rows):
    """x dense on the same mesh, batch, attention, projections and layer form; x the same
    row on one device."""
    def key(r, **kw):
        return tuple({**r, **kw}.get(k) for k in ("mesh", "batch", "method", "attention",
                                                    "projections", "sparsity", "layers"))
    tps = {key(r): r["tokens_per_s"] for r in rows
           if isinstance(r.get("tokens_per_s"), float)}
    for r in rows:
        v = r.get("tokens_per_s")
        if not isinstance(v, float):
            continue
        dense = tps.get(key(r, method="dense", sparsity=0.0))
        one = tps.get(key(r, mesh="1x1"))
        r["x_dense_same_mesh"] = round(v / dense, 3) if dense else ""
        r["x_one_device"] = round(v / one, 3) if one and r["mesh"] != "1x1" else ""


def table(rows, profile, head: str) -> str:
    cols = ("mesh", "batch", "method", "layers", "attention", "projections", "capacity_scope",
            "capacity_per_device",
            "sparsity", "sparsity_realised", "tokens_per_s", "ms_per_step",
            "x_dense_same_mesh", "x_one_device", "gb_per_s_per_device",
            "pct_of_read_ceiling", "check_rel_err", "note")
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(k, "")) for k in cols) + " |" for r in rows]
    if profile:
        lines += ["", "Profile of one timed call (per decode step, per GPU): kernel time of "
                  "the collectives (it includes waiting for the other GPU) and of the "
                  "compute kernels; `exposed` = time only a collective was running; idle = "
                  "no kernel running (launch gaps, host round trips).", "",
                  "| mesh | batch | method | layers | projections | device | wall ms | busy ms | "
                  "idle ms | compute ms | collective ms | collectives | exposed collective ms |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in profile:
            n = p["steps"]
            ms = lambda k, p=p, n=n: f"{p[k] / n / 1e3:.3f}"
            lines.append(f"| {p['mesh']} | {p['batch']} | {p['method']} | "
                         f"{p.get('layers', 'unstacked')} | {p.get('projections', 'xla')} | "
                         f"{p['device']} | "
                         f"{ms('wall_us')} | {ms('busy_us')} | {ms('idle_us')} | "
                         f"{ms('compute_us')} | {ms('collective_us')} | "
                         f"{p['collective_launches'] / n:.0f} | "
                         f"{ms('exposed_collective_us')} |")
    return "\n".join(lines) + "\n"
