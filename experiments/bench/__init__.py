"""Benchmark harness shared by the experiments/bench_*.py entry scripts.

- ``shapes``: the paper models' MLP and decoder shapes (one place).
- ``harness``: the in-jit timing loop, medians, HBM ceilings, GB/s, CSV writing.
- ``profile``: per-kernel GPU time of one call from a profiler trace.
- ``ffn_*``: the sparse-FFN kernel benchmark (problem, variants, runner, plans, report).
- ``decode``: end-to-end decode timing shared by bench_decode and bench_spmd.
"""
