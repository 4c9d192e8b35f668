"""Attention of one decode token per row against the KV cache: reference, api, Pallas GPU."""
