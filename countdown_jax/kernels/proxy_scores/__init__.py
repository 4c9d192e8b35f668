"""|s_hat| of the low-bit proxy (countdown_jax.proxy) from its packed codes: reference, api
(implementation=), Pallas GPU."""
