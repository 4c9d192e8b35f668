"""Kernels, one folder per op: reference.py (plain JAX), api.py (implementation=), backends.

What the ops share - the implementation vocabulary, backend resolution, interpret mode and
the flat view of stacked weights - is ``_platform.py``; GPU tile helpers are
``_triton_tiles.py``. An op depends on gated / selection / proxy (the proxy's storage
format) and these two, never on another op's insides (it may call another op's public api).
"""
