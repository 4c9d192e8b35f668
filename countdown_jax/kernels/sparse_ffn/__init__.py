from countdown_jax.kernels.sparse_ffn.api import sparse_ffn  # noqa: F401
