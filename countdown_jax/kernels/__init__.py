"""Kernels, one folder per op: reference.py (plain JAX), api.py (implementation=), backends."""
