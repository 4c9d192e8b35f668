"""Per-kernel GPU time of one call from a profiler trace; the implementation lives in
``experiments.bench.profile`` (this name is kept for the README's and users' imports).

    from experiments.gpu_profile import profile_call
    rows, summary = profile_call(fn, *args)
"""

from experiments.bench.profile import chained, profile_call  # noqa: F401
