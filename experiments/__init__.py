"""Experiments: GPU benchmarks (``experiments.bench`` + thin entry scripts) and the quality
reproduction. Run the scripts from the repository root as modules
(``python -m experiments.bench_kernels``) or with the root on ``PYTHONPATH``."""
