"""Sparse FFN with the selection inside the kernel: reference, api (implementation=), Pallas GPU."""
